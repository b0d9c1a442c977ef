// Layer norm over the last dim: layer_norm, and layer_norm_residual, which also hands its input on
// as the residual branch so that the branch's gradient is added inside the layer-norm backward
// kernel (no separate pass over the residual stream's gradient). Each is one tape node running one
// kernel each way; the result may be written in bf16 from f32 input (the operand of the next bf16
// product, no cast kernel), and a bf16 incoming gradient is read as such.
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {

// What the backward reads: the input rows, the parameters and the row statistics.
struct LayerNormSaved {
  Tensor x_rows, weight, bias, mean, rstd;  // x_rows: x contiguous; weight/bias may be undefined
  int64_t rows = 0, cols = 0;
};

struct LayerNormForward {
  Tensor out;
  LayerNormSaved saved;
};

LayerNormForward layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                                    std::optional<DType> out_dtype, const char* op) {
  LT_CHECK(x.defined(), op, ": input is an undefined tensor");
  LT_CHECK(is_floating(x.dtype()), op, ": input must be a floating tensor (f32, f64, bf16, f16), got ",
           dtype_name(x.dtype()));
  LT_CHECK(x.dim() >= 1, op, ": input must have at least 1 dim, got a 0-d tensor");
  LT_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const DType out_type = out_dtype.value_or(x.dtype());
  LT_CHECK(out_type == x.dtype() || (out_type == DType::bf16 && x.dtype() == DType::f32), op,
           ": out_dtype must be the input's dtype (", dtype_name(x.dtype()), ") or bf16 with f32 input, got ",
           dtype_name(out_type));
  const int64_t cols = x.shape().back();
  LT_CHECK(cols > 0, op, ": the normalised (last) dim must be non-empty, got shape ", shape_str(x.shape()));
  const int64_t rows = x.numel() / cols;
  auto check_param = [&](const Tensor& p, const char* what) {
    if (!p.defined()) return;
    LT_CHECK(p.shape() == Shape{cols}, op, ": ", what, " must have shape [", cols, "] to match input ",
             shape_str(x.shape()), ", got ", shape_str(p.shape()));
    LT_CHECK(p.dtype() == x.dtype(), op, ": ", what, " must have dtype ", dtype_name(x.dtype()), ", got ",
             dtype_name(p.dtype()));
    LT_CHECK(p.device() == x.device(), op, ": ", what, " must be on ", x.device().str(), ", got ",
             p.device().str());
  };
  check_param(weight, "weight");
  check_param(bias, "bias");

  LayerNormSaved s;
  s.rows = rows;
  s.cols = cols;
  s.x_rows = x.detach().contiguous();
  s.weight = weight.defined() ? weight.detach().contiguous() : Tensor();
  s.bias = bias.defined() ? bias.detach().contiguous() : Tensor();
  // Row statistics are kept in f32 (f64 for f64 input), as the kernel interface specifies.
  const DType stat_dtype = x.dtype() == DType::f64 ? DType::f64 : DType::f32;
  s.mean = Tensor::empty({rows}, stat_dtype, x.device());
  s.rstd = Tensor::empty({rows}, stat_dtype, x.device());
  Tensor out = Tensor::empty(x.shape(), out_type, x.device());
  kernels::layer_norm(out.raw_data(), out_type, s.mean.raw_data(), s.rstd.raw_data(), s.x_rows.raw_data(),
                      s.weight.defined() ? s.weight.raw_data() : nullptr,
                      s.bias.defined() ? s.bias.raw_data() : nullptr, x.dtype(), rows, cols, eps, x.device());
  return {out, s};
}

// A gradient as the backward kernel reads it: contiguous, in x's dtype (or bf16 for f32 x when
// `bf16_ok`: the kernel reads it directly).
Tensor gradient_rows(const Tensor& g, const Tensor& x_rows, bool bf16_ok) {
  const bool readable = g.dtype() == x_rows.dtype() ||
                        (bf16_ok && g.dtype() == DType::bf16 && x_rows.dtype() == DType::f32);
  return (readable ? g.detach() : cast(g.detach(), x_rows.dtype())).contiguous();
}

// {dx, dweight, dbias} for the incoming gradient dy (of the normalised output), with dx =
// dx_addend + the layer-norm gradient when dx_addend is defined. An undefined dy gives {dx_addend,
// undefined, undefined}.
std::vector<Tensor> layer_norm_backward(const LayerNormSaved& s, const Tensor& dy, const Tensor& dx_addend) {
  const Tensor& x = s.x_rows;
  Tensor addend = dx_addend.defined() ? gradient_rows(dx_addend, x, false) : Tensor();
  if (!dy.defined()) return {addend, Tensor(), Tensor()};
  Tensor dy_rows = gradient_rows(dy, x, true);
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor dw = s.weight.defined() ? Tensor::empty({s.cols}, x.dtype(), x.device()) : Tensor();
  Tensor db = s.bias.defined() ? Tensor::empty({s.cols}, x.dtype(), x.device()) : Tensor();
  kernels::layer_norm_backward(dx.raw_data(), dw.defined() ? dw.raw_data() : nullptr,
                               db.defined() ? db.raw_data() : nullptr, dy_rows.raw_data(), dy_rows.dtype(),
                               addend.defined() ? addend.raw_data() : nullptr, x.raw_data(), s.mean.raw_data(),
                               s.rstd.raw_data(), s.weight.defined() ? s.weight.raw_data() : nullptr, x.dtype(),
                               s.rows, s.cols, x.device());
  return {dx, dw, db};
}

}  // namespace

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                  std::optional<DType> out_dtype) {
  LayerNormForward f = layer_norm_forward(x, weight, bias, eps, out_dtype, "layer_norm");
  const LayerNormSaved& s = f.saved;
  record("layer_norm", {x, weight, bias}, {f.out},
         [s](const std::vector<Tensor>& g) -> std::vector<Tensor> { return layer_norm_backward(s, g[0], Tensor()); },
         {s.x_rows, s.weight, s.bias});
  return f.out;
}

std::pair<Tensor, Tensor> layer_norm_residual(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                                              std::optional<DType> out_dtype) {
  LayerNormForward f = layer_norm_forward(x, weight, bias, eps, out_dtype, "layer_norm_residual");
  const LayerNormSaved& s = f.saved;
  Tensor residual = x.detach();  // x's storage, no copy; its gradient reaches x through this node
  record("layer_norm_residual", {x, weight, bias}, {residual, f.out},
         [s](const std::vector<Tensor>& g) -> std::vector<Tensor> { return layer_norm_backward(s, g[1], g[0]); },
         {s.x_rows, s.weight, s.bias});
  return {residual, f.out};
}

}  // namespace longtape
