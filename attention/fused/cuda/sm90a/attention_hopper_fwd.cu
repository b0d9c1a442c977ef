// Fused attention forward for Hopper (sm_90a): the same problems as attention_fused_fwd.cu (dense,
// causal, dilated streams of both mixings, block lists with an optional bias; head dims 64 and 128)
// on warpgroup MMA. A CTA owns
// kWG x 64 query rows of one stream; each warpgroup (4 warps) owns 64 of them and computes
// S = Q K^T with wgmma from shared memory, the online softmax in registers, and O += P V with P as
// the register A operand and V read transposed from shared memory. K/V tiles of kBN keys arrive
// through a kStages-deep cp.async pipeline into 128-byte-swizzled tiles (strided dilated rows are
// read in place). Block lists of 64-token blocks without causal masking or a bias take their
// 64-key list tiles two at a time into 128-key tiles (kPairs: m64n128 products and half the tile
// steps). Built only for sm_90a; the host picks it by compute capability.
#include <algorithm>
#include <cmath>

#include "attention/fused/cuda/attention_forward.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "attention/fused/cuda/attention_wgmma.cuh"
#include "attention/fused/cuda/sm90a/hopper_tiles.cuh"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

template <int D, int kWG, int kBN, int kStages>
struct HopperShape {
  static constexpr int kBM = kWG * 64;
  static constexpr int kThreads = kWG * 128;
  static constexpr int kQBytes = kBM * D * 2;
  static constexpr int kKVBytes = kBN * D * 2;
  static constexpr int kQSlab = kBM * 128;  // bytes of one 64-column slab of the Q tile
  static constexpr int kKVSlab = kBN * 128;
  // 1024 bytes of slack: the swizzled tiles must start on a 1024-byte boundary.
  static constexpr size_t kSmem = 1024 + kQBytes + 2 * kStages * kKVBytes;
};

