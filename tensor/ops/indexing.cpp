// Joining (cat, stack, split) and indexing (index_select, gather, scatter_add), each with its
// backward. The index kernels work on contiguous data viewed as (outer, dim, inner); the ops here
// bring their operands to that layout and check every index before a kernel sees it.
#include <algorithm>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {

// Integer index tensors are read as contiguous i64 on their own device.
Tensor indices_as_i64(const Tensor& index, const Tensor& like, const char* op) {
  LT_CHECK(index.defined(), op, ": index is an undefined tensor");
  LT_CHECK(index.dtype() == DType::i64 || index.dtype() == DType::i32, op,
           ": index must be an i64 or i32 tensor, got ", dtype_name(index.dtype()));
  LT_CHECK(index.device() == like.device(), op, ": index must be on ", like.device().str(), " like the input, got ",
           index.device().str());
  return cast(index.detach(), DType::i64).contiguous();
}

const int64_t* index_ptr(const Tensor& i64) { return static_cast<const int64_t*>(i64.raw_data()); }

int64_t product(const Shape& s, size_t begin, size_t end) {
  int64_t p = 1;
  for (size_t i = begin; i < end; ++i) p *= s[i];
  return p;
}

// A view of t restricted to the leading `shape` corner (every size <= t's), no copy, no history.
Tensor corner(const Tensor& t, const Shape& shape) { return make_view(t.detach(), shape, t.strides(), t.offset()); }

// Zeros of `full_shape` with `part` written into its leading corner.
Tensor pad_to(const Tensor& part, const Shape& full_shape) {
  if (part.shape() == full_shape) return part;
  Tensor full = Tensor::zeros(full_shape, part.dtype(), part.device());
  kernels::copy(kernels::make_view(corner(full, part.shape())), kernels::make_view(part));
  return full;
}

// out (index's shape) = a gathered along dim; a contiguous with a's sizes equal to index's outside dim.
Tensor gather_raw(const Tensor& a, int64_t dim, const Tensor& idx) {
  const Shape& is = idx.shape();
  Tensor out = Tensor::empty(is, a.dtype(), a.device());
  kernels::gather(out.raw_data(), a.raw_data(), index_ptr(idx), a.dtype(), product(is, 0, dim), a.shape()[dim],
                  is[dim], product(is, dim + 1, is.size()), a.device());
  return out;
}

// Checks torch's rule: index has a's rank and fits inside `bound` in every dim except `dim`.
void check_index_shape(const Tensor& index, const Tensor& bound, int64_t dim, const char* op, const char* what) {
  LT_CHECK(index.dim() == bound.dim(), op, ": index must have the same number of dims as ", what, " (",
           bound.dim(), "), got index of shape ", shape_str(index.shape()), " and ", what, " of shape ",
           shape_str(bound.shape()));
  for (int64_t k = 0; k < index.dim(); ++k)
    LT_CHECK(k == dim || index.shape()[k] <= bound.shape()[k], op, ": index of shape ", shape_str(index.shape()),
             " is larger than ", what, " of shape ", shape_str(bound.shape()), " in dim ", k);
}

}  // namespace

Tensor cat(const std::vector<Tensor>& tensors, int64_t dim) {
  LT_CHECK(!tensors.empty(), "cat: expected at least one tensor, got an empty list");
  for (size_t i = 0; i < tensors.size(); ++i)
    LT_CHECK(tensors[i].defined(), "cat: tensor ", i, " is undefined");
  const Tensor& first = tensors[0];
  LT_CHECK(first.dim() >= 1, "cat: tensors must have at least 1 dim, tensor 0 is 0-d (use stack)");
  const int64_t d = normalize_dim(dim, first.dim(), "cat");
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    LT_CHECK(t.dtype() == first.dtype(), "cat: tensor ", i, " has dtype ", dtype_name(t.dtype()),
             " but tensor 0 has dtype ", dtype_name(first.dtype()));
    LT_CHECK(t.device() == first.device(), "cat: tensor ", i, " is on ", t.device().str(), " but tensor 0 is on ",
             first.device().str());
    LT_CHECK(t.dim() == first.dim(), "cat: tensor ", i, " has shape ", shape_str(t.shape()),
             " but tensor 0 has shape ", shape_str(first.shape()), "; all need the same number of dims");
    for (int64_t k = 0; k < t.dim(); ++k)
      LT_CHECK(k == d || t.shape()[k] == first.shape()[k], "cat: tensor ", i, " has shape ", shape_str(t.shape()),
               " but tensor 0 has shape ", shape_str(first.shape()), "; sizes must match except in dim ", d);
    out_shape[d] += t.shape()[d];
  }

  Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());
  std::vector<int64_t> starts, lengths;
  int64_t start = 0;
  for (const Tensor& t : tensors) {
    const int64_t len = t.shape()[d];
    if (len > 0)
      kernels::copy(kernels::make_view(out.narrow(d, start, len)), kernels::make_view(t));
    starts.push_back(start);
    lengths.push_back(len);
    start += len;
  }
  record("cat", tensors, {out}, [d, starts, lengths](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    std::vector<Tensor> grads;
    for (size_t i = 0; i < starts.size(); ++i) grads.push_back(g[0].narrow(d, starts[i], lengths[i]));
    return grads;
  });
  return out;
}

