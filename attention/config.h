#pragma once
// One configuration for every attention variant (see docs/attention.md). Fields a variant does not
// use are ignored by it; validate() checks the ones it does.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace longtape::attention {

enum class Mixing { lse, head_groups };

struct AttentionConfig {
  int64_t num_heads = 8;
  int64_t head_dim = 64;
  // dilated
  std::vector<int64_t> segment_lengths{2048};
  std::vector<int64_t> dilation_rates{1};
  Mixing mixing = Mixing::lse;
  bool causal = false;
  std::optional<double> softmax_scale;  // default 1/sqrt(head_dim)
  double dropout = 0.0;                 // attention-probability dropout (training only)
  // Implementation of the attention core: "auto" (fused kernels where supported, else the
  // composed path), "fused" (fused or an error saying why not) or "composed".
  std::string impl = "auto";
  // block-sparse
  std::string pattern = "local_window";  // all, local_window, dilated, global_local, random, adaptive
  int64_t block_size = 64;
  double density = 0.25;
  int64_t window = 256;
  int64_t global_blocks = 1;
  uint64_t seed = 0;
  // ordering
  std::string order = "natural";     // natural | hilbert
  std::string grid;                  // "HxW" for hilbert; empty = square
  std::string schedule = "natural";  // natural | hilbert (block-sparse only)
  // parallel
  std::string parallel = "none";  // none | ring | head
  int64_t ranks = 1;
  // ring: which tokens each rank holds: "contiguous" (rank r: [r*N/P, (r+1)*N/P)) or "zigzag"
  // (chunks r and 2P-1-r of 2P: the same causal work on every rank).
  std::string ring_layout = "contiguous";
  std::string inner_variant = "dilated";  // the core variant a wrapper (hilbert, ring, head) runs
  // head_parallel: into how many groups each rank splits its heads, so that the all-to-alls of one
  // group travel while the core runs another (1 = no overlap; 0 = chosen from the head count).
  int64_t pipeline_groups = 0;
  // head_parallel: a pipeline over token chunks instead, for patterns whose segments never cross a
  // chunk: K steps, each running all of the rank's heads on N / K tokens. 0 = automatic (token
  // chunks where the pattern allows and pipeline_groups is 0, else head groups), 1 = never, K >= 2
  // = K steps where the pattern allows (else head groups).
  int64_t token_chunks = 0;
  // Their layout: "one_rank" (each step runs one rank's chunk, each rank's own chunks first and
  // last, so the first core waits for no transfer and the last sends nothing back; K a multiple of
  // the ranks P, or P + 1: one chunk per rank, its own taken in two halves of N / 2P tokens; else
  // every_rank runs) or "every_rank" (step g runs chunk g of every rank).
  std::string token_chunk_layout = "one_rank";
  // A variant that runs on a slice of the heads (head_parallel gives each rank H/P of them) is told
  // the global index of its first head and the total head count, so that dilation offsets (h mod r)
  // and head groups follow the global head indices, exactly as on one device.
  int64_t head_offset = 0;
  int64_t total_heads = 0;  // 0 = num_heads

  double scale() const;
};

Mixing parse_mixing(const std::string& text);  // "lse" | "head_groups"
std::string mixing_name(Mixing m);
// Parses "2048,4096" into {2048, 4096}; throws on malformed text.
std::vector<int64_t> parse_int_list(const std::string& text, const char* what);

}  // namespace longtape::attention
