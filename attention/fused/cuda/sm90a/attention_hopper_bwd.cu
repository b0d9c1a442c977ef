// Fused attention backward for Hopper (sm_90a), D = 64 and 128, dense / causal / dilated streams of
// both mixings, block lists (with a fixed bias; a bias gradient keeps the portable kernels).
// Flash-style. Deterministic (the default): two kinds of CTA in one launch,
//   dK/dV: a CTA owns kWG x 64 keys of one stream (64 per warpgroup) and walks the query tiles
//          that see them: S^T = K Q^T and dP^T = V dO^T on wgmma from shared memory, P^T and
//          dS^T = P^T (dP^T - delta) in registers, then dV += P^T dO and dK += dS^T Q with P^T and
//          dS^T as register A operands (hi + lo parts, as the portable kernels) and dO, Q
//          read transposed from shared memory;
//   dQ:    a CTA owns kWG x 64 queries and walks its key tiles: S = Q K^T, dP = dO V^T,
//          dS, and dQ += dS K.
// Fused dQ (a lab form, kernel_tuning().hopper_backward_fused_dq, not deterministic): only the
// dK/dV CTAs run; each also writes dS^T of its tile to shared memory and adds dQ = dS K (dS read
// transposed) into an f32 accumulator with atomics, 5 products per tile instead of 7. Its atomic
// traffic (16 KB per 64 x 64 tile) makes it slower than the dQ CTAs (benchmarks/lab/NOTES.md v18).
// Tiles arrive through cp.async into 128-byte-swizzled shared memory (strided rows in place). At
// D = 64 without block lists (kAsync) a tile's last product group is not waited for: it runs while
// the CTA waits for the next tile's copies, in three stages of streamed tiles.
// Products run in one of two modes (Plain, RescaledF16 below): the inputs' format with P and dS as
// hi + lo parts, or bf16 inputs rescaled into f16 copies with P and dS as one f16 part each.
#include <algorithm>
#include <cmath>

#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"
#include "attention/fused/cuda/sm90a/hopper_backward_parts.cuh"
#include "attention/fused/cuda/sm90a/hopper_tiles.cuh"

