// The transformer MLP gelu(x W1^T + b1) W2^T as one node. The hidden activations are 4x wider
// than the residual stream, so keeping them for backward (the pre-activation for gelu' and the
// activation for W2's gradient) is most of a block's activation memory. This node keeps only x's
// product operand (bf16 under bf16 precision) and recomputes x W1^T + b1 in backward, at the cost
// of one extra product. Both passes walk the rows in chunks so the hidden temporaries stay small.
#include <algorithm>

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"
#include "tensor/precision.h"

namespace longtape {

using autograd::record;

namespace {

// Rows per chunk: hidden temporaries of at most 8M elements (32 MiB in f32).
constexpr int64_t kChunkElements = int64_t{1} << 23;

struct MlpOperands {
  Tensor w1, b1, w2;  // w1, w2 as the products read them; b1 as given
  bool low = false;   // bf16 products (operands lowered with bf16_operand)
  GeluApprox approx = GeluApprox::erf;

  Tensor operand(const Tensor& t) const { return low ? bf16_operand(t) : t.contiguous(); }

  // pre = x W1^T (f32/f64, bias not added) and the activation gelu(pre + b1) as a product reads it
  // (on CUDA under bf16 the kernel writes it in bf16 directly).
  std::pair<Tensor, Tensor> hidden(const Tensor& x_rows) const {
    Tensor pre = matmul_operands(x_rows, w1.transpose(0, 1));
    const bool direct = !low || pre.device().is_cuda();
    Tensor act = Tensor::empty(pre.shape(), low && direct ? DType::bf16 : pre.dtype(), pre.device());
    if (act.numel() > 0)
      kernels::bias_gelu(act.raw_data(), act.dtype(), pre.raw_data(), b1.raw_data(), pre.dtype(), pre.size(0),
                         pre.size(1), approx == GeluApprox::tanh, pre.device());
    return {pre, direct ? act : operand(act)};
  }
};

Tensor accumulate(const Tensor& total, const Tensor& part) { return total.defined() ? add(total, part) : part; }

}  // namespace

Tensor gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, GeluApprox approx,
                int64_t chunk_rows) {
  LT_CHECK(x.defined() && w1.defined() && b1.defined() && w2.defined(), "gelu_mlp: got an undefined tensor");
  LT_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64, "gelu_mlp: expected f32 or f64 x, got ",
           dtype_name(x.dtype()));
  for (const Tensor* t : {&w1, &b1, &w2})
    LT_CHECK(t->dtype() == x.dtype() && t->device() == x.device(), "gelu_mlp: weights must be ",
             dtype_name(x.dtype()), " on ", x.device().str(), " like x, got ", dtype_name(t->dtype()), " on ",
             t->device().str());
  LT_CHECK(x.dim() >= 1 && w1.dim() == 2 && w2.dim() == 2 && b1.dim() == 1 && w1.size(1) == x.shape().back() &&
               b1.size(0) == w1.size(0) && w2.size(1) == w1.size(0),
           "gelu_mlp: expected x (..., E), w1 (H, E), b1 (H,), w2 (E_out, H), got x ", shape_str(x.shape()), ", w1 ",
           shape_str(w1.shape()), ", b1 ", shape_str(b1.shape()), ", w2 ", shape_str(w2.shape()));
  LT_CHECK(chunk_rows >= 0, "gelu_mlp: chunk_rows must be >= 0 (0 = automatic), got ", chunk_rows);
  const int64_t e = x.shape().back(), hidden = w1.size(0), e_out = w2.size(0);
  const int64_t chunk =
      chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kChunkElements / std::max<int64_t>(hidden, 1));
  Shape out_shape = x.shape();
  out_shape.back() = e_out;
  const Precision precision = autocast_precision();
  MlpOperands ops;
  Tensor x_op;
  Tensor y;
  {
    NoGradGuard guard;
    ops.low = lowers_to_bf16(precision, x.dtype());
    ops.approx = approx;
    ops.w1 = ops.operand(w1.detach());
    ops.w2 = ops.operand(w2.detach());
    ops.b1 = b1.detach().contiguous();
    x_op = ops.operand(x.detach().reshape({-1, e}));
    const int64_t rows = x_op.size(0);
    y = Tensor::zeros({rows, e_out}, x.dtype(), x.device());  // each chunk's product lands in its rows
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      matmul_operands(ops.hidden(x_op.narrow(0, r0, n)).second, ops.w2.transpose(0, 1), y.narrow(0, r0, n));
    }
    y = y.reshape(out_shape);
  }
  // Lowered weights are private copies; unlowered, the backward reads the parameters themselves.
  const std::vector<Tensor> saved = ops.low ? std::vector<Tensor>{b1} : std::vector<Tensor>{x, w1, b1, w2};
  record("gelu_mlp", {x, w1, b1, w2}, {y},
         [ops, x_op, precision, x_shape = x.shape(), e_out, hidden, chunk](const std::vector<Tensor>& g) -> std::vector<Tensor> {
           AutocastScope scope(precision);
           const int64_t rows = x_op.size(0);
           const Tensor dy = ops.operand(g[0].reshape({rows, e_out}));
           Tensor dx = Tensor::zeros({rows, x_op.size(1)}, g[0].dtype(), g[0].device());
           // Parameter gradients accumulate chunk by chunk inside the products (beta = 1).
           Tensor dw1 = Tensor::zeros(ops.w1.shape(), dx.dtype(), dx.device());
           Tensor dw2 = Tensor::zeros(ops.w2.shape(), dx.dtype(), dx.device());
           Tensor db1;
           for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
             const int64_t n = std::min(chunk, rows - r0);
             const Tensor xc = x_op.narrow(0, r0, n), dyc = dy.narrow(0, r0, n);
             auto [pre, act] = ops.hidden(xc);
             matmul_operands(dyc.transpose(0, 1), act, dw2);
             act = Tensor();
             // d(pre) = (dy W2) * gelu'(pre + b1), in place in dy W2's buffer.
             Tensor dpre = matmul_operands(dyc, ops.w2);
             kernels::bias_gelu_backward(dpre.raw_data(), dpre.raw_data(), pre.raw_data(), ops.b1.raw_data(),
                                         dpre.dtype(), n, hidden, ops.approx == GeluApprox::tanh, dpre.device());
             pre = Tensor();
             db1 = accumulate(db1, sum(dpre, {0}));
             const Tensor dpre_op = ops.operand(dpre);
             dpre = Tensor();
             matmul_operands(dpre_op.transpose(0, 1), xc, dw1);
             matmul_operands(dpre_op, ops.w1, dx.narrow(0, r0, n));
           }
           if (rows == 0) db1 = Tensor::zeros(ops.b1.shape(), dx.dtype(), dx.device());
           return {dx.reshape(x_shape), dw1, db1, dw2};
         },
         saved);
  return y;
}

}  // namespace longtape
