// Matrix products with broadcast batch dims (GEMM through Eigen on the CPU, cuBLAS on CUDA).
// Under a bf16 AutocastScope (tensor/precision.h) f32 operands are rounded to bf16 and the product
// accumulates and writes f32; the node saves the rounded operands and its backward rounds the
// incoming gradient the same way, so every product of the pass reads bf16 and every gradient that
// leaves the node is f32.
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"
#include "tensor/ops/gemm_product.h"
#include "tensor/precision.h"

namespace longtape {

using autograd::record;

namespace {

// Batched product of (..., M, K) and (..., K, N) tensors with equal batch dims (both contiguous).
// bf16 operands with f32_out give an f32 result (CUDA).
Tensor bmm_raw(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool f32_out = false) {
  const int64_t nd = a.dim();
  const int64_t m = trans_a ? a.shape()[nd - 1] : a.shape()[nd - 2];
  const int64_t k = trans_a ? a.shape()[nd - 2] : a.shape()[nd - 1];
  const int64_t n = trans_b ? b.shape()[nd - 2] : b.shape()[nd - 1];
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = shape_numel(out_shape);
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, f32_out ? DType::f32 : a.dtype(), a.device());
  kernels::GemmArgs g{out.raw_data(), a.raw_data(), b.raw_data(), a.dtype(), batch, m, n, k,
                      a.shape()[nd - 1] * a.shape()[nd - 2], b.shape()[nd - 1] * b.shape()[nd - 2], m * n,
                      trans_a, trans_b, 1.0, 0.0, a.device(), f32_out};
  if (out.numel() > 0) {
    if (k > 0) kernels::gemm(g);
    else out.zero_();
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

// A stored operand as a bf16 product reads it (not recorded: the node saves the result).
Operand lowered(Operand o) {
  NoGradGuard guard;
  if (o.stored.dtype() == DType::bf16) {  // already bf16: as is on CUDA, its exact f32 values on the CPU
    if (!o.stored.device().is_cuda()) o.stored = cast(o.stored, DType::f32);
    return o;
  }
  o.stored = bf16_operand(o.stored);
  return o;
}

}  // namespace

namespace detail {

Tensor gemm_product(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const ProductEpilogue& e) {
  LT_CHECK(a.defined() && b.defined() && a.dim() == 2 && b.dim() == 2 && (a.is_contiguous() || a.numel() == 0) &&
               (b.is_contiguous() || b.numel() == 0),
           "gemm_product: expected contiguous 2-D operands");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  LT_CHECK(k == kb && a.dtype() == b.dtype() && a.device() == b.device(), "gemm_product: operands ",
           shape_str(a.shape()), " ", dtype_name(a.dtype()), " and ", shape_str(b.shape()), " ", dtype_name(b.dtype()),
           " do not multiply");
  const DType out_dtype = e.f32_out ? DType::f32 : a.dtype();
  const DType vector_dtype = a.dtype() == DType::f64 ? DType::f64 : DType::f32;
  auto check_tensor = [&](const Tensor& t, const Shape& shape, DType dtype, const char* what) {
    LT_CHECK(!t.defined() || (t.shape() == shape && t.dtype() == dtype && t.device() == a.device() &&
                              t.is_contiguous()),
             "gemm_product: ", what, " must be a contiguous ", dtype_name(dtype), " ", shape_str(shape), " on ",
             a.device().str(), ", got ", t.defined() ? dtype_name(t.dtype()) : "undefined", " ",
             t.defined() ? shape_str(t.shape()) : std::string());
  };
  check_tensor(e.bias, {n}, vector_dtype, "bias");
  check_tensor(e.c_in, {m, n}, out_dtype, "c_in");
  check_tensor(e.into, {m, n}, out_dtype, "into");
  check_tensor(e.a_sums, {m}, vector_dtype, "a_sums");
  LT_CHECK(!(e.accumulate && e.c_in.defined()), "gemm_product: accumulate and c_in exclude each other");
  NoGradGuard guard;
  Tensor out = e.into.defined() ? e.into : Tensor::empty({m, n}, out_dtype, a.device());
  const bool accumulate = e.into.defined() && e.accumulate;
  if (k == 0) {  // an empty sum: only the epilogue's terms
    if (e.c_in.defined()) out.copy_(e.c_in);
    else if (!accumulate) out.zero_();
    if (e.bias.defined() && out.numel() > 0) out.copy_(add(out, e.bias.to(out_dtype)));
    if (e.a_sums.defined()) Tensor(e.a_sums).zero_();
  } else {
    // A bias and A's row sums never come together in one GEMM: the bias is then added after it.
    const bool both = e.bias.defined() && e.a_sums.defined();
    kernels::GemmArgs g{out.raw_data(), a.raw_data(), b.raw_data(), a.dtype(), 1, m, n, k, 0, 0, 0,
                        trans_a, trans_b, 1.0, (accumulate || e.c_in.defined()) ? 1.0 : 0.0, a.device(), e.f32_out};
    g.c_in = e.c_in.defined() ? e.c_in.raw_data() : nullptr;
    g.bias = e.bias.defined() && !both ? e.bias.raw_data() : nullptr;
    g.a_sums = e.a_sums.defined() ? e.a_sums.raw_data() : nullptr;
    kernels::gemm(g);
    if (both && out.numel() > 0) out.copy_(add(out, e.bias.to(out_dtype)));
  }
  out.bump_version();
  if (e.a_sums.defined()) e.a_sums.bump_version();
  return out;
}

Tensor product_operand(const Tensor& t, bool low) {
  NoGradGuard guard;
  if (!low) return t.contiguous();
  if (t.dtype() == DType::bf16) return t.device().is_cuda() ? t.contiguous() : cast(t, DType::f32);
  return bf16_operand(t.contiguous());
}

}  // namespace detail

Tensor matmul(const Tensor& a_in, const Tensor& b_in) {
  LT_CHECK(a_in.defined() && b_in.defined(), "matmul: got an undefined tensor");
  LT_CHECK(a_in.dim() >= 1 && b_in.dim() >= 1, "matmul: both operands need at least 1 dim, got shapes ",
           shape_str(a_in.shape()), " and ", shape_str(b_in.shape()));
  LT_CHECK(a_in.device() == b_in.device(), "matmul: operands on ", a_in.device().str(), " and ",
           b_in.device().str());
  const Precision precision = autocast_precision();
  // Under bf16 precision a bf16 operand (e.g. the attention core's bf16 output) may meet an f32
  // one: it is already what the product reads, so only the f32 operand is lowered.
  const bool mixed_bf16 = precision == Precision::bf16 && a_in.dtype() != b_in.dtype() &&
                          (a_in.dtype() == DType::bf16 || b_in.dtype() == DType::bf16) &&
                          (a_in.dtype() == DType::f32 || b_in.dtype() == DType::f32);
  LT_CHECK(a_in.dtype() == b_in.dtype() || mixed_bf16, "matmul: operand dtypes differ: ", dtype_name(a_in.dtype()),
           " and ", dtype_name(b_in.dtype()), " (a bf16 and an f32 operand meet only under bf16 precision)");
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
  const bool low = mixed_bf16 || lowers_to_bf16(precision, a_in.dtype());
  // bf16 tensors exist on CUDA only; the CPU multiplies the bf16-rounded values in f32.
  const bool f32_out = low && a_in.device().is_cuda();
  Tensor out;
  Operand oa, ob;
  {
    NoGradGuard guard;
    oa = as_operand(ae.detach());
    ob = as_operand(be.detach());
    if (low) {
      oa = lowered(oa);
      ob = lowered(ob);
    }
    out = bmm_raw(oa.stored, ob.stored, oa.transposed, ob.transposed, f32_out);
  }
  // The backward reads oa and ob. Lowered, they are private bf16 copies: saving the f32 inputs too
  // (for the in-place check) would keep every f32 activation that feeds a product alive until
  // backward, next to its copy.
  const std::vector<Tensor> saved = low ? std::vector<Tensor>{} : std::vector<Tensor>{ae.detach(), be.detach()};
  const DType a_dtype = a_in.dtype(), b_dtype = b_in.dtype();
  record("matmul", {ae, be}, {out},
         [oa, ob, precision, low, f32_out, a_dtype, b_dtype](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    AutocastScope scope(precision);  // the backward products compute as the forward did (tf32)
    Tensor go = g[0].contiguous();
    if (low) {
      NoGradGuard guard;
      go = bf16_operand(go);
    }
    // dA = dC B^T, dB = A^T dC
    // Each gradient in its input's dtype: a bf16 input's comes straight from the product on CUDA.
    auto product = [&](const Tensor& x, const Tensor& y, bool tx, bool ty, DType want) {
      const bool to_bf16 = want == DType::bf16 && x.dtype() == DType::bf16;
      Tensor r = bmm_raw(x, y, tx, ty, f32_out && !to_bf16);
      return r.dtype() == want ? r : cast(r, want);
    };
    return {product(go, ob.stored, false, !ob.transposed, a_dtype), product(oa.stored, go, !oa.transposed, false, b_dtype)};
  }, saved);
  if (a_in.dim() == 1) out = out.squeeze(-2);
  if (b_in.dim() == 1) out = out.squeeze(-1);
  return out;
}

}  // namespace longtape