namespace longtape::cuda::attn {

namespace {

using namespace hopper_backward;

// Block-list tile indices come from shared memory; at D = 128 the unserialized products need more
// than 255 registers there (24 bytes spill), so that instantiation keeps the serialized issue.
template <int D, bool kLists>
__device__ __forceinline__ int list_uniform(int v) {
  if constexpr (kLists && D < 128) return warp_uniform(v);
  return v;
}

// Makes this iteration's tile visible to every thread and the tensor cores, and starts copying
// the next one into `next_stage`: before the wait (two stages: the tile in flight is the only
// other), or with kAsync after the barrier (three stages: that stage's last readers, the products
// of two tiles ago, are done in every warp once all have passed it).
template <bool kAsync, class Fetch>
__device__ __forceinline__ void next_tile_ready(const Fetch& fetch, int next_stage, int next) {
  if constexpr (!kAsync) fetch(next_stage, next);
  cp_async_wait<kAsync ? 0 : 1>();
  wgmma::fence_proxy_async();
  __syncthreads();
  if constexpr (kAsync) fetch(next_stage, next);
}

// Fused dQ, step 3: adds dq (columns 64 c ..) times `factor` into the f32 accumulator rows of
// this thread's queries row_a and row_a + 8 of the stream (float2 atomics).
template <int D>
__device__ __forceinline__ void add_dq_rows(const BwdParams& p, const float (&dq)[32], float factor, int row_a,
                                            int len_q, const StreamRows& s, int b, int h, int c) {
  const int col = (threadIdx.x & 3) * 2 + c * 64;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_a + half * 8;
    if (row >= len_q) continue;
    const int64_t pos = s.first_q + static_cast<int64_t>(row) * s.step;
    float* dst = p.dq_acc + ((static_cast<int64_t>(b) * p.st.seq_q + pos) * p.heads + h) * D + col;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      atomicAdd(reinterpret_cast<float2*>(dst + 8 * j),
                make_float2(dq[4 * j + 2 * half] * factor, dq[4 * j + 2 * half + 1] * factor));
  }
}

// dK and dV of the key tile of CTA index `cta`. kLists: the query tiles come from the key block's
// column list (kWG = 1, so that a CTA's 64 keys lie in one block), with the block bias if any.
// kFuseDq (kWG = 1): also adds each tile's dQ = dS K into p.dq_acc with atomics.
// kAsync: a tile's dV and dK products are not waited for; they run while the CTA waits for the
// next tile's copies and barrier, and complete before its S^T and dP^T are issued (their A
// fragments and the next products' accumulators are not live at once). Three stages, since the
// stage of the tile before is still being read when the next copy starts.
template <class M, int D, int kWG, bool kLists, bool kFuseDq, bool kAsync>
__device__ __forceinline__ void dkdv_tile(const BwdParams& p, unsigned char* smem, int64_t cta) {
  using F = typename M::Compute;
  constexpr int kDsTiles = kFuseDq ? (M::kSplit ? 2 : 1) : 0;
  constexpr int kStages = kAsync ? 3 : 2;
  using Shape = BwdShape<D, kWG, kDsTiles, kStages>;
  static_assert(!kFuseDq || kWG == 1, "fused dQ: one warpgroup per CTA");
  static_assert(!(kFuseDq && kAsync), "fused dQ waits for its products");
  constexpr bool kDqWithDkDv = D == 64;
  unsigned char* sK = smem;
  unsigned char* sV = sK + Shape::kOwnBytes;
  unsigned char* sQ = sV + Shape::kOwnBytes;     // kStages stages
  unsigned char* sG = sQ + kStages * Shape::kStepBytes;  // dO, kStages stages
  unsigned char* sDs = sG + kStages * Shape::kStepBytes;  // dS^T [key][query], hi (and lo) parts
  float* sLse = reinterpret_cast<float*>(sDs + kDsTiles * Shape::kDsBytes);  // kStages x kStep
  float* sDelta = sLse + kStages * kStep;

  const int h = blockIdx.y, b = blockIdx.z;
  int64_t kt;
  StreamRows s;
  int br;
  if (!tile_of_cta(p.st, h, kt, s, br, cta)) return;
  const int k0 = static_cast<int>(kt) * Shape::kRows;
  if (k0 >= s.len_k) return;
  const int len_q = static_cast<int>(s.len_q);

  const BackwardInputs in = backward_inputs(p, s, b, h);

  // Query tiles that see these keys: a range (causal ones start at the tile holding key k0), or
  // the key block's column list.
  KeyTiles queries{(len_q + kStep - 1) / kStep, nullptr, 1};
  int first = p.causal ? k0 / kStep : 0;
  int block_col = 0;
  if constexpr (kLists) {
    block_col = static_cast<int>(kt) / p.lists.block_tiles;
    queries = key_block_queries(p.lists, p.heads, b, h, block_col);
    first = 0;
  }
  __shared__ int32_t list_cache[kLists ? kListCache : 1];
  if constexpr (kLists) {
    cache_block_list(queries, list_cache);
    __syncthreads();
  }
  auto tile_at = [&](int i) { return kLists ? list_uniform<D, kLists>(queries.tile(i)) : i; };
  // The next list entry at or after i whose queries see some of these keys.
  auto next_visible = [&](int i) {
    if constexpr (kLists)
      while (i < queries.count && (queries.tile(i) * kStep >= len_q || (p.causal && queries.tile(i) * kStep + kStep - 1 < k0)))
        ++i;
    return list_uniform<D, kLists>(i);
  };

  load_swizzled_async<D, Shape::kRows, Shape::kThreads>(sK, in.k, in.k_step, k0, s.len_k);
  load_swizzled_async<D, Shape::kRows, Shape::kThreads>(sV, in.v, in.v_step, k0, s.len_k);
  const ProductScales sc = product_scales<M>(p);
  auto fetch = [&](int stage, int i) {
    if (i < queries.count) {
      const int64_t q0 = static_cast<int64_t>(tile_at(i)) * kStep;
      load_swizzled_async<D, kStep, Shape::kThreads>(sQ + stage * Shape::kStepBytes, in.q, in.q_step, q0, len_q);
      load_swizzled_async<D, kStep, Shape::kThreads>(sG + stage * Shape::kStepBytes, in.dout, in.g_step, q0, len_q);
      if (threadIdx.x < kStep) {
        const int64_t row = q0 + threadIdx.x;
        const bool valid = row < len_q;
        sLse[stage * kStep + threadIdx.x] = valid ? lse_log2(p.lse[in.lse_row0 + row * s.step]) : INFINITY;
        sDelta[stage * kStep + threadIdx.x] = valid ? p.delta[in.lse_row0 + row * s.step] * sc.delta : 0.f;
      }
    }
    cp_async_commit();
  };
  first = next_visible(first);
  fetch(0, first);

  const int wg = kWG == 1 ? 0 : warp_uniform(static_cast<int>(threadIdx.x >> 7));
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int col_in_quad = (lane & 3) * 2;
  const int wg_key0 = k0 + wg * 64;
  const int key_a = wg_key0 + warp * 16 + (lane >> 2);  // this thread's keys: key_a, key_a + 8
  const uint32_t k_addr = smem_addr(sK) + wg * 64 * 128, v_addr = smem_addr(sV) + wg * 64 * 128;

  float dk[D / 2], dv[D / 2], st[kStep / 2], dpt[kStep / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kStep / 2; ++i) st[i] = dpt[i] = 0.f;

  int stage = 0;
  for (int i = first; i < queries.count;) {
    const int next = next_visible(i + 1);
    const int next_stage = stage + 1 == kStages ? 0 : stage + 1;
    // kAsync: the tile before this one may still be read by its dV and dK products; the one
    // before that is done in every warp (each waited for its products before this barrier).
    next_tile_ready<kAsync>(fetch, next_stage, next);
    const int qt = tile_at(i);
    const int q0 = qt * kStep;
    const float bias =
        (kLists ? bias_log2(p, b, h, qt / p.lists.block_tiles, block_col) : 0.f) + sc.p_log2;
    if constexpr (kAsync) wgmma::wait<0>();  // the tile before's dV and dK
    // A warpgroup whose keys all follow the tile's last query (causal) has nothing to add.
    if (!(p.causal && wg_key0 > q0 + kStep - 1)) {
      const uint32_t q_addr = smem_addr(sQ + stage * Shape::kStepBytes);
      const uint32_t g_addr = smem_addr(sG + stage * Shape::kStepBytes);
      // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries per warpgroup).
      wgmma::fence_registers(st);
      wgmma::fence_registers(dpt);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        mma_ss<F, kStep>(st, k_major(k_addr, Shape::kOwnSlab, kk), k_major(q_addr, Shape::kStepSlab, kk), kk > 0);
        mma_ss<F, kStep>(dpt, k_major(v_addr, Shape::kOwnSlab, kk), k_major(g_addr, Shape::kStepSlab, kk), kk > 0);
      }
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(st);
      wgmma::fence_registers(dpt);

      const float* tLse = sLse + stage * kStep;
      const float* tDelta = sDelta + stage * kStep;
      // P^T = exp2(S^T scale_log2 - lse); causal-diagonal tiles: P = 0 where the query precedes
      // the key. dS^T = P^T (dP^T do_scale - delta).
      const bool diagonal = p.causal && wg_key0 + 63 > q0;
#pragma unroll
      for (int j = 0; j < kStep / 8; ++j) {
        const float2 l2 = *reinterpret_cast<const float2*>(tLse + j * 8 + col_in_quad);
        const float2 d2 = *reinterpret_cast<const float2*>(tDelta + j * 8 + col_in_quad);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float prob = fast_exp2(fmaf(st[4 * j + e], sc.scale_log2, bias - ((e & 1) ? l2.y : l2.x)));
          if (diagonal && q0 + j * 8 + col_in_quad + (e & 1) < key_a + (e >> 1) * 8) prob = 0.f;
          st[4 * j + e] = prob;
          dpt[4 * j + e] = prob * fmaf(dpt[4 * j + e], sc.dp, -((e & 1) ? d2.y : d2.x));
        }
      }
      const uint32_t ds_addr = smem_addr(sDs);
      if constexpr (kFuseDq) {
        write_ds_tile<M>(sDs, dpt, key_a < s.len_k, key_a + 8 < s.len_k);
        wgmma::fence_proxy_async();
        __syncthreads();  // the whole dS^T tile is in shared memory before the dQ product reads it
      }
      // dV += P^T dO and dK += dS^T Q (k = the tile's queries), hi + lo parts each.
      wgmma::fence_registers(dv);
      wgmma::fence_registers(dk);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kStep / 16; ++kk) {
        uint32_t hi[4], lo[4];
        a_fragment_split_at<F, kStep / 2>(hi, lo, st, kk);
        mma_rs_nmajor<F, D>(dv, hi, n_major(g_addr, Shape::kStepSlab, kk));
        if constexpr (M::kSplit) mma_rs_nmajor<F, D>(dv, lo, n_major(g_addr, Shape::kStepSlab, kk));
        a_fragment_split_at<F, kStep / 2>(hi, lo, dpt, kk);
        mma_rs_nmajor<F, D>(dk, hi, n_major(q_addr, Shape::kStepSlab, kk));
        if constexpr (M::kSplit) mma_rs_nmajor<F, D>(dk, lo, n_major(q_addr, Shape::kStepSlab, kk));
      }
      // dQ of the tile's queries, 64 columns at a time: at D = 64 in the same group as dK and dV;
      // at D = 128 after it (both accumulators and a dQ half would not fit the registers).
      // (Declared here so that it is not live across tiles; zeroed so that no product reads an
      // undefined register.)
      float dq[kFuseDq ? 32 : 1] = {};
      if constexpr (kFuseDq && kDqWithDkDv) dq_product<M, Shape>(dq, ds_addr, k_addr, 0);
      wgmma::commit();
      if constexpr (!kAsync) {
        wgmma::wait<0>();
        wgmma::fence_registers(dv);
        wgmma::fence_registers(dk);
      }
      if constexpr (kFuseDq) {
#pragma unroll
        for (int c = 0; c < D / 64; ++c) {
          if constexpr (!kDqWithDkDv) {
            wgmma::fence();
            dq_product<M, Shape>(dq, ds_addr, k_addr, c);
            wgmma::commit();
            wgmma::wait<0>();
          }
          wgmma::fence_registers(dq);
          add_dq_rows<D>(p, dq, sc.dq, q0 + warp * 16 + (lane >> 2), len_q, s, b, h, c);
        }
      }
    }
    // Every warpgroup is done with this stage before the next iteration's fetch overwrites it
    // (kAsync: the next iteration's barrier covers the stage it overwrites).
    if constexpr (!kAsync) __syncthreads();
    stage = next_stage;
    i = next;
  }
  cp_async_wait<0>();
  if constexpr (kAsync) {
    wgmma::wait<0>();
    wgmma::fence_registers(dv);
    wgmma::fence_registers(dk);
  }
  const int64_t nk = p.st.seq_k;
  store_rows<typename M::Out, D>([&](int d, int e) { return dk[4 * d + e]; }, sc.dk, key_a, s.len_k, s, p.accumulate,
                                 p.accumulate_first, p.dk, p.dks, p.dk_acc, b, h, p.heads, nk);
  store_rows<typename M::Out, D>([&](int d, int e) { return dv[4 * d + e]; }, sc.dv, key_a, s.len_k, s, p.accumulate,
                                 p.accumulate_first, p.dv, p.dvs, p.dv_acc, b, h, p.heads, nk);
}

