// Fused attention forward on tensor cores (bf16 or f16 inputs, f32 accumulation, online softmax), and the
// host side that turns an attention::fused::Problem into launches. Every key set (dense, dilated
// branches, block lists) runs through the one kernel: a CTA owns 64 query rows of one stream and
// loops over 64-key tiles, reading strided (dilated) rows in place.
#include <cmath>
#include <limits>
#include <string>

#include "attention/fused/backends.h"
#include "attention/fused/cuda/attention_forward.cuh"
#include "attention/fused/cuda/attention_fused.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {


// A CTA owns 64 query rows of one stream (4 warps x 16 rows) and walks its key tiles with a
// kStages-deep cp.async pipeline (one barrier per key tile). Per key tile each warp computes S = Q K^T (16 x 64), the online
// softmax on unscaled scores (one FFMA + one MUFU per element: exp2(s * scale_log2 + bias - max)),
// and O += P V. Masking runs (behind a warp-uniform branch) only on ragged or causal-diagonal tiles.
// kSplitP: P enters P V as hi + lo parts in format F, so O is accurate to about twice F's bits
// (used when a block bias needs its gradient, whose rowsum(dO * O) must not carry P's rounding).
// kStages: K/V tiles in flight. Three resident CTAs per SM for D <= 64 (168 registers, no spills;
// D = 128 needs ~240).
template <class F, int D, bool kSplitP, int kStages>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 3 : 1) attention_forward_kernel(const FwdParams p) {
  using L = TileLayout<D>;
  constexpr int kNT = kTile / 8;  // key n-tiles per step
  constexpr int kDT = D / 8;      // output n-tiles
  constexpr int kKD = D / 16;     // k-steps of Q K^T
  constexpr bool kQInRegisters = D <= 64;  // D = 128 would need 32 more registers
  extern __shared__ __align__(16) unsigned char smem_raw[];
  elem16* sQ = reinterpret_cast<elem16*>(smem_raw);
  elem16* sK = sQ + L::kElems;  // kStages stages
  elem16* sV = sK + kStages * L::kElems;

  __shared__ int32_t list_cache[kListCache];
  CtaTile t;  // t.tiles: the key tiles of this query tile
  if (!cta_tile<true>(p, list_cache, t)) return;
  const StreamRows& s = t.s;
  const int b = t.b, h = t.h, q0 = t.row0, len_k = static_cast<int>(s.len_k);
  const StreamInputs in = stream_inputs(p, s, b, h);
  const float* bias_row = bias_row_of(p, b, h, t.block);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_in_warp = lane >> 2, col_in_quad = (lane & 3) * 2;
  const int warp_row0 = warp * 16;
  // Stream-local query row of accumulator half hf.
  auto row_of = [&](int hf) { return q0 + warp_row0 + hf * 8 + row_in_warp; };

  load_tile_async<D>(sQ, in.q, in.q_step, q0, s.len_q);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  // Skip key tiles that lie entirely in the causal future of every row of this query tile.
  auto next_visible = [&](int i) {
    while (p.causal && i < t.tiles.count && t.tiles.tile(i) * kTile > q0 + kTile - 1) ++i;
    return i;
  };
  // One cp.async group per stage, empty past the last tile, so that group counts stay fixed.
  auto fetch_tile = [&](int stage, int i) {
    if (i < t.tiles.count) {
      const int64_t k0 = static_cast<int64_t>(t.tiles.tile(i)) * kTile;
      load_tile_async<D>(sK + stage * L::kElems, in.k, in.k_step, k0, len_k);
      load_tile_async<D>(sV + stage * L::kElems, in.v, in.v_step, k0, len_k);
    }
    cp_async_commit();
  };
  int fetch;
  const int first = prefetch_stages<kStages>(next_visible, fetch_tile, fetch);

  uint32_t qf[kQInRegisters ? kKD : 1][4];
  if constexpr (kQInRegisters) {
    cp_async_wait<kStages - 1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kKD; ++kk) load_a<D>(qf[kk], sQ, warp_row0, kk);
  }

  // One key tile: scores, online softmax, P V. masked: the tile holds padded keys or the causal
  // diagonal; lim[hf] is then the last visible key offset of the half-row.
  auto step = [&](const elem16* tK, const elem16* tV, float bias, bool masked, const int (&lim)[2]) {
    float sc[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKD; ++kk) {
      uint32_t a_smem[4];
      if constexpr (!kQInRegisters) load_a<D>(a_smem, sQ, warp_row0, kk);
      const uint32_t(&a)[4] = kQInRegisters ? qf[kk] : a_smem;
      mma_tile_b<F, D, false>(sc, a, a, tK, kk);
    }
    online_softmax_tile<kNT, kDT>([&](int j, int e) -> float& { return sc[j][e]; },
                                  [&](int d, int e) -> float& { return o[d][e]; }, m_run, l_run, bias, p.scale_log2,
                                  p.lazy_rescale, masked, lim, [](int) {});
    // O += P V: P from registers as A fragments (format F, or hi + lo), V tile [key][d].
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t a[4], a_lo[4];
      if constexpr (kSplitP)
        a_fragment_split<F>(a, a_lo, sc[2 * kk], sc[2 * kk + 1]);
      else
        a_fragment<F>(a, sc[2 * kk], sc[2 * kk + 1]);
      mma_tile_b<F, D, true, kSplitP>(o, a, a_lo, tV, kk);
    }
  };

  int stage = 0;
  for (int i = first; i < t.tiles.count; i = next_visible(i + 1)) {
    const int kt = t.tiles.tile(i);
    // Tile i has landed for every thread, and every thread is done with the stage it read in the
    // previous iteration, which the next fetch overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    fetch_tile((stage + kStages - 1) % kStages, fetch);
    fetch = next_visible(fetch + 1);
    const float bias = bias_row ? bias_row[kt / p.lists.block_tiles] * kLog2e : 0.f;
    const int k0 = kt * kTile;
    const elem16* tK = sK + stage * L::kElems;
    const elem16* tV = sV + stage * L::kElems;
    const bool masked = k0 + kTile > len_k || (p.causal && k0 + kTile - 1 > q0);
    int lim[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) lim[hf] = min(len_k - k0, p.causal ? row_of(hf) - k0 + 1 : kTile) - 1;
    step(tK, tV, bias, masked, lim);
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();

  store_forward_rows<F, D>(p, [&](int d, int e) { return o[d][e]; }, m_run, l_run, s, b, h, [&](int hf) { return row_of(hf); });
}