template <class F, int D, int kWG, int kBN, int kStages, bool kLists, bool kPairs>
__global__ void __launch_bounds__(kWG * 128, kWG == 1 ? 3 : (kWG == 2 && D == 64 ? 2 : 1)) hopper_forward_kernel(const FwdParams p) {
  static_assert(!kPairs || (kLists && kBN == 128), "paired list tiles: 128-key tiles of a block list");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = HopperShape<D, kWG, kBN, kStages>;
  constexpr int kBM = Shape::kBM;
  constexpr int kNT = kBN / 8;  // score n-tiles of 8 keys
  extern __shared__ unsigned char smem_raw[];
  unsigned char* sQ = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sK = sQ + Shape::kQBytes;  // kStages tiles
  unsigned char* sV = sK + kStages * Shape::kKVBytes;

  const int h = blockIdx.y, b = blockIdx.z;
  int64_t qt;
  StreamRows s;
  int br;
  if (!tile_of_cta(p.st, h, qt, s, br)) return;
  const int q0 = static_cast<int>(qt) * kBM;
  if (q0 >= s.len_q) return;
  const int len_k = static_cast<int>(s.len_k);

  const StreamInputs in = stream_inputs(p, s, b, h);

  // Key tiles of this query tile: a range, or a block list (the launcher makes kBM the block size
  // and kBN 64 keys, so that block_tiles = block size / 64 as for the portable kernel).
  KeyTiles keys{0, nullptr, 1};
  int block_row = 0;
  if constexpr (kLists) {
    block_row = q0 / kBM;
    keys = query_block_keys(p.lists, p.heads, b, h, block_row);
  } else {
    const int all_tiles = (len_k + kBN - 1) / kBN;
    keys.count = p.causal ? min(all_tiles, (q0 + kBM - 1) / kBN + 1) : all_tiles;
  }
  __shared__ int32_t list_cache[kLists ? kListCache : 1];
  if constexpr (kLists) {
    cache_block_list(keys, list_cache);
    __syncthreads();
  }
  const float* bias_row = kLists ? bias_row_of(p, b, h, block_row) : nullptr;
  auto tile_of = [&](int i) { return kLists ? keys.tile(i) : i; };
  // Skip key tiles that lie entirely in the causal future of every row of this query tile (paired
  // tiles only run without causal masking).
  auto next_visible = [&](int i) {
    while (kLists && !kPairs && p.causal && i < keys.count && keys.tile(i) * kBN > q0 + kBM - 1) ++i;
    return i;
  };
  // Steps of the key loop: tiles, or pairs of 64-key list tiles (the last one may be alone).
  const int steps = kPairs ? (keys.count + 1) / 2 : keys.count;

  load_swizzled_async<D, kBM, Shape::kThreads>(sQ, in.q, in.q_step, q0, s.len_q);
  cp_async_commit();
  // One cp.async group per stage, empty past the last tile, so that group counts stay fixed.
  auto fetch_tile = [&](int stage, int i) {
    if constexpr (kPairs) {
      // List tiles 2i and 2i + 1 into rows 0-63 and 64-127 (zeros past a lone last tile).
      if (i < steps) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int t = 2 * i + half;
          const int64_t k0 = t < keys.count ? static_cast<int64_t>(tile_of(t)) * 64 : len_k;
          load_swizzled_async<D, 64, Shape::kThreads, kBN>(sK + stage * Shape::kKVBytes + half * 64 * 128, in.k,
                                                           in.k_step, k0, len_k);
          load_swizzled_async<D, 64, Shape::kThreads, kBN>(sV + stage * Shape::kKVBytes + half * 64 * 128, in.v,
                                                           in.v_step, k0, len_k);
        }
      }
    } else if (i < keys.count) {
      load_kv_swizzled_async<D, kBN, Shape::kThreads>(sK + stage * Shape::kKVBytes, sV + stage * Shape::kKVBytes, in,
                                                      static_cast<int64_t>(tile_of(i)) * kBN, len_k);
    }
    cp_async_commit();
  };
  int fetch;
  const int first = prefetch_stages<kStages>(next_visible, fetch_tile, fetch);

  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int wg_row0 = q0 + wg * 64;
  // Stream-local query row of accumulator half hf.
  auto row_of = [&](int hf) { return wg_row0 + warp * 16 + hf * 8 + (lane >> 2); };
  const uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float sc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) sc[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  int stage = 0;
  for (int i = first; i < steps; i = next_visible(i + 1)) {
    // Tile i has landed for every thread (and is visible to the tensor cores), and every
    // warpgroup is done with the stage the next fetch overwrites.
    cp_async_wait<kStages - 2>();
    wgmma::fence_proxy_async();
    __syncthreads();
    fetch_tile((stage + kStages - 1) % kStages, fetch);
    fetch = next_visible(fetch + 1);
    const int kt = tile_of(kPairs ? 2 * i : i);
    const int k0 = kt * (kPairs ? 64 : kBN);
    const float bias = kLists && !kPairs && bias_row ? bias_row[kt / p.lists.block_tiles] * kLog2e : 0.f;
    // A warpgroup whose rows all precede the tile (causal) has nothing to do with it.
    if (!(p.causal && k0 > wg_row0 + 63)) {
      const uint32_t k_addr = smem_addr(sK + stage * Shape::kKVBytes);
      const uint32_t v_addr = smem_addr(sV + stage * Shape::kKVBytes);
      // S = Q K^T (64 x kBN per warpgroup).
      wgmma::fence_registers(sc);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t within = (kk % 4) * 32;  // k16 step inside a 128-byte row
        const uint64_t da = wgmma::descriptor(q_addr + (kk / 4) * Shape::kQSlab + within, 16, 1024);
        const uint64_t db = wgmma::descriptor(k_addr + (kk / 4) * Shape::kKVSlab + within, 16, 1024);
        mma_ss<F, kBN>(sc, da, db, kk > 0);
      }
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(sc);

      bool masked = k0 + kBN > len_k || (p.causal && k0 + kBN - 1 > wg_row0);
      int lim[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) lim[hf] = min(len_k - k0, p.causal ? row_of(hf) - k0 + 1 : kBN) - 1;
      if constexpr (kPairs) {
        // Keys of each half past the sequence's end (a lone last tile: the whole second half).
        const int k1 = 2 * i + 1 < keys.count ? tile_of(2 * i + 1) * 64 : len_k;
        const int valid0 = min(64, len_k - k0), valid1 = min(64, len_k - k1);
        masked = false;
        if (valid0 < 64 || valid1 < 64) {
          const int col_in_quad = (lane & 3) * 2;
#pragma unroll
          for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = j * 8 + col_in_quad + (e & 1);
              if (col - (col < 64 ? 0 : 64) >= (col < 64 ? valid0 : valid1)) sc[4 * j + e] = -INFINITY;
            }
        }
      }
      // Two adjacent 8-key n-tiles make one 16-key A fragment of P V.
      uint32_t pa[kBN / 16][4];
      online_softmax_tile<kNT, D / 8>(
          [&](int j, int e) -> float& { return sc[4 * j + e]; }, [&](int d, int e) -> float& { return o[4 * d + e]; },
          m_run, l_run, bias, p.scale_log2, p.lazy_rescale, masked, lim, [&](int j) {
            pa[j / 2][(j % 2) * 2] = F::pack(sc[4 * j], sc[4 * j + 1]);
            pa[j / 2][(j % 2) * 2 + 1] = F::pack(sc[4 * j + 2], sc[4 * j + 3]);
          });
      // O += P V: V tile [key][d] is the N-major B operand.
      wgmma::fence_registers(o);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        mma_rs_nmajor<F, D>(o, pa[kk], wgmma::descriptor(v_addr + kk * 16 * 128, Shape::kKVSlab, 1024));
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(o);
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();
  store_forward_rows<F, D>(p, [&](int d, int e) { return o[4 * d + e]; }, m_run, l_run, s, b, h, row_of);
#endif
}

