// Matrix products with broadcast batch dims (GEMM through Eigen on the CPU, cuBLAS on CUDA).
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {

// Batched product of (..., M, K) and (..., K, N) tensors with equal batch dims (both contiguous).
Tensor bmm_raw(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  const int64_t nd = a.dim();
  const int64_t m = trans_a ? a.shape()[nd - 1] : a.shape()[nd - 2];
  const int64_t k = trans_a ? a.shape()[nd - 2] : a.shape()[nd - 1];
  const int64_t n = trans_b ? b.shape()[nd - 2] : b.shape()[nd - 1];
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = shape_numel(out_shape);
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  kernels::GemmArgs g{out.raw_data(), a.raw_data(), b.raw_data(), a.dtype(), batch, m, n, k,
                      a.shape()[nd - 1] * a.shape()[nd - 2], b.shape()[nd - 1] * b.shape()[nd - 2], m * n,
                      trans_a, trans_b, 1.0, 0.0, a.device()};
  if (out.numel() > 0) {
    if (k == 0) out.zero_();
    else kernels::gemm(g);
  }
  return out;
}

// The stored matrices of an operand: itself when contiguous, its transpose when that is contiguous
// (a transposed weight enters the product without a copy), else a contiguous copy.
struct Operand {
  Tensor stored;
  bool transposed = false;
};

Operand as_operand(const Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  const int64_t nd = x.dim();
  Tensor t = x.transpose(nd - 2, nd - 1);
  if (t.is_contiguous()) return {t, true};
  return {x.contiguous(), false};
}

}  // namespace

Tensor matmul(const Tensor& a_in, const Tensor& b_in) {
  LT_CHECK(a_in.defined() && b_in.defined(), "matmul: got an undefined tensor");
  LT_CHECK(a_in.dim() >= 1 && b_in.dim() >= 1, "matmul: both operands need at least 1 dim, got shapes ",
           shape_str(a_in.shape()), " and ", shape_str(b_in.shape()));
  LT_CHECK(a_in.device() == b_in.device(), "matmul: operands on ", a_in.device().str(), " and ",
           b_in.device().str());
  LT_CHECK(a_in.dtype() == b_in.dtype(), "matmul: operand dtypes differ: ", dtype_name(a_in.dtype()), " and ",
           dtype_name(b_in.dtype()));
  LT_CHECK(is_floating(a_in.dtype()), "matmul: expected floating operands, got ", dtype_name(a_in.dtype()));
  // 1-D operands as in NumPy: prepend / append a dim, removed again at the end.
  Tensor a = a_in.dim() == 1 ? a_in.unsqueeze(0) : a_in;
  Tensor b = b_in.dim() == 1 ? b_in.unsqueeze(-1) : b_in;
  const int64_t ka = a.shape()[a.dim() - 1], kb = b.shape()[b.dim() - 2];
  LT_CHECK(ka == kb, "matmul: inner dims differ: ", shape_str(a_in.shape()), " @ ", shape_str(b_in.shape()));
  // A (..., M, K) times a plain (K, N) matrix: the batch folds into the rows of one product, so
  // the weight is neither copied per batch entry nor its gradient summed over the batch.
  if (a.dim() > 2 && b_in.dim() == 2) {
    Shape out_shape(a.shape().begin(), a.shape().end() - 1);
    out_shape.push_back(b.shape()[1]);
    Tensor rows = a.reshape({-1, ka});
    return matmul(rows, b).reshape(out_shape);
  }
  // broadcast batch dims
  Shape ba(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
  Shape batch(std::max(ba.size(), bb.size()));
  for (size_t i = 0; i < batch.size(); ++i) {
    int64_t da = i < batch.size() - ba.size() ? 1 : ba[i - (batch.size() - ba.size())];
    int64_t db = i < batch.size() - bb.size() ? 1 : bb[i - (batch.size() - bb.size())];
    LT_CHECK(da == db || da == 1 || db == 1, "matmul: batch dims of ", shape_str(a_in.shape()), " and ",
             shape_str(b_in.shape()), " cannot be broadcast");
    batch[i] = da == 1 ? db : da;
  }
  Shape sa = batch, sb = batch;
  sa.push_back(a.shape()[a.dim() - 2]);
  sa.push_back(ka);
  sb.push_back(kb);
  sb.push_back(b.shape()[b.dim() - 1]);
  Tensor ae = a.expand(sa), be = b.expand(sb);
  Tensor out;
  Operand oa, ob;
  {
    NoGradGuard guard;
    oa = as_operand(ae.detach());
    ob = as_operand(be.detach());
    out = bmm_raw(oa.stored, ob.stored, oa.transposed, ob.transposed);
  }
  Tensor ad = ae.detach(), bd = be.detach();
  record("matmul", {ae, be}, {out}, [oa, ob](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor go = g[0].contiguous();
    // dA = dC B^T, dB = A^T dC
    return {bmm_raw(go, ob.stored, false, !ob.transposed), bmm_raw(oa.stored, go, !oa.transposed, false)};
  }, {ad, bd});
  if (a_in.dim() == 1) out = out.squeeze(-2);
  if (b_in.dim() == 1) out = out.squeeze(-1);
  return out;
}

}  // namespace longtape
