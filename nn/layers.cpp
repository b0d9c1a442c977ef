#include "nn/layers.h"

#include <cmath>

#include "tensor/autograd/grad_mode.h"
#include "tensor/checked_math.h"
#include "tensor/precision.h"

namespace longtape::nn {

namespace {
Tensor uniform_tensor(const Shape& shape, double bound) {
  NoGradGuard guard;
  return add(mul(Tensor::rand(shape), 2.0 * bound), -bound);  // U(-bound, bound)
}
}  // namespace

// ---------------------------------------------------------------- Linear

Linear::Linear(int64_t in_features, int64_t out_features, bool with_bias)
    : in_features_(in_features), out_features_(out_features) {
  LT_CHECK(in_features >= 1 && out_features >= 1, "Linear: in_features and out_features must be >= 1, got ",
           in_features, " and ", out_features);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  weight = register_parameter("weight", uniform_tensor({out_features, in_features}, bound));
  if (with_bias) bias = register_parameter("bias", uniform_tensor({out_features}, bound));
}

Tensor Linear::project(const Tensor& x) {
  LT_CHECK(x.defined() && x.dim() >= 1 && x.shape().back() == in_features_, "Linear: input must be (..., ",
           in_features_, "), got ", x.defined() ? shape_str(x.shape()) : std::string("undefined"));
  // Flatten the leading dims so the weight enters one 2-D product (no per-batch weight copies).
  Shape out_shape = x.shape();
  out_shape.back() = out_features_;
  Tensor rows = x.dim() == 2 ? x : x.reshape({-1, in_features_});
  Tensor y = matmul(rows, weight.transpose(0, 1));
  return x.dim() == 2 ? y : y.reshape(out_shape);
}

Tensor Linear::forward(const Tensor& x) {
  // One node where linear() takes the input: the bias rides in the product's epilogue and its
  // gradient in the weight-gradient product. A bf16 input (bf16 precision) gives an f32 result, as
  // matmul does.
  const bool bf16_input = x.defined() && x.dtype() == DType::bf16 && lowers_to_bf16(autocast_precision(), weight.dtype());
  if (x.defined() && x.dim() >= 1 && x.shape().back() == in_features_ && (x.dtype() == weight.dtype() || bf16_input))
    return linear(x, weight, bias, Tensor(), bf16_input ? DType::f32 : x.dtype());
  Tensor y = project(x);
  return bias.defined() ? add(y, bias) : y;
}

// ---------------------------------------------------------------- LayerNorm

LayerNorm::LayerNorm(int64_t dim, double eps, bool affine) : dim_(dim), eps_(eps) {
  LT_CHECK(dim >= 1, "LayerNorm: dim must be >= 1, got ", dim);
  LT_CHECK(eps >= 0, "LayerNorm: eps must be >= 0, got ", eps);
  if (affine) {
    weight = register_parameter("weight", Tensor::ones({dim}));
    bias = register_parameter("bias", Tensor::zeros({dim}));
  }
}

void LayerNorm::check_input(const Tensor& x) const {
  LT_CHECK(x.defined() && x.dim() >= 1 && x.shape().back() == dim_, "LayerNorm: input must be (..., ", dim_,
           "), got ", x.defined() ? shape_str(x.shape()) : std::string("undefined"));
}

Tensor LayerNorm::forward(const Tensor& x) {
  check_input(x);
  return layer_norm(x, weight, bias, eps_);
}

Tensor LayerNorm::forward(const Tensor& x, DType out_dtype) {
  check_input(x);
  return layer_norm(x, weight, bias, eps_, out_dtype);
}

std::pair<Tensor, Tensor> LayerNorm::forward_residual(const Tensor& x, std::optional<DType> out_dtype) {
  check_input(x);
  return layer_norm_residual(x, weight, bias, eps_, out_dtype);
}

// ---------------------------------------------------------------- Embedding

Embedding::Embedding(int64_t num_embeddings, int64_t dim, double init_std)
    : num_embeddings_(num_embeddings), dim_(dim) {
  LT_CHECK(num_embeddings >= 1 && dim >= 1, "Embedding: num_embeddings and dim must be >= 1, got ", num_embeddings,
           " and ", dim);
  LT_CHECK(init_std >= 0, "Embedding: init_std must be >= 0, got ", init_std);
  NoGradGuard guard;
  weight = register_parameter("weight", mul(Tensor::randn({num_embeddings, dim}), init_std));
}

Tensor Embedding::forward(const Tensor& indices) { return embedding(weight, indices); }

// ---------------------------------------------------------------- Dropout

Dropout::Dropout(double p) : p_(p) { LT_CHECK(p >= 0 && p < 1, "Dropout: p must be in [0, 1), got ", p); }

Tensor Dropout::forward(const Tensor& x) { return dropout(x, p_, is_training()); }

// ---------------------------------------------------------------- MLP

MLP::MLP(int64_t dim, int64_t hidden, double dropout_p, bool recompute) : recompute_hidden(recompute) {
  LT_CHECK(hidden >= 0, "MLP: hidden must be >= 0 (0 = 4 * dim), got ", hidden);
  LT_CHECK(dim >= 1, "MLP: dim must be >= 1, got ", dim);
  const int64_t h = hidden == 0 ? checked::mul(4, dim, "MLP: hidden size 4 * dim") : hidden;
  fc1 = register_module("fc1", std::make_shared<Linear>(dim, h));
  act = register_module("act", std::make_shared<GELU>());
  fc2 = register_module("fc2", std::make_shared<Linear>(h, dim));
  drop = register_module("drop", std::make_shared<Dropout>(dropout_p));
}

namespace {
// Whether the MLP runs as one gelu_mlp node (recomputing its hidden activations in backward).
bool mlp_is_one_node(const MLP& m, const Tensor& x) {
  const bool dropout_active = m.is_training() && m.drop->p() > 0;
  const bool operand_ok = x.dtype() == m.fc1->weight.dtype() ||
                          (x.dtype() == DType::bf16 && lowers_to_bf16(autocast_precision(), m.fc1->weight.dtype()));
  return m.recompute_hidden && m.fc1->bias.defined() && !dropout_active && operand_ok &&
         (m.fc1->weight.dtype() == DType::f32 || m.fc1->weight.dtype() == DType::f64);
}
}  // namespace

Tensor MLP::forward_residual(const Tensor& x, const Tensor& residual) {
  if (mlp_is_one_node(*this, x) && residual.dtype() == fc2->weight.dtype())
    return gelu_mlp(x, fc1->weight, fc1->bias, fc2->weight, fc2->bias, act->approx(), 0, residual);
  return add(residual, forward(x));
}

Tensor MLP::forward(const Tensor& x) {
  if (mlp_is_one_node(*this, x)) return gelu_mlp(x, fc1->weight, fc1->bias, fc2->weight, fc2->bias, act->approx());
  Tensor h = fc1->bias.defined() ? bias_gelu(fc1->project(x), fc1->bias, act->approx()) : act->forward(fc1->forward(x));
  return fc2->forward(drop->forward(h));
}

// ---------------------------------------------------------------- ModuleList

std::shared_ptr<Module> ModuleList::at(size_t i) const {
  LT_CHECK(i < items_.size(), "ModuleList: index ", i, " is out of range for ", items_.size(), " items");
  return items_[i];
}

// ---------------------------------------------------------------- TransformerBlock

TransformerBlock::TransformerBlock(const TransformerBlockConfig& config, std::shared_ptr<TokenMixer> attention) {
  LT_CHECK(config.embed_dim >= 1, "TransformerBlock: embed_dim must be >= 1, got ", config.embed_dim);
  LT_CHECK(attention != nullptr, "TransformerBlock: needs an attention module (a TokenMixer), got none");
  ln1 = register_module("ln1", std::make_shared<LayerNorm>(config.embed_dim));
  attn = register_module("attn", std::move(attention));
  ln2 = register_module("ln2", std::make_shared<LayerNorm>(config.embed_dim));
  mlp = register_module("mlp", std::make_shared<MLP>(config.embed_dim, config.mlp_hidden));
  drop = register_module("drop", std::make_shared<Dropout>(config.dropout));
}

Tensor TransformerBlock::forward(const Tensor& x) {
  LT_CHECK(x.defined() && x.dim() == 3, "TransformerBlock: input must be (B, N, E), got ",
           x.defined() ? shape_str(x.shape()) : std::string("undefined"));
  if (is_training() && drop->p() > 0) {
    Tensor h = add(x, drop->forward(attn->forward(ln1->forward(x))));
    return add(h, drop->forward(mlp->forward(ln2->forward(h))));
  }
  // Without dropout each branch's last product starts from the residual stream, and each layer
  // norm hands the stream on (its backward adds the stream's gradient in the same pass). Under bf16
  // the norms write the products' bf16 operands directly.
  const bool low = lowers_to_bf16(autocast_precision(), x.dtype());
  const std::optional<DType> operand = low ? std::optional<DType>(DType::bf16) : std::nullopt;
  auto [x_stream, y1] = ln1->forward_residual(x, attn->reads_bf16_under_autocast() ? operand : std::nullopt);
  Tensor h = attn->forward_residual(y1, x_stream);
  auto [h_stream, y2] = ln2->forward_residual(h, operand);
  return mlp->forward_residual(y2, h_stream);
}

}  // namespace longtape::nn
