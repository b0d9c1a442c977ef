// y = residual + x W^T + b as one node: the bias and the residual enter the product's epilogue
// (tensor/kernels.h GemmArgs) instead of separate passes, and the backward takes the bias gradient
// from the weight-gradient product (the column sums of dY), returns dY itself as the residual's
// gradient and lowers dY to bf16 once for both of its products.
#include <optional>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/ops.h"
#include "tensor/ops/gemm_product.h"
#include "tensor/precision.h"

namespace longtape {

using autograd::record;
using detail::gemm_product;
using detail::product_operand;
using detail::ProductEpilogue;

namespace {

// A product's result (f32 or f64) in `want`: bf16 on the CPU is the rounded values stored as bf16.
Tensor as_dtype(const Tensor& t, DType want) {
  NoGradGuard guard;
  return t.dtype() == want ? t : cast(t, want);
}

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& residual,
              std::optional<DType> out_dtype_arg) {
  LT_CHECK(x.defined() && weight.defined(), "linear: x and weight must be defined");
  LT_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.shape().back() == weight.size(1),
           "linear: expected x (..., in) and weight (out, in), got x ", shape_str(x.shape()), " and weight ",
           shape_str(weight.shape()));
  const int64_t in = weight.size(1), out = weight.size(0);
  const Precision precision = autocast_precision();
  LT_CHECK(weight.dtype() == DType::f32 || weight.dtype() == DType::f64, "linear: expected an f32 or f64 weight, got ",
           dtype_name(weight.dtype()));
  // bf16 products: an f32 weight under bf16 precision; x may then be f32 or already bf16.
  const bool low = lowers_to_bf16(precision, weight.dtype());
  LT_CHECK(x.dtype() == weight.dtype() || (low && x.dtype() == DType::bf16), "linear: x must be ",
           dtype_name(weight.dtype()), low ? " or bf16" : "", " like the weight, got ", dtype_name(x.dtype()),
           low ? "" : " (a bf16 x meets an f32 weight only under bf16 precision)");
  const DType out_dtype = out_dtype_arg.value_or(x.dtype());
  LT_CHECK(out_dtype == x.dtype() || (low && (out_dtype == DType::f32 || out_dtype == DType::bf16)),
           "linear: out_dtype ", dtype_name(out_dtype), " differs from x's ", dtype_name(x.dtype()),
           " (f32 and bf16 results are both offered only under bf16 precision)");
  for (const Tensor* t : {&weight, &bias, &residual})
    if (t->defined())
      LT_CHECK(t->device() == x.device(), "linear: every tensor must be on x's device ", x.device().str(), ", got ",
               t->device().str());
  LT_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == out && bias.dtype() == weight.dtype()),
           "linear: bias must be a ", dtype_name(weight.dtype()), " [", out, "], got ",
           bias.defined() ? dtype_name(bias.dtype()) : "", " ", bias.defined() ? shape_str(bias.shape()) : std::string());
  Shape out_shape = x.shape();
  out_shape.back() = out;
  LT_CHECK(!residual.defined() || (residual.shape() == out_shape && residual.dtype() == out_dtype),
           "linear: residual must be a ", dtype_name(out_dtype), " ", shape_str(out_shape), ", got ",
           residual.defined() ? dtype_name(residual.dtype()) : "", " ",
           residual.defined() ? shape_str(residual.shape()) : std::string());

  const bool cuda = x.device().is_cuda();
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  Tensor x_op, w_op, y;
  {
    NoGradGuard guard;
    x_op = product_operand(x.detach().reshape({rows, in}), low);
    w_op = product_operand(weight.detach(), low);
    // The GEMM writes the result's dtype (bf16 or f32 from bf16 on CUDA; the CPU computes in f32
    // and rounds a bf16 result afterwards).
    const DType gemm_out = cuda || !low ? out_dtype : DType::f32;
    ProductEpilogue e;
    e.f32_out = low && cuda && gemm_out == DType::f32;
    if (bias.defined()) e.bias = bias.detach().contiguous();
    if (residual.defined()) e.c_in = as_dtype(residual.detach().reshape({rows, out}).contiguous(), gemm_out);
    y = as_dtype(gemm_product(x_op, false, w_op, true, e), out_dtype).reshape(out_shape);
  }
  std::vector<Tensor> inputs{x, weight};
  if (bias.defined()) inputs.push_back(bias);
  if (residual.defined()) inputs.push_back(residual);
  // Lowered, w_op is a private copy; x_op is x's own storage when x is already what the product reads.
  std::vector<Tensor> saved{x_op};
  if (!low) saved.push_back(w_op);
  record("linear", inputs, {y},
         [x_op, w_op, low, cuda, rows, in, out, precision, x_shape = x.shape(), x_dtype = x.dtype(),
          with_bias = bias.defined(), with_residual = residual.defined()](
             const std::vector<Tensor>& g) -> std::vector<Tensor> {
           AutocastScope scope(precision);  // tf32 products stay tf32
           NoGradGuard guard;
           // dY lowered once for both products (as is when it is already bf16 on CUDA).
           const Tensor dy = product_operand(g[0].reshape({rows, out}), low);
           const DType vector_dtype = x_op.dtype() == DType::f64 ? DType::f64 : DType::f32;
           ProductEpilogue ew;
           ew.f32_out = low && cuda;
           // db = column sums of dY as the dW product reads it; the CPU under bf16, which rounds f32
           // values for its products, sums the unrounded f32 gradient.
           Tensor db;
           if (with_bias && low && !cuda) db = sum(as_dtype(g[0], DType::f32).reshape({rows, out}), {0});
           else if (with_bias) ew.a_sums = db = Tensor::empty({out}, vector_dtype, dy.device());
           Tensor dw = gemm_product(dy, true, x_op, false, ew);  // dW = dY^T x
           ProductEpilogue ex;
           ex.f32_out = low && cuda && x_dtype == DType::f32;
           Tensor dx = as_dtype(gemm_product(dy, false, w_op, false, ex), x_dtype).reshape(x_shape);
           std::vector<Tensor> grads{dx, dw};
           if (with_bias) grads.push_back(db);
           if (with_residual) grads.push_back(g[0]);
           return grads;
         },
         saved);
  return y;
}

}  // namespace longtape
