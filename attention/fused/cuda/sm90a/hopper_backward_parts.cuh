#pragma once
// Pieces shared by the sm_90a backward kernels (attention_hopper_bwd.cu: the dK/dV and dQ CTAs;
// attention_hopper_bwd_ws.cu: the warp-specialized form): the products' modes and scalars, the
// shared-memory shape, wgmma operand descriptors, and dQ = dS K from a dS^T tile in shared memory.
#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/sm90a/hopper_tiles.cuh"

namespace longtape::cuda::attn::hopper_backward {

inline constexpr int kStep = 64;  // queries (dK/dV kernel) or keys (dQ kernel) per inner step

// The products' format, the gradients' format, and whether P and dS go in as hi + lo parts.
template <class F>
struct Plain {
  using Compute = F;
  using Out = F;
  static constexpr bool kSplit = true, kRescaled = false;
};
// bf16 inputs rescaled by powers of two into f16 copies (rescale_bf16_to_f16 in
// attention_fused_bwd.cu): P and dS carry 11 significant bits in one f16 part, three more than a
// bf16 hi part, at the cost of one product each. The factors come from BwdParams::rescale.
struct RescaledF16 {
  using Compute = F16Format;
  using Out = Bf16Format;
  static constexpr bool kSplit = false, kRescaled = true;
};

// The scalars of the products: the problem's own (Plain), or with the rescaled inputs' powers of
// two folded in (RescaledF16; see BwdRescale for each).
struct ProductScales {
  float scale_log2, p_log2, dp, delta, dk, dv, dq;
};
template <class M>
__device__ __forceinline__ ProductScales product_scales(const BwdParams& p) {
  if constexpr (M::kRescaled) {
    const float* r = p.rescale;
    return {r[kRescaleScoreLog2], r[kRescaleProbLog2], r[kRescaleDp], r[kRescaleDelta],
            r[kRescaleDk],        r[kRescaleDv],       r[kRescaleDq]};
  } else {
    return {p.scale_log2, 0.f, p.do_scale, 1.f, p.scale, p.do_scale, p.scale};
  }
}

// kDsTiles: shared tiles for dS^T (fused dQ: 1, or 2 for hi + lo parts); kStages: stages of the
// streamed tiles (3 where the second product group of a tile runs on while the next tile starts).
template <int D, int kWG, int kDsTiles = 0, int kStages = 2>
struct BwdShape {
  static constexpr int kRows = kWG * 64;  // keys (dK/dV) or queries (dQ) per CTA
  static constexpr int kThreads = kWG * 128;
  static constexpr int kOwnBytes = kRows * D * 2;  // one resident tile (K, V or Q, dO)
  static inline constexpr int kStepBytes = kStep * D * 2;  // one streamed tile
  static constexpr int kOwnSlab = kRows * 128;
  static inline constexpr int kStepSlab = kStep * 128;
  static constexpr int kDsBytes = kStep * 64 * 2;  // dS^T: 64 keys x kStep queries
  // Two resident tiles, kStages stages of two streamed tiles, the dS^T tiles, lse and delta per
  // stage; 1024 slack.
  static constexpr size_t kSmem = 1024 + 2 * kOwnBytes + 2 * kStages * kStepBytes + kDsTiles * kDsBytes +
                                  2 * kStages * kStep * sizeof(float);
};

// The same value in every thread, said so to the compiler: a wgmma under a branch it cannot prove
// uniform across the warpgroup is serialized (ptxas C7520), so every branch and loop around the
// products tests values that pass through here (or compile-time constants).
__device__ __forceinline__ int warp_uniform(int v) { return __shfl_sync(0xffffffffu, v, 0); }
__device__ __forceinline__ unsigned char* align_1024(unsigned char* p) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~uintptr_t(1023));
}

// K-major operand descriptor of k16 step kk: rows of a swizzled tile (slab = 64 columns).
__device__ __forceinline__ uint64_t k_major(uint32_t base, int slab_bytes, int kk) {
  return wgmma::descriptor(base + (kk / 4) * slab_bytes + (kk % 4) * 32, 16, 1024);
}
// N-major (transposed) B operand of k16 step kk: rows 16 kk .. 16 kk + 15 of a swizzled tile.
__device__ __forceinline__ uint64_t n_major(uint32_t base, int slab_bytes, int kk) {
  return wgmma::descriptor(base + kk * 16 * 128, slab_bytes, 1024);
}

// Fused dQ, step 1: dS^T of a 64 x 64 tile (wgmma accumulator layout: this thread's keys
// key_a = 16 warp + lane / 4 and key_a + 8) into a swizzled shared tile [key][query] in the
// products' format (and the rest as a second tile for hi + lo parts). Padded keys get 0: their P
// is not bounded by 1, and K's zero rows must not meet an infinity.
template <class M>
__device__ __forceinline__ void write_ds_tile(unsigned char* tile, const float (&ds)[kStep / 2], bool key_a_valid,
                                              bool key_b_valid) {
  using F = typename M::Compute;
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool valid = half ? key_b_valid : key_a_valid;
      const float x = valid ? ds[4 * j + 2 * half] : 0.f, y = valid ? ds[4 * j + 2 * half + 1] : 0.f;
      const uint32_t offset = wgmma::swizzled_offset(warp * 16 + half * 8 + (lane >> 2), j) + (lane & 3) * 4;
      const uint32_t hi = F::pack(x, y);
      *reinterpret_cast<uint32_t*>(tile + offset) = hi;
      if constexpr (M::kSplit) {
        const float2 h = F::unpack(hi);
        *reinterpret_cast<uint32_t*>(tile + kStep * 128 + offset) = F::pack(x - h.x, y - h.y);
      }
    }
}

// Fused dQ, step 2: dq (64 queries x columns 64 c .. 64 c + 63) = dS K, A = dS read transposed
// from the dS^T tile, B = the CTA's K tile read N-major. Issues the products; the caller commits.
template <class M, class Shape>
__device__ __forceinline__ void dq_product(float (&dq)[32], uint32_t ds_addr, uint32_t k_addr, int c) {
  using F = typename M::Compute;
#pragma unroll
  for (int kk = 0; kk < kStep / 16; ++kk) {
    const uint64_t k_desc = n_major(k_addr + c * Shape::kOwnSlab, Shape::kOwnSlab, kk);
    wgmma::wgmma_ss<64, F::kIsF16, true>(dq, n_major(ds_addr, kStep * 128, kk), k_desc, kk > 0);
    if constexpr (M::kSplit)
      wgmma::wgmma_ss<64, F::kIsF16, true>(dq, n_major(ds_addr + kStep * 128, kStep * 128, kk), k_desc, 1);
  }
}
}  // namespace longtape::cuda::attn::hopper_backward
