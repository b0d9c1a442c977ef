// Bias + GELU: one elementwise kernel forward (gelu(x + bias)), one backward (dy * gelu'(x + bias));
// the formulas of cuda/elementwise.cu's gelu. bf16 is stored as bf16 and computed in f32. The bias
// may be null: a bf16 pre-activation from a product's bias epilogue already holds it.
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

// A null bias reads as zero (x already holds it).
template <typename T>
__device__ __forceinline__ typename Elem<T>::C bias_at(const T* bias, int64_t c) {
  return bias ? Elem<T>::load(bias, c) : typename Elem<T>::C(0);
}

template <typename T, typename O>
__global__ void bias_gelu_kernel(O* out, const T* x, const T* bias, int64_t rows, int64_t cols, bool tanh_approx) {
  for_each_row_column(rows, cols, [&](int64_t i, int64_t c) {
    Elem<O>::store(out, i, gelu_of(Elem<T>::load(x, i) + bias_at(bias, c), tanh_approx));
  });
}

// dy and bias are T; x is X and dx D (T, or bf16 pre-activations and gradients with f32 dy).
template <typename T, typename X, typename D>
__global__ void bias_gelu_backward_kernel(D* dx, const T* dy, const X* x, const T* bias, int64_t rows, int64_t cols,
                                          bool tanh_approx) {
  using C = typename Elem<T>::C;
  for_each_row_column(rows, cols, [&](int64_t i, int64_t c) {
    const C pre = static_cast<C>(Elem<X>::load(x, i)) + bias_at(bias, c);
    Elem<D>::store(dx, i, Elem<T>::load(dy, i) * gelu_grad_of(pre, tanh_approx));
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

void bias_gelu_backward(void* dx, DType dx_dtype, const void* dy, const void* x, DType x_dtype, const void* bias,
                        DType dtype, int64_t rows, int64_t cols, bool tanh_approx) {
  if (rows * cols == 0) return;
  const bool same = dx_dtype == dtype && x_dtype == dtype;
  const bool bf16_rows = dtype == DType::f32 && x_dtype == DType::bf16 && (dx_dtype == DType::bf16 || dx_dtype == DType::f32);
  LT_CHECK(same || bf16_rows,
           "bias_gelu_backward: reads dy, x and writes dx of one dtype, or f32 dy with bf16 x (dx f32 or bf16); got dy ",
           dtype_name(dtype), ", x ", dtype_name(x_dtype), ", dx ", dtype_name(dx_dtype));
  DeviceGuard guard(device_of(dx));
  const dim3 grid = row_column_grid(rows, cols);
  if (!same) {
    const auto* dyp = static_cast<const float*>(dy);
    const auto* xp = static_cast<const bf16*>(x);
    const auto* bp = static_cast<const float*>(bias);
    if (dx_dtype == DType::bf16)
      bias_gelu_backward_kernel<float, bf16, bf16><<<grid, kThreads, 0, stream()>>>(static_cast<bf16*>(dx), dyp, xp, bp,
                                                                                    rows, cols, tanh_approx);
    else
      bias_gelu_backward_kernel<float, bf16, float><<<grid, kThreads, 0, stream()>>>(static_cast<float*>(dx), dyp, xp,
                                                                                     bp, rows, cols, tanh_approx);
  } else {
    dispatch_floating(dtype, "bias_gelu_backward", [&](auto tag) {
      using T = typename decltype(tag)::type;
      bias_gelu_backward_kernel<T, T, T><<<grid, kThreads, 0, stream()>>>(
          static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), rows,
          cols, tanh_approx);
    });
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