template <class F, int D, bool kSplitP, int kStages>
void launch_forward_variant(const FwdParams& params, int64_t max_tiles, int64_t batch) {
  const size_t smem = (1 + 2 * kStages) * TileLayout<D>::kElems * sizeof(elem16);
  launch_with_shared<attention_forward_kernel<F, D, kSplitP, kStages>>(cta_grid(max_tiles, params.heads, batch),
                                                                        kThreads, smem, params);
}

// Split P only when a block bias needs its gradient. 128-row query tiles (two m-tiles per warp)
// measured 5-10% slower on the H200 (benchmarks/lab/NOTES.md, v2).
template <class F, int D>
void launch_forward(const FwdParams& params, const Streams& streams, int64_t batch, bool split_p) {
  const int64_t max_tiles = max_tiles_of(streams);
  if (max_tiles == 0) return;
  FwdParams p = params;
  p.st = streams;
  if (split_p) return launch_forward_variant<F, D, true, 2>(p, max_tiles, batch);
  // Three stages only where three CTAs still fit in shared memory (D <= 64). The lab's stage
  // choice applies to bf16; f16 builds only the default, which keeps the instantiations few.
  if constexpr (D > 64) {
    launch_forward_variant<F, D, false, 2>(p, max_tiles, batch);
  } else if constexpr (F::kIsF16) {
    launch_forward_variant<F, D, false, 3>(p, max_tiles, batch);
  } else {
    if (kernel_tuning().forward_stages == 2)
      launch_forward_variant<F, D, false, 2>(p, max_tiles, batch);
    else
      launch_forward_variant<F, D, false, 3>(p, max_tiles, batch);
  }
}

// The sm_90a forward runs where the lab has not turned it off and the sm_90a kernels cover the
// problem (hopper_kernels_cover: any key set), without a P split.
bool hopper_forward_usable(const attention::fused::Problem& pr, bool split_p) {
  return kernel_tuning().hopper_forward && !split_p && hopper_kernels_cover(pr);
}

}  // namespace

const char* g_last_forward_kernel = "none";
const char* last_forward_kernel() { return g_last_forward_kernel; }

// sm_90a code runs on compute capability 9.0 and nothing else.
bool hopper_kernels_cover(const attention::fused::Problem& pr) {
#if defined(LONGTAPE_WITH_HOPPER)
  if (pr.head_dim != 64 && pr.head_dim != 128) return false;
  if (pr.key_set == attention::fused::KeySet::blocks && pr.blocks.block_size != 64 && pr.blocks.block_size != 128)
    return false;
  return current_device_is_sm90();
#else
  (void)pr;
  return false;
#endif
}

void run_forward(const attention::fused::Problem& pr, const LaunchPlan& plan) {
  FwdParams p{};
  set_inputs<elem16>(p, pr, plan);
  p.out = static_cast<elem16*>(pr.out);
  p.out_residual = static_cast<elem16*>(pr.out_residual);
  p.os = row_strides_of(pr.out_stride);
  p.lse = static_cast<float*>(pr.lse);
  p.lazy_rescale = kernel_tuning().lazy_rescale;

  p.lse_stride = pr.seq_q;
  if (plan.prefill) fill_outputs(pr);
  const bool split_p = pr.blocks.bias != nullptr && pr.out_residual != nullptr;
  const bool hopper = hopper_forward_usable(pr, split_p);
  g_last_forward_kernel = hopper ? "sm90a-wgmma" : "sm80-mma";
  // lse mixing with several branches merges into an f32 accumulator, then converts once; it runs
  // chunk by chunk (merge_chunks), so the accumulator holds one chunk's rows.
  for_each_chunk(pr, plan, kernel_tuning().forward_chunk_row_heads, p,
                 [&](const SequenceChunk& chunk, const auto& pc_problem, const LaunchPlan& plan_of_chunk,
                     FwdParams pc, ChunkAccumulator& acc) {
    pc.out += chunk.start * p.os.row;
    if (pc.out_residual) pc.out_residual += chunk.start * p.os.row;
    if (plan.merge)
      pc.out_acc = acc.zeroed(static_cast<size_t>(pc_problem.batch * pc_problem.seq_q * pc_problem.heads *
                                                  pc_problem.head_dim));
    for (const Streams& launch : plan_of_chunk.launches) {
      pc.merge = plan.merge;
      pc.out_scale = plan.out_scale;
      with_format(pr.dtype, [&](auto format) {
        using F = decltype(format);
        if (hopper) return launch_forward_hopper<F>(pc, launch, pr.batch, static_cast<int>(pr.head_dim));
        with_head_dim(pr.head_dim, [&](auto dim) {
          launch_forward<F, decltype(dim)::value>(pc, launch, pr.batch, split_p);
        });
      });
    }
    if (plan.merge)
      store_accumulator(pc.out, pr.out_stride, pc.out_acc, pc_problem, pc_problem.seq_q, pc.out_residual);
  });
}

}  // namespace longtape::cuda::attn