template <class F, int D, int kWG, int kBN, int kStages, bool kLists = false, bool kPairs = false>
void launch(const FwdParams& params, const Streams& streams, int64_t batch) {
  using Shape = HopperShape<D, kWG, kBN, kStages>;
  FwdParams p = params;
  p.st = streams;
  // Query tiles of kBM rows instead of the portable kernel's 64.
  const int64_t max_tiles = retile(p.st, Shape::kBM);
  if (max_tiles == 0) return;
  launch_with_shared<hopper_forward_kernel<F, D, kWG, kBN, kStages, kLists, kPairs>>(
      cta_grid(max_tiles, p.heads, batch), Shape::kThreads, Shape::kSmem, p);
}

}  // namespace

template <class F>
void launch_forward_hopper(const FwdParams& params, const Streams& streams, int64_t batch, int head_dim) {
  if (params.lists.row_begin) {
    // Block lists: one query block per CTA, 64-key tiles. 64-token blocks at D = 64 take them two
    // at a time where no causal mask or bias depends on the key block (1.2x; 128-token blocks
    // measured slower with 128-key tiles, benchmarks/lab/NOTES.md v22).
    const bool two = params.lists.block_tiles == 2;
    LT_CHECK(params.lists.block_tiles == 1 || two, "fused attention (Hopper): block size must be 64 or 128");
    if (kernel_tuning().hopper_forward_list_pairs && !two && head_dim == 64 && !params.causal && !params.lists.bias)
      return launch<F, 64, 1, 128, 2, true, true>(params, streams, batch);
    if (head_dim == 64)
      return two ? launch<F, 64, 2, 64, 3, true>(params, streams, batch) : launch<F, 64, 1, 64, 3, true>(params, streams, batch);
    if (head_dim == 128)
      return two ? launch<F, 128, 2, 64, 2, true>(params, streams, batch)
                 : launch<F, 128, 1, 64, 2, true>(params, streams, batch);
  }
  // The lab's warpgroup choice applies to bf16; f16 builds only the default.
  if (head_dim == 64) {
    if constexpr (!F::kIsF16)
      if (kernel_tuning().hopper_warpgroups == 3) return launch<F, 64, 3, 128, 2>(params, streams, batch);
    return launch<F, 64, 2, 128, 3>(params, streams, batch);
  }
  if (head_dim == 128) return launch<F, 128, 2, 128, 2>(params, streams, batch);
  LT_CHECK(false, "fused attention (Hopper): head_dim must be 64 or 128, got ", head_dim);
}

template void launch_forward_hopper<Bf16Format>(const FwdParams&, const Streams&, int64_t, int);
template void launch_forward_hopper<F16Format>(const FwdParams&, const Streams&, int64_t, int);

}  // namespace longtape::cuda::attn
