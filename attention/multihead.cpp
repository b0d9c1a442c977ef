#include "attention/multihead.h"

#include <cmath>

#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/precision.h"
#include "tensor/profiler.h"

namespace longtape::attention {

namespace {

// Xavier-normal (Glorot) for an x W weight of shape (fan_in, fan_out): std = gain sqrt(2 / (in + out)).
Tensor xavier_normal(int64_t fan_in, int64_t fan_out, double gain, DType dtype, Device device) {
  const double std = gain * std::sqrt(2.0 / static_cast<double>(fan_in + fan_out));
  return mul(Tensor::randn({fan_in, fan_out}, DType::f64), std).to(dtype).to(device);
}

MultiheadAttentionOptions make_options(int64_t embed_dim, int64_t num_heads, std::string variant,
                                       AttentionConfig config, bool fused_qkv, bool sub_layernorm, double gamma,
                                       bool bias) {
  MultiheadAttentionOptions o;
  o.embed_dim = embed_dim;
  o.num_heads = num_heads;
  o.variant = std::move(variant);
  o.attention = std::move(config);
  o.fused_qkv = fused_qkv;
  o.sub_layernorm = sub_layernorm;
  o.gamma = gamma;
  o.bias = bias;
  return o;
}

// residual + x w + b for an x w weight (fan_in, fan_out): one linear node (bias and residual in the
// product's epilogue) for f32/f64 weights; separate ops otherwise.
Tensor project_rows(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& residual, DType out_dtype) {
  if (w.dtype() == DType::f32 || w.dtype() == DType::f64) return linear(x, w.transpose(0, 1), b, residual, out_dtype);
  Tensor y = matmul(x, w);
  if (b.defined()) y = add(y, b);
  return residual.defined() ? add(residual, y) : y;
}

}  // namespace

MultiheadAttention::MultiheadAttention(int64_t embed_dim, int64_t num_heads, std::string variant,
                                       AttentionConfig config, bool fused_qkv, bool sub_layernorm, double gamma,
                                       bool bias)
    : MultiheadAttention(make_options(embed_dim, num_heads, std::move(variant), std::move(config), fused_qkv,
                                      sub_layernorm, gamma, bias)) {}

MultiheadAttention::MultiheadAttention(MultiheadAttentionOptions options) : options_(std::move(options)) {
  const int64_t e = options_.embed_dim, h = options_.num_heads;
  LT_CHECK(e > 0, "MultiheadAttention: embed_dim must be > 0, got ", e);
  LT_CHECK(h > 0, "MultiheadAttention: num_heads must be > 0, got ", h);
  LT_CHECK(e % h == 0, "MultiheadAttention: embed_dim (", e, ") must be divisible by num_heads (", h, ")");
  LT_CHECK(std::isfinite(options_.gamma) && options_.gamma > 0, "MultiheadAttention: gamma must be finite and > 0, got ",
           options_.gamma);
  LT_CHECK(options_.layer_norm_eps >= 0, "MultiheadAttention: layer_norm_eps must be >= 0, got ",
           options_.layer_norm_eps);
  LT_CHECK(is_floating(options_.dtype), "MultiheadAttention: dtype must be floating, got ",
           dtype_name(options_.dtype));
  head_dim_ = e / h;
  options_.attention.num_heads = h;
  options_.attention.head_dim = head_dim_;
  core_ = register_module("attention", make_attention(options_.variant, options_.attention));

  NoGradGuard no_grad;
  const DType dt = options_.dtype;
  const Device dev = options_.device;
  const double gamma = options_.gamma;
  if (options_.fused_qkv) {
    Tensor w = cat({xavier_normal(e, e, 1.0, dt, dev), xavier_normal(e, e, 1.0, dt, dev),
                    xavier_normal(e, e, gamma, dt, dev)},
                   1);
    w_qkv = register_parameter("qkv_weight", w);
    if (options_.bias) b_qkv = register_parameter("qkv_bias", Tensor::zeros({3 * e}, dt, dev));
  } else {
    w_q = register_parameter("q_weight", xavier_normal(e, e, 1.0, dt, dev));
    w_k = register_parameter("k_weight", xavier_normal(e, e, 1.0, dt, dev));
    w_v = register_parameter("v_weight", xavier_normal(e, e, gamma, dt, dev));
    if (options_.bias) {
      b_q = register_parameter("q_bias", Tensor::zeros({e}, dt, dev));
      b_k = register_parameter("k_bias", Tensor::zeros({e}, dt, dev));
      b_v = register_parameter("v_bias", Tensor::zeros({e}, dt, dev));
    }
  }
  if (options_.sub_layernorm) {
    ln_weight = register_parameter("norm_weight", Tensor::ones({e}, dt, dev));
    ln_bias = register_parameter("norm_bias", Tensor::zeros({e}, dt, dev));
  }
  w_out = register_parameter("out_weight", xavier_normal(e, e, gamma, dt, dev));
  if (options_.bias) b_out = register_parameter("out_bias", Tensor::zeros({e}, dt, dev));
  if (options_.key_shift) key_shift = register_parameter("key_shift", Tensor::zeros({e}, dt, dev));
}

void MultiheadAttention::check_input(const Tensor& x, const char* what) const {
  LT_CHECK(x.defined() && x.dim() == 3 && x.size(2) == options_.embed_dim, "MultiheadAttention: ", what,
           " must be (batch, sequence, embed_dim = ", options_.embed_dim, "), got ",
           x.defined() ? shape_str(x.shape()) : std::string("undefined"));
}

Tensor MultiheadAttention::project(const Tensor& x, int which) const {
  const int64_t e = options_.embed_dim;
  Tensor w, b;
  if (options_.fused_qkv) {
    w = w_qkv.narrow(1, which * e, e);
    if (b_qkv.defined()) b = b_qkv.narrow(0, which * e, e);
  } else {
    w = which == 0 ? w_q : which == 1 ? w_k : w_v;
    b = which == 0 ? b_q : which == 1 ? b_k : b_v;
  }
  return project_rows(x, w, b, Tensor(), w.dtype());
}

Tensor MultiheadAttention::smear(const Tensor& k) const {
  const int64_t n = k.size(1);
  if (!key_shift.defined() || n < 2) return k;
  // The key before each position (zeros before the first), mixed in by the learned gate.
  Tensor previous = cat({Tensor::zeros({k.size(0), 1, k.size(2)}, k.dtype(), k.device()), k.narrow(1, 0, n - 1)}, 1);
  return add(k, mul(sigmoid(key_shift), sub(previous, k)));
}

Tensor MultiheadAttention::attend(const Tensor& q, const Tensor& k_unshifted, const Tensor& v, const Tensor& residual) {
  const int64_t h = options_.num_heads;
  const Tensor k = smear(k_unshifted);
  // Under bf16 precision the core reads bf16 q, k, v (on CUDA: the fused bf16 kernels); the casts'
  // backward hands f32 gradients to the projections.
  const bool low = autocast_precision() == Precision::bf16 && (q.dtype() == DType::f32 || q.dtype() == DType::bf16);
  auto heads = [&](const Tensor& t) {
    const Tensor operand = low && t.dtype() == DType::f32 ? bf16_operand(t) : t;
    return operand.reshape({t.size(0), t.size(1), h, head_dim_});
  };
  Tensor o;
  {
    profiler::Scope scope("attention core forward", 4 * q.numel() * static_cast<int64_t>(dtype_size(q.dtype())));
    o = core_->forward(heads(q), heads(k), heads(v));
    // A bf16 output enters the output projection as it is (matmul lowers only w_out), so no f32
    // copy is made and the product saves the core's own output tensor.
    if (low && (options_.sub_layernorm || o.dtype() != DType::bf16)) o = f32_activation(o);
  }
  Tensor merged = o.reshape({o.size(0), o.size(1), options_.embed_dim});
  // Under bf16 the sub-LayerNorm writes the output projection's bf16 operand directly.
  if (options_.sub_layernorm)
    merged = layer_norm(merged, ln_weight, ln_bias, options_.layer_norm_eps,
                        low && merged.dtype() == DType::f32 ? std::optional<DType>(DType::bf16) : std::nullopt);
  return project_rows(merged, w_out, b_out, residual, w_out.dtype());
}

Tensor MultiheadAttention::forward(const Tensor& x) { return forward_residual(x, Tensor()); }

Tensor MultiheadAttention::forward_residual(const Tensor& x, const Tensor& residual) {
  check_input(x, "x");
  // One (E, 3E) product for all three projections (separate weights are joined for it: x is read
  // once and has one gradient), the bias in its epilogue. Under bf16 (without smeared keys, which
  // mix k in f32) it writes q, k and v in bf16, which enter the core as strided views; split's
  // backward gathers their gradients in one buffer.
  const Tensor w = options_.fused_qkv ? w_qkv : cat({w_q, w_k, w_v}, 1);
  const Tensor b = options_.fused_qkv ? b_qkv : b_q.defined() ? cat({b_q, b_k, b_v}, 0) : Tensor();
  const bool low_qkv = lowers_to_bf16(autocast_precision(), w.dtype()) && !key_shift.defined();
  const Tensor qkv = project_rows(x, w, b, Tensor(), low_qkv ? DType::bf16 : w.dtype());
  const std::vector<Tensor> parts = split(qkv, options_.embed_dim, 2);
  return attend(parts[0], parts[1], parts[2], residual);
}

Tensor MultiheadAttention::forward(const Tensor& query, const Tensor& key, const Tensor& value) {
  check_input(query, "query");
  check_input(key, "key");
  check_input(value, "value");
  LT_CHECK(key.shape() == value.shape(), "MultiheadAttention: key and value must have the same shape, got key ",
           shape_str(key.shape()), ", value ", shape_str(value.shape()));
  LT_CHECK(query.size(0) == key.size(0), "MultiheadAttention: query and key must have the same batch size, got query ",
           shape_str(query.shape()), ", key ", shape_str(key.shape()));
  return attend(project(query, 0), project(key, 1), project(value, 2));
}

}  // namespace longtape::attention