std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim) {
  LT_CHECK(a.defined(), "split: got an undefined tensor");
  LT_CHECK(a.dim() >= 1, "split: cannot split a 0-d tensor");
  const int64_t d = normalize_dim(dim, a.dim(), "split");
  int64_t total = 0;
  for (int64_t s : sizes) {
    LT_CHECK(s >= 0, "split: sizes must be >= 0, got ", shape_str(sizes));
    total += s;
  }
  LT_CHECK(total == a.shape()[d], "split: sizes ", shape_str(sizes), " sum to ", total, " but dim ", d,
           " of shape ", shape_str(a.shape()), " has size ", a.shape()[d]);
  // One node for all parts: its backward writes every part's gradient into one buffer (no zero
  // fill per part, no sum of part-sized gradients).
  std::vector<Tensor> parts;
  {
    NoGradGuard guard;
    int64_t start = 0;
    for (int64_t s : sizes) {
      parts.push_back(a.narrow(d, start, s));
      start += s;
    }
  }
  autograd::record("split", {a}, parts,
                   [sizes, d, shape = a.shape(), dtype = a.dtype(), device = a.device()](
                       const std::vector<Tensor>& g) -> std::vector<Tensor> {
                     Tensor full = Tensor::empty(shape, dtype, device);
                     int64_t start = 0;
                     for (size_t i = 0; i < sizes.size(); ++i) {
                       full.narrow(d, start, sizes[i]).copy_(g[i]);
                       start += sizes[i];
                     }
                     return {full};
                   });
  return parts;
}

std::vector<Tensor> split(const Tensor& a, int64_t chunk, int64_t dim) {
  LT_CHECK(a.defined(), "split: got an undefined tensor");
  LT_CHECK(a.dim() >= 1, "split: cannot split a 0-d tensor");
  LT_CHECK(chunk > 0, "split: chunk size must be > 0, got ", chunk);
  const int64_t d = normalize_dim(dim, a.dim(), "split");
  const int64_t n = a.shape()[d];
  if (n == 0) return {a.narrow(d, 0, 0)};
  std::vector<int64_t> sizes;
  for (int64_t start = 0; start < n; start += chunk) sizes.push_back(std::min(chunk, n - start));
  return split(a, sizes, d);
}

Tensor stack(const std::vector<Tensor>& tensors, int64_t dim) {
  LT_CHECK(!tensors.empty(), "stack: expected at least one tensor, got an empty list");
  for (size_t i = 0; i < tensors.size(); ++i) {
    LT_CHECK(tensors[i].defined(), "stack: tensor ", i, " is undefined");
    LT_CHECK(tensors[i].shape() == tensors[0].shape(), "stack: tensor ", i, " has shape ",
             shape_str(tensors[i].shape()), " but tensor 0 has shape ", shape_str(tensors[0].shape()),
             "; all must have the same shape");
  }
  const int64_t d = normalize_dim(dim, tensors[0].dim() + 1, "stack");
  std::vector<Tensor> expanded;
  expanded.reserve(tensors.size());
  for (const Tensor& t : tensors) expanded.push_back(t.unsqueeze(d));
  return cat(expanded, d);
}

Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index) {
  LT_CHECK(a.defined(), "index_select: got an undefined input");
  LT_CHECK(a.dim() >= 1, "index_select: input must have at least 1 dim, got a 0-d tensor");
  const int64_t d = normalize_dim(dim, a.dim(), "index_select");
  Tensor idx = indices_as_i64(index, a, "index_select");
  LT_CHECK(idx.dim() <= 1, "index_select: index must be 1-d, got shape ", shape_str(index.shape()));
  const int64_t n = idx.numel();
  kernels::check_indices(index_ptr(idx), n, a.shape()[d], a.device(), "index_select");

  const Shape in_shape = a.shape();
  const int64_t outer = product(in_shape, 0, d), inner = product(in_shape, d + 1, in_shape.size());
  const int64_t in_dim = in_shape[d];
  Tensor src = a.detach().contiguous();
  Shape out_shape = in_shape;
  out_shape[d] = n;
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  kernels::index_select(out.raw_data(), src.raw_data(), index_ptr(idx), a.dtype(), outer, in_dim, n, inner,
                        a.device());

  record("index_select", {a}, {out},
         [idx, in_shape, outer, in_dim, n, inner](const std::vector<Tensor>& g) -> std::vector<Tensor> {
           Tensor dy = g[0].detach().contiguous();
           Tensor dx = Tensor::zeros(in_shape, dy.dtype(), dy.device());
           kernels::index_add(dx.raw_data(), dy.raw_data(), index_ptr(idx), dy.dtype(), outer, in_dim, n, inner,
                              dy.device());
           return {dx};
         }, {idx});
  return out;
}

