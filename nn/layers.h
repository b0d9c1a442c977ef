#pragma once
// Standard layers on top of Module: Linear, LayerNorm, Embedding, Dropout, GELU, MLP, ModuleList
// and the pre-LN TransformerBlock, which takes its attention (any TokenMixer) from whoever builds
// it (models/ wires in attention::MultiheadAttention). Parameter names follow PyTorch ("weight",
// "bias") so state dicts read like PyTorch's. Initialisation draws from the default generator
// (manual_seed).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "nn/module.h"
#include "tensor/ops.h"

namespace longtape::nn {

// y = x W^T + b with W of shape (out_features, in_features), as in PyTorch. Init: W and b uniform
// in [-1/sqrt(in), 1/sqrt(in)] (PyTorch's kaiming_uniform(a=sqrt(5)) bound).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true);
  Tensor forward(const Tensor& x);  // (..., in) -> (..., out)
  Tensor project(const Tensor& x);  // x W^T without the bias (for a fused bias + activation)
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  std::string type_name() const override { return "Linear"; }

  Tensor weight;
  Tensor bias;  // undefined without bias

 private:
  int64_t in_features_, out_features_;
};

// Normalises over the last dim; weight = 1, bias = 0 initially.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool affine = true);
  Tensor forward(const Tensor& x);
  // The result in out_dtype: x's dtype, or bf16 from f32 x (the operand of a bf16 product).
  Tensor forward(const Tensor& x, DType out_dtype);
  // {residual, normalised} of layer_norm_residual: x handed on (no copy) for a pre-LN residual
  // block, whose gradient the layer-norm backward adds in its own pass.
  std::pair<Tensor, Tensor> forward_residual(const Tensor& x, std::optional<DType> out_dtype = std::nullopt);
  std::string type_name() const override { return "LayerNorm"; }

  Tensor weight;  // undefined when !affine
  Tensor bias;

 private:
  void check_input(const Tensor& x) const;

  int64_t dim_;
  double eps_;
};

// Lookup table (num_embeddings, dim), initialised N(0, init_std^2).
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, double init_std = 1.0);
  Tensor forward(const Tensor& indices);  // i32/i64 (...) -> (..., dim)
  int64_t num_embeddings() const { return num_embeddings_; }
  int64_t dim() const { return dim_; }
  std::string type_name() const override { return "Embedding"; }

  Tensor weight;

 private:
  int64_t num_embeddings_, dim_;
};

// Zeroes elements with probability p while training (scaling the rest by 1/(1-p)); identity in eval().
class Dropout : public Module {
 public:
  explicit Dropout(double p = 0.1);
  Tensor forward(const Tensor& x);
  double p() const { return p_; }
  std::string type_name() const override { return "Dropout"; }

 private:
  double p_;
};

class GELU : public Module {
 public:
  explicit GELU(GeluApprox approx = GeluApprox::erf) : approx_(approx) {}
  Tensor forward(const Tensor& x) { return gelu(x, approx_); }
  GeluApprox approx() const { return approx_; }
  std::string type_name() const override { return "GELU"; }

 private:
  GeluApprox approx_;
};

// Linear(dim, hidden) - GELU - Linear(hidden, dim); hidden defaults to 4 * dim. fc1's bias and the
// GELU run as one fused op (bias_gelu). With recompute_hidden (the default) and no active dropout,
// the whole MLP but fc2's bias is one gelu_mlp node that recomputes the hidden activations in
// backward instead of keeping them (one extra product, most of a block's activation memory saved).
class MLP : public Module {
 public:
  explicit MLP(int64_t dim, int64_t hidden = 0, double dropout = 0.0, bool recompute_hidden = true);
  Tensor forward(const Tensor& x);
  // residual + forward(x), the residual being the output's starting value when the MLP is one node.
  Tensor forward_residual(const Tensor& x, const Tensor& residual);
  std::string type_name() const override { return "MLP"; }
  bool recompute_hidden = true;

  std::shared_ptr<Linear> fc1, fc2;
  std::shared_ptr<GELU> act;
  std::shared_ptr<Dropout> drop;
};

// An ordered list of child modules named "0", "1", ...
class ModuleList : public Module {
 public:
  template <typename M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> module) {
    register_module(std::to_string(items_.size()), module);
    items_.push_back(module);
    return module;
  }
  size_t size() const { return items_.size(); }
  std::shared_ptr<Module> at(size_t i) const;  // throws when out of range
  template <typename M>
  std::shared_ptr<M> at_as(size_t i) const {
    auto m = std::dynamic_pointer_cast<M>(at(i));
    LT_CHECK(m != nullptr, "ModuleList: item ", i, " is a ", at(i)->type_name(), ", not the requested type");
    return m;
  }
  std::string type_name() const override { return "ModuleList"; }

 private:
  std::vector<std::shared_ptr<Module>> items_;
};

// A layer that mixes information across the positions of a sequence: (B, N, E) -> (B, N, E).
// Self-attention is one (attention::MultiheadAttention).
class TokenMixer : public Module {
 public:
  virtual Tensor forward(const Tensor& x) = 0;
  // residual + forward(x); a mixer whose last product can start from the residual overrides it
  // (no separate add, forward or backward).
  virtual Tensor forward_residual(const Tensor& x, const Tensor& residual) { return add(residual, forward(x)); }
  // Whether forward takes a bf16 x under bf16 precision (its products lower x anyway), so the
  // layer norm before it may write bf16.
  virtual bool reads_bf16_under_autocast() const { return false; }
};

struct TransformerBlockConfig {
  int64_t embed_dim = 256;
  int64_t mlp_hidden = 0;  // 0: 4 * embed_dim
  double dropout = 0.0;    // on both residual branches
};

// Pre-LN block: x = x + drop(attn(ln1(x))); x = x + drop(mlp(ln2(x))). Input and output (B, N, E).
// `attention` becomes the child "attn"; it must map (B, N, E) to (B, N, E).
class TransformerBlock : public Module {
 public:
  TransformerBlock(const TransformerBlockConfig& config, std::shared_ptr<TokenMixer> attention);
  Tensor forward(const Tensor& x);
  std::string type_name() const override { return "TransformerBlock"; }

  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<TokenMixer> attn;
  std::shared_ptr<MLP> mlp;
  std::shared_ptr<Dropout> drop;
};

}  // namespace longtape::nn
