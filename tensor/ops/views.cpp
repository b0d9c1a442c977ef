// View operations (share storage) and the copies contiguous/clone/to, each with its backward.
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/checked_math.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {
// The requested shape with its -1 (at most one) replaced by the size that makes `numel` elements.
// Every refusal names the op and the requested shape: a second -1, a size below -1, sizes whose
// product overflows int64, a -1 next to a zero-size dimension (any size would fit, so it is
// ambiguous) and element counts that do not match.
Shape infer_shape(const Shape& requested, int64_t numel, const char* op) {
  Shape out = requested;
  int64_t known = 1, infer_at = -1;
  bool has_zero = false;
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t d = out[i];
    if (d == -1) {
      LT_CHECK(infer_at < 0, op, ": only one dim can be -1, got ", shape_str(requested), " (dims ", infer_at,
               " and ", i, ")");
      infer_at = static_cast<int64_t>(i);
      continue;
    }
    LT_CHECK(d >= 0, op, ": sizes must be >= 0 or -1, got ", shape_str(requested), " (dim ", i, " is ", d, ")");
    if (d == 0) {
      has_zero = true;
    } else {
      LT_CHECK(!__builtin_mul_overflow(known, d, &known), op, ": shape ", shape_str(requested),
               " has more elements than int64 can count (the sizes up to dim ", i, " multiply past ",
               checked::kInt64Max, ")");
    }
  }
  if (infer_at >= 0) {
    LT_CHECK(!has_zero, op, ": cannot infer -1 in ", shape_str(requested), " for ", numel,
             " elements: next to a zero-size dimension any size fits, so -1 is ambiguous; give every size");
    LT_CHECK(numel % known == 0, op, ": cannot infer -1 in ", shape_str(requested), " for ", numel,
             " elements: ", numel, " is not a multiple of ", known, ", the product of the other sizes");
    out[infer_at] = numel / known;
  }
  LT_CHECK(shape_numel(out) == numel, op, ": shape ", shape_str(requested), " needs ", shape_numel(out),
           " elements, the tensor has ", numel);
  return out;
}

