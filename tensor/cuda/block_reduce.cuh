#pragma once
// Deterministic warp and block reductions, and the row-per-block pieces built on them (softmax,
// LayerNorm, cross-entropy, reduce). A fixed shuffle tree in each warp, then a fixed tree over
// the warps' results: the same block size gives the same bits on every run. (CUB's BlockReduce
// wants the block size at compile time; these kernels pick it per row length at run time.)
#include <type_traits>

#include "tensor/cuda/common.cuh"

namespace longtape::cuda::impl {

// The type a row is accumulated in: f64 for f64 data, f32 for f32 and bf16.
template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A, typename F>
__device__ __forceinline__ A warp_reduce(A v, F combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Every lane gets the sum, over a fixed butterfly (the same bits on every run).
template <typename A>
__device__ __forceinline__ A warp_all_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread of the block must call this; all get the result. `shared` holds 32 values.
template <typename A, typename F>
__device__ A block_reduce(A v, F combine, A identity, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, combine);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? shared[lane] : identity;
    v = warp_reduce(v, combine);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
// max/min that propagate NaN, like the CPU kernels.
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return (a != a || b != b) ? (a != a ? a : b) : (b > a ? b : a); }
};
struct MinOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return (a != a || b != b) ? (a != a ? a : b) : (b < a ? b : a); }
};

// Block size for one block per row of `cols` elements: a multiple of 32, at most `cap`.
inline int row_block_size(int64_t cols, int cap = 512) {
  int threads = 32;
  while (threads < cap && threads < cols) threads *= 2;
  return threads;
}

// Grid for one block per row, the rows walked in chunks of the grid beyond 65536.
inline unsigned row_grid(int64_t rows) { return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, 65536)); }

// A row's maximum and the sum of exp(x - max), the two halves of its log-sum-exp. An all -inf
// row gets max 0, so that no inf - inf appears.
template <typename A>
struct RowMaxSumExp {
  A max;
  A sum_exp;
};

// Every thread of the block must call this for the same row; all get the result.
template <typename T>
__device__ RowMaxSumExp<AccT<T>> row_max_sum_exp(const T* x, int64_t cols, AccT<T>* shared) {
  using A = AccT<T>;
  using E = Elem<T>;
  const A inf = A(1) / A(0);
  A m = -inf;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = MaxOp{}(m, static_cast<A>(E::load(x, c)));
  m = block_reduce(m, MaxOp{}, -inf, shared);
  if (m == -inf) m = 0;
  A s = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += m_exp(static_cast<A>(E::load(x, c)) - m);
  s = block_reduce(s, SumOp{}, A(0), shared);
  return {m, s};
}

}  // namespace longtape::cuda::impl
