// Routes every kernel of tensor/kernels.h to the backend of the output's device.
#include "tensor/cpu/cpu_kernels.h"
#include "tensor/profiler.h"
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

void unary(UnaryOp op, const View& out, const View& in, double alpha) {
  profiler::Scope scope(unary_name(op), 2 * bytes_of(out));
  LT_ROUTE(out.device, unary(op, out, in, alpha));
}
void binary(BinaryOp op, const View& out, const View& a, const View& b) {
  profiler::Scope scope(binary_name(op), 3 * bytes_of(out));
  LT_ROUTE(out.device, binary(op, out, a, b));
}
void where(const View& out, const View& cond, const View& a, const View& b) {
  profiler::Scope scope("where", 4 * bytes_of(out));
  LT_ROUTE(out.device, where(out, cond, a, b));
}
void copy(const View& dst, const View& src) {
  profiler::Scope scope("copy", bytes_of(dst) + bytes_of(src));
  LT_ROUTE(dst.device, copy(dst, src));
}
void fill(const View& dst, double value) {
  profiler::Scope scope("fill", bytes_of(dst));
  LT_ROUTE(dst.device, fill(dst, value));
}
void reduce(ReduceOp op, const View& out, const View& in, int nreduce) {
  profiler::Scope scope(reduce_name(op), bytes_of(in) + bytes_of(out));
  LT_ROUTE(out.device, reduce(op, out, in, nreduce));
}
void gemm(const GemmArgs& args) {
  profiler::Scope scope("gemm", bytes_of(args.batch * (args.m * args.k + args.k * args.n + args.m * args.n), args.dtype));
  LT_ROUTE(args.device, gemm(args));
}
void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log, Device device) {
  profiler::Scope scope("softmax", 2 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, softmax(out, in, dtype, rows, cols, log));
}
void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols, bool log,
                      Device device) {
  profiler::Scope scope("softmax_backward", 3 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, softmax_backward(dx, y, dy, dtype, rows, cols, log));
}
void layer_norm(void* y, void* mean, void* rstd, const void* x, const void* weight, const void* bias, DType dtype,
                int64_t rows, int64_t cols, double eps, Device device) {
  profiler::Scope scope("layer_norm", 2 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, layer_norm(y, mean, rstd, x, weight, bias, dtype, rows, cols, eps));
}
void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* weight, DType dtype, int64_t rows, int64_t cols,
                         Device device) {
  profiler::Scope scope("layer_norm_backward", 3 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, layer_norm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight, dtype, rows, cols));
}
void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
                  int64_t n, int64_t inner, Device device) {
  profiler::Scope scope("index_select", 2 * bytes_of(outer * n * inner, dtype));
  LT_ROUTE(device, index_select(out, in, index, dtype, outer, in_dim, n, inner));
}
void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
               int64_t n, int64_t inner, Device device) {
  profiler::Scope scope("index_add", 3 * bytes_of(outer * n * inner, dtype));
  LT_ROUTE(device, index_add(out, src, index, dtype, outer, out_dim, n, inner));
}
void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
            int64_t n, int64_t inner, Device device) {
  profiler::Scope scope("gather", 2 * bytes_of(outer * n * inner, dtype));
  LT_ROUTE(device, gather(out, in, index, dtype, outer, in_dim, n, inner));
}
void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
                 int64_t n, int64_t inner, Device device) {
  profiler::Scope scope("scatter_add", 3 * bytes_of(outer * n * inner, dtype));
  LT_ROUTE(device, scatter_add(out, src, index, dtype, outer, out_dim, n, inner));
}
void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high) {
  profiler::Scope scope("uniform", bytes_of(out));
  LT_ROUTE(out.device, uniform(out, seed, offset, low, high));
}
void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std) {
  profiler::Scope scope("normal", bytes_of(out));
  LT_ROUTE(out.device, normal(out, seed, offset, mean, std));
}

// ---- fused training ops
void bias_gelu(void* out, const void* x, const void* bias, DType dtype, int64_t rows, int64_t cols, bool tanh_approx,
               Device device) {
  profiler::Scope scope("bias_gelu", 2 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, bias_gelu(out, x, bias, dtype, rows, cols, tanh_approx));
}
void bias_gelu_backward(void* dx, const void* dy, const void* x, const void* bias, DType dtype, int64_t rows,
                        int64_t cols, bool tanh_approx, Device device) {
  profiler::Scope scope("bias_gelu_backward", 3 * bytes_of(rows * cols, dtype));
  LT_ROUTE(device, bias_gelu_backward(dx, dy, x, bias, dtype, rows, cols, tanh_approx));
}
void cross_entropy(void* loss_rows, void* counted_rows, void* lse_rows, const void* logits, const int64_t* targets,
                   DType dtype, int64_t rows, int64_t classes, int64_t ignore_index, Device device) {
  profiler::Scope scope("cross_entropy", bytes_of(rows * classes, dtype));
  LT_ROUTE(device, cross_entropy(loss_rows, counted_rows, lse_rows, logits, targets, dtype, rows, classes, ignore_index));
}
void cross_entropy_backward(void* dlogits, const void* logits, const void* lse_rows, const int64_t* targets,
                            const void* scale, DType dtype, int64_t rows, int64_t classes, int64_t ignore_index,
                            Device device) {
  profiler::Scope scope("cross_entropy_backward", 2 * bytes_of(rows * classes, dtype));
  LT_ROUTE(device, cross_entropy_backward(dlogits, logits, lse_rows, targets, scale, dtype, rows, classes, ignore_index));
}
void flag_bad_indices(int64_t* first_bad, const int64_t* index, int64_t n, int64_t limit, int64_t allowed,
                      Device device) {
  profiler::Scope scope("flag_bad_indices", bytes_of(n, DType::i64));
  LT_ROUTE(device, flag_bad_indices(first_bad, index, n, limit, allowed));
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
