#pragma once
// Pieces shared by the CUDA kernel files (tensor/cuda/*.cu): element types and their compute types,
// a device guard, launch geometry, dtype dispatch and strided N-d indexing. Block reductions
// are in tensor/cuda/block_reduce.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "tensor/cuda/check.cuh"
#include "tensor/cuda/runtime.h"
#include "tensor/allocator.h"
#include "tensor/kernels.h"

namespace longtape::cuda::impl {

// Math overloads so one template serves f32 (single-precision functions) and f64.
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_erf(float x) { return erff(x); }
__device__ __forceinline__ double m_erf(double x) { return erf(x); }

using bf16 = __nv_bfloat16;
using f16 = __half;
using kernels::kMaxDims;

inline cudaStream_t stream() { return static_cast<cudaStream_t>(current_stream()); }

// Makes a device current for one launch and restores the previous one afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device) {
    if (!device.is_cuda()) return;
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device.index) {
      CUDA_CHECK(cudaSetDevice(device.index));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The device that owns `ptr`, for the kernels that receive bare pointers: launching on another
// device than the one holding the data would fault. Host or unknown pointers give the current one.
inline Device device_of(const void* ptr) {
  // With one visible device it owns every pointer: no driver query on each launch.
  static const int visible = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    return n;
  }();
  if (visible == 1) return Device::cuda(0);
  cudaPointerAttributes attributes{};
  if (ptr && cudaPointerGetAttributes(&attributes, ptr) == cudaSuccess && attributes.type == cudaMemoryTypeDevice)
    return Device::cuda(attributes.device);
  cudaGetLastError();  // an unregistered pointer is not an error here
  return Device::cuda(current_device());
}

// Scratch device memory for one call, from the caching pool. Freed on scope exit; safe while
// the kernels that use it are still queued, because the pool reuses blocks in stream order.
inline std::shared_ptr<Storage> scratch(size_t nbytes) {
  return allocate_storage(Device::cuda(current_device()), std::max<size_t>(nbytes, 1));
}

// Type tags for dispatching on a run-time dtype with generic lambdas (the .cu files build as C++17).
template <typename T>
struct Tag {
  using type = T;
};
template <int B>
struct SizeTag {
  static constexpr int value = B;
};

// Calls body(Tag<T>{}) for the floating dtypes the kernels compute in (f16 too where kWithF16);
// `op` names the caller in the error for any other dtype.
template <bool kWithF16 = false, typename Body>
void dispatch_floating(DType t, const char* op, Body&& body) {
  switch (t) {
    case DType::f32: body(Tag<float>{}); return;
    case DType::f64: body(Tag<double>{}); return;
    case DType::bf16: body(Tag<bf16>{}); return;
    case DType::f16:
      if constexpr (kWithF16) {
        body(Tag<f16>{});
        return;
      }
      [[fallthrough]];
    default:
      throw Error(detail::concat(op, ": the CUDA backend computes in f32, f64, bf16",
                                 kWithF16 ? " or f16" : "", ", got ", dtype_name(t)));
  }
}

// ---- launch geometry: grid-stride loops over int64 element counts ----
constexpr int kThreads = 256;
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 65536));
}
__device__ __forceinline__ int64_t global_tid() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- element types: bf16 and f16 are stored as such and computed in f32; integers compute in f64,
// like the CPU backend (exact below 2^53) ----
template <typename T>
struct Elem {
  using C = T;
  __device__ __forceinline__ static C load(const T* p, int64_t i) { return p[i]; }
  __device__ __forceinline__ static void store(T* p, int64_t i, C v) { p[i] = v; }
};
template <>
struct Elem<bf16> {
  using C = float;
  __device__ __forceinline__ static C load(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
  __device__ __forceinline__ static void store(bf16* p, int64_t i, C v) { p[i] = __float2bfloat16_rn(v); }
};
template <>
struct Elem<f16> {
  using C = float;
  __device__ __forceinline__ static C load(const f16* p, int64_t i) { return __half2float(p[i]); }
  __device__ __forceinline__ static void store(f16* p, int64_t i, C v) { p[i] = __float2half_rn(v); }
};
template <>
struct Elem<int32_t> {
  using C = double;
  __device__ __forceinline__ static C load(const int32_t* p, int64_t i) { return static_cast<double>(p[i]); }
  __device__ __forceinline__ static void store(int32_t* p, int64_t i, C v) { p[i] = static_cast<int32_t>(v); }
};
template <>
struct Elem<int64_t> {
  using C = double;
  __device__ __forceinline__ static C load(const int64_t* p, int64_t i) { return static_cast<double>(p[i]); }
  __device__ __forceinline__ static void store(int64_t* p, int64_t i, C v) { p[i] = static_cast<int64_t>(v); }
};

// Loads and stores through a dtype known only at run time (casts, where's condition). The
// conversions match tensor/cpu/elementwise.cpp: through double, bf16 and f16 via float.
__device__ __forceinline__ double load_any(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f64: return static_cast<const double*>(p)[i];
    case DType::bf16: return __bfloat162float(static_cast<const bf16*>(p)[i]);
    case DType::f16: return __half2float(static_cast<const f16*>(p)[i]);
    case DType::i32: return static_cast<double>(static_cast<const int32_t*>(p)[i]);
    case DType::i64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
  }
  return 0;
}
__device__ __forceinline__ void store_any(DType t, void* p, int64_t i, double v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case DType::f64: static_cast<double*>(p)[i] = v; return;
    case DType::bf16: static_cast<bf16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); return;
    case DType::f16: static_cast<f16*>(p)[i] = __float2half_rn(static_cast<float>(v)); return;
    case DType::i32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); return;
    case DType::i64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); return;
  }
}

