#pragma once
// Dense softmax attention, causal or not, on the composed path: queries are processed in
// chunks (StreamOptions::max_score_elements), so the transient scores stay bounded; the tape keeps
// the B x H x N x Nk probabilities, as any dense attention backward must.
#include "attention/attention.h"

namespace longtape::attention {

class DenseAttention : public Attention {
 public:
  // Reads num_heads, head_dim, causal, softmax_scale and dropout (applied in training mode only).
  explicit DenseAttention(AttentionConfig config);
  // q (B, Nq, H, D), k and v (B, Nk, H, D); causal needs Nq == Nk.
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "dense"; }
};

}  // namespace longtape::attention
