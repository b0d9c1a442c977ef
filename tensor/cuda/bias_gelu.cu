// Bias + GELU: one elementwise kernel forward (gelu(x + bias)), one backward (dy * gelu'(x + bias));
// the formulas of tensor/cuda/elementwise.cu's gelu. bf16 is stored as bf16 and computed in f32; a bf16
// pre-activation comes with an f32 bias. The bias may be null (x already holds it). Rows whose
// length is a multiple of 8 move 16 bytes of bf16 (and 2 x 16 of f32) per thread and access.
#include "tensor/cuda/common.cuh"
#include "tensor/cuda/kernels.h"

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

// x is X, out O, the bias B (X = B, or bf16 pre-activations with an f32 bias).
template <typename X, typename B, typename O>
__global__ void bias_gelu_kernel(O* out, const X* x, const B* bias, int64_t rows, int64_t cols, bool tanh_approx) {
  using C = typename Elem<B>::C;
  for_each_row_column(rows, cols, [&](int64_t i, int64_t c) {
    Elem<O>::store(out, i, gelu_of(static_cast<C>(Elem<X>::load(x, i)) + bias_at(bias, c), tanh_approx));
  });
}

// Eight consecutive f32 or bf16 values as f32, and back (16-byte aligned pointers).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(pairs[j]);
    v[2 * j] = f.x, v[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
  uint4 raw;
  auto* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
  for (int j = 0; j < 4; ++j) pairs[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// f32 math, eight elements of a row per thread: cols % 8 == 0, every pointer 16-byte aligned,
// rows * cols / 8 < 2^31. `f(x, bias, i)` returns element i's result from its pre-activation.
template <typename O, typename Inputs>
__global__ void gelu_rows_vec8_kernel(O* out, Inputs in, int32_t groups, int32_t groups_per_row) {
  for (int32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
    const int64_t i = static_cast<int64_t>(g) * 8;
    const int32_t c = (g % groups_per_row) * 8;
    float v[8];
    in(i, c, v);
    store8(out + i, v);
  }
}

template <typename X>
struct GeluForward8 {
  const X* x;
  const float* bias;
  bool tanh_approx;
  __device__ __forceinline__ void operator()(int64_t i, int32_t c, float (&v)[8]) const {
    float b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    load8(x + i, v);
    if (bias) load8(bias + c, b);
    for (int j = 0; j < 8; ++j) v[j] = gelu_of(v[j] + b[j], tanh_approx);
  }
};

template <typename X>
struct GeluBackward8 {
  const float* dy;
  const X* x;
  const float* bias;
  bool tanh_approx;
  __device__ __forceinline__ void operator()(int64_t i, int32_t c, float (&v)[8]) const {
    float b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, g[8];
    load8(x + i, v);
    load8(dy + i, g);
    if (bias) load8(bias + c, b);
    for (int j = 0; j < 8; ++j) v[j] = g[j] * gelu_grad_of(v[j] + b[j], tanh_approx);
  }
};

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches the eight-wide kernel when the shape and pointers allow it; false otherwise.
template <typename O, typename Inputs>
bool launch_vec8(O* out, const Inputs& in, int64_t rows, int64_t cols, std::initializer_list<const void*> pointers) {
  if (cols % 8 != 0 || rows * cols / 8 >= (int64_t{1} << 31) || !aligned16(out)) return false;
  for (const void* p : pointers)
    if (!aligned16(p)) return false;
  const int64_t groups = rows * cols / 8;
  gelu_rows_vec8_kernel<O, Inputs><<<grid_for(groups), kThreads, 0, stream()>>>(
      out, in, static_cast<int32_t>(groups), static_cast<int32_t>(cols / 8));
  return true;
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

void bias_gelu(void* out, DType out_dtype, const void* x, DType x_dtype, const void* bias, DType dtype, int64_t rows,
               int64_t cols, bool tanh_approx) {
  if (rows * cols == 0) return;
  const bool same = out_dtype == dtype && x_dtype == dtype;
  const bool to_bf16 = dtype == DType::f32 && out_dtype == DType::bf16 && (x_dtype == DType::f32 || x_dtype == DType::bf16);
  LT_CHECK(same || to_bf16,
           "bias_gelu: reads x and the bias and writes one dtype, or f32 or bf16 x with an f32 bias into bf16; got x ",
           dtype_name(x_dtype), ", bias ", dtype_name(dtype), ", out ", dtype_name(out_dtype));
  DeviceGuard guard(device_of(out));
  const dim3 grid = row_column_grid(rows, cols);
  const auto* bp = static_cast<const float*>(bias);
  if (to_bf16 && x_dtype == DType::bf16) {
    auto* o = static_cast<bf16*>(out);
    const auto* xp = static_cast<const bf16*>(x);
    if (!launch_vec8(o, GeluForward8<bf16>{xp, bp, tanh_approx}, rows, cols, {xp, bp}))
      bias_gelu_kernel<bf16, float, bf16><<<grid, kThreads, 0, stream()>>>(o, xp, bp, rows, cols, tanh_approx);
  } else if (to_bf16) {
    auto* o = static_cast<bf16*>(out);
    const auto* xp = static_cast<const float*>(x);
    if (!launch_vec8(o, GeluForward8<float>{xp, bp, tanh_approx}, rows, cols, {xp, bp}))
      bias_gelu_kernel<float, float, bf16><<<grid, kThreads, 0, stream()>>>(o, xp, bp, rows, cols, tanh_approx);
  } else {
    dispatch_floating(dtype, "bias_gelu", [&](auto tag) {
      using T = typename decltype(tag)::type;
      bias_gelu_kernel<T, T, T><<<grid, kThreads, 0, stream()>>>(
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
    const GeluBackward8<bf16> in{dyp, xp, bp, tanh_approx};
    if (dx_dtype == DType::bf16) {
      auto* d = static_cast<bf16*>(dx);
      if (!launch_vec8(d, in, rows, cols, {dyp, xp, bp}))
        bias_gelu_backward_kernel<float, bf16, bf16><<<grid, kThreads, 0, stream()>>>(d, dyp, xp, bp, rows, cols,
                                                                                      tanh_approx);
    } else {
      auto* d = static_cast<float*>(dx);
      if (!launch_vec8(d, in, rows, cols, {dyp, xp, bp}))
        bias_gelu_backward_kernel<float, bf16, float><<<grid, kThreads, 0, stream()>>>(d, dyp, xp, bp, rows, cols,
                                                                                       tanh_approx);
    }
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