Tensor gather(const Tensor& a, int64_t dim, const Tensor& index) {
  LT_CHECK(a.defined(), "gather: got an undefined input");
  LT_CHECK(a.dim() >= 1, "gather: input must have at least 1 dim, got a 0-d tensor");
  const int64_t d = normalize_dim(dim, a.dim(), "gather");
  Tensor idx = indices_as_i64(index, a, "gather");
  check_index_shape(idx, a, d, "gather", "input");
  kernels::check_indices(index_ptr(idx), idx.numel(), a.shape()[d], a.device(), "gather");

  // Only the corner of a that index covers takes part; make it contiguous (outer, dim, inner).
  Shape used = idx.shape();
  used[d] = a.shape()[d];
  Tensor src = corner(a, used).contiguous();
  Tensor out = gather_raw(src, d, idx);

  const Shape in_shape = a.shape();
  record("gather", {a}, {out}, [idx, d, used, in_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor dy = g[0].detach().contiguous();
    Tensor dx = Tensor::zeros(used, dy.dtype(), dy.device());
    const Shape& is = idx.shape();
    kernels::scatter_add(dx.raw_data(), dy.raw_data(), index_ptr(idx), dy.dtype(), product(is, 0, d), used[d], is[d],
                         product(is, d + 1, is.size()), dy.device());
    return {pad_to(dx, in_shape)};
  }, {idx});
  return out;
}

Tensor scatter_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src) {
  LT_CHECK(a.defined() && src.defined(), "scatter_add: got an undefined input or src");
  LT_CHECK(is_floating(a.dtype()), "scatter_add: input must be a floating tensor, got ", dtype_name(a.dtype()));
  LT_CHECK(src.dtype() == a.dtype(), "scatter_add: src must have dtype ", dtype_name(a.dtype()), " like the input, got ",
           dtype_name(src.dtype()));
  LT_CHECK(src.device() == a.device(), "scatter_add: src must be on ", a.device().str(), " like the input, got ",
           src.device().str());
  LT_CHECK(a.dim() >= 1, "scatter_add: input must have at least 1 dim, got a 0-d tensor");
  const int64_t d = normalize_dim(dim, a.dim(), "scatter_add");
  Tensor idx = indices_as_i64(index, a, "scatter_add");
  check_index_shape(idx, a, d, "scatter_add", "input");
  check_index_shape(idx, src, -1, "scatter_add", "src");
  kernels::check_indices(index_ptr(idx), idx.numel(), a.shape()[d], a.device(), "scatter_add");

  // Scatter into the corner of the output that index covers (contiguous (outer, dim, inner)), then
  // write that corner back when it is smaller than the whole output.
  const Shape& is = idx.shape();
  Shape used = is;
  used[d] = a.shape()[d];
  Tensor out = a.detach().clone();
  const bool whole = used == a.shape();
  Tensor target = whole ? out : corner(out, used).contiguous();
  Tensor values = corner(src, is).contiguous();
  kernels::scatter_add(target.raw_data(), values.raw_data(), index_ptr(idx), a.dtype(), product(is, 0, d), used[d],
                       is[d], product(is, d + 1, is.size()), a.device());
  if (!whole) kernels::copy(kernels::make_view(corner(out, used)), kernels::make_view(target));

  const Shape src_shape = src.shape();
  record("scatter_add", {a, src}, {out}, [idx, d, used, src_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor dsrc = gather_raw(corner(g[0], used).contiguous(), d, idx);
    return {g[0], pad_to(dsrc, src_shape)};
  }, {idx});
  return out;
}

}  // namespace longtape
