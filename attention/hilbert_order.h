#pragma once
// Hilbert token ordering (docs/attention.md, Hilbert ordering) around any registered attention
// variant: the tokens of q, k and v are laid row-major on a grid (config.grid = "HxW", or a square
// side x side grid when empty, which needs N to be a perfect square), re-ordered along the Hilbert
// curve of that grid, attended by the inner variant, and the output (and lse) are put back in the
// original order. The gathers are index_select, whose backward is the exact scatter, so the
// gradients are those of the permuted function. Dense non-causal attention is unchanged by the
// ordering (permutation equivariance); every other variant sees a different neighbourhood structure
// (2-D neighbours stay close in 1-D).
#include <memory>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "tensor/tensor.h"

namespace longtape::attention {

class HilbertOrderAttention : public Attention {
 public:
  // Builds the inner variant with make_attention(config.inner_variant, config) (with order set to
  // natural); it is registered as the child module "inner", so its parameters belong to this one.
  explicit HilbertOrderAttention(AttentionConfig config);
  // q, k, v (B, N, H, D) with one length N (the ordering is of one token grid).
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "hilbert"; }
  Attention& inner() const { return *inner_; }
  // perm[i] = original position of the i-th token along the curve, for N tokens and config.grid.
  std::vector<int64_t> permutation(int64_t n) const;

 private:
  std::shared_ptr<Attention> inner_;
};

// Wraps `inner` in the Hilbert ordering when config.order == "hilbert"; returns it unchanged when
// config.order == "natural"; throws on any other order.
std::shared_ptr<Attention> apply_token_order(const std::string& inner, const AttentionConfig& config);

}  // namespace longtape::attention
