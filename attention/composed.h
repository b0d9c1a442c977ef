#pragma once
// Building blocks of the composed attention path: every variant of docs/attention.md written with
// ordinary differentiable tensor ops (matmul, softmax, gather, index_select, cat, elementwise), so
// autograd gives its exact gradients and it runs wherever those ops run (CPU f32/f64, CUDA
// f32/bf16). It is the reference the fused kernels are checked against, and the fallback where
// there is none.
//
// Memory: scores are only ever formed for one chunk of queries of one group of streams at a time
// (at most StreamOptions::max_score_elements of them), so the transient peak is bounded. What the
// tape keeps for backward is one probability matrix per stream, i.e. O(N * L) for streams of
// length L: linear in N for dilated attention, quadratic only for dense attention.
#include <cstdint>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/config.h"
#include "tensor/tensor.h"

namespace longtape::attention {

// Throws unless the fields every core variant uses are valid: num_heads > 0, head_dim > 0, a
// finite positive softmax scale, dropout in [0, 1). `variant` names the variant in the message.
void validate_core_config(const AttentionConfig& config, const std::string& variant);

// The dtype the composed path computes in: f64 for f64 inputs, f32 otherwise (bf16 is upcast, so
// scores, softmax and lse are f32).
DType compute_dtype(DType input);

struct StreamOptions {
  double scale = 1.0;
  bool causal = false;  // key j visible to query i only when j <= i (needs Lq == Lk)
  double dropout = 0.0;  // probability dropout applied to P before P V (0 = none)
  // Upper bound on the number of score elements formed at once; queries (and then streams) are
  // split into chunks to stay below it.
  int64_t max_score_elements = int64_t{1} << 22;
};

// Output and row log-sum-exp of one attention computation.
struct OutLse {
  Tensor out;  // (..., L, D)
  Tensor lse;  // (..., L): out's shape without the last dim; -inf where a row sees no key
};

// Softmax attention of independent streams in row layout: q (..., Lq, D), k and v (..., Lk, D)
// with equal leading (batch) dims; every leading index is one stream. Returns out (..., Lq, D) and
// lse (..., Lq) in q's dtype. lse is computed as S[i, m] - log P[i, m] at the row maximum m: the
// exact value and gradient of logsumexp, while the tape keeps only P (not a second N x L tensor).
OutLse attend_rows(const Tensor& q, const Tensor& k, const Tensor& v, const StreamOptions& options);

// The same in the attention layout: q (B', Lq, H', D), k and v (B', Lk, H', D); returns out
// (B', Lq, H', D) and lse (B', H', Lq). Dense attention is this on the whole sequence.
AttentionOutput stream_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const StreamOptions& options);

// Rows `positions` of x along `dim` (index_select; a view when they form one contiguous range).
// The backward is index_add, so repeated positions accumulate.
Tensor gather_rows(const Tensor& x, int64_t dim, const std::vector<int64_t>& positions);

// The inverse of gather_rows for distinct positions: `pieces` are concatenated along `dim` (their
// rows belong, in order, to `positions`, which must be distinct and in [0, n)); returns a tensor of
// length n along `dim` holding each row at its position and `fill` at every other position. It is
// an index_select from the concatenation plus one padding row, so it is differentiable (the
// padding row is a constant: uncovered positions get no gradient).
Tensor scatter_rows(const std::vector<Tensor>& pieces, int64_t dim, const std::vector<int64_t>& positions,
                    int64_t n, double fill);

// Merges partial results over key sets through their lse (docs/attention.md, lse mixing):
//   O = sum_i exp(lse_i - lse) O_i,  lse = logsumexp_i lse_i.
// Rows where every lse_i is -inf give O = 0, lse = -inf and zero gradient, with no NaN in the
// forward or backward. Parts must share shapes, dtype and device.
OutLse merge_rows_by_lse(const std::vector<OutLse>& parts);

// The same for results in the attention layout: out (B, N, H, D), lse (B, H, N). Computes in the
// lse dtype; the merged out has the parts' out dtype.
AttentionOutput merge_by_lse(const std::vector<AttentionOutput>& parts);

}  // namespace longtape::attention
