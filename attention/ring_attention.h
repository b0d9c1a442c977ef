#pragma once
// Ring attention (sequence parallel; docs/attention.md, parallel variants): rank r of P holds the
// tokens [start_r, start_{r+1}) of q, k and v (B, n_r, H, D); the K/V chunks travel around the ring
// and every rank merges the partial results of its queries against each arriving chunk by lse. The
// inner variant (config.inner_variant) is "dense" or "dilated" (both mixing modes, causal or not),
// and the result equals that variant on one device, forward and backward.
//
// Dilated attention in the ring: lse mixing is ONE softmax over the multiset of keys a query sees
// in all branches (docs/attention.md, lse mixing), so each (branch, head offset, key chunk)
// contributes a partial result that merges by lse like any other. For a pair (query chunk, key
// chunk) only the segments that overlap both chunks are computed, and only the stream rows inside
// them (strided views, no gather copies). Branches whose segments lie inside one chunk are thus
// local (they only produce work when the chunk meets itself). Chunks travel only as far as some
// segment reaches: from lower ranks over the steps 1..up (received from r - 1), and, when segments
// also reach forward (non-causal), from higher ranks over the steps 1..down (received from r + 1),
// choosing up and down with the fewest steps in all. When every distance is needed that is the
// classic one-way ring of P - 1 steps; with segments barely crossing chunk edges, one step each
// way; with only local, aligned branches no K/V moves at all. Whole chunks travel, not only the
// stream rows: the dilated rows of a segment are a strided view of the chunk, and one chunk serves
// every branch. head_groups mixing: group g's heads see branch g only; out is scaled by 1/G.
//
// Causal: a chunk from a later rank is skipped, and within the diagonal chunk keys after the query
// are masked by their stream index.
//
// Backward is one autograd node per ring call: with the final lse it recomputes every block's
// probabilities P = exp(S - lse), accumulates dQ locally and dK/dV into buffers that travel the
// ring with their K/V chunk (dS = P * (dP - rowsum(dO * O)) with the lse gradient folded
// in); at the end of each direction's pass every dK/dV buffer goes straight back to its owner.
#include <cstdint>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "nn/dist/communicator.h"

namespace longtape::attention {

// Token ranges of P ranks sharing N tokens: rank r holds [r*N/P, (r+1)*N/P) (integer division), so
// the chunks differ by at most one token. Returns P + 1 boundaries. Needs N >= P >= 1.
std::vector<int64_t> sequence_chunk_starts(int64_t n, int64_t ranks);

// Most score elements one block of the ring forms at once (default 2^22, as the composed path);
// larger blocks are computed in pieces of whole segments, then of query runs. Returns the previous
// value. Process-wide; for memory tuning and tests.
int64_t set_ring_score_budget(int64_t elements);

// Rank-local ring attention: q, k, v are this rank's tokens (B, n_r, H, D); the ranks' chunks lie in
// rank order (rank r's first token is the sum of the lengths of ranks < r, exchanged here). Returns
// this rank's out (B, n_r, H, D) and lse (B, H, n_r). Differentiable: every rank must call backward
// through it (see nn/dist/functional.h), inside the run_ranks body.
AttentionOutput ring_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                               const Tensor& k, const Tensor& v);

// The registered variant "ring". Inside run_ranks, forward takes this rank's shards and uses the
// rank's communicator. Called anywhere else, forward takes the full (B, N, H, D) tensors and runs
// config.ranks ranks as threads of an in-process group, returning the full result (what `longtape
// bench` and `longtape train` use).
class RingAttention : public Attention {
 public:
  // Reads ranks, inner_variant ("dense" or "dilated") and what that variant reads. Throws on an
  // invalid config. Attention dropout is not supported (an error in training mode when set).
  explicit RingAttention(AttentionConfig config);
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "ring"; }
};

}  // namespace longtape::attention
