// Routes every kernel of tensor/kernels.h to the backend of the output's device.
#include "tensor/cpu/cpu_kernels.h"
#include "tensor/tensor.h"
#ifdef LONGTAPE_WITH_CUDA
#include "cuda/kernels.h"
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

void unary(UnaryOp op, const View& out, const View& in, double alpha) { LT_ROUTE(out.device, unary(op, out, in, alpha)); }
void binary(BinaryOp op, const View& out, const View& a, const View& b) { LT_ROUTE(out.device, binary(op, out, a, b)); }
void where(const View& out, const View& cond, const View& a, const View& b) { LT_ROUTE(out.device, where(out, cond, a, b)); }
void copy(const View& dst, const View& src) { LT_ROUTE(dst.device, copy(dst, src)); }
void fill(const View& dst, double value) { LT_ROUTE(dst.device, fill(dst, value)); }
void reduce(ReduceOp op, const View& out, const View& in, int nreduce) { LT_ROUTE(out.device, reduce(op, out, in, nreduce)); }
void gemm(const GemmArgs& args) { LT_ROUTE(args.device, gemm(args)); }
void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log, Device device) {
  LT_ROUTE(device, softmax(out, in, dtype, rows, cols, log));
}
void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols, bool log,
                      Device device) {
  LT_ROUTE(device, softmax_backward(dx, y, dy, dtype, rows, cols, log));
}
void layer_norm(void* y, void* mean, void* rstd, const void* x, const void* weight, const void* bias, DType dtype,
                int64_t rows, int64_t cols, double eps, Device device) {
  LT_ROUTE(device, layer_norm(y, mean, rstd, x, weight, bias, dtype, rows, cols, eps));
}
void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* weight, DType dtype, int64_t rows, int64_t cols,
                         Device device) {
  LT_ROUTE(device, layer_norm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight, dtype, rows, cols));
}
void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
                  int64_t n, int64_t inner, Device device) {
  LT_ROUTE(device, index_select(out, in, index, dtype, outer, in_dim, n, inner));
}
void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
               int64_t n, int64_t inner, Device device) {
  LT_ROUTE(device, index_add(out, src, index, dtype, outer, out_dim, n, inner));
}
void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
            int64_t n, int64_t inner, Device device) {
  LT_ROUTE(device, gather(out, in, index, dtype, outer, in_dim, n, inner));
}
void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
                 int64_t n, int64_t inner, Device device) {
  LT_ROUTE(device, scatter_add(out, src, index, dtype, outer, out_dim, n, inner));
}
void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high) {
  LT_ROUTE(out.device, uniform(out, seed, offset, low, high));
}
void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std) {
  LT_ROUTE(out.device, normal(out, seed, offset, mean, std));
}

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