// dQ of the query tile of CTA index `cta`. kLists: the key tiles come from the query block's row
// list (kWG = 1), with the block bias if any. kAsync: as in dkdv_tile, for the dQ product.
template <class M, int D, int kWG, bool kLists, bool kAsync>
__device__ __forceinline__ void dq_tile(const BwdParams& p, unsigned char* smem, int64_t cta) {
  using F = typename M::Compute;
  constexpr int kStages = kAsync ? 3 : 2;
  using Shape = BwdShape<D, kWG, 0, kStages>;
  unsigned char* sQ = smem;
  unsigned char* sG = sQ + Shape::kOwnBytes;
  unsigned char* sK = sG + Shape::kOwnBytes;     // kStages stages
  unsigned char* sV = sK + kStages * Shape::kStepBytes;  // kStages stages

  const int h = blockIdx.y, b = blockIdx.z;
  int64_t qt;
  StreamRows s;
  int br;
  if (!tile_of_cta(p.st, h, qt, s, br, cta)) return;
  const int q0 = static_cast<int>(qt) * Shape::kRows;
  if (q0 >= s.len_q) return;
  const int len_k = static_cast<int>(s.len_k);

  const BackwardInputs in = backward_inputs(p, s, b, h);

  const int k_tiles = (len_k + kStep - 1) / kStep;
  KeyTiles keys{p.causal ? min(k_tiles, (q0 + Shape::kRows - 1) / kStep + 1) : k_tiles, nullptr, 1};
  int block_row = 0;
  if constexpr (kLists) {
    block_row = static_cast<int>(qt) / p.lists.block_tiles;
    keys = query_block_keys(p.lists, p.heads, b, h, block_row);
  }
  __shared__ int32_t list_cache[kLists ? kListCache : 1];
  if constexpr (kLists) {
    cache_block_list(keys, list_cache);
    __syncthreads();
  }
  auto tile_at = [&](int i) { return kLists ? list_uniform<D, kLists>(keys.tile(i)) : i; };
  auto next_visible = [&](int i) {
    if constexpr (kLists)
      while (i < keys.count && (keys.tile(i) * kStep >= len_k || (p.causal && keys.tile(i) * kStep > q0 + Shape::kRows - 1)))
        ++i;
    return list_uniform<D, kLists>(i);
  };

  load_swizzled_async<D, Shape::kRows, Shape::kThreads>(sQ, in.q, in.q_step, q0, s.len_q);
  load_swizzled_async<D, Shape::kRows, Shape::kThreads>(sG, in.dout, in.g_step, q0, s.len_q);
  auto fetch = [&](int stage, int i) {
    if (i < keys.count)
      load_kv_swizzled_async<D, kStep, Shape::kThreads>(sK + stage * Shape::kStepBytes, sV + stage * Shape::kStepBytes,
                                                        in, static_cast<int64_t>(tile_at(i)) * kStep, len_k);
    cp_async_commit();
  };
  const int first = next_visible(0);
  fetch(0, first);

  const int wg = kWG == 1 ? 0 : warp_uniform(static_cast<int>(threadIdx.x >> 7));
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int col_in_quad = (lane & 3) * 2;
  const int wg_row0 = q0 + wg * 64;
  const int row_a = wg_row0 + warp * 16 + (lane >> 2), row_b = row_a + 8;
  const float lse[2] = {row_a < s.len_q ? lse_log2(p.lse[in.lse_row0 + row_a * s.step]) : INFINITY,
                        row_b < s.len_q ? lse_log2(p.lse[in.lse_row0 + row_b * s.step]) : INFINITY};
  const ProductScales scales = product_scales<M>(p);
  const float delta[2] = {row_a < s.len_q ? p.delta[in.lse_row0 + row_a * s.step] * scales.delta : 0.f,
                          row_b < s.len_q ? p.delta[in.lse_row0 + row_b * s.step] * scales.delta : 0.f};
  const uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128, g_addr = smem_addr(sG) + wg * 64 * 128;

  float dq[D / 2], sc[kStep / 2], dp[kStep / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kStep / 2; ++i) sc[i] = dp[i] = 0.f;

  int stage = 0;
  for (int i = first; i < keys.count;) {
    const int next = next_visible(i + 1);
    const int next_stage = stage + 1 == kStages ? 0 : stage + 1;
    next_tile_ready<kAsync>(fetch, next_stage, next);
    const int kt = tile_at(i);
    const int k0 = kt * kStep;
    const float bias =
        (kLists && p.lists.bias ? p.lists.bias[block_pair(p, b, h, block_row, kt / p.lists.block_tiles)] * kLog2e : 0.f) +
        scales.p_log2;
    if constexpr (kAsync) wgmma::wait<0>();  // the tile before's dQ product
    if (!(p.causal && k0 > wg_row0 + 63)) {
      const uint32_t k_addr = smem_addr(sK + stage * Shape::kStepBytes);
      const uint32_t v_addr = smem_addr(sV + stage * Shape::kStepBytes);
      // S = Q K^T and dP = dO V^T (64 queries x 64 keys per warpgroup).
      wgmma::fence_registers(sc);
      wgmma::fence_registers(dp);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        mma_ss<F, kStep>(sc, k_major(q_addr, Shape::kOwnSlab, kk), k_major(k_addr, Shape::kStepSlab, kk), kk > 0);
        mma_ss<F, kStep>(dp, k_major(g_addr, Shape::kOwnSlab, kk), k_major(v_addr, Shape::kStepSlab, kk), kk > 0);
      }
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(sc);
      wgmma::fence_registers(dp);
      // P = 0 for padded keys and, on causal-diagonal tiles, keys after the query.
      const bool masked = k0 + kStep > len_k || (p.causal && k0 + kStep - 1 > wg_row0);
      int lim[2] = {kStep - 1, kStep - 1};
      if (masked) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) lim[hf] = min(len_k - k0, p.causal ? (hf ? row_b : row_a) - k0 + 1 : kStep) - 1;
      }
