// Elementwise kernels: unary, binary, where, copy (with dtype conversion) and fill, over strided
// N-d views (broadcast = stride 0). A view set that walks memory linearly takes a fast path
// with no index arithmetic. bf16 and f16 are stored as such and computed in f32.
#include "tensor/cuda/common.cuh"
#include "tensor/cuda/kernels.h"
#include "tensor/elementwise_math.h"

namespace longtape::cuda {

using namespace impl;

namespace {

__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double m_pow(double x, double y) { return pow(x, y); }

// The transcendental primitives of tensor/elementwise_math.h on the device (tensor/cuda/common.cuh).
struct DeviceMath {
  template <typename C> __device__ __forceinline__ static C exp(C x) { return m_exp(x); }
  template <typename C> __device__ __forceinline__ static C erf(C x) { return m_erf(x); }
  template <typename C> __device__ __forceinline__ static C log(C x) { return m_log(x); }
  template <typename C> __device__ __forceinline__ static C sqrt(C x) { return m_sqrt(x); }
  template <typename C> __device__ __forceinline__ static C tanh(C x) { return m_tanh(x); }
  template <typename C> __device__ __forceinline__ static C pow(C x, C y) { return m_pow(x, y); }
  template <typename C> __device__ __forceinline__ static C abs(C x) { return m_abs(x); }
};

// The formulas are the CPU kernels' own (tensor/elementwise_math.h).
template <typename C>
__device__ __forceinline__ C apply_unary(UnaryOp op, C x, C alpha) {
  return element::apply_unary<DeviceMath>(op, x, alpha);
}
template <typename C>
__device__ __forceinline__ C apply_binary(BinaryOp op, C a, C b) {
  return element::apply_binary<DeviceMath>(op, a, b);
}

template <typename T>
__global__ void unary_kernel(UnaryOp op, Strided<2> s, bool linear, T* out, const T* in,
                             typename Elem<T>::C alpha, int64_t n) {
  using E = Elem<T>;
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[2] = {i, i};
    if (!linear) strided_offsets(s, i, off);
    E::store(out, off[0], apply_unary(op, E::load(in, off[1]), alpha));
  }
}

template <typename T>
__global__ void binary_kernel(BinaryOp op, Strided<3> s, bool linear, T* out, const T* a, const T* b, int64_t n) {
  using E = Elem<T>;
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[3] = {i, i, i};
    if (!linear) strided_offsets(s, i, off);
    E::store(out, off[0], apply_binary(op, E::load(a, off[1]), E::load(b, off[2])));
  }
}

// where and same-dtype copies move bits: exact for every dtype.
template <int Bytes>
__global__ void where_kernel(Strided<4> s, bool linear, void* out, DType cond_dtype, const void* cond,
                             const void* a, const void* b, int64_t n) {
  using U = typename Bits<Bytes>::type;
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[4] = {i, i, i, i};
    if (!linear) strided_offsets(s, i, off);
    const bool take_a = load_any(cond_dtype, cond, off[1]) != 0;
    static_cast<U*>(out)[off[0]] = take_a ? static_cast<const U*>(a)[off[2]] : static_cast<const U*>(b)[off[3]];
  }
}

template <int Bytes>
__global__ void copy_bits_kernel(Strided<2> s, void* dst, const void* src, int64_t n) {
  using U = typename Bits<Bytes>::type;
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[2];
    strided_offsets(s, i, off);
    static_cast<U*>(dst)[off[0]] = static_cast<const U*>(src)[off[1]];
  }
}

// Same-dtype copies whose innermost dim is contiguous in both views and whole 16-byte units long
// (head slices of (B, N, H, D) tensors, permuted rows): 16 bytes a thread, the row's start found
// from the outer dims once per unit, instead of one element and a full index a thread.
__global__ void copy_rows_kernel(Strided<2> rows, int64_t element_bytes, int64_t row_units, void* dst,
                                 const void* src, int64_t units) {
  const bool index32 = units < (int64_t{1} << 31);  // a 64-bit division costs several times a 32-bit one
  for (int64_t i = global_tid(); i < units; i += grid_stride()) {
    const int64_t row = index32 ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(row_units))
                                : i / row_units;
    const int64_t unit = i - row * row_units;
    int64_t off[2];
    strided_offsets(rows, row, off);
    reinterpret_cast<uint4*>(static_cast<char*>(dst) + off[0] * element_bytes)[unit] =
        reinterpret_cast<const uint4*>(static_cast<const char*>(src) + off[1] * element_bytes)[unit];
  }
}

// Conversions go through double (bf16 and f16 through float), exactly like the CPU backend.
__global__ void convert_kernel(Strided<2> s, bool linear, void* dst, DType dst_dtype, const void* src,
                               DType src_dtype, int64_t n) {
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[2] = {i, i};
    if (!linear) strided_offsets(s, i, off);
    store_any(dst_dtype, dst, off[0], load_any(src_dtype, src, off[1]));
  }
}

