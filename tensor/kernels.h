#pragma once
// The kernel interface both backends implement (tensor/cpu/*.cpp and tensor/cuda/*.cu). Plain C++ only:
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

// C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b] for b in [0, batch). Row-major, contiguous
// matrices; batch strides in elements (0 broadcasts). op = transpose when trans_* is set.
// A is (M,K) (or (K,M) when trans_a), B is (K,N) (or (N,K) when trans_b), C is (M,N).
// The optional epilogue fields below default to off, so a plain product sets none of them.
struct GemmArgs {
  void* c; const void* a; const void* b;
  DType dtype;  // A and B share it (f32, f64, or bf16 with f32 accumulation on CUDA)
  int64_t batch, m, n, k;
  int64_t stride_a, stride_b, stride_c;
  bool trans_a, trans_b;
  double alpha, beta;
  Device device;
  // The result's dtype: bf16 A and B write f32 C when set (CUDA), else C has A's dtype.
  bool f32_out = false;
  // When set, beta scales this matrix instead of C: C[b] = alpha op(A) op(B) + beta * c_in[b].
  // Same shape, strides and dtype as C; may equal c.
  const void* c_in = nullptr;
  // When set, bias[j] is added to every row of each C[b] (N values; f64 when dtype is f64, else f32).
  const void* bias = nullptr;
  // When set, a_sums[i] = sum over the reduction dim of op(A)[i][:] (M values, f64 for f64 operands,
  // else f32): with A = dY^T and B = X this is the bias gradient next to dW = dY^T X. batch must be 1;
  // not together with bias.
  void* a_sums = nullptr;
  DType out_dtype() const { return f32_out ? DType::f32 : dtype; }
  DType vector_dtype() const { return dtype == DType::f64 ? DType::f64 : DType::f32; }  // bias / a_sums
};

// The kernels both backends implement, declared from the one list (tensor/kernel_list.inc, where
// each kernel's contract is written). A raw-pointer kernel takes a trailing Device here.
#define LT_VIEW_KERNEL(name, params, args, device, label, bytes) void name params;
#define LT_RAW_KERNEL(name, params, args, bytes) void name LT_KERNEL_WITH_DEVICE params;
#define LT_KERNEL_WITH_DEVICE(...) (__VA_ARGS__, Device device)
#include "tensor/kernel_list.inc"
#undef LT_VIEW_KERNEL
#undef LT_RAW_KERNEL

// Throws unless every index is in [0, limit). Reads device memory when needed.
void check_indices(const int64_t* index, int64_t n, int64_t limit, Device device, const char* op);

}  // namespace longtape::kernels