#pragma unroll
      for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float prob = fast_exp2(fmaf(sc[4 * j + e], scales.scale_log2, bias - lse[e >> 1]));
          if (masked && j * 8 + col_in_quad + (e & 1) > lim[e >> 1]) prob = 0.f;
          sc[4 * j + e] = prob * fmaf(dp[4 * j + e], scales.dp, -delta[e >> 1]);  // dS
        }
      // dQ += dS K (k = the tile's keys), hi + lo parts.
      wgmma::fence_registers(dq);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kStep / 16; ++kk) {
        uint32_t hi[4], lo[4];
        a_fragment_split_at<F, kStep / 2>(hi, lo, sc, kk);
        mma_rs_nmajor<F, D>(dq, hi, n_major(k_addr, Shape::kStepSlab, kk));
        if constexpr (M::kSplit) mma_rs_nmajor<F, D>(dq, lo, n_major(k_addr, Shape::kStepSlab, kk));
      }
      wgmma::commit();
      if constexpr (!kAsync) {
        wgmma::wait<0>();
        wgmma::fence_registers(dq);
      }
    }
    if constexpr (!kAsync) __syncthreads();
    stage = next_stage;
    i = next;
  }
  cp_async_wait<0>();
  if constexpr (kAsync) {
    wgmma::wait<0>();
    wgmma::fence_registers(dq);
  }
  StreamRows q_rows = s;
  q_rows.first_k = s.first_q;
  store_rows<typename M::Out, D>([&](int d, int e) { return dq[4 * d + e]; }, scales.dq, row_a, s.len_q, q_rows,
                                 p.accumulate, p.accumulate_first, p.dq, p.dqs, p.dq_acc, b, h, p.heads, p.st.seq_q);
}