// f32 <-> bf16 over contiguous memory, four elements a thread (the casts around every bf16
// product): the same bits as convert_kernel without its per-element dtype switches.
template <typename From, typename To>
__global__ void convert_linear_kernel(To* dst, const From* src, int64_t n) {
  using Src4 = std::conditional_t<std::is_same_v<From, float>, float4, uint2>;
  using Dst4 = std::conditional_t<std::is_same_v<To, float>, float4, uint2>;
  const int64_t quads = n / 4;
  for (int64_t i = global_tid(); i < quads; i += grid_stride()) {
    const Src4 packed = reinterpret_cast<const Src4*>(src)[i];
    const From* in = reinterpret_cast<const From*>(&packed);
    Dst4 result;
    To* out = reinterpret_cast<To*>(&result);
#pragma unroll
    for (int j = 0; j < 4; ++j) Elem<To>::store(out, j, Elem<From>::load(in, j));
    reinterpret_cast<Dst4*>(dst)[i] = result;
  }
  for (int64_t i = 4 * quads + global_tid(); i < n; i += grid_stride()) Elem<To>::store(dst, i, Elem<From>::load(src, i));
}

template <int Bytes>
__global__ void fill_kernel(Strided<1> s, bool linear, void* dst, uint64_t bits, int64_t n) {
  using U = typename Bits<Bytes>::type;
  const U value = static_cast<U>(bits);
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    int64_t off[1] = {i};
    if (!linear) strided_offsets(s, i, off);
    static_cast<U*>(dst)[off[0]] = value;
  }
}

bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_cuda_view(const View& v, const char* op) {
  LT_CHECK(v.device.is_cuda(), op, ": expected a CUDA tensor, got one on ", v.device.str());
}

// The rows of a strided same-dtype copy for copy_rows_kernel (its dims but the innermost), or false
// when the innermost dim is strided in a view or the rows do not start on 16-byte boundaries.
bool copy_rows(const Strided<2>& s, size_t element_bytes, const void* dst, const void* src, Strided<2>& rows,
               int64_t& row_units) {
  if (s.ndim < 2 || !aligned_to(dst, 16) || !aligned_to(src, 16)) return false;
  const int last = s.ndim - 1;
  const int64_t bytes = static_cast<int64_t>(element_bytes);
  if (s.strides[0][last] != 1 || s.strides[1][last] != 1 || (s.shape[last] * bytes) % 16 != 0) return false;
  int64_t count = 1;
  rows.ndim = last;
  for (int d = 0; d < last; ++d) {
    for (int k = 0; k < 2; ++k) {
      if ((s.strides[k][d] * bytes) % 16 != 0) return false;
      rows.strides[k][d] = s.strides[k][d];
    }
    rows.shape[d] = s.shape[d];
    count *= s.shape[d];
  }
  rows.index32 = count < (int64_t{1} << 31);
  row_units = s.shape[last] * bytes / 16;
  return true;
}

}  // namespace

void unary(UnaryOp op, const View& out, const View& in, double alpha) {
  LT_CHECK(out.dtype == in.dtype, "unary: dtype mismatch (", dtype_name(out.dtype), " vs ", dtype_name(in.dtype), ")");
  check_cuda_view(in, "unary");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(out.device);
  const View* views[2] = {&out, &in};
  const Strided<2> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for(n);
  dispatch_floating<true>(out.dtype, "unary op", [&](auto tag) {
    using T = typename decltype(tag)::type;
    unary_kernel<T><<<grid, kThreads, 0, stream()>>>(op, s, linear, static_cast<T*>(out.data),
                                                     static_cast<const T*>(in.data),
                                                     static_cast<typename Elem<T>::C>(alpha), n);
  });
  CUDA_CHECK_LAUNCH();
}

void binary(BinaryOp op, const View& out, const View& a, const View& b) {
  LT_CHECK(out.dtype == a.dtype && a.dtype == b.dtype, "binary: dtype mismatch (", dtype_name(out.dtype), ", ",
           dtype_name(a.dtype), ", ", dtype_name(b.dtype), ")");
  check_cuda_view(a, "binary");
  check_cuda_view(b, "binary");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(out.device);
  const View* views[3] = {&out, &a, &b};
  const Strided<3> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for(n);
  auto launch = [&](auto tag) {
    using T = typename decltype(tag)::type;
    binary_kernel<T><<<grid, kThreads, 0, stream()>>>(op, s, linear, static_cast<T*>(out.data),
                                                      static_cast<const T*>(a.data), static_cast<const T*>(b.data), n);
  };
  switch (out.dtype) {
    case DType::f32: launch(Tag<float>{}); break;
    case DType::f64: launch(Tag<double>{}); break;
    case DType::bf16: launch(Tag<bf16>{}); break;
    case DType::f16: launch(Tag<f16>{}); break;
    case DType::i32: launch(Tag<int32_t>{}); break;
    case DType::i64: launch(Tag<int64_t>{}); break;
  }
  CUDA_CHECK_LAUNCH();
}

