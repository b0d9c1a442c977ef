// Bias + GELU rows: forward and backward, one pass each (the formulas of elementwise.cpp's gelu).
#include <cmath>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"
#include "tensor/cpu/vector_math.h"

namespace longtape::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

// The approximation is a template argument so that the row loops below vectorise (erf_of is
// branch-free for f32).
template <bool tanh_approx, typename T>
[[gnu::always_inline]] inline T gelu_of(T x) {
  if constexpr (tanh_approx) return T(0.5) * x * (T(1) + std::tanh(T(kSqrt2OverPi) * (x + T(0.044715) * x * x * x)));
  return T(0.5) * x * (T(1) + erf_of(x * T(kInvSqrt2)));
}

template <bool tanh_approx, typename T>
[[gnu::always_inline]] inline T gelu_grad_of(T x) {
  if constexpr (tanh_approx) {
    const T t = std::tanh(T(kSqrt2OverPi) * (x + T(0.044715) * x * x * x));
    const T du = T(kSqrt2OverPi) * (T(1) + T(3 * 0.044715) * x * x);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
  }
  return T(0.5) * (T(1) + erf_of(x * T(kInvSqrt2))) + x * T(kInvSqrt2Pi) * exp_of(T(-0.5) * x * x);
}
template <typename F>
void with_approx(bool tanh_approx, F&& f) {
  if (tanh_approx) f.template operator()<true>();
  else f.template operator()<false>();
}
}  // namespace

void bias_gelu(void* out, DType out_dtype, const void* x, DType x_dtype, const void* bias, DType dtype, int64_t rows,
               int64_t cols, bool tanh_approx) {
  LT_CHECK(out_dtype == dtype && x_dtype == dtype, "bias_gelu: the CPU backend reads and writes one dtype, got x ",
           dtype_name(x_dtype), ", bias ", dtype_name(dtype), ", out ", dtype_name(out_dtype));
  dispatch_float(dtype, "bias_gelu", [&]<typename T>() {
    const T* xp = static_cast<const T*>(x);
    const T* b = static_cast<const T*>(bias);
    T* y = static_cast<T*>(out);
    with_approx(tanh_approx, [&]<bool kTanh>() {
#pragma omp parallel for if (rows * cols > (1 << 16))
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = xp + r * cols;
        T* yr = y + r * cols;
        if (b)
          for (int64_t c = 0; c < cols; ++c) yr[c] = gelu_of<kTanh>(xr[c] + b[c]);
        else
          for (int64_t c = 0; c < cols; ++c) yr[c] = gelu_of<kTanh>(xr[c]);
      }
    });
  });
}

void bias_gelu_backward(void* dx, DType dx_dtype, const void* dy, const void* x, DType x_dtype, const void* bias,
                        DType dtype, int64_t rows, int64_t cols, bool tanh_approx) {
  LT_CHECK(dx_dtype == dtype && x_dtype == dtype, "bias_gelu_backward: the CPU backend reads and writes one dtype, got dx ",
           dtype_name(dx_dtype), ", x ", dtype_name(x_dtype), ", dy ", dtype_name(dtype));
  dispatch_float(dtype, "bias_gelu_backward", [&]<typename T>() {
    const T* g = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    const T* b = static_cast<const T*>(bias);
    T* d = static_cast<T*>(dx);
    with_approx(tanh_approx, [&]<bool kTanh>() {
#pragma omp parallel for if (rows * cols > (1 << 16))
      for (int64_t r = 0; r < rows; ++r) {
        const T* gr = g + r * cols;
        const T* xr = xp + r * cols;
        T* dr = d + r * cols;
        if (b)
          for (int64_t c = 0; c < cols; ++c) dr[c] = gr[c] * gelu_grad_of<kTanh>(xr[c] + b[c]);
        else
          for (int64_t c = 0; c < cols; ++c) dr[c] = gr[c] * gelu_grad_of<kTanh>(xr[c]);
      }
    });
  });
}

}  // namespace longtape::cpu
