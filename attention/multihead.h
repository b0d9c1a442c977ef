#pragma once
// Multihead attention layer (docs/attention.md, multihead layer) around any core variant:
//   x (B, N, E) -> q, k, v = x W_q + b_q, ... (or one fused W_qkv (E, 3E)) -> (B, N, H, D)
//   -> core attention -> (B, N, E) -> optional sub-LayerNorm(E) (MAGNETO) -> out projection.
// Under a bf16 AutocastScope (tensor/precision.h) the core reads bf16 q, k, v and returns f32.
// Weights are stored (in, out) and applied as x W, as docs/attention.md writes them. MAGNETO init:
// xavier-normal with gain 1 for W_q and W_k, gain `gamma` for W_v and W_out, biases 0; a fused
// W_qkv is initialised block by block as the three separate matrices would be. With key_shift,
// each key channel c becomes k_t + sigmoid(s_c) (k_{t-1} - k_t) (smeared keys, s = 0 at init):
// one head can then match a query against the token *before* a key, which is how a single
// attention layer looks up "the value after this key" (associative recall).
#include <memory>
#include <string>

#include "attention/attention.h"
#include "attention/config.h"
#include "nn/layers.h"
#include "nn/module.h"

namespace longtape::attention {

struct MultiheadAttentionOptions {
  int64_t embed_dim = 512;
  int64_t num_heads = 8;               // head_dim = embed_dim / num_heads
  std::string variant = "dilated";     // any name of registered_attention_names()
  AttentionConfig attention;           // its num_heads and head_dim are set from the two above
  bool fused_qkv = false;              // one (E, 3E) projection instead of three (E, E)
  bool sub_layernorm = true;           // LayerNorm(E) before the out projection (MAGNETO)
  double layer_norm_eps = 1e-5;
  double gamma = 1.0;                  // MAGNETO init gain of W_v and W_out
  bool bias = true;                    // projection biases
  bool key_shift = false;              // smeared keys (above): a learned gate per key channel
  DType dtype = DType::f32;
  Device device = Device::cpu();
};

class MultiheadAttention : public nn::TokenMixer {
 public:
  explicit MultiheadAttention(MultiheadAttentionOptions options);
  // The same with the common settings in order (parameters f32 on the CPU; use to() to move them).
  MultiheadAttention(int64_t embed_dim, int64_t num_heads, std::string variant = "dilated",
                     AttentionConfig config = {}, bool fused_qkv = false, bool sub_layernorm = true,
                     double gamma = 1.0, bool bias = true);

  // Self-attention: x (B, N, E) -> (B, N, E).
  Tensor forward(const Tensor& x) override;
  // residual + forward(x), the residual entering the output projection's product.
  Tensor forward_residual(const Tensor& x, const Tensor& residual) override;
  // Self-attention reads x in one q/k/v product, so x has one use and one gradient.
  bool reads_bf16_under_autocast() const override { return true; }
  // Cross-attention: query (B, Nq, E), key and value (B, Nk, E) -> (B, Nq, E). The core variant
  // decides which Nq, Nk it accepts (dense: any; dilated: Nq == Nk).
  Tensor forward(const Tensor& query, const Tensor& key, const Tensor& value);

  const MultiheadAttentionOptions& options() const { return options_; }
  Attention& core() { return *core_; }
  std::string type_name() const override { return "MultiheadAttention(" + options_.variant + ")"; }

  // Parameters (undefined when not used by this configuration).
  Tensor w_q, w_k, w_v, b_q, b_k, b_v;  // separate projections, (E, E) and (E)
  Tensor w_qkv, b_qkv;                  // fused projection, (E, 3E) and (3E)
  Tensor w_out, b_out;                  // (E, E) and (E)
  Tensor ln_weight, ln_bias;            // sub-LayerNorm, (E)
  Tensor key_shift;                     // gate logits of the smeared keys, (E)

 private:
  Tensor project(const Tensor& x, int which) const;  // which: 0 = q, 1 = k, 2 = v
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& residual = Tensor());
  Tensor smear(const Tensor& k) const;  // k (B, N, E) with the key_shift gate applied
  void check_input(const Tensor& x, const char* what) const;

  MultiheadAttentionOptions options_;
  int64_t head_dim_ = 0;
  std::shared_ptr<Attention> core_;
};

}  // namespace longtape::attention
