// Bias + GELU: one elementwise kernel forward (gelu(x + bias)), one backward (dy * gelu'(x + bias));
// the formulas of cuda/elementwise.cu's gelu. bf16 is stored as bf16 and computed in f32.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <typename C>
__device__ __forceinline__ C gelu_of(C x, bool tanh_approx) {
  if (tanh_approx) return C(0.5) * x * (C(1) + m_tanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x)));
  return C(0.5) * x * (C(1) + m_erf(x * C(kInvSqrt2)));
}

template <typename C>
__device__ __forceinline__ C gelu_grad_of(C x, bool tanh_approx) {
  if (tanh_approx) {
    const C t = m_tanh(C(kSqrt2OverPi) * (x + C(0.044715) * x * x * x));
    const C du = C(kSqrt2OverPi) * (C(1) + C(3 * 0.044715) * x * x);
    return C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * du;
  }
  return C(0.5) * (C(1) + m_erf(x * C(kInvSqrt2))) + x * C(kInvSqrt2Pi) * m_exp(C(-0.5) * x * x);
}

// Calls f(i, column of i) over this thread's elements of a (rows, cols) grid-stride walk; the column
// steps along with i (a 64-bit remainder per element cost more than the GELU itself).
template <typename F>
__device__ __forceinline__ void for_each_with_column(int64_t total, int64_t cols, F&& f) {
  const int64_t step = grid_stride(), column_step = step % cols;
  int64_t i = global_tid(), c = i % cols;
  for (; i < total; i += step) {
    f(i, c);
    c += column_step;
    if (c >= cols) c -= cols;
  }
}

template <typename T>
__global__ void bias_gelu_kernel(T* out, const T* x, const T* bias, int64_t total, int64_t cols, bool tanh_approx) {
  using E = Elem<T>;
  for_each_with_column(total, cols, [&](int64_t i, int64_t c) {
    E::store(out, i, gelu_of(E::load(x, i) + E::load(bias, c), tanh_approx));
  });
}

template <typename T>
__global__ void bias_gelu_backward_kernel(T* dx, const T* dy, const T* x, const T* bias, int64_t total, int64_t cols,
                                          bool tanh_approx) {
  using E = Elem<T>;
  for_each_with_column(total, cols, [&](int64_t i, int64_t c) {
    E::store(dx, i, E::load(dy, i) * gelu_grad_of(E::load(x, i) + E::load(bias, c), tanh_approx));
  });
}

}  // namespace

void bias_gelu(void* out, const void* x, const void* bias, DType dtype, int64_t rows, int64_t cols, bool tanh_approx) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  DeviceGuard guard(device_of(out));
  dispatch_floating(dtype, "bias_gelu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_gelu_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(bias), total, cols, tanh_approx);
  });
  CUDA_CHECK_LAUNCH();
}

void bias_gelu_backward(void* dx, const void* dy, const void* x, const void* bias, DType dtype, int64_t rows,
                        int64_t cols, bool tanh_approx) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  DeviceGuard guard(device_of(dx));
  dispatch_floating(dtype, "bias_gelu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_gelu_backward_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), total,
        cols, tanh_approx);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
