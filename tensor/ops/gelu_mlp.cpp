// The transformer MLP residual + gelu(x W1^T + b1) W2^T + b2 as one node. The hidden activations are
// 4x wider than the residual stream, so keeping them for backward (the pre-activation for gelu' and
// the activation for W2's gradient) is most of a block's activation memory. This node keeps only
// x's product operand (bf16 under bf16 precision) and recomputes x W1^T + b1 in backward, at the
// cost of one extra product. Both passes walk the rows in chunks so the hidden temporaries stay small.
//
// The biases and the residual ride in the products' epilogues (tensor/ops/gemm_product.h): b1 is
// added by the first product (on CUDA under bf16 it writes the pre-activation in bf16), b2 and the
// residual by the second, and the bias gradients are the column sums the weight-gradient products
// take of their left operand. Each chunk's sums land in a row of a small (chunks, H) buffer, summed
// once at the end; the first chunk writes the weight gradients (beta = 0) and the later ones add.
#include <algorithm>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"
#include "tensor/ops/gemm_product.h"
#include "tensor/precision.h"

namespace longtape {

using autograd::record;
using detail::gemm_product;
using detail::ProductEpilogue;

namespace {

// Rows per chunk: hidden temporaries of at most 8M elements (32 MiB in f32).
constexpr int64_t kChunkElements = int64_t{1} << 23;

struct MlpOperands {
  Tensor w1, b1, w2;   // w1, w2 as the products read them; b1 as given (contiguous)
  bool low = false;    // bf16 products (operands lowered with bf16_operand)
  bool cuda = false;
  GeluApprox approx = GeluApprox::erf;

  Tensor operand(const Tensor& t) const { return detail::product_operand(t, low); }
  // bf16 tensors between the products: CUDA under bf16 (the CPU rounds f32 values instead).
  bool bf16_hidden() const { return low && cuda; }

