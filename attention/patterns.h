#pragma once
// Which keys each query sees, for every sparse variant of docs/attention.md: dilated streams,
// head groups and block-sparse patterns. Plain index arithmetic on std::vector, shared
// by the composed reference path, the fused kernels (which receive the lists built here) and the
// float64 test oracle, so all of them agree on one definition.
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace longtape::attention {

// ---------------------------------------------------------------------------------------------
// Dilated attention

// One branch of dilated attention: segments of `segment` tokens, every `dilation`-th token.
struct DilatedBranch {
  int64_t segment = 0;
  int64_t dilation = 1;
};

// Throws unless there is at least one branch and every segment and dilation is > 0.
void validate_branches(const std::vector<DilatedBranch>& branches);

// Segment length actually used for a sequence of n tokens: a segment longer than n means n.
int64_t effective_segment(int64_t n, int64_t segment);

// Number of segments of length `segment` covering n tokens (the last one may be shorter).
int64_t num_segments(int64_t n, int64_t segment);

// The stream of every segment for one offset: result[t] lists, increasing, the positions
// t*w + offset + j*dilation that lie inside segment t = [t*w, min((t+1)*w, n)), w the effective
// segment. result[t] is empty when the offset is not smaller than that segment's length.
// Requires n >= 0, segment > 0, dilation > 0 and 0 <= offset < dilation.
std::vector<std::vector<int64_t>> dilated_streams(int64_t n, int64_t segment, int64_t dilation,
                                                  int64_t offset);

// Offset of head h in a branch with dilation r for mixing = lse: h mod r.
int64_t lse_head_offset(int64_t head, int64_t dilation);

// ---------------------------------------------------------------------------------------------
// Head groups: H heads in G contiguous groups, sizes H / G, the first H % G one larger.

std::vector<int> head_group_sizes(int num_heads, int num_groups);
// First head of group g.
int head_group_start(int group, int num_heads, int num_groups);
// Group of head h.
int head_group_of(int head, int num_heads, int num_groups);

// ---------------------------------------------------------------------------------------------
// Block-sparse patterns

enum class BlockPattern { all, local_window, dilated, global_local, random };

// "all", "local_window", "dilated", "global_local", "random".
std::string_view to_string(BlockPattern pattern);
BlockPattern parse_block_pattern(std::string_view name);
const std::vector<BlockPattern>& all_block_patterns();

struct BlockPatternOptions {
  int64_t block_size = 64;
  int64_t window = 256;                        // tokens; W = window / block_size / 2 blocks
  std::vector<int64_t> dilation_rates{1, 2, 4};  // block distances for `dilated`
  int64_t global_blocks = 1;                   // leading blocks for `global_local`
  double density = 0.25;                       // fraction of key blocks kept by `random`
  uint64_t seed = 0;                           // `random` draws from (seed, head, query block)
  bool causal = false;                         // drop key blocks J > I
};

// Throws with a clear message on block_size <= 0, window < 0, global_blocks < 0,
// density outside (0, 1], or a dilation rate <= 0.
void validate(const BlockPatternOptions& options);

// Number of blocks covering n tokens (the last block may be shorter).
int64_t num_blocks_for(int64_t n, int64_t block_size);

// Half width, in blocks, of the local window: window / block_size / 2.
int64_t local_window_blocks(const BlockPatternOptions& options);

// Key blocks kept per query block by `random` before the causal limit:
// max(1, round(density * num_blocks)).
int64_t random_blocks_per_row(int64_t num_blocks, double density);

// For every query block I, the sorted list of active key blocks J. Only `random` depends on
// `head` (each head draws its own blocks); the others are the same for every head.
// `random` keeps the diagonal block plus distinct others drawn with a counter-based generator
// keyed by (seed, head, I): identical on every platform and compiler. When causal only J <= I
// are candidates, so a row keeps min(I + 1, random_blocks_per_row) blocks.
using BlockLists = std::vector<std::vector<int64_t>>;
BlockLists block_pattern(BlockPattern pattern, int64_t num_blocks,
                         const BlockPatternOptions& options, int64_t head = 0);

// The (I, J) pairs of a pattern ordered along a Hilbert curve over the (I, J) grid, so that
// consecutive pairs share query or key blocks (cache locality). Same set of pairs as the
// natural row-by-row order; only the processing order differs.
std::vector<std::pair<int64_t, int64_t>> natural_block_schedule(const BlockLists& pattern);
std::vector<std::pair<int64_t, int64_t>> hilbert_block_schedule(const BlockLists& pattern);

// Total number of (I, J) pairs of a pattern.
int64_t count_pairs(const BlockLists& pattern);

// ---------------------------------------------------------------------------------------------
// Deterministic randomness, identical on every platform.

// One splitmix64 step: a bijective 64-bit mix, used as a counter-based generator.
uint64_t splitmix64(uint64_t x);
// Uniform draw in [0, bound) from the counter `counter` of the stream keyed by `key`.
// bound > 0. (The modulo bias is below bound / 2^64.)
uint64_t keyed_uniform(uint64_t key, uint64_t counter, uint64_t bound);

}  // namespace longtape::attention
