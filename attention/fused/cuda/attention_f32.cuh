#pragma once
// Shared pieces of the fused attention kernels for f32 inputs (attention_f32_fwd.cu,
// attention_f32_bwd.cu). The math is exact f32: every product is an f32 FFMA on the CUDA cores
// (no tensor cores, no TF32 rounding of the inputs), softmax and lse in f32 as on the 16-bit path.
// The stream geometry (Streams, StreamRows, Lists, tile_of_cta, block lists) and the launch plan
// are the 16-bit kernels' own (attention/fused/cuda/attention_fused.cuh, attention/fused/cuda/attention_launch.h).
//
// Register tiling: a CTA holds 64 x 64 products (scores, P, dS) as a grid of threads, 16 along the
// columns (a half warp, so that row reductions are half-warp shuffles) and 64 / kRM along the rows;
// thread (ty, tx) holds rows ty * kRM + i and columns tx + 16 j (j < 4). Tiles of q, k, v, dO are
// row-major in shared memory with rows padded by 16 bytes: 8 consecutive rows read at one column
// fall in distinct banks, so column reads (rows tx + 16 j) run without conflicts, and row reads are
// broadcasts. Products of a 64 x 64 tile with a 64 x D tile give each thread D / 16 columns of its
// rows, read as float4 (float2 at D = 32).
#include <initializer_list>
#include <utility>

#include "attention/fused/cuda/attention_fused.cuh"

namespace longtape::cuda::attn::f32 {

constexpr int kTx = 16;          // threads along a tile's columns (a half warp)
constexpr int kCols = kTile / kTx;  // columns per thread of a 64 x 64 tile: tx + 16 j
constexpr int kLdP = kTile + 4;  // row length of a 64 x 64 shared tile (P, dS)

// A CTA whose threads hold kRM rows each of a 64 x 64 tile.
template <int kRM>
struct Grid {
  static_assert(kRM == 4 || kRM == 8, "4 or 8 rows per thread");
  static constexpr int kRows = kRM;
  static constexpr int kThreads = kTx * (kTile / kRM);  // 256 or 128
  __device__ __forceinline__ static int tx() { return threadIdx.x % kTx; }
  __device__ __forceinline__ static int row0() { return static_cast<int>(threadIdx.x / kTx) * kRM; }
};

// A 64 x D shared tile, rows padded by 4 floats.
template <int D>
struct RowTile {
  static constexpr int kLd = D + 4;
  static constexpr int kFloats = kTile * kLd;
  // A thread's D / 16 output columns: chunks of kVec consecutive columns, one per 16 * kVec.
  static constexpr int kVec = D >= 64 ? 4 : 2;
  static constexpr int kDC = D / kTx;
  __device__ __forceinline__ static int col(int c, int tx) { return (c / kVec) * (kTx * kVec) + tx * kVec + c % kVec; }
};

// Copies rows [row0, row0 + 64) of a stream (first row `base`, `step` floats apart, `len` rows) into a
// shared tile; rows past `len` are zeroed. vec: 16-byte cp.async (rows and base 16-byte aligned),
// else scalar loads (these land before the function returns). Call with all kThreads threads.
template <int D, int kThreads>
__device__ __forceinline__ void load_rows(float* tile, const float* base, int64_t step, int64_t row0, int64_t len,
                                          bool vec) {
  constexpr int kLd = RowTile<D>::kLd;
  if (vec) {
    constexpr int kChunks = D / 4;
    for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 4;
      const bool valid = row0 + r < len;
      cp_async_16(tile + r * kLd + c, valid ? base + (row0 + r) * step + c : base, valid ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < kTile * D; i += kThreads) {
      const int r = i / D, c = i % D;
      tile[r * kLd + c] = row0 + r < len ? base[(row0 + r) * step + c] : 0.f;
    }
  }
}

// acc[i][j] += sum_d a[row0 + i][d] * b[tx + 16 j][d]: a and b row-major 64 x D tiles (S = Q K^T,
// dP = dO V^T and their transposes).
// kUnroll: steps of the d loop unrolled (2 overlaps the loads of one step with the products of the
// other; 1 saves the registers of a second set of loads).
template <int D, int kRM, int kUnroll = 2>
__device__ __forceinline__ void rows_dot_cols(float (&acc)[kRM][kCols], const float* a, const float* b, int row0,
                                              int tx) {
  constexpr int kLd = RowTile<D>::kLd;
#pragma unroll kUnroll
  for (int d = 0; d < D; d += 4) {
    float4 bv[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) bv[j] = *reinterpret_cast<const float4*>(b + (tx + kTx * j) * kLd + d);
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const float4 av = *reinterpret_cast<const float4*>(a + (row0 + i) * kLd + d);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        acc[i][j] = fmaf(av.x, bv[j].x, acc[i][j]);
        acc[i][j] = fmaf(av.y, bv[j].y, acc[i][j]);
        acc[i][j] = fmaf(av.z, bv[j].z, acc[i][j]);
        acc[i][j] = fmaf(av.w, bv[j].w, acc[i][j]);
      }
    }
  }
}

