#pragma once
// Ring attention (sequence parallel; docs/attention.md, parallel variants): every rank holds some
// tokens of q, k and v (B, n_r, H, D); the K/V chunks travel around the ring and every rank merges
// the partial results of its queries against each arriving chunk by lse. The inner variant
// (config.inner_variant) is "dense" or "dilated" (both mixing modes, causal or not), and the
// result equals that variant on one device, forward and backward.
//
// Layout (config.ring_layout): "contiguous" gives rank r the tokens [r*N/P, (r+1)*N/P);
// "zigzag" cuts the sequence into 2P chunks and gives rank r chunks r and 2P-1-r (in that order in
// its tensors), so that under a causal mask every rank has the same amount of work.
//
// Each (query chunk, arriving key chunk) pair runs through the attention core of the fused layer
// (attention/fused/chunk_attention.h): the fused kernels, or the composed reference, chosen by
// config.impl and the one selector. Only the stream rows that meet are computed. Chunks travel only
// as far as some segment reaches: from lower ranks over the steps 1..up (received from r - 1) and,
// when segments also reach forward, from higher ranks over the steps 1..down (received from r + 1),
// with the fewest steps in all: the classic ring of P - 1 steps when every distance is needed, one
// step each way with segments barely crossing chunk edges, nothing with local aligned branches.
// In that last case (every rank's pieces hold whole segments) each rank runs the attention core
// once on its tokens with the inner variant's key set, as one device would (last_ring_run()).
//
// Transfers overlap compute: the next K/V chunk is on its way (Communicator::exchange) while the
// current one is computed on. Backward is one autograd node per ring call: with the final lse and
// delta = rowsum(dO * O) - dlse it recomputes every block and accumulates dQ locally and dK/dV into
// buffers that travel the ring behind their K/V chunk; at the end of each direction's pass every
// dK/dV buffer goes straight back to its owner.
#include <cstdint>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/fused/fused_attention.h"
#include "attention/fused/problem.h"
#include "tensor/tensor.h"
#include "nn/dist/communicator.h"

namespace longtape::attention {

enum class RingLayout : uint8_t { contiguous, zigzag };
RingLayout parse_ring_layout(const std::string& text);  // "contiguous" | "zigzag"
std::string ring_layout_name(RingLayout layout);

// Token ranges of P ranks sharing N tokens: rank r holds [r*N/P, (r+1)*N/P) (integer division), so
// the chunks differ by at most one token. Returns P + 1 boundaries. Needs N >= P >= 1.
std::vector<int64_t> sequence_chunk_starts(int64_t n, int64_t ranks);

// A run of tokens [start, start + length) of the sequence.
struct TokenRange {
  int64_t start = 0, length = 0;
  bool operator==(const TokenRange&) const = default;
};

// The token ranges rank `rank` of `ranks` holds under `layout`, in the order of its local tensors:
// one range (contiguous) or chunks r and 2P-1-r of sequence_chunk_starts(N, 2P) (zigzag, needs
// N >= 2P).
std::vector<TokenRange> ring_token_ranges(int64_t n, int64_t ranks, int64_t rank, RingLayout layout);
// Rank `rank`'s shard of x along `dim` (the sequence): its ranges, concatenated (a new tensor).
Tensor ring_shard(const Tensor& x, int64_t dim, int64_t ranks, int64_t rank, RingLayout layout);
// The inverse: the full sequence from every rank's shard (rank order) along `dim`.
Tensor ring_unshard(const std::vector<Tensor>& shards, int64_t dim, RingLayout layout);

// Throws (naming `who`) unless q, k and v are defined 4-d (batch, sequence, heads, head_dim)
// tensors of one shape: the shards of one sequence that the parallel variants take.
void check_qkv_shards(const Tensor& q, const Tensor& k, const Tensor& v, const char* who);

// The key set of a dense or dilated variant's config (its heads head_offset.. of total_heads), as
// the attention core takes it.
CoreKeys ring_keys(const AttentionConfig& config);

// Whether each of `ranges` of a sequence of `sequence` tokens holds whole segments of every branch
// of that key set for `num_heads` heads (dense: only the whole sequence; ChunkStreams::
// holds_whole_segments): then its queries meet no key outside it, and the key set run on its
// tokens alone gives exactly its rows of the sequence's result. The ring's local path rests on it.
bool holds_whole_segments(const AttentionConfig& config, int64_t num_heads, int64_t sequence,
                          const std::vector<TokenRange>& ranges);

// `field` of every rank's part, in rank order (the shards ring_unshard or a concatenation joins).
template <class Part>
std::vector<Tensor> each_rank(const std::vector<Part>& parts, Tensor Part::*field) {
  std::vector<Tensor> shards;
  shards.reserve(parts.size());
  for (const Part& part : parts) shards.push_back(part.*field);
  return shards;
}

// What a ring call ran. local: no query met a key of another rank's piece and every piece held
// whole segments of every branch, so no chunk travelled and each rank ran the attention core once
// on its tokens with the sequence's key set (key_set: dilated for a dilated inner variant; out
// written in the input dtype). Otherwise the ring ran, with up_steps and down_steps steps: its pairs as dense
// problems over stream blocks merged by lse (key_set: dense), except that a chunk against itself
// holding whole segments runs as one problem with the key set (chunk_attention.h).
struct RingRun {
  bool local = false;
  fused::KeySet key_set = fused::KeySet::dense;
  int64_t up_steps = 0, down_steps = 0;
};
// The last ring call's run in this process (for tests and reports).
RingRun last_ring_run();

// Most score elements one block of the composed ring path forms at once (default 2^22, as the
// composed path elsewhere); larger blocks are computed in pieces of whole segments, then of query
// runs (the fused kernels form no scores). Returns the previous value. Process-wide; for memory
// tuning and tests.
int64_t set_ring_score_budget(int64_t elements);

// Rank-local ring attention: q, k, v are this rank's tokens (B, n_r, H, D) under config.ring_layout
// (contiguous: chunks in rank order, lengths exchanged here; zigzag: ring_token_ranges). Returns
// this rank's out (B, n_r, H, D) and lse (B, H, n_r). Differentiable: every rank must call backward
// through it (see nn/dist/functional.h), inside the run_ranks body.
AttentionOutput ring_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                               const Tensor& k, const Tensor& v);

// The registered variant "ring". Inside run_ranks, forward takes this rank's shards and uses the
// rank's communicator. Called anywhere else, forward takes the full (B, N, H, D) tensors and runs
// config.ranks ranks as threads of an in-process group (sharded by config.ring_layout), returning
// the full result (what `longtape bench` and `longtape train` use).
class RingAttention : public Attention {
 public:
  // Reads ranks, ring_layout, impl, inner_variant ("dense" or "dilated") and what that variant
  // reads. Throws on an invalid config. Attention dropout is not supported (an error in training
  // mode when set).
  explicit RingAttention(AttentionConfig config);
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "ring"; }
};

}  // namespace longtape::attention
