// Elementwise operations with NumPy broadcasting, each with its backward.
#include <algorithm>
#include <cmath>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;
using kernels::BinaryOp;
using kernels::UnaryOp;

namespace {

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  Shape out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t da = i < out.size() - a.size() ? 1 : a[i - (out.size() - a.size())];
    int64_t db = i < out.size() - b.size() ? 1 : b[i - (out.size() - b.size())];
    LT_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
             " cannot be broadcast together (dim ", i, ": ", da, " vs ", db, ")");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

void check_same_device_dtype(const Tensor& a, const Tensor& b, const char* op) {
  LT_CHECK(a.defined() && b.defined(), op, ": got an undefined tensor");
  LT_CHECK(a.device() == b.device(), op, ": both tensors must be on one device, got ", a.device().str(), " and ",
           b.device().str());
  LT_CHECK(a.dtype() == b.dtype(), op, ": both tensors must have one dtype, got ", dtype_name(a.dtype()), " and ",
           dtype_name(b.dtype()), " (use cast())");
}

void check_floating(const Tensor& a, const char* op) {
  LT_CHECK(a.defined(), op, ": got an undefined tensor");
  LT_CHECK(is_floating(a.dtype()), op, ": expected a floating tensor (f32, f64, bf16, f16), got ",
           dtype_name(a.dtype()));
}

Tensor binary_raw(BinaryOp op, const Tensor& a, const Tensor& b, const char* name) {
  check_same_device_dtype(a, b, name);
  Shape shape = broadcast_shapes(a.shape(), b.shape(), name);
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  const int nd = static_cast<int>(shape.size());
  kernels::binary(op, kernels::make_view(out), kernels::make_view(a, shape.data(), nd),
                  kernels::make_view(b, shape.data(), nd));
  return out;
}

Tensor unary_raw(UnaryOp op, const Tensor& a, double alpha, const char* name) {
  check_floating(a, name);
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  kernels::unary(op, kernels::make_view(out), kernels::make_view(a), alpha);
  return out;
}

}  // namespace

Tensor sum_to_shape(const Tensor& grad, const Shape& shape) {
  if (grad.shape() == shape) return grad;
  const int64_t lead = grad.dim() - static_cast<int64_t>(shape.size());
  LT_ASSERT(lead >= 0, "sum_to_shape: target has more dims than the gradient");
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < grad.dim(); ++i)
    if (i < lead || (shape[i - lead] == 1 && grad.shape()[i] != 1)) dims.push_back(i);
  Tensor s = dims.empty() ? grad : sum(grad, dims, true);
  return s.reshape(shape);
}

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::add, a, b, "add");
  Shape sa = a.shape(), sb = b.shape();
  record("add", {a, b}, {out}, [sa, sb](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {sum_to_shape(g[0], sa), sum_to_shape(g[0], sb)};
  });
  return out;
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::sub, a, b, "sub");
  Shape sa = a.shape(), sb = b.shape();
  record("sub", {a, b}, {out}, [sa, sb](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {sum_to_shape(g[0], sa), sum_to_shape(neg(g[0]), sb)};
  });
  return out;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::mul, a, b, "mul");
  Tensor ad = a.detach(), bd = b.detach();
  record("mul", {a, b}, {out}, [ad, bd](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {sum_to_shape(mul(g[0], bd), ad.shape()), sum_to_shape(mul(g[0], ad), bd.shape())};
  }, {ad, bd});
  return out;
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::div, a, b, "div");
  Tensor ad = a.detach(), bd = b.detach();
  record("div", {a, b}, {out}, [ad, bd](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor ga = div(g[0], bd);
    Tensor gb = neg(div(mul(ga, ad), bd));
    return {sum_to_shape(ga, ad.shape()), sum_to_shape(gb, bd.shape())};
  }, {ad, bd});
  return out;
}

Tensor pow(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::pow, a, b, "pow");
  Tensor ad = a.detach(), bd = b.detach(), od = out.detach();
  record("pow", {a, b}, {out}, [ad, bd, od](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    // d/da a^b = b a^(b-1); d/db a^b = a^b log a (taken as 0 where a^b is 0)
    Tensor ga = mul(g[0], mul(bd, pow(ad, add(bd, -1.0))));
    Tensor safe_log = log(where(gt(ad, Tensor::zeros({}, ad.dtype(), ad.device())), ad,
                                Tensor::ones({}, ad.dtype(), ad.device())));
    Tensor gb = mul(g[0], mul(od, safe_log));
    return {sum_to_shape(ga, ad.shape()), sum_to_shape(gb, bd.shape())};
  }, {ad, bd, od});
  return out;
}

Tensor maximum(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::maximum, a, b, "maximum");
  Tensor ad = a.detach(), bd = b.detach();
  record("maximum", {a, b}, {out}, [ad, bd](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    // ties split the gradient evenly, like torch
    Tensor a_wins = binary_raw(BinaryOp::gt, ad, bd, "maximum");
    Tensor tie = binary_raw(BinaryOp::eq, ad, bd, "maximum");
    Tensor wa = add(a_wins, mul(tie, 0.5));
    Tensor wb = add(mul(wa, -1.0), 1.0);
    return {sum_to_shape(mul(g[0], wa), ad.shape()), sum_to_shape(mul(g[0], wb), bd.shape())};
  }, {ad, bd});
  return out;
}

