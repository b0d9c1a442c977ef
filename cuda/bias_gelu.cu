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

// Rows of a contiguous (rows, cols) grid: blocks stride over rows (grid y) and threads over columns
// (grid x), so the column of an element is known without a division and a warp's loads are coalesced.
template <typename F>
__device__ __forceinline__ void for_each_row_column(int64_t rows, int64_t cols, F&& f) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
      f(r * cols + c, c);
}

dim3 row_column_grid(int64_t rows, int64_t cols) {
  const int64_t x = std::clamp<int64_t>((cols + kThreads - 1) / kThreads, 1, 16);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::clamp<int64_t>(rows, 1, 65535)));
}

template <typename T, typename O>
__global__ void bias_gelu_kernel(O* out, const T* x, const T* bias, int64_t rows, int64_t cols, bool tanh_approx) {
  for_each_row_column(rows, cols, [&](int64_t i, int64_t c) {
    Elem<O>::store(out, i, gelu_of(Elem<T>::load(x, i) + Elem<T>::load(bias, c), tanh_approx));
  });
}

template <typename T>
__global__ void bias_gelu_backward_kernel(T* dx, const T* dy, const T* x, const T* bias, int64_t rows, int64_t cols,
                                          bool tanh_approx) {
  using E = Elem<T>;
  for_each_row_column(rows, cols, [&](int64_t i, int64_t c) {
    E::store(dx, i, E::load(dy, i) * gelu_grad_of(E::load(x, i) + E::load(bias, c), tanh_approx));
  });
}

}  // namespace

void bias_gelu(void* out, DType out_dtype, const void* x, const void* bias, DType dtype, int64_t rows, int64_t cols,
               bool tanh_approx) {
  if (rows * cols == 0) return;
  LT_CHECK(out_dtype == dtype || (out_dtype == DType::bf16 && dtype == DType::f32),
           "bias_gelu: writes the input's dtype or bf16 from f32, got ", dtype_name(dtype), " -> ", dtype_name(out_dtype));
  DeviceGuard guard(device_of(out));
  const dim3 grid = row_column_grid(rows, cols);
  if (out_dtype != dtype) {
    bias_gelu_kernel<float, bf16><<<grid, kThreads, 0, stream()>>>(
        static_cast<bf16*>(out), static_cast<const float*>(x), static_cast<const float*>(bias), rows, cols, tanh_approx);
  } else {
    dispatch_floating(dtype, "bias_gelu", [&](auto tag) {
      using T = typename decltype(tag)::type;
      bias_gelu_kernel<T, T><<<grid, kThreads, 0, stream()>>>(
          static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(bias), rows, cols, tanh_approx);
    });
  }
  CUDA_CHECK_LAUNCH();
}

void bias_gelu_backward(void* dx, const void* dy, const void* x, const void* bias, DType dtype, int64_t rows,
                        int64_t cols, bool tanh_approx) {
  if (rows * cols == 0) return;
  DeviceGuard guard(device_of(dx));
  dispatch_floating(dtype, "bias_gelu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_gelu_backward_kernel<T><<<row_column_grid(rows, cols), kThreads, 0, stream()>>>(
        static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), rows,
        cols, tanh_approx);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