// Deterministic: one launch runs both kinds of CTA, so that neither waits for the other's last
// wave: x in [0, tiles) computes dK/dV of key tile x, x in [tiles, 2 tiles) dQ of query tile
// x - tiles. kFuseDq: x in [0, tiles), dK/dV with dQ by atomics.
// kCtasPerSm bounds the registers (65536 / (128 kCtasPerSm) per thread at kWG = 1).
template <class M, int D, int kWG, bool kLists, int kCtasPerSm, bool kFuseDq, bool kAsync>
__global__ void __launch_bounds__(kWG * 128, kCtasPerSm)
    hopper_backward_kernel(const BwdParams p, int64_t tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  if (kFuseDq || blockIdx.x < tiles)
    dkdv_tile<M, D, kWG, kLists, kFuseDq, kAsync>(p, smem, blockIdx.x);
  else
    dq_tile<M, D, kWG, kLists, kAsync>(p, smem, blockIdx.x - tiles);
#endif
}

template <class M, int D, int kWG, bool kLists = false, int kCtasPerSm = kWG == 1 ? 2 : 1, bool kFuseDq = false,
          bool kAsync = false>
void launch(const BwdParams& params, const Streams& streams, int64_t batch) {
  using Shape = BwdShape<D, kWG, kFuseDq ? (M::kSplit ? 2 : 1) : 0, kAsync ? 3 : 2>;
  BwdParams p = params;
  p.st = streams;
  const int64_t max_tiles = retile(p.st, Shape::kRows);
  if (max_tiles == 0) return;
  launch_with_shared<hopper_backward_kernel<M, D, kWG, kLists, kCtasPerSm, kFuseDq, kAsync>>(
      cta_grid(kFuseDq ? max_tiles : 2 * max_tiles, p.heads, batch), Shape::kThreads, Shape::kSmem, p, max_tiles);
}