Tensor gt(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::gt, a, b, "gt"); }
Tensor lt(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::lt, a, b, "lt"); }
Tensor eq(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::eq, a, b, "eq"); }

Tensor add(const Tensor& a, double b) {
  Tensor out = unary_raw(UnaryOp::add_scalar, a, b, "add");
  record("add_scalar", {a}, {out}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {g[0]}; });
  return out;
}

Tensor mul(const Tensor& a, double b) {
  Tensor out = unary_raw(UnaryOp::mul_scalar, a, b, "mul");
  record("mul_scalar", {a}, {out}, [b](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {mul(g[0], b)}; });
  return out;
}

Tensor pow(const Tensor& a, double exponent) {
  Tensor out = unary_raw(UnaryOp::pow_scalar, a, exponent, "pow");
  Tensor ad = a.detach();
  record("pow_scalar", {a}, {out}, [ad, exponent](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], mul(pow(ad, exponent - 1.0), exponent))};
  }, {ad});
  return out;
}

Tensor neg(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::neg, a, 0, "neg");
  record("neg", {a}, {out}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {neg(g[0])}; });
  return out;
}

Tensor exp(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::exp, a, 0, "exp");
  Tensor od = out.detach();
  record(
      "exp", {a}, {out}, [od](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {mul(g[0], od)}; }, {od});
  return out;
}

Tensor log(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::log, a, 0, "log");
  Tensor ad = a.detach();
  record(
      "log", {a}, {out}, [ad](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {div(g[0], ad)}; }, {ad});
  return out;
}

Tensor sqrt(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::sqrt, a, 0, "sqrt");
  Tensor od = out.detach();
  record("sqrt", {a}, {out}, [od](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {div(mul(g[0], 0.5), od)};
  }, {od});
  return out;
}

Tensor rsqrt(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::rsqrt, a, 0, "rsqrt");
  Tensor od = out.detach();
  record("rsqrt", {a}, {out}, [od](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], mul(pow(od, 3.0), -0.5))};  // d/dx x^-1/2 = -1/2 x^-3/2
  }, {od});
  return out;
}

Tensor tanh(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::tanh, a, 0, "tanh");
  Tensor od = out.detach();
  record("tanh", {a}, {out}, [od](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], unary_raw(UnaryOp::rsub_scalar, unary_raw(UnaryOp::square, od, 0, "tanh"), 1.0, "tanh"))};
  }, {od});
  return out;
}

Tensor relu(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::relu, a, 0, "relu");
  Tensor ad = a.detach();
  record("relu", {a}, {out}, [ad](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], unary_raw(UnaryOp::step, ad, 0, "relu"))};
  }, {ad});
  return out;
}

Tensor sigmoid(const Tensor& a) {
  Tensor out = unary_raw(UnaryOp::sigmoid, a, 0, "sigmoid");
  Tensor od = out.detach();
  record("sigmoid", {a}, {out}, [od](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], mul(od, unary_raw(UnaryOp::rsub_scalar, od, 1.0, "sigmoid")))};
  }, {od});
  return out;
}

Tensor gelu(const Tensor& a, GeluApprox approx) {
  const bool use_tanh = approx == GeluApprox::tanh;
  Tensor out = unary_raw(use_tanh ? UnaryOp::gelu_tanh : UnaryOp::gelu_erf, a, 0, "gelu");
  Tensor ad = a.detach();
  record("gelu", {a}, {out}, [ad, use_tanh](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], unary_raw(use_tanh ? UnaryOp::gelu_tanh_grad : UnaryOp::gelu_erf_grad, ad, 0, "gelu"))};
  }, {ad});
  return out;
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  check_same_device_dtype(a, b, "where");
  LT_CHECK(cond.defined() && cond.device() == a.device(), "where: condition must be on ", a.device().str());
  Shape shape = broadcast_shapes(broadcast_shapes(cond.shape(), a.shape(), "where"), b.shape(), "where");
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  const int nd = static_cast<int>(shape.size());
  kernels::where(kernels::make_view(out), kernels::make_view(cond, shape.data(), nd),
                 kernels::make_view(a, shape.data(), nd), kernels::make_view(b, shape.data(), nd));
  Tensor cd = cond.detach();
  Shape sa = a.shape(), sb = b.shape();
  record("where", {a, b}, {out}, [cd, sa, sb](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor zero = Tensor::zeros({}, g[0].dtype(), g[0].device());
    return {sum_to_shape(where(cd, g[0], zero), sa), sum_to_shape(where(cd, zero, g[0]), sb)};
  }, {cd});
  return out;
}

Tensor masked_fill(const Tensor& a, const Tensor& mask, double value) {
  check_floating(a, "masked_fill");
  Tensor fill = Tensor::full({}, value, a.dtype(), a.device());
  return where(mask, fill, a).reshape(a.shape());
}

}  // namespace longtape
