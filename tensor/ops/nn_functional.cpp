// Neural-network functions: softmax, log_softmax, embedding, dropout (cross_entropy:
// tensor/ops/cross_entropy.cpp, layer norm: tensor/ops/layer_norm.cpp).
// Each runs its forward through the row kernels of tensor/kernels.h and records one node whose
// backward calls the matching backward kernel, so the tape stays short and the gradients are
// computed in one pass.
#include <cstring>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/device_checks.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {

void check_floating(const Tensor& a, const char* op, const char* what) {
  LT_CHECK(a.defined(), op, ": ", what, " is an undefined tensor");
  LT_CHECK(is_floating(a.dtype()), op, ": ", what, " must be a floating tensor (f32, f64, bf16, f16), got ",
           dtype_name(a.dtype()));
}

// Integer index tensors are read as contiguous i64 on their own device.
Tensor indices_as_i64(const Tensor& index, const Tensor& like, const char* op, const char* what) {
  LT_CHECK(index.defined(), op, ": ", what, " is an undefined tensor");
  LT_CHECK(index.dtype() == DType::i64 || index.dtype() == DType::i32, op, ": ", what,
           " must be an i64 or i32 tensor, got ", dtype_name(index.dtype()));
  LT_CHECK(index.device() == like.device(), op, ": ", what, " must be on ", like.device().str(), ", got ",
           index.device().str());
  return cast(index.detach(), DType::i64).contiguous();
}

const int64_t* index_ptr(const Tensor& i64) { return static_cast<const int64_t*>(i64.raw_data()); }

// Permutation that moves `dim` to the end, and its inverse.
struct MoveLast {
  std::vector<int64_t> forward, inverse;
  bool identity = true;
};

MoveLast move_last(int64_t dim, int64_t ndim) {
  MoveLast m;
  for (int64_t i = 0; i < ndim; ++i)
    if (i != dim) m.forward.push_back(i);
  m.forward.push_back(dim);
  m.inverse.resize(ndim);
  for (int64_t i = 0; i < ndim; ++i) {
    m.inverse[m.forward[i]] = i;
    if (m.forward[i] != i) m.identity = false;
  }
  return m;
}

Tensor softmax_impl(const Tensor& a, int64_t dim, bool log, const char* op) {
  check_floating(a, op, "input");
  if (a.dim() == 0) {  // a single element: treat as one row of one column
    normalize_dim(dim, 0, op);
    return softmax_impl(a.reshape({1}), 0, log, op).reshape({});
  }
  const int64_t d = normalize_dim(dim, a.dim(), op);
  const MoveLast perm = move_last(d, a.dim());
  Tensor rows_in = a.detach();
  if (!perm.identity) rows_in = rows_in.permute(perm.forward);
  rows_in = rows_in.contiguous();
  const int64_t cols = a.shape()[d];
  const int64_t rows = cols == 0 ? 0 : a.numel() / cols;
  Tensor rows_out = Tensor::empty(rows_in.shape(), a.dtype(), a.device());
  kernels::softmax(rows_out.raw_data(), rows_in.raw_data(), a.dtype(), rows, cols, log, a.device());
  Tensor out = perm.identity ? rows_out : rows_out.permute(perm.inverse).contiguous();

  Tensor saved = rows_out.detach();
  record(log ? "log_softmax" : "softmax", {a}, {out},
         [saved, perm, rows, cols, log](const std::vector<Tensor>& g) -> std::vector<Tensor> {
           Tensor dy = g[0].detach();
           if (!perm.identity) dy = dy.permute(perm.forward);
           dy = dy.contiguous();
           Tensor dx = Tensor::empty(saved.shape(), saved.dtype(), saved.device());
           kernels::softmax_backward(dx.raw_data(), saved.raw_data(), dy.raw_data(), saved.dtype(), rows, cols,
                                     log, saved.device());
           return {perm.identity ? dx : dx.permute(perm.inverse).contiguous()};
         }, {saved});
  return out;
}

}  // namespace

Tensor softmax(const Tensor& a, int64_t dim) { return softmax_impl(a, dim, false, "softmax"); }

Tensor log_softmax(const Tensor& a, int64_t dim) { return softmax_impl(a, dim, true, "log_softmax"); }

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  check_floating(weight, "embedding", "weight");
  LT_CHECK(weight.dim() == 2, "embedding: weight must be 2-d (num_embeddings, dim), got shape ",
           shape_str(weight.shape()));
  Tensor idx = indices_as_i64(indices, weight, "embedding", "indices");
  const int64_t vocab = weight.shape()[0], width = weight.shape()[1], n = idx.numel();
  check_indices_deferred(idx, vocab, 0, "embedding", "index");  // no host read on CUDA

  Shape out_shape = indices.shape();
  out_shape.push_back(width);
  Tensor table = weight.detach().contiguous();
  Tensor out = Tensor::empty(out_shape, weight.dtype(), weight.device());
  kernels::index_select(out.raw_data(), table.raw_data(), index_ptr(idx), weight.dtype(), 1, vocab, n, width,
                        weight.device());

  DType dt = weight.dtype();
  Device dev = weight.device();
  record("embedding", {weight}, {out}, [idx, vocab, width, n, dt, dev](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    // index_add accumulates repeated indices in index order: deterministic on every backend.
    Tensor dy = g[0].detach().contiguous();
    Tensor dw = Tensor::zeros({vocab, width}, dt, dev);
    kernels::index_add(dw.raw_data(), dy.raw_data(), index_ptr(idx), dt, 1, vocab, n, width, dev);
    return {dw};
  }, {idx});
  return out;
}

Tensor dropout(const Tensor& a, double p, bool training, std::optional<uint64_t> seed) {
  check_floating(a, "dropout", "input");
  LT_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  if (!training || p == 0.0) return a;
  const DType dt = a.dtype();
  const Device dev = a.device();
  Tensor mask = Tensor::empty(a.shape(), dt, dev);
  uint64_t key = 0, offset = 0;
  if (seed) {
    key = *seed;
  } else {
    PhiloxState s = next_philox(static_cast<uint64_t>(a.numel() + 3) / 4 + 1);
    key = s.seed;
    offset = s.offset;
  }
  // Uniform draws in (0, 1): keep an element when its draw exceeds p (probability 1 - p), and
  // scale the kept ones by 1 / (1 - p) so the expectation is unchanged.
  kernels::uniform(kernels::make_view(mask), key, offset, 0.0, 1.0);
  kernels::unary(kernels::UnaryOp::gt_scalar, kernels::make_view(mask), kernels::make_view(mask), p);
  kernels::unary(kernels::UnaryOp::mul_scalar, kernels::make_view(mask), kernels::make_view(mask), 1.0 / (1.0 - p));

  Tensor out = Tensor::empty(a.shape(), dt, dev);
  kernels::binary(kernels::BinaryOp::mul, kernels::make_view(out), kernels::make_view(a), kernels::make_view(mask));
  record("dropout", {a}, {out}, [mask](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {mul(g[0], mask)};
  });
  return out;
}

}  // namespace longtape
