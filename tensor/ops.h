#pragma once
// Differentiable operations. Every op records a node on the autograd tape when any input
// requires grad and grad mode is on. Binary ops broadcast like NumPy. Float ops take f32 and
// f64 on the CPU, f32 and bf16 on CUDA. Bad input throws longtape::Error naming the op, what
// it expected and what it was given.
#include <optional>
#include <utility>
#include <vector>

#include "tensor/autograd/grad_mode.h"
#include "tensor/tensor.h"

namespace longtape {

// ---- elementwise (tensor/ops/elementwise.cpp) ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor pow(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double b);
Tensor mul(const Tensor& a, double b);
Tensor pow(const Tensor& a, double exponent);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor rsqrt(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor relu(const Tensor& a);
Tensor sigmoid(const Tensor& a);
enum class GeluApprox { erf, tanh };
Tensor gelu(const Tensor& a, GeluApprox approx = GeluApprox::erf);
// gelu(x + bias), bias (C,) over x (..., C): one node, one kernel each way (tensor/ops/bias_gelu.cpp).
Tensor bias_gelu(const Tensor& x, const Tensor& bias, GeluApprox approx = GeluApprox::erf);
// Comparisons return a float mask of a's dtype (no gradient).
Tensor gt(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor eq(const Tensor& a, const Tensor& b);
// out = cond ? a : b (cond: any dtype, nonzero = true), broadcasting all three.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor masked_fill(const Tensor& a, const Tensor& mask, double value);
Tensor cast(const Tensor& a, DType dtype);

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator-(const Tensor& a) { return neg(a); }
inline Tensor operator+(const Tensor& a, double b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, double b) { return add(a, -b); }
inline Tensor operator*(const Tensor& a, double b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, double b) { return mul(a, 1.0 / b); }
inline Tensor operator*(double a, const Tensor& b) { return mul(b, a); }
inline Tensor operator+(double a, const Tensor& b) { return add(b, a); }

// Sums a broadcast gradient back to `shape` (the one helper every broadcast backward uses).
Tensor sum_to_shape(const Tensor& grad, const Shape& shape);

// ---- reductions (tensor/ops/reduce.cpp); dims may be negative; empty dims = all ----
Tensor sum(const Tensor& a, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& a, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& a, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor logsumexp(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim = false);

// ---- linear algebra (tensor/ops/matmul.cpp) ----
// (..., M, K) @ (..., K, N) with broadcast batch dims; 1-D operands as in NumPy.
Tensor matmul(const Tensor& a, const Tensor& b);
// residual + x @ weight^T + bias as one node (tensor/ops/linear.cpp); weight (out, in) as Linear
// stores it, bias (out,) and residual (..., out) optional. The bias and residual enter the
// product's epilogue; backward takes the bias gradient from the weight-gradient product and passes
// the output gradient to the residual as is. f32 and f64; under bf16 precision the products read
// bf16 (x may already be bf16 on CUDA; the f32 weight is lowered inside, its gradient is f32) and
// accumulate in f32. The result is out_dtype (default x's dtype): f32 or bf16 under bf16 precision.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(), const Tensor& residual = Tensor(),
              std::optional<DType> out_dtype = std::nullopt);
// gelu(x @ w1^T + b1) @ w2^T + b2 (weights as Linear stores them: (hidden, E), (E_out, hidden);
// b2 may be undefined) as one
// node that saves only x's product operand and recomputes the hidden activations, in row chunks,
// in backward: the (..., hidden) tensors are never kept between forward and backward
// (tensor/ops/gelu_mlp.cpp). Follows the autocast precision like matmul. f32 and f64.
// chunk_rows: rows per chunk, 0 = hidden temporaries of at most 8M elements.
// With `residual` ((..., E_out), x's dtype) the result is residual + the MLP, the residual being
// the products' starting value (no separate add); its gradient is the output gradient itself.
Tensor gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2 = Tensor(),
                GeluApprox approx = GeluApprox::erf, int64_t chunk_rows = 0, const Tensor& residual = Tensor());

// ---- layer norm (tensor/ops/layer_norm.cpp) ----
// Normalises over the last dim; weight and bias (shape (C,)) may be undefined. Row statistics in
// f32 (f64 for f64). out_dtype (default: x's dtype) may be bf16 for f32 x: the same kernel writes
// the result in bf16, as a bf16 product reads its operand; the backward reads a bf16 gradient as
// such and returns gradients in x's dtype.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5,
                  std::optional<DType> out_dtype = std::nullopt);
// {residual, normalised} = {x, layer_norm(x, weight, bias, eps, out_dtype)} as one tape node, for a
// pre-LN residual block (h = residual + f(normalised)). residual shares x's storage (no copy); the
// backward adds the residual's gradient to x's inside the layer-norm backward kernel, so the
// residual stream's gradient costs no separate sum. Modifying residual in place makes the backward
// refuse (it reads x).
std::pair<Tensor, Tensor> layer_norm_residual(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                              double eps = 1e-5, std::optional<DType> out_dtype = std::nullopt);

// ---- neural-network functions (tensor/ops/nn_functional.cpp) ----
Tensor softmax(const Tensor& a, int64_t dim = -1);
Tensor log_softmax(const Tensor& a, int64_t dim = -1);
// weight (V, E), indices i32/i64 of any shape -> (..., E).
Tensor embedding(const Tensor& weight, const Tensor& indices);
// logits (N, C) or (B, T, C); targets i32/i64 of the leading shape; mean over non-ignored targets
// (0 when every target is ignored). Fused with log-softmax (tensor/ops/cross_entropy.cpp): one
// node, one kernel each way, the loss in f32 (f64 for f64 logits). A target outside [0, C) that
// is not ignore_index throws "cross_entropy: target T at position i is out of range [0, C)": at
// once on the CPU; on CUDA when this thread next reads a value (loss.item(); tensor/device_checks.h),
// so a training step never waits for the check.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100);
// Seeded by the default generator unless a seed is given; identity when !training or p == 0.
Tensor dropout(const Tensor& a, double p, bool training = true,
               std::optional<uint64_t> seed = std::nullopt);

// ---- joining and indexing (tensor/ops/indexing.cpp) ----
Tensor cat(const std::vector<Tensor>& tensors, int64_t dim);
std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim);
std::vector<Tensor> split(const Tensor& a, int64_t chunk, int64_t dim);
Tensor stack(const std::vector<Tensor>& tensors, int64_t dim);
Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index);
Tensor gather(const Tensor& a, int64_t dim, const Tensor& index);
// out = a with src added at index along dim (torch's scatter_add; a is not modified).
Tensor scatter_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src);

}  // namespace longtape