// The fused-dQ form (one warpgroup per CTA) for each key set and head dim.
template <class M, int kCtasPerSm64>
void launch_fused_dq(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim) {
  if (params.lists.row_begin)
    return head_dim == 128 ? launch<M, 128, 1, true, 1, true>(params, streams, batch)
                           : launch<M, 64, 1, true, 2, true>(params, streams, batch);
  if (head_dim == 128) return launch<M, 128, 1, false, 1, true>(params, streams, batch);
  launch<M, 64, 1, false, kCtasPerSm64, true>(params, streams, batch);
}

}  // namespace

template <class F>
void launch_backward_hopper(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim,
                            bool fuse_dq) {
  if (params.rescale) {
    if constexpr (!F::kIsF16) return launch_backward_hopper_rescaled(params, streams, batch, head_dim, fuse_dq);
  }
  using M = Plain<F>;
  if (fuse_dq) return launch_fused_dq<M, 2>(params, streams, batch, head_dim);
  // Block lists: one warpgroup per CTA, so that its 64 keys (or queries) lie in one block.
  if (params.lists.row_begin)
    return head_dim == 128 ? launch<M, 128, 1, true>(params, streams, batch) : launch<M, 64, 1, true>(params, streams, batch);
  if (head_dim == 128) return launch<M, 128, 1>(params, streams, batch);
  // One warpgroup per CTA measured 15-20% faster than two (benchmarks/lab/NOTES.md, v11). The
  // lab's choices (two warpgroups, three CTAs per SM) apply to bf16; f16 builds only the default.
  if constexpr (!F::kIsF16) {
    if (kernel_tuning().hopper_backward_warpgroups == 2) return launch<M, 64, 2>(params, streams, batch);
    if (kernel_tuning().hopper_backward_ctas_per_sm == 3) return launch<M, 64, 1, false, 3>(params, streams, batch);
  }
  if (kernel_tuning().hopper_backward_async) return launch<M, 64, 1, false, 2, false, true>(params, streams, batch);
  launch<M, 64, 1, false, 2>(params, streams, batch);
}