  // pre = x W1^T (bf16 on CUDA under bf16, else f32/f64; b1 is added by the GELU kernels, which
  // read pre anyway) and the activation gelu(pre + b1) as the second product reads it.
  std::pair<Tensor, Tensor> hidden(const Tensor& x_rows) const {
    Tensor pre = gemm_product(x_rows, false, w1, true);
    Tensor act = Tensor::empty(pre.shape(), pre.dtype(), pre.device());
    if (act.numel() > 0)
      kernels::bias_gelu(act.raw_data(), act.dtype(), pre.raw_data(), pre.dtype(), b1.raw_data(), b1.dtype(),
                         pre.size(0), pre.size(1), approx == GeluApprox::tanh, pre.device());
    return {pre, low && !cuda ? operand(act) : act};
  }
};

}  // namespace

Tensor gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                GeluApprox approx, int64_t chunk_rows, const Tensor& residual) {
  LT_CHECK(x.defined() && w1.defined() && b1.defined() && w2.defined(), "gelu_mlp: got an undefined tensor");
  // The weights' dtype is the result's; x may also be bf16 when the products run in bf16.
  const DType wd = w1.dtype();
  LT_CHECK(wd == DType::f32 || wd == DType::f64, "gelu_mlp: expected f32 or f64 weights, got ", dtype_name(wd));
  const Precision precision = autocast_precision();
  const bool low = lowers_to_bf16(precision, wd);
  LT_CHECK(x.dtype() == wd || (low && x.dtype() == DType::bf16), "gelu_mlp: x must be ", dtype_name(wd),
           low ? " or bf16" : "", " like the weights, got ", dtype_name(x.dtype()));
  for (const Tensor* t : {&w1, &b1, &w2, &b2})
    if (t->defined())
    LT_CHECK(t->dtype() == wd && t->device() == x.device(), "gelu_mlp: weights must be ",
             dtype_name(wd), " on ", x.device().str(), " like w1, got ", dtype_name(t->dtype()), " on ",
             t->device().str());
  LT_CHECK(x.dim() >= 1 && w1.dim() == 2 && w2.dim() == 2 && b1.dim() == 1 && w1.size(1) == x.shape().back() &&
               b1.size(0) == w1.size(0) && w2.size(1) == w1.size(0),
           "gelu_mlp: expected x (..., E), w1 (H, E), b1 (H,), w2 (E_out, H), got x ", shape_str(x.shape()), ", w1 ",
           shape_str(w1.shape()), ", b1 ", shape_str(b1.shape()), ", w2 ", shape_str(w2.shape()));
  LT_CHECK(!b2.defined() || (b2.dim() == 1 && b2.size(0) == w2.size(0)), "gelu_mlp: b2 must be (", w2.size(0),
           ",) or undefined, got ", b2.defined() ? shape_str(b2.shape()) : std::string());
  LT_CHECK(chunk_rows >= 0, "gelu_mlp: chunk_rows must be >= 0 (0 = automatic), got ", chunk_rows);
  const int64_t e = x.shape().back(), hidden = w1.size(0), e_out = w2.size(0);
  Shape out_shape = x.shape();
  out_shape.back() = e_out;
  LT_CHECK(!residual.defined() || (residual.shape() == out_shape && residual.dtype() == wd &&
                                   residual.device() == x.device()),
           "gelu_mlp: residual must be ", dtype_name(wd), " ", shape_str(out_shape), " on ", x.device().str(),
           ", got ", residual.defined() ? dtype_name(residual.dtype()) : "", " ",
           residual.defined() ? shape_str(residual.shape()) : std::string(), " on ",
           residual.defined() ? residual.device().str() : std::string());
  const int64_t chunk =
      chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kChunkElements / std::max<int64_t>(hidden, 1));
  MlpOperands ops;
  Tensor x_op;
  Tensor y;
  {
    NoGradGuard guard;
    ops.low = low;
    ops.cuda = x.device().is_cuda();
    ops.approx = approx;
    ops.w1 = ops.operand(w1.detach());
    ops.w2 = ops.operand(w2.detach());
    ops.b1 = b1.detach().contiguous();
    x_op = ops.operand(x.detach().reshape({-1, e}));
    const int64_t rows = x_op.size(0);
    // Each chunk writes its rows: residual + act W2^T + b2 in one product.
    y = Tensor::empty({rows, e_out}, wd, x.device());
    const Tensor res = residual.defined() ? residual.detach().reshape({rows, e_out}).contiguous() : Tensor();
    const Tensor bias2 = b2.defined() ? b2.detach().contiguous() : Tensor();
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      ProductEpilogue e2;
      e2.f32_out = ops.bf16_hidden();
      e2.bias = bias2;
      e2.into = y.narrow(0, r0, n);
      if (res.defined()) e2.c_in = res.narrow(0, r0, n);
      gemm_product(ops.hidden(x_op.narrow(0, r0, n)).second, false, ops.w2, true, e2);
    }
    y = y.reshape(out_shape);
  }
  // Lowered weights are private copies; unlowered, the backward reads the parameters themselves.
  const std::vector<Tensor> saved = ops.low ? std::vector<Tensor>{b1} : std::vector<Tensor>{x, w1, b1, w2};
  std::vector<Tensor> inputs{x, w1, b1, w2};
  if (b2.defined()) inputs.push_back(b2);
  if (residual.defined()) inputs.push_back(residual);
  record("gelu_mlp", inputs, {y},
         [ops, x_op, precision, x_shape = x.shape(), x_dtype = x.dtype(), e_out, hidden, chunk, with_b2 = b2.defined(),
          with_residual = residual.defined()](const std::vector<Tensor>& g) -> std::vector<Tensor> {
           AutocastScope scope(precision);
           NoGradGuard guard;
           const int64_t rows = x_op.size(0);
           const Tensor dy = ops.operand(g[0].reshape({rows, e_out}));
           const Device device = g[0].device();
           const DType dtype = g[0].dtype();
           // The bias gradients are the sums of the products' left operands (dy, then d(pre)), except
           // on the CPU under bf16, which sums the f32 values before they are rounded for the products.
           const bool sums_in_products = !(ops.low && !ops.cuda);
           const int64_t chunks = std::max<int64_t>(1, (rows + chunk - 1) / chunk);
           Tensor dx = Tensor::empty({rows, x_op.size(1)}, x_dtype, device);
           Tensor dw1 = Tensor::empty(ops.w1.shape(), dtype, device);
           Tensor dw2 = Tensor::empty(ops.w2.shape(), dtype, device);
           Tensor db1_parts = Tensor::empty({chunks, hidden}, dtype, device);
           Tensor db2_parts = Tensor::empty({chunks, e_out}, dtype, device);
           if (rows == 0) {
             for (Tensor* t : {&dw1, &dw2, &db1_parts, &db2_parts}) t->zero_();
           }
           for (int64_t r0 = 0, c = 0; r0 < rows; r0 += chunk, ++c) {
             const int64_t n = std::min(chunk, rows - r0);
             const Tensor xc = x_op.narrow(0, r0, n), dyc = dy.narrow(0, r0, n);
             auto [pre, act] = ops.hidden(xc);
             ProductEpilogue ew2;
             ew2.f32_out = ops.bf16_hidden();
             ew2.into = dw2;
             ew2.accumulate = r0 > 0;
             if (with_b2) {
               if (sums_in_products) ew2.a_sums = db2_parts.select(0, c);
               else db2_parts.select(0, c).copy_(sum(g[0].reshape({rows, e_out}).narrow(0, r0, n), {0}));
             }
             gemm_product(dyc, true, act, false, ew2);
             act = Tensor();
             // d(pre) = (dy W2) * gelu'(pre), written as the next products read it.
             ProductEpilogue eh;
             eh.f32_out = ops.bf16_hidden();
             const Tensor dh = gemm_product(dyc, false, ops.w2, false, eh);
             Tensor dpre = Tensor::empty(dh.shape(), ops.bf16_hidden() ? DType::bf16 : dtype, device);
             kernels::bias_gelu_backward(dpre.raw_data(), dpre.dtype(), dh.raw_data(), pre.raw_data(), pre.dtype(),
                                         ops.b1.raw_data(), dh.dtype(), n, hidden, ops.approx == GeluApprox::tanh,
                                         device);
             pre = Tensor();
             if (!sums_in_products) db1_parts.select(0, c).copy_(sum(dpre, {0}));
             if (ops.low && !ops.cuda) dpre = bf16_operand(dpre);
             ProductEpilogue ew1;
             ew1.f32_out = ops.bf16_hidden();
             ew1.into = dw1;
             ew1.accumulate = r0 > 0;
             if (sums_in_products) ew1.a_sums = db1_parts.select(0, c);
             gemm_product(dpre, true, xc, false, ew1);
             ProductEpilogue ex;
             ex.f32_out = ops.bf16_hidden() && x_dtype == DType::f32;
             ex.into = dx.narrow(0, r0, n);
             if (ops.low && !ops.cuda && x_dtype == DType::bf16) ex.into = Tensor();  // rounded below
             const Tensor dxc = gemm_product(dpre, false, ops.w1, false, ex);
             if (!ex.into.defined()) dx.narrow(0, r0, n).copy_(cast(dxc, DType::bf16));
           }
           auto total = [&](const Tensor& parts) { return chunks == 1 ? parts.select(0, 0) : sum(parts, {0}); };
           std::vector<Tensor> grads{dx.reshape(x_shape), dw1, total(db1_parts), dw2};
           if (with_b2) grads.push_back(total(db2_parts));
           if (with_residual) grads.push_back(g[0]);
           return grads;
         },
         saved);
  return y;
}

}  // namespace longtape