// Strides for viewing (shape, strides) as new_shape without a copy, or nullopt when impossible.
// Walks both shapes from the back, matching chunks of old dims that are contiguous with each other.
std::optional<Shape> view_strides(const Shape& shape, const Shape& strides, const Shape& new_shape) {
  if (shape.empty() || shape_numel(shape) == 0) return contiguous_strides(new_shape);
  Shape out(new_shape.size());
  int64_t view_d = static_cast<int64_t>(new_shape.size()) - 1;
  int64_t chunk_base_stride = strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t tensor_d = static_cast<int64_t>(shape.size()) - 1; tensor_d >= 0; --tensor_d) {
    tensor_numel *= shape[tensor_d];
    if (tensor_d == 0 ||
        (shape[tensor_d - 1] != 1 && strides[tensor_d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || new_shape[view_d] == 1)) {
        out[view_d] = view_numel * chunk_base_stride;
        view_numel *= new_shape[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (tensor_d > 0) {
        chunk_base_stride = strides[tensor_d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return out;
}

}  // namespace

Tensor Tensor::view(const Shape& shape) const {
  Shape target = infer_shape(shape, numel(), "view");
  auto st = view_strides(this->shape(), strides(), target);
  LT_CHECK(st.has_value(), "view: shape ", shape_str(target), " is not compatible with the strides of a ",
           shape_str(this->shape()), " tensor (use reshape(), which copies when needed)");
  Tensor out = make_view(*this, target, *st, offset());
  Shape in_shape = this->shape();
  record("view", {*this}, {out}, [in_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {g[0].reshape(in_shape)};
  });
  return out;
}

Tensor Tensor::reshape(const Shape& shape) const {
  Shape target = infer_shape(shape, numel(), "reshape");
  if (view_strides(this->shape(), strides(), target)) return view(target);
  return contiguous().view(target);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  LT_CHECK(static_cast<int64_t>(dims.size()) == dim(), "permute: expected ", dim(), " dims, got ", dims.size());
  Shape sh(dims.size()), st(dims.size());
  std::vector<int64_t> inverse(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = normalize_dim(dims[i], dim(), "permute");
    LT_CHECK(inverse[d] < 0, "permute: dim ", d, " appears twice");
    inverse[d] = static_cast<int64_t>(i);
    sh[i] = shape()[d];
    st[i] = strides()[d];
  }
  Tensor out = make_view(*this, sh, st, offset());
  record("permute", {*this}, {out}, [inverse](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {g[0].permute(inverse)};
  });
  return out;
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  std::vector<int64_t> dims(dim());
  for (int64_t i = 0; i < dim(); ++i) dims[i] = i;
  std::swap(dims[normalize_dim(d0, dim(), "transpose")], dims[normalize_dim(d1, dim(), "transpose")]);
  return permute(dims);
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = normalize_dim(d, dim(), "slice");
  LT_CHECK(step > 0, "slice: step must be > 0, got ", step);
  const int64_t n = shape()[d];
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  Shape sh = shape(), st = strides();
  sh[d] = (end - start + step - 1) / step;
  st[d] = strides()[d] * step;
  Tensor out = make_view(*this, sh, st, offset() + start * strides()[d]);
  Shape in_shape = shape();
  DType dt = dtype();
  Device dev = device();
  record("slice", {*this}, {out}, [=](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor full = Tensor::zeros(in_shape, dt, dev);
    Tensor window = make_view(full, sh, [&] {
      Shape s = contiguous_strides(in_shape);
      s[d] *= step;
      return s;
    }(), start * contiguous_strides(in_shape)[d]);
    window.copy_(g[0]);
    return {full};
  });
  return out;
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  int64_t dd = normalize_dim(d, dim(), "narrow");
  LT_CHECK(start >= 0 && length >= 0 && start + length <= shape()[dd], "narrow: range [", start, ", ",
           start + length, ") is outside dim ", dd, " of size ", shape()[dd]);
  return slice(dd, start, start + length);
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  int64_t dd = normalize_dim(d, dim(), "select");
  int64_t n = shape()[dd];
  LT_CHECK(index >= -n && index < n, "select: index ", index, " is out of range for dim ", dd, " of size ", n);
  if (index < 0) index += n;
  return narrow(dd, index, 1).squeeze(dd);
}

Tensor Tensor::expand(const Shape& target) const {
  LT_CHECK(target.size() >= shape().size(), "expand: cannot expand shape ", shape_str(shape()), " to ",
           shape_str(target));
  LT_CHECK(target.size() <= static_cast<size_t>(kernels::kMaxDims), "expand: at most ", kernels::kMaxDims, " dims");
  Shape st(target.size(), 0);
  Shape sh = target;
  size_t lead = target.size() - shape().size();
  for (size_t i = 0; i < target.size(); ++i) {
    if (i < lead) {
      LT_CHECK(target[i] >= 0, "expand: new leading dims need explicit sizes, got ", shape_str(target));
      continue;
    }
    int64_t s = shape()[i - lead];
    if (target[i] == -1) sh[i] = s;
    LT_CHECK(sh[i] == s || s == 1, "expand: cannot expand shape ", shape_str(shape()), " to ", shape_str(target),
             " (dim ", i, ": ", s, " vs ", target[i], ")");
    st[i] = (s == sh[i]) ? strides()[i - lead] : 0;
  }
  Tensor out = make_view(*this, sh, st, offset());
  Shape in_shape = shape();
  record("expand", {*this}, {out}, [in_shape](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {sum_to_shape(g[0], in_shape)};
  });
  return out;
}

Tensor Tensor::squeeze(int64_t d) const {
  d = normalize_dim(d, dim(), "squeeze");
  if (shape()[d] != 1) return view(shape());
  Shape sh = shape();
  sh.erase(sh.begin() + d);
  return view(sh);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = normalize_dim(d, dim() + 1, "unsqueeze");
  Shape sh = shape();
  sh.insert(sh.begin() + d, 1);
  return view(sh);
}

Tensor Tensor::flatten(int64_t start_dim, int64_t end_dim) const {
  if (dim() == 0) return reshape({1});
  start_dim = normalize_dim(start_dim, dim(), "flatten");
  end_dim = normalize_dim(end_dim, dim(), "flatten");
  LT_CHECK(start_dim <= end_dim, "flatten: start_dim ", start_dim, " is after end_dim ", end_dim);
  Shape sh(shape().begin(), shape().begin() + start_dim);
  int64_t m = 1;
  for (int64_t i = start_dim; i <= end_dim; ++i) m *= shape()[i];
  sh.push_back(m);
  sh.insert(sh.end(), shape().begin() + end_dim + 1, shape().end());
  return reshape(sh);
}

Tensor Tensor::clone() const {
  Tensor out = Tensor::empty(shape(), dtype(), device());
  kernels::copy(kernels::make_view(out), kernels::make_view(*this));
  record("clone", {*this}, {out}, [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {g[0]}; });
  return out;
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor src = detach().contiguous();
  Tensor out = Tensor::empty(shape(), dtype(), target);
  copy_bytes(out.raw_data(), target, src.raw_data(), device(), nbytes());
  Device back = device();
  record("to_device", {*this}, {out}, [back](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {g[0].to(back)};
  });
  return out;
}

Tensor Tensor::to(DType target) const { return cast(*this, target); }

Tensor cast(const Tensor& a, DType target) {
  if (a.dtype() == target) return a;
  Tensor out = Tensor::empty(a.shape(), target, a.device());
  kernels::copy(kernels::make_view(out), kernels::make_view(a));
  if (is_floating(target) && is_floating(a.dtype())) {
    DType back = a.dtype();
    record("cast", {a}, {out}, [back](const std::vector<Tensor>& g) -> std::vector<Tensor> {
      return {cast(g[0], back)};
    });
  }
  return out;
}

}  // namespace longtape
