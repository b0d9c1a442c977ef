// Routes every kernel of tensor/kernels.h to the backend of the output's device.
#include "tensor/cpu/cpu_kernels.h"
#include "tensor/profiler.h"
#include "tensor/tensor.h"
#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/kernels.h"
#endif

namespace longtape::kernels {

View make_view(const Tensor& t) { return make_view(t, t.shape().data(), static_cast<int>(t.dim())); }

View make_view(const Tensor& t, const int64_t* shape, int ndim) {
  LT_CHECK(ndim <= kMaxDims, "tensors have at most ", kMaxDims, " dims, got ", ndim);
  View v;
  v.data = t.raw_data();
  v.dtype = t.dtype();
  v.device = t.device();
  v.ndim = ndim;
  const int64_t tdim = t.dim();
  LT_ASSERT(tdim <= ndim, "broadcast view with fewer dims than the tensor");
  for (int i = 0; i < ndim; ++i) {
    int64_t ti = i - (ndim - tdim);
    v.shape[i] = shape[i];
    if (ti < 0) {
      v.strides[i] = 0;
    } else {
      int64_t s = t.shape()[ti];
      LT_ASSERT(s == shape[i] || s == 1, "broadcast view of incompatible shape");
      v.strides[i] = (s == 1 && shape[i] != 1) ? 0 : t.strides()[ti];
    }
  }
  return v;
}

namespace {
// Profiler row names and byte counts (read + written) of the kernels below.
const char* unary_name(UnaryOp op) {
  static const char* const names[] = {
      "unary:neg", "unary:exp", "unary:log", "unary:sqrt", "unary:rsqrt", "unary:tanh", "unary:relu",
      "unary:sigmoid", "unary:abs", "unary:square", "unary:reciprocal", "unary:gelu_tanh", "unary:gelu_erf",
      "unary:gelu_tanh_grad", "unary:gelu_erf_grad", "unary:step", "unary:pow_scalar", "unary:add_scalar",
      "unary:mul_scalar", "unary:rsub_scalar", "unary:gt_scalar", "unary:lt_scalar", "unary:eq_scalar"};
  const size_t i = static_cast<size_t>(op);
  return i < sizeof names / sizeof names[0] ? names[i] : "unary";
}
const char* binary_name(BinaryOp op) {
  static const char* const names[] = {"binary:add", "binary:sub", "binary:mul", "binary:div", "binary:pow",
                                      "binary:maximum", "binary:minimum", "binary:gt", "binary:lt", "binary:ge",
                                      "binary:le", "binary:eq", "binary:ne"};
  const size_t i = static_cast<size_t>(op);
  return i < sizeof names / sizeof names[0] ? names[i] : "binary";
}
const char* reduce_name(ReduceOp op) {
  return op == ReduceOp::sum ? "reduce:sum" : op == ReduceOp::max ? "reduce:max" : "reduce:min";
}
int64_t bytes_of(const View& v) { return v.numel() * static_cast<int64_t>(dtype_size(v.dtype)); }
int64_t bytes_of(int64_t n, DType t) { return n * static_cast<int64_t>(dtype_size(t)); }
}  // namespace

#ifdef LONGTAPE_WITH_CUDA
#define LT_ROUTE(device, call)      \
  do {                              \
    if ((device).is_cuda()) {       \
      cuda::call;                   \
    } else {                        \
      cpu::call;                    \
    }                               \
  } while (0)
#else
#define LT_ROUTE(device, call)                                                              \
  do {                                                                                      \
    LT_CHECK((device).is_cpu(), "no CUDA backend in this build, got a tensor on ", (device).str()); \
    cpu::call;                                                                              \
  } while (0)
#endif

// One routing function per entry of tensor/kernel_list.inc, each timed as one profiler row.
#define LT_VIEW_KERNEL(name, params, args, device, label, bytes) \
  void name params {                                              \
    profiler::Scope scope(label, bytes);                          \
    LT_ROUTE(device, name args);                                  \
  }
#define LT_RAW_KERNEL(name, params, args, bytes) \
  void name LT_KERNEL_WITH_DEVICE params {        \
    profiler::Scope scope(#name, bytes);          \
    LT_ROUTE(device, name args);                  \
  }
#include "tensor/kernel_list.inc"
#undef LT_VIEW_KERNEL
#undef LT_RAW_KERNEL

void check_indices(const int64_t* index, int64_t n, int64_t limit, Device device, const char* op) {
  std::vector<int64_t> host;
  const int64_t* p = index;
  if (device.is_cuda()) {
    host.resize(n);
    copy_bytes(host.data(), Device::cpu(), index, device, n * sizeof(int64_t));
    p = host.data();
  }
  for (int64_t i = 0; i < n; ++i)
    LT_CHECK(p[i] >= 0 && p[i] < limit, op, ": index ", p[i], " at position ", i, " is out of range [0, ",
             limit, ")");
}

}  // namespace longtape::kernels