void where(const View& out, const View& cond, const View& a, const View& b) {
  LT_CHECK(out.dtype == a.dtype && a.dtype == b.dtype, "where: a, b and the output must share a dtype, got ",
           dtype_name(a.dtype), ", ", dtype_name(b.dtype), " and ", dtype_name(out.dtype));
  check_cuda_view(cond, "where");
  check_cuda_view(a, "where");
  check_cuda_view(b, "where");
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(out.device);
  const View* views[4] = {&out, &cond, &a, &b};
  const Strided<4> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for(n);
  switch (dtype_size(out.dtype)) {
    case 2: where_kernel<2><<<grid, kThreads, 0, stream()>>>(s, linear, out.data, cond.dtype, cond.data, a.data, b.data, n); break;
    case 4: where_kernel<4><<<grid, kThreads, 0, stream()>>>(s, linear, out.data, cond.dtype, cond.data, a.data, b.data, n); break;
    default: where_kernel<8><<<grid, kThreads, 0, stream()>>>(s, linear, out.data, cond.dtype, cond.data, a.data, b.data, n); break;
  }
  CUDA_CHECK_LAUNCH();
}

void copy(const View& dst, const View& src) {
  check_cuda_view(src, "copy");
  LT_CHECK(dst.device == src.device, "copy: both views must be on one device, got ", dst.device.str(), " and ",
           src.device.str());
  const int64_t n = dst.numel();
  if (n == 0) return;
  DeviceGuard guard(dst.device);
  const View* views[2] = {&dst, &src};
  const Strided<2> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for(n);
  if (dst.dtype == src.dtype) {
    const size_t es = dtype_size(dst.dtype);
    if (linear) {
      CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(n) * es, cudaMemcpyDeviceToDevice, stream()));
      return;
    }
    Strided<2> rows;
    int64_t row_units = 0;
    if (copy_rows(s, es, dst.data, src.data, rows, row_units)) {
      const int64_t units = n * static_cast<int64_t>(es) / 16;
      copy_rows_kernel<<<grid_for(units), kThreads, 0, stream()>>>(rows, static_cast<int64_t>(es), row_units, dst.data,
                                                                   src.data, units);
      CUDA_CHECK_LAUNCH();
      return;
    }
    switch (es) {
      case 2: copy_bits_kernel<2><<<grid, kThreads, 0, stream()>>>(s, dst.data, src.data, n); break;
      case 4: copy_bits_kernel<4><<<grid, kThreads, 0, stream()>>>(s, dst.data, src.data, n); break;
      default: copy_bits_kernel<8><<<grid, kThreads, 0, stream()>>>(s, dst.data, src.data, n); break;
    }
  } else if (linear && aligned_to(dst.data, 16) && aligned_to(src.data, 16) &&
             ((dst.dtype == DType::bf16 && src.dtype == DType::f32) || (dst.dtype == DType::f32 && src.dtype == DType::bf16))) {
    const unsigned quad_grid = grid_for((n + 3) / 4);
    if (dst.dtype == DType::bf16)
      convert_linear_kernel<float, bf16><<<quad_grid, kThreads, 0, stream()>>>(static_cast<bf16*>(dst.data),
                                                                             static_cast<const float*>(src.data), n);
    else
      convert_linear_kernel<bf16, float><<<quad_grid, kThreads, 0, stream()>>>(static_cast<float*>(dst.data),
                                                                             static_cast<const bf16*>(src.data), n);
  } else {
    convert_kernel<<<grid, kThreads, 0, stream()>>>(s, linear, dst.data, dst.dtype, src.data, src.dtype, n);
  }
  CUDA_CHECK_LAUNCH();
}

void fill(const View& dst, double value) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  DeviceGuard guard(dst.device);
  // The element's bits, converted on the host exactly as the CPU backend stores them.
  uint64_t bits = 0;
  switch (dst.dtype) {
    case DType::f32: { float f = static_cast<float>(value); std::memcpy(&bits, &f, 4); break; }
    case DType::f64: std::memcpy(&bits, &value, 8); break;
    case DType::bf16: bits = bfloat16(static_cast<float>(value)).bits; break;
    case DType::f16: bits = float16(static_cast<float>(value)).bits; break;
    case DType::i32: { int32_t v = static_cast<int32_t>(value); uint32_t u; std::memcpy(&u, &v, 4); bits = u; break; }
    case DType::i64: { int64_t v = static_cast<int64_t>(value); std::memcpy(&bits, &v, 8); break; }
  }
  const View* views[1] = {&dst};
  const Strided<1> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for(n);
  switch (dtype_size(dst.dtype)) {
    case 2: fill_kernel<2><<<grid, kThreads, 0, stream()>>>(s, linear, dst.data, bits, n); break;
    case 4: fill_kernel<4><<<grid, kThreads, 0, stream()>>>(s, linear, dst.data, bits, n); break;
    default: fill_kernel<8><<<grid, kThreads, 0, stream()>>>(s, linear, dst.data, bits, n); break;
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