void launch_backward_hopper_rescaled(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim,
                                     bool fuse_dq) {
  using M = RescaledF16;
  // With fused dQ the D = 64 kernel needs 172 registers (20 bytes spill at three CTAs per SM):
  // two CTAs per SM unless the lab asks for three.
  if (fuse_dq) {
    if (kernel_tuning().hopper_backward_ctas_per_sm == 3) return launch_fused_dq<M, 3>(params, streams, batch, head_dim);
    return launch_fused_dq<M, 2>(params, streams, batch, head_dim);
  }
  if (params.lists.row_begin)
    return head_dim == 128 ? launch<M, 128, 1, true>(params, streams, batch) : launch<M, 64, 1, true>(params, streams, batch);
  if (head_dim == 128) return launch<M, 128, 1>(params, streams, batch);
  // Without the lo parts the D = 64 kernel fits 168 registers: three CTAs per SM, no spill.
  if (kernel_tuning().hopper_backward_ctas_per_sm == 2) return launch<M, 64, 1, false, 2>(params, streams, batch);
  if (kernel_tuning().hopper_backward_async) return launch<M, 64, 1, false, 3, false, true>(params, streams, batch);
  launch<M, 64, 1, false, 3>(params, streams, batch);
}

template void launch_backward_hopper<Bf16Format>(const BwdParams&, const Streams&, int64_t, int, bool);
template void launch_backward_hopper<F16Format>(const BwdParams&, const Streams&, int64_t, int, bool);

}  // namespace longtape::cuda::attn
