// gelu(x + bias) as one op: one kernel forward, one backward kernel for the pre-activation
// gradient, whose column sum is the bias gradient. One tape node instead of two (add, gelu), and
// x + bias is never stored: the backward recomputes it.
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

Tensor bias_gelu(const Tensor& x, const Tensor& bias, GeluApprox approx) {
  LT_CHECK(x.defined() && bias.defined(), "bias_gelu: got an undefined tensor");
  LT_CHECK(is_floating(x.dtype()), "bias_gelu: x must be a floating tensor, got ", dtype_name(x.dtype()));
  LT_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.shape().back(), "bias_gelu: bias must have shape [",
           x.dim() >= 1 ? x.shape().back() : 0, "] to match x ", shape_str(x.shape()), ", got ",
           shape_str(bias.shape()));
  LT_CHECK(bias.dtype() == x.dtype() && bias.device() == x.device(), "bias_gelu: bias must be ", dtype_name(x.dtype()),
           " on ", x.device().str(), " like x, got ", dtype_name(bias.dtype()), " on ", bias.device().str());
  const int64_t cols = x.shape().back();
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const bool tanh_approx = approx == GeluApprox::tanh;
  Tensor xc = x.detach().contiguous();
  Tensor bc = bias.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel() > 0)
    kernels::bias_gelu(out.raw_data(), x.dtype(), xc.raw_data(), x.dtype(), bc.raw_data(), x.dtype(), rows, cols,
                       tanh_approx, x.device());
  record("bias_gelu", {x, bias}, {out},
         [xc, bc, rows, cols, tanh_approx](const std::vector<Tensor>& g) -> std::vector<Tensor> {
           Tensor dy = g[0].detach().contiguous();
           Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
           if (dx.numel() > 0)
             kernels::bias_gelu_backward(dx.raw_data(), dx.dtype(), dy.raw_data(), xc.raw_data(), xc.dtype(),
                                         bc.raw_data(), xc.dtype(), rows, cols, tanh_approx, xc.device());
           return {dx, sum(dx.reshape({rows, cols}), {0})};
         }, {xc, bc});
  return out;
}

}  // namespace longtape
