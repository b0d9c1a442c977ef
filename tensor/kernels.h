#pragma once
// The kernel interface both backends implement (tensor/cpu/*.cpp and cuda/*.cu). Plain C++ only:
// no CUDA headers, so CPU-only code builds with a host compiler. Kernels take outputs first,
// then inputs, then sizes. Views carry their own strides (in elements; 0 = broadcast) and a
// data pointer that already includes the element offset. dispatch.cpp routes each call to the
// backend of the output's device.
#include <cstdint>

#include "tensor/device.h"
#include "tensor/dtype.h"

namespace longtape {
class Tensor;
}

namespace longtape::kernels {

constexpr int kMaxDims = 8;

struct View {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};
View make_view(const Tensor& t);                   // the tensor's own layout
View make_view(const Tensor& t, const int64_t* shape, int ndim);  // broadcast to shape

enum class UnaryOp : uint8_t {
  neg, exp, log, sqrt, rsqrt, tanh, relu, sigmoid, abs, square, reciprocal,
  gelu_tanh, gelu_erf,
  gelu_tanh_grad,  // d/dx gelu_tanh(x)
  gelu_erf_grad,   // d/dx gelu_erf(x)
  step,            // 1 where x > 0 else 0 (relu's derivative)
  pow_scalar,      // x ** alpha
  add_scalar,      // x + alpha
  mul_scalar,      // x * alpha
  rsub_scalar,     // alpha - x
  gt_scalar,       // x > alpha ? 1 : 0
  lt_scalar,       // x < alpha ? 1 : 0
  eq_scalar,       // x == alpha ? 1 : 0
};
enum class BinaryOp : uint8_t { add, sub, mul, div, pow, maximum, minimum, gt, lt, ge, le, eq, ne };
enum class ReduceOp : uint8_t { sum, max, min };

// out = op(in, alpha); out and in have the same shape; in may be strided or broadcast.
void unary(UnaryOp op, const View& out, const View& in, double alpha);
// out = op(a, b); a and b are already broadcast to out's shape.
void binary(BinaryOp op, const View& out, const View& a, const View& b);
// out = cond != 0 ? a : b; all broadcast to out's shape.
void where(const View& out, const View& cond, const View& a, const View& b);
// dst = src (same shape; dtypes may differ: converts). Both on the same device.
void copy(const View& dst, const View& src);
void fill(const View& dst, double value);
// out (contiguous, numel = product of in's leading (ndim - nreduce) dims) = reduction of in over
// its last `nreduce` dims, visited in a fixed row-major order (bitwise reproducible).
void reduce(ReduceOp op, const View& out, const View& in, int nreduce);

// C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b] for b in [0, batch). Row-major, contiguous
// matrices; batch strides in elements (0 broadcasts). op = transpose when trans_* is set.
// A is (M,K) (or (K,M) when trans_a), B is (K,N) (or (N,K) when trans_b), C is (M,N).
struct GemmArgs {
  void* c; const void* a; const void* b;
  DType dtype;  // all three share it (f32, f64, or bf16 with f32 accumulation on CUDA)
  int64_t batch, m, n, k;
  int64_t stride_a, stride_b, stride_c;
  bool trans_a, trans_b;
  double alpha, beta;
  Device device;
  bool f32_out = false;  // bf16 A and B, f32 C (CUDA): mixed-precision products write f32
};
void gemm(const GemmArgs& args);

// Row-wise softmax / log_softmax over the last dim of contiguous (rows, cols) data.
void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log,
             Device device);
// dx = y * (dy - sum(dy * y))           (softmax)
// dx = dy - exp(y) * sum(dy)            (log_softmax, y = log-probabilities)
void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows,
                      int64_t cols, bool log, Device device);

// LayerNorm over the last dim of contiguous (rows, cols). weight/bias may be null.
// mean and rstd are f32 (f64 when dtype is f64), length rows.
void layer_norm(void* y, void* mean, void* rstd, const void* x, const void* weight,
                const void* bias, DType dtype, int64_t rows, int64_t cols, double eps,
                Device device);
// dweight/dbias may be null; they are overwritten (not accumulated), summed in fixed order.
void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, const void* x,
                         const void* mean, const void* rstd, const void* weight, DType dtype,
                         int64_t rows, int64_t cols, Device device);

// Index kernels on contiguous data viewed as (outer, dim, inner).
// out(outer, n, inner) = in(outer, index[j], inner); index: n i64 entries, checked by the caller.
void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer,
                  int64_t in_dim, int64_t n, int64_t inner, Device device);
// out(outer, index[j], inner) += src(outer, j, inner), accumulated in index order (deterministic).
void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer,
               int64_t out_dim, int64_t n, int64_t inner, Device device);
// gather / scatter_add with an index tensor of shape (outer, n, inner) (torch semantics).
void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer,
            int64_t in_dim, int64_t n, int64_t inner, Device device);
void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer,
                 int64_t out_dim, int64_t n, int64_t inner, Device device);

// Counter-based Philox4x32-10 random numbers, contiguous out; same (seed, offset) = same values.
void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high);
void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std);

// ---- fused training ops (tensor/ops/bias_gelu.cpp, tensor/ops/cross_entropy.cpp, tensor/device_checks.cpp)
// out = gelu(x + bias) over contiguous (rows, cols) x and bias (cols); math in f32 (f64 for f64).
void bias_gelu(void* out, const void* x, const void* bias, DType dtype, int64_t rows, int64_t cols, bool tanh_approx,
               Device device);
// dx = dy * gelu'(x + bias) (the bias gradient is dx's column sum).
void bias_gelu_backward(void* dx, const void* dy, const void* x, const void* bias, DType dtype, int64_t rows,
                        int64_t cols, bool tanh_approx, Device device);
// Per row of contiguous (rows, classes) logits: lse = logsumexp(row), loss = lse - logit[target] and
// counted = 1, or loss = counted = 0 when the target is ignore_index or outside [0, classes) (the
// caller checks targets). loss, counted and lse are f32 (f64 for f64 logits).
void cross_entropy(void* loss_rows, void* counted_rows, void* lse_rows, const void* logits, const int64_t* targets,
                   DType dtype, int64_t rows, int64_t classes, int64_t ignore_index, Device device);
// dlogits = (exp(logits - lse) - onehot(target)) * scale[0] on counted rows, 0 on the others;
// scale is one f32 (f64) value in device memory (d loss / counted rows), so no host read is needed.
void cross_entropy_backward(void* dlogits, const void* logits, const void* lse_rows, const int64_t* targets,
                            const void* scale, DType dtype, int64_t rows, int64_t classes, int64_t ignore_index,
                            Device device);
// *first_bad = min(*first_bad, first position whose index is outside [0, limit) and != allowed).
void flag_bad_indices(int64_t* first_bad, const int64_t* index, int64_t n, int64_t limit, int64_t allowed,
                      Device device);

// Throws unless every index is in [0, limit). Reads device memory when needed.
void check_indices(const int64_t* index, int64_t n, int64_t limit, Device device, const char* op);

}  // namespace longtape::kernels