// acc[i][c] += sum_k A[row0 + i][k] * b[k][col(c)] over the 64 k of a 64 x 64 shared tile A
// (kLdP floats a row; kATransposed: stored as [k][row]) and a row-major 64 x D tile b (P V, P^T dO,
// dS^T Q, dS K).
template <int D, int kRM, bool kATransposed, int kUnroll = 2>
__device__ __forceinline__ void rows_times_tile(float (&acc)[kRM][RowTile<D>::kDC], const float* a, const float* b,
                                                int row0, int tx) {
  using T = RowTile<D>;
#pragma unroll kUnroll
  for (int k = 0; k < kTile; k += 4) {
    float av[kRM][4];
    if constexpr (kATransposed) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int i4 = 0; i4 < kRM; i4 += 4) {
          const float4 x = *reinterpret_cast<const float4*>(a + (k + kk) * kLdP + row0 + i4);
          av[i4][kk] = x.x, av[i4 + 1][kk] = x.y, av[i4 + 2][kk] = x.z, av[i4 + 3][kk] = x.w;
        }
    } else {
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
        const float4 x = *reinterpret_cast<const float4*>(a + (row0 + i) * kLdP + k);
        av[i][0] = x.x, av[i][1] = x.y, av[i][2] = x.z, av[i][3] = x.w;
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      float bv[T::kDC];
      const float* brow = b + (k + kk) * T::kLd;
#pragma unroll
      for (int c = 0; c < T::kDC; c += T::kVec) {
        if constexpr (T::kVec == 4) {
          const float4 x = *reinterpret_cast<const float4*>(brow + T::col(c, tx));
          bv[c] = x.x, bv[c + 1] = x.y, bv[c + 2] = x.z, bv[c + 3] = x.w;
        } else {
          const float2 x = *reinterpret_cast<const float2*>(brow + T::col(c, tx));
          bv[c] = x.x, bv[c + 1] = x.y;
        }
      }
#pragma unroll
      for (int i = 0; i < kRM; ++i)
#pragma unroll
        for (int c = 0; c < T::kDC; ++c) acc[i][c] = fmaf(av[i][kk], bv[c], acc[i][c]);
    }
  }
}

// Sum and max over the 16 threads of a half warp (one tile row).
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
  for (int off = kTx / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int off = kTx / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// dst = keep * dst + factor * x over a thread's D / 16 columns of one row (contiguous last dim);
// keep == 0 writes without reading dst (which may hold anything). vec: the row is 16-byte aligned
// and the columns go as float4 (D >= 64).
template <int D>
__device__ __forceinline__ void blend_row(float* dst, const float (&x)[RowTile<D>::kDC], float factor, float keep,
                                          int tx, bool vec) {
  using T = RowTile<D>;
#pragma unroll
  for (int c = 0; c < T::kDC; c += T::kVec) {
    float* at = dst + T::col(c, tx);
    if (vec && T::kVec == 4) {
      float4 v = keep != 0.f ? *reinterpret_cast<float4*>(at) : make_float4(0.f, 0.f, 0.f, 0.f);
      v.x = fmaf(x[c], factor, v.x * keep);
      v.y = fmaf(x[c + 1], factor, v.y * keep);
      v.z = fmaf(x[c + 2], factor, v.z * keep);
      v.w = fmaf(x[c + 3], factor, v.w * keep);
      *reinterpret_cast<float4*>(at) = v;
    } else {
#pragma unroll
      for (int e = 0; e < T::kVec; ++e) at[e] = fmaf(x[c + e], factor, keep != 0.f ? at[e] * keep : 0.f);
    }
  }
}

// The parameters of the f32 forward (write or lse-merge mode; the merge reads and rewrites out
// and lse in place, which are f32 already).
struct FwdParamsF32 : InputParams<float> {
  float* out;
  RowStrides os;
  float* lse;  // (B, H, Nq)
  float out_scale;
  bool merge;
  bool vec;  // q, k, v rows 16-byte aligned: cp.async tile loads and float4 stores
};

// The parameters of the f32 backward. dq, dk, dv are zeroed first and every kernel adds into them
// through their strides (launches of several branches add in a fixed order).
struct BwdParamsF32 : BackwardParams<float> {
  bool vec, atomic_dq;
};

// Whether every row the kernels touch is 16-byte aligned (pointers and strides).
inline bool rows_aligned(std::initializer_list<std::pair<const void*, RowStrides>> rows) {
  for (const auto& [ptr, s] : rows)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || s.batch % 4 != 0 || s.row % 4 != 0 || s.head % 4 != 0)
      return false;
  return true;
}

}  // namespace longtape::cuda::attn::f32
