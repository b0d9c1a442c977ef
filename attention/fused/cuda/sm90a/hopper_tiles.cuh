#pragma once
// Tiles and products shared by the sm_90a attention kernels: copying stream rows into 128-byte
// swizzled shared tiles, the wgmma shapes they use, and P / dS accumulators as register A operands.
#include "attention/fused/cuda/attention_fused.cuh"
#include "attention/fused/cuda/attention_wgmma.cuh"

namespace longtape::cuda::attn {

// Starts copying rows [row0, row0 + kRows) of a stream into a swizzled tile (D / 64 slabs of
// kSlabRows x 128 bytes; kSlabRows > kRows fills the first rows of a taller tile, `tile` then
// points at the first row to fill); rows at or beyond `len` are zero-filled. Every thread of the
// CTA takes part.
template <int D, int kRows, int kThreadsAll, int kSlabRows = kRows>
__device__ __forceinline__ void load_swizzled_async(unsigned char* tile, const elem16* base, int64_t step, int64_t row0,
                                                    int64_t len) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreadsAll / kChunks;
  constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  unsigned char* slab = tile + (c / 8) * (kSlabRows * 128);
  const elem16* src = base + (row0 + r) * step + c * 8;
  const int64_t rows_left = len - row0 - r;
  const int64_t pass_step = kRowsPerPass * step;
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int row = r + i * kRowsPerPass;
    if (kRows % kRowsPerPass == 0 || row < kRows) {
      const bool valid = i * kRowsPerPass < rows_left;
      cp_async_16(slab + wgmma::swizzled_offset(row, c % 8), valid ? src : base, valid ? 16 : 0);
    }
    src += pass_step;
  }
}

// Starts copying the K and V rows [k0, k0 + kRows) of a stream into one pipeline stage (k_tile,
// v_tile); rows at or beyond len_k are zero-filled. Every thread of the CTA takes part.
template <int D, int kRows, int kThreadsAll>
__device__ __forceinline__ void load_kv_swizzled_async(unsigned char* k_tile, unsigned char* v_tile,
                                                       const StreamInputs& in, int64_t k0, int64_t len_k) {
  load_swizzled_async<D, kRows, kThreadsAll>(k_tile, in.k, in.k_step, k0, len_k);
  load_swizzled_async<D, kRows, kThreadsAll>(v_tile, in.v, in.v_step, k0, len_k);
}

// Products on inputs of format F (Bf16Format, F16Format).
template <class F, int N>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  wgmma::wgmma_ss<N, F::kIsF16>(d, a, b, accumulate);
}
template <class F, int N>
__device__ __forceinline__ void mma_rs_nmajor(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  wgmma::wgmma_rs_tb<N, F::kIsF16>(d, a, b);
}

// The A fragment (hi in format F, and lo = rest) of k-block kk of a 64 x N accumulator in wgmma
// layout: n-tiles 2 kk and 2 kk + 1 (elements 8 kk .. 8 kk + 7 of the flat accumulator).
template <class F, int N>
__device__ __forceinline__ void a_fragment_split_at(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&acc)[N], int kk) {
  const float* f = acc + 8 * kk;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    hi[r] = F::pack(f[2 * r], f[2 * r + 1]);
    const float2 h = F::unpack(hi[r]);
    lo[r] = F::pack(f[2 * r] - h.x, f[2 * r + 1] - h.y);
  }
}

}  // namespace longtape::cuda::attn