// The unsigned integer type of an element size, for copies that move bits.
template <int Bytes>
struct Bits;
template <>
struct Bits<2> { using type = uint16_t; };
template <>
struct Bits<4> { using type = uint32_t; };
template <>
struct Bits<8> { using type = uint64_t; };

// ---- strided N-d indexing ----
// K views of one shape; views[0] defines it. Passed to kernels by value.
template <int K>
struct Strided {
  int ndim = 0;
  bool index32 = false;  // every element index fits 32 bits: offsets come from 32-bit divisions
  int64_t shape[kMaxDims] = {};
  int64_t strides[K][kMaxDims] = {};
};

// Builds the indexer, dropping size-1 dims and merging neighbouring dims that are contiguous
// with each other in every view (a contiguous tensor becomes one dim of stride 1).
template <int K>
Strided<K> make_strided(const kernels::View* const (&views)[K]) {
  Strided<K> s;
  const kernels::View& v0 = *views[0];
  for (int d = 0; d < v0.ndim; ++d) {
    if (v0.shape[d] == 1) continue;
    const int nd = s.ndim;
    bool merge = nd > 0;
    for (int k = 0; k < K && merge; ++k)
      merge = s.strides[k][nd - 1] == views[k]->strides[d] * v0.shape[d];
    if (merge) {
      s.shape[nd - 1] *= v0.shape[d];
      for (int k = 0; k < K; ++k) s.strides[k][nd - 1] = views[k]->strides[d];
    } else {
      s.shape[nd] = v0.shape[d];
      for (int k = 0; k < K; ++k) s.strides[k][nd] = views[k]->strides[d];
      s.ndim = nd + 1;
    }
  }
  int64_t numel = 1;
  for (int d = 0; d < v0.ndim; ++d) numel *= v0.shape[d];
  s.index32 = numel < (int64_t{1} << 31);
  return s;
}

// True when every view walks memory linearly (offset of element i is i).
template <int K>
bool is_linear(const Strided<K>& s) {
  if (s.ndim == 0) return true;
  if (s.ndim > 1) return false;
  for (int k = 0; k < K; ++k)
    if (s.strides[k][0] != 1) return false;
  return true;
}

// Element offsets of row-major element `i` in each view. Unrolled over kMaxDims so the shape
// and strides stay in the kernel's parameter space.
template <int K>
__device__ __forceinline__ void strided_offsets(const Strided<K>& s, int64_t i, int64_t (&off)[K]) {
  if (s.ndim == 1) {  // the common case after merging dims: no division
#pragma unroll
    for (int k = 0; k < K; ++k) off[k] = i * s.strides[k][0];
    return;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) off[k] = 0;
  if (s.index32) {  // a 64-bit division costs several times a 32-bit one
    uint32_t j = static_cast<uint32_t>(i);
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < s.ndim) {
        const uint32_t size = static_cast<uint32_t>(s.shape[d]);
        const uint32_t q = j / size;
        const int64_t idx = j - q * size;
        j = q;
#pragma unroll
        for (int k = 0; k < K; ++k) off[k] += idx * s.strides[k][d];
      }
    }
    return;
  }
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d < s.ndim) {
      const int64_t size = s.shape[d];
      const int64_t idx = i % size;
      i /= size;
#pragma unroll
      for (int k = 0; k < K; ++k) off[k] += idx * s.strides[k][d];
    }
  }
}

}  // namespace longtape::cuda::impl
