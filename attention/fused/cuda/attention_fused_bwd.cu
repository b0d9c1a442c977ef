// Fused attention backward on tensor cores, flash style:
//   delta = rowsum(dO * O) - dlse                       (one small kernel)
//   dK, dV: a CTA owns 64 keys of a stream and loops over the query tiles that see them; by
//           default it also adds dQ = dS K into an f32 accumulator with atomics
//   deterministic mode (set_deterministic_algorithms): no atomics; dQ (and the block-bias
//           gradient) come from a second kernel in which a CTA owns 64 queries
// P is recomputed from the saved lse; dK/dV rows are written by exactly one CTA per launch, and
// launches of several dilated branches accumulate in f32 in a fixed order.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/fused/backends.h"
#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/attention_fused.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {


// delta = rowsum(dO * O) - dlse per (batch, head, row), in that order. Generic form: a warp per
// row, an element per lane.
template <class F>
__global__ void delta_kernel(float* delta, const elem16* out, const elem16* residual, RowStrides os, const elem16* dout,
                             RowStrides ds, const float* dlse, int64_t batch, int64_t heads, int64_t rows, int dim) {
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp_id >= batch * heads * rows) return;
  const int64_t r = warp_id % rows, h = (warp_id / rows) % heads, b = warp_id / rows / heads;
  const elem16* o = out + b * os.batch + h * os.head + r * os.row;
  const elem16* g = dout + b * ds.batch + h * ds.head + r * ds.row;
  float acc = 0.f;
  const elem16* lo = residual ? residual + (o - out) : nullptr;
  for (int d = lane; d < dim; d += 32)
    acc += (F::to_float(o[d]) + (lo ? F::to_float(lo[d]) : 0.f)) * F::to_float(g[d]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[warp_id] = acc - (dlse ? dlse[warp_id] : 0.f);
}

// The same with 16-byte loads: kLanes = dim / 8 lanes per row (a lane per 8 elements), so that a
// warp reads 32 / kLanes rows at once.
template <class F, int kLanes>
__global__ void delta_wide_kernel(float* delta, const elem16* out, const elem16* residual, RowStrides os,
                                  const elem16* dout, RowStrides ds, const float* dlse, int64_t batch, int64_t heads,
                                  int64_t rows) {
  const int64_t row_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int part = threadIdx.x % kLanes;
  const bool live = row_id < batch * heads * rows;
  float acc = 0.f;
  if (live) {
    const int64_t r = row_id % rows, h = (row_id / rows) % heads, b = row_id / rows / heads;
    const int64_t o_at = b * os.batch + h * os.head + r * os.row + part * 8;
    const uint4 o = *reinterpret_cast<const uint4*>(out + o_at);
    const uint4 g = *reinterpret_cast<const uint4*>(dout + b * ds.batch + h * ds.head + r * ds.row + part * 8);
    const uint4 lo = residual ? *reinterpret_cast<const uint4*>(residual + o_at) : make_uint4(0, 0, 0, 0);
    const uint32_t op[4] = {o.x, o.y, o.z, o.w}, gp[4] = {g.x, g.y, g.z, g.w}, lp[4] = {lo.x, lo.y, lo.z, lo.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 of = F::unpack(op[e]), gf = F::unpack(gp[e]), lf = F::unpack(lp[e]);
      acc += (of.x + lf.x) * gf.x + (of.y + lf.y) * gf.y;
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (live && part == 0) delta[row_id] = acc - (dlse ? dlse[row_id] : 0.f);
}

// kFuseDq: the CTA also adds its dQ = dS K share into the f32 dq_acc with atomics (dS^T goes
// through shared memory so that warps split dQ by query rows), saving the dQ kernel's recompute.
// Three resident CTAs per SM for D <= 64 in the deterministic form with bf16 (its registers fit in
// 170); the f16 form needs more registers (half <-> f32 conversions) and takes two, without spills.
template <class F, int D, bool kFuseDq>
__global__ void __launch_bounds__(kThreads, D <= 64 && !kFuseDq ? (F::kIsF16 ? 2 : 3) : 1)
    attention_backward_dkdv_kernel(const BwdParams p) {
  using L = TileLayout<D>;
  constexpr int kNT = kTile / 8, kDT = D / 8;
  constexpr int kLdS = kTile + 8;  // dS^T tile [key][query], padded like the others
  extern __shared__ __align__(16) unsigned char smem_raw[];
  elem16* sK = reinterpret_cast<elem16*>(smem_raw);
  elem16* sV = sK + L::kElems;
  elem16* sQ = sV + L::kElems;         // 2 stages
  elem16* sdO = sQ + 2 * L::kElems;    // 2 stages
  elem16* sdS = sdO + 2 * L::kElems;   // kTile x kLdS (kFuseDq only)
  float* sLse = reinterpret_cast<float*>(sdS + (kFuseDq ? kTile * kLdS : 0));  // 2 x kTile
  float* sDelta = sLse + 2 * kTile;
  __shared__ float bias_part[kWarps];

  // Written out rather than through cta_tile: that form costs this kernel registers and spills.
  const int h = blockIdx.y, b = blockIdx.z;
  int64_t kt;
  StreamRows s;
  int br;
  if (!tile_of_cta(p.st, h, kt, s, br)) return;
  const int k0 = static_cast<int>(kt) * kTile;
  if (k0 >= s.len_k) return;
  const int len_q = static_cast<int>(s.len_q);

  const BackwardInputs in = backward_inputs(p, s, b, h);

  // Query tiles that see this key tile.
  KeyTiles queries{0, nullptr, 1};
  int block_col = 0;
  if (p.lists.row_begin) {
    const int64_t list = p.lists.num_lists == 1 ? 0 : (p.lists.num_lists == p.heads ? h : b * p.heads + h);
    block_col = static_cast<int>(kt) / p.lists.block_tiles;
    const int32_t* cb = p.lists.col_begin + list * (p.lists.nkb + 1);
    queries.list = p.lists.row_index + cb[block_col];
    queries.block_tiles = p.lists.block_tiles;
    queries.count = (cb[block_col + 1] - cb[block_col]) * p.lists.block_tiles;
  } else {
    queries.count = (len_q + kTile - 1) / kTile;
  }
  __shared__ int32_t list_cache[kListCache];
  cache_block_list(queries, list_cache);
  __syncthreads();
  // Causal: query tiles before this key tile see none of its keys.
  auto visible = [&](int qt) { return qt * kTile < len_q && (!p.causal || qt * kTile + kTile - 1 >= k0); };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col_in_quad = (lane & 3) * 2;
  const int key_a = k0 + warp * 16 + (lane >> 2);  // this thread's two key rows: key_a, key_a + 8
  const bool ragged_keys = k0 + kTile > s.len_k;
  const bool key_valid[2] = {key_a < s.len_k, key_a + 8 < s.len_k};

  load_tile_async<D>(sK, in.k, in.k_step, k0, s.len_k);
  load_tile_async<D>(sV, in.v, in.v_step, k0, s.len_k);
  auto load_query_tile = [&](int st, int qt) {
    load_tile_async<D>(sQ + st * L::kElems, in.q, in.q_step, static_cast<int64_t>(qt) * kTile, len_q);
    load_tile_async<D>(sdO + st * L::kElems, in.dout, in.g_step, static_cast<int64_t>(qt) * kTile, len_q);
    if (threadIdx.x < kTile) {
      const int row = qt * kTile + threadIdx.x;
      const bool valid = row < s.len_q;
      sLse[st * kTile + threadIdx.x] = valid ? lse_log2(p.lse[in.lse_row0 + row * s.step]) : INFINITY;
      sDelta[st * kTile + threadIdx.x] = valid ? p.delta[in.lse_row0 + row * s.step] : 0.f;
    }
  };
  int i = 0;
  while (i < queries.count && !visible(queries.tile(i))) ++i;
  if (i < queries.count) load_query_tile(0, queries.tile(i));
  cp_async_commit();

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int d = 0; d < kDT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;

  int stage = 0;
  while (i < queries.count) {
    const int qt = queries.tile(i);
    int after = i + 1;
    while (after < queries.count && !visible(queries.tile(after))) ++after;
    __syncthreads();  // the other stage is free (its last readers finished)
    if (after < queries.count) load_query_tile(stage ^ 1, queries.tile(after));
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const elem16* tQ = sQ + stage * L::kElems;
    const elem16* tG = sdO + stage * L::kElems;
    const float* tLse = sLse + stage * kTile;
    const float* tDelta = sDelta + stage * kTile;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys of this warp x 64 queries.
    float st[kNT][4];
    float dpt[kNT][4];
    warp_product_pair<F, D>(st, dpt, sK, sV, warp * 16, tQ, tG);
    const float bias = bias_log2(p, b, h, qt / p.lists.block_tiles, block_col);
    const int q0 = qt * kTile;
    // P^T = exp2(S^T * scale_log2 + bias - lse) and dS^T = P^T (dP^T * do_scale - delta) in place;
    // one FFMA + one MUFU per probability, lse and delta read as pairs of columns.
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float2 l2 = *reinterpret_cast<const float2*>(tLse + j * 8 + col_in_quad);
      const float shift[2] = {bias - l2.x, bias - l2.y};
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = fast_exp2(fmaf(st[j][e], p.scale_log2, shift[e & 1]));
    }
    // Causal-diagonal tiles and the ragged last key tile: P = 0 where the key is invisible (padded
    // keys add nothing to dbias either).
    if ((p.causal && k0 + kTile - 1 > q0) || ragged_keys) {
      const int first_q[2] = {p.causal ? key_a - q0 : -kTile, p.causal ? key_a + 8 - q0 : -kTile};
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!key_valid[e >> 1] || j * 8 + col_in_quad + (e & 1) < first_q[e >> 1]) st[j][e] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float2 d2 = *reinterpret_cast<const float2*>(tDelta + j * 8 + col_in_quad);
      const float delta[2] = {d2.x, d2.y};
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[j][e] = st[j][e] * fmaf(dpt[j][e], p.do_scale, -delta[e & 1]);
    }
    if (p.lists.dbias) {  // block bias gradient: the sum of dS over the (query block, key block) pair
      float ds_sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNT; ++j) ds_sum += (dpt[j][0] + dpt[j][1]) + (dpt[j][2] + dpt[j][3]);
      ds_sum = quad_sum(ds_sum);
      for (int off = 4; off < 32; off <<= 1) ds_sum += __shfl_xor_sync(0xffffffffu, ds_sum, off);
      if (lane == 0) bias_part[warp] = ds_sum;
      __syncthreads();
      if (threadIdx.x == 0)
        p.lists.dbias[block_pair(p, b, h, qt / p.lists.block_tiles, block_col)] =
            bias_part[0] + bias_part[1] + bias_part[2] + bias_part[3];
    }
    if constexpr (kFuseDq) {
      // dS^T (this warp's 16 keys x 64 queries) to shared memory in format F.
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + hf * 8 + (lane >> 2)) * kLdS + j * 8 + col_in_quad) =
              F::pack(dpt[j][2 * hf], dpt[j][2 * hf + 1]);
    }
    // dV += P^T dO, dK += dS^T Q (k = queries); P and dS as hi + lo parts (dO and Q terms
    // of either sign cancel in both sums).
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t ap[4], ap_lo[4], as[4], as_lo[4];
      a_fragment_split<F>(ap, ap_lo, st[2 * kk], st[2 * kk + 1]);
      a_fragment_split<F>(as, as_lo, dpt[2 * kk], dpt[2 * kk + 1]);
      mma_tile_b_pair<F, D, true, true>(dv, ap, ap_lo, tG, dk, as, as_lo, tQ, kk);
    }
    if constexpr (kFuseDq) {
      __syncthreads();  // every warp's dS^T rows are in shared memory
      // dQ (this warp's 16 queries x D) += dS K over the CTA's 64 keys; A = dS read transposed.
      float dq[kDT][4];
#pragma unroll
      for (int d = 0; d < kDT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, sdS + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLdS + warp * 16 +
                                 (((lane >> 3) & 1) << 3));
        mma_tile_b<F, D, true>(dq, a, a, sK, kk);
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t row = q0 + warp * 16 + hf * 8 + (lane >> 2);
        if (row >= s.len_q) continue;
        const int64_t pos = s.first_q + row * s.step;
        float* dst = p.dq_acc + ((static_cast<int64_t>(b) * p.st.seq_q + pos) * p.heads + h) * D + col_in_quad;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          atomicAdd(dst + d * 8, dq[d][2 * hf] * p.scale);
          atomicAdd(dst + d * 8 + 1, dq[d][2 * hf + 1] * p.scale);
        }
      }
    }
    stage ^= 1;
    i = after;
  }
  cp_async_wait<0>();
  const int64_t nk = p.st.seq_k;
  store_rows<F, D>([&](int d, int e) { return dk[d][e]; }, p.scale, key_a, s.len_k, s, p.accumulate,
                   p.accumulate_first, p.dk, p.dks, p.dk_acc, b, h, p.heads, nk);
  store_rows<F, D>([&](int d, int e) { return dv[d][e]; }, p.do_scale, key_a, s.len_k, s, p.accumulate,
                   p.accumulate_first, p.dv, p.dvs, p.dv_acc, b, h, p.heads, nk);
}

// Three resident CTAs per SM for D <= 64 (the registers fit without spilling).
template <class F, int D>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 3 : 1) attention_backward_dq_kernel(const BwdParams p) {
  using L = TileLayout<D>;
  constexpr int kNT = kTile / 8, kDT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  elem16* sQ = reinterpret_cast<elem16*>(smem_raw);
  elem16* sdO = sQ + L::kElems;
  elem16* sK = sdO + L::kElems;  // 2 stages
  elem16* sV = sK + 2 * L::kElems;  // 2 stages

  __shared__ int32_t list_cache[kListCache];
  CtaTile t;  // t.tiles: the key tiles of this query tile
  if (!cta_tile<true>(p, list_cache, t)) return;
  const StreamRows& s = t.s;
  const int b = t.b, h = t.h, qt = t.tile, q0 = t.row0, len_k = static_cast<int>(s.len_k);
  const BackwardInputs in = backward_inputs(p, s, b, h);
  auto visible = [&](int kt) { return kt * kTile < len_k && (!p.causal || kt * kTile <= q0 + kTile - 1); };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col_in_quad = (lane & 3) * 2;
  const int64_t row_a = q0 + warp * 16 + (lane >> 2), row_b = row_a + 8;
  const float lse_a = row_a < s.len_q ? lse_log2(p.lse[in.lse_row0 + row_a * s.step]) : INFINITY;
  const float lse_b = row_b < s.len_q ? lse_log2(p.lse[in.lse_row0 + row_b * s.step]) : INFINITY;
  const float delta_a = row_a < s.len_q ? p.delta[in.lse_row0 + row_a * s.step] : 0.f;
  const float delta_b = row_b < s.len_q ? p.delta[in.lse_row0 + row_b * s.step] : 0.f;

  load_tile_async<D>(sQ, in.q, in.q_step, q0, s.len_q);
  load_tile_async<D>(sdO, in.dout, in.g_step, q0, s.len_q);
  int i = 0;
  while (i < t.tiles.count && !visible(t.tiles.tile(i))) ++i;
  if (i < t.tiles.count) {
    load_tile_async<D>(sK, in.k, in.k_step, static_cast<int64_t>(t.tiles.tile(i)) * kTile, len_k);
    load_tile_async<D>(sV, in.v, in.v_step, static_cast<int64_t>(t.tiles.tile(i)) * kTile, len_k);
  }
  cp_async_commit();

  float dq[kDT][4];
#pragma unroll
  for (int d = 0; d < kDT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;

  int stage = 0;
  while (i < t.tiles.count) {
    const int kt = t.tiles.tile(i);
    int after = i + 1;
    while (after < t.tiles.count && !visible(t.tiles.tile(after))) ++after;
    __syncthreads();
    if (after < t.tiles.count) {
      const int64_t nk0 = static_cast<int64_t>(t.tiles.tile(after)) * kTile;
      load_tile_async<D>(sK + (stage ^ 1) * L::kElems, in.k, in.k_step, nk0, len_k);
      load_tile_async<D>(sV + (stage ^ 1) * L::kElems, in.v, in.v_step, nk0, len_k);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const elem16* tK = sK + stage * L::kElems;
    const elem16* tV = sV + stage * L::kElems;

    // S = Q K^T and dP = dO V^T: 16 queries of this warp x 64 keys.
    float sc[kNT][4], dp[kNT][4];
    warp_product_pair<F, D>(sc, dp, sQ, sdO, warp * 16, tK, tV);
    const float bias = bias_log2(p, b, h, qt / p.lists.block_tiles, kt / p.lists.block_tiles);
    const int k0 = kt * kTile;
    const float shift[2] = {bias - lse_a, bias - lse_b};
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = fast_exp2(fmaf(sc[j][e], p.scale_log2, shift[e >> 1]));
    // Ragged or causal-diagonal tiles: P = 0 beyond the last visible key offset of each row.
    if (k0 + kTile > len_k || (p.causal && k0 + kTile - 1 > q0)) {
      int lim[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        lim[hf] = min(len_k - k0, p.causal ? static_cast<int>(hf ? row_b : row_a) - k0 + 1 : kTile) - 1;
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j * 8 + col_in_quad + (e & 1) > lim[e >> 1]) sc[j][e] = 0.f;
    }
    const float delta[2] = {delta_a, delta_b};
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] *= fmaf(dp[j][e], p.do_scale, -delta[e >> 1]);
    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t as[4], as_lo[4];
      a_fragment_split<F>(as, as_lo, sc[2 * kk], sc[2 * kk + 1]);
      mma_tile_b<F, D, true, true>(dq, as, as_lo, tK, kk);
    }
    stage ^= 1;
    i = after;
  }
  cp_async_wait<0>();
  StreamRows qs_rows = s;
  qs_rows.first_k = s.first_q;
  store_rows<F, D>([&](int d, int e) { return dq[d][e]; }, p.scale, row_a, s.len_q, qs_rows, p.accumulate,
                   p.accumulate_first, p.dq, p.dqs, p.dq_acc, b, h, p.heads, p.st.seq_q);
}

template <class F, int D, bool kFuseDq>
void launch_dkdv(const BwdParams& params, const dim3 grid) {
  using L = TileLayout<D>;
  const size_t smem = 6 * L::kElems * sizeof(elem16) + (kFuseDq ? kTile * (kTile + 8) * sizeof(elem16) : 0) +
                      4 * kTile * sizeof(float);
  launch_with_shared<attention_backward_dkdv_kernel<F, D, kFuseDq>>(grid, kThreads, smem, params);
}

template <class F, int D>
void launch_backward(const BwdParams& params, int64_t max_tiles, int64_t batch, bool deterministic) {
  const dim3 grid = cta_grid(max_tiles, params.heads, batch);
  if (!deterministic) return launch_dkdv<F, D, true>(params, grid);
  launch_dkdv<F, D, false>(params, grid);
  const size_t smem_dq = 6 * TileLayout<D>::kElems * sizeof(elem16);
  launch_with_shared<attention_backward_dq_kernel<F, D>>(grid, kThreads, smem_dq, params);
}


// Whether a launch reaches every query and key row of every head (a dilation-1 branch on all heads).
bool covers_every_row(const Streams& st, int64_t heads) {
  if (st.seq_q != st.seq_k) return false;
  for (int64_t h = 0; h < heads; ++h) {
    const int br = st.branch_of_head[h];
    if (br < 0 || st.dilation[br] != 1 || st.offset_of_head[h] != 0) return false;
  }
  return true;
}

// The sm_90a backward runs where the lab has not turned it off and the sm_90a kernels cover the
// problem (hopper_kernels_cover), unless a block bias needs its gradient (that stays on the
// portable kernels).
bool hopper_backward_usable(const attention::fused::BackwardProblem& bp) {
  const attention::fused::Problem& f = bp.forward;
  if (!kernel_tuning().hopper_backward) return false;
  if (f.key_set == attention::fused::KeySet::blocks && bp.dbias != nullptr) return false;
  return hopper_kernels_cover(f);
}

}  // namespace

const char* g_last_backward_kernel = "none";
const char* last_backward_kernel() { return g_last_backward_kernel; }

void run_backward(const attention::fused::BackwardProblem& bp, const LaunchPlan& plan) {
  const attention::fused::Problem& f = bp.forward;
  const cudaStream_t stream = impl::stream();
  BwdParams p{};
  set_backward_inputs<elem16>(p, bp, plan);

  const int64_t rows_q = f.batch * f.heads * f.seq_q;
  auto delta = impl::scratch(static_cast<size_t>(rows_q) * sizeof(float));
  p.delta = static_cast<const float*>(delta->data);
  if (rows_q > 0) {
    const int64_t threads = rows_q * 32;
    const RowStrides os = row_strides_of(f.out_stride);
    auto aligned = [](const void* ptr, RowStrides s) {
      return ptr == nullptr ||
             (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0);
    };
    const bool wide = (f.head_dim == 32 || f.head_dim == 64 || f.head_dim == 128) && aligned(f.out, os) &&
                      aligned(f.out_residual, os) && aligned(p.dout, p.dos);
    with_format(f.dtype, [&](auto format) {
      using F = decltype(format);
      const auto* out = static_cast<const elem16*>(f.out);
      const auto* residual = static_cast<const elem16*>(f.out_residual);
      auto* d = static_cast<float*>(delta->data);
      const auto* dlse = static_cast<const float*>(bp.dlse);
      auto launch_wide = [&](auto lanes) {
        constexpr int kLanes = decltype(lanes)::value;
        const unsigned blocks = static_cast<unsigned>((rows_q * kLanes + 255) / 256);
        delta_wide_kernel<F, kLanes><<<blocks, 256, 0, stream>>>(d, out, residual, os, p.dout, p.dos, dlse, f.batch,
                                                                 f.heads, f.seq_q);
      };
      if (wide && f.head_dim == 32)
        launch_wide(std::integral_constant<int, 4>{});
      else if (wide && f.head_dim == 64)
        launch_wide(std::integral_constant<int, 8>{});
      else if (wide)
        launch_wide(std::integral_constant<int, 16>{});
      else
        delta_kernel<F><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
            d, out, residual, os, p.dout, p.dos, dlse, f.batch, f.heads, f.seq_q, static_cast<int>(f.head_dim));
      CUDA_CHECK_LAUNCH();
    });
  }
  zero_block_bias_grad(bp, plan);

  // Several lse branches add into f32 accumulators; otherwise each row is written once (rows that
  // no stream reaches are zeroed first). Without the deterministic switch the portable kernels
  // gather dQ in an f32 accumulator through atomics from the dK/dV kernel; the sm_90a backward
  // does so in its warp-specialized form (hopper_backward_warp_specialized) or where the lab asks
  // (hopper_backward_fused_dq: slower than its dQ CTAs).
  p.accumulate = plan.merge;
  const bool hopper = hopper_backward_usable(bp);
  // The rescaled f16 copies cost four (B, rows, H, D) buffers: dense problems take them whole, lse
  // mixing per chunk of its accumulators; the other dilated problems and block lists keep bf16
  // products (chunks of their own cost them more than the copies save).
  const bool rescaled = hopper && f.dtype == DType::bf16 && kernel_tuning().hopper_backward_rescaled &&
                        (f.key_set == attention::fused::KeySet::dense || plan.merge);
  const bool warp_specialized = rescaled && !bp.deterministic && kernel_tuning().hopper_backward_warp_specialized &&
                                !kernel_tuning().hopper_backward_fused_dq &&
                                hopper_backward_ws_covers(f.head_dim, f.key_set == attention::fused::KeySet::blocks);
  const bool fuse_dq =
      !bp.deterministic && (!hopper || kernel_tuning().hopper_backward_fused_dq || warp_specialized);
  if (!p.accumulate) {
    if (!fuse_dq) zero_rows(bp.dq, bp.dq_stride, f, f.seq_q);
    zero_rows(bp.dk, bp.dk_stride, f, f.seq_k);
    zero_rows(bp.dv, bp.dv_stride, f, f.seq_k);
  }
  g_last_backward_kernel = warp_specialized ? "sm90a-wgmma-f16-ws"
                           : rescaled       ? "sm90a-wgmma-f16"
                           : hopper         ? "sm90a-wgmma"
                                            : "sm80-mma";
  std::shared_ptr<Storage> factors;
  if (rescaled) {
    factors = bf16_rescale_factors(bp, p.do_scale);
    p.rescale = static_cast<const float*>(factors->data);
  }
  // With accumulators, runs chunk by chunk (merge_chunks): they and the rescaled copies then hold
  // one chunk's rows.
  for_each_chunk(f, plan, kernel_tuning().backward_chunk_row_heads, p,
                 [&](const SequenceChunk& chunk, const auto& fc, const LaunchPlan& plan_of_chunk, BwdParams pc,
                     ChunkAccumulator& acc) {
    pc.dout += chunk.start * p.dos.row;
    pc.delta += chunk.start;
    pc.dq += chunk.start * p.dqs.row;
    pc.dk += chunk.start * p.dks.row;
    pc.dv += chunk.start * p.dvs.row;
    const size_t per_q = static_cast<size_t>(fc.batch * fc.seq_q * fc.heads * fc.head_dim);
    const size_t per_k = static_cast<size_t>(fc.batch * fc.seq_k * fc.heads * fc.head_dim);
    const size_t dq_padding =
        warp_specialized ? static_cast<size_t>(hopper_backward_ws_dq_padding(plan_of_chunk.launches, fc.heads)) : 0;
    const size_t acc_elems =
        (p.accumulate || fuse_dq ? per_q + dq_padding : 0) + (p.accumulate ? 2 * per_k : 0);
    // A launch that covers every row goes first and writes the accumulators instead of adding
    // into zeros (no zeroing pass, no reads; dQ by atomics still needs zeros).
    std::vector<Streams> launches = plan_of_chunk.launches;
    const auto full = std::find_if(launches.begin(), launches.end(),
                                   [&](const Streams& st) { return covers_every_row(st, f.heads); });
    const bool first_writes = p.accumulate && !fuse_dq && kernel_tuning().backward_first_launch_writes &&
                              full != launches.end() && max_tiles_of(*full) > 0;
    if (first_writes) std::rotate(launches.begin(), full, full + 1);
    if (acc_elems > 0) pc.dq_acc = first_writes ? acc.uninitialized(acc_elems) : acc.zeroed(acc_elems);
    if (p.accumulate) {
      pc.dk_acc = pc.dq_acc + per_q + dq_padding;
      pc.dv_acc = pc.dk_acc + per_k;
    }
    // The chunk's rows of q, k, v and dO as rescaled f16 copies (freed in stream order).
    std::vector<RescaledRows> copies;
    if (rescaled) {
      const void* sources[] = {f.q, f.k, f.v, bp.dout};
      const attention::fused::Strides strides[] = {f.q_stride, f.k_stride, f.v_stride, bp.dout_stride};
      const bool whole = chunk.start == 0 && chunk.rows == f.seq_q;  // then fc.seq_k is not the keys' count
      for (int which = 0; which < 4; ++which) {
        const bool keys = which == 1 || which == 2;
        const int64_t rows = whole ? (keys ? f.seq_k : f.seq_q) : chunk.rows;
        copies.push_back(rescale_rows_to_f16(p.rescale, which, sources[which], strides[which], f.batch, chunk.start, rows,
                                             f.heads, f.head_dim));
      }
      pc.q = copies[0].rows;
      pc.qs = copies[0].strides;
      pc.k = copies[1].rows;
      pc.ks = copies[1].strides;
      pc.v = copies[2].rows;
      pc.vs = copies[2].strides;
      pc.dout = copies[3].rows;
      pc.dos = copies[3].strides;
    }
    for (size_t l = 0; l < launches.size(); ++l) {
      const Streams& launch = launches[l];
      pc.st = launch;
      pc.accumulate_first = first_writes && l == 0;
      const int64_t max_tiles = max_tiles_of(launch);
      if (max_tiles == 0) continue;
      with_format(f.dtype, [&](auto format) {
        using F = decltype(format);
        if (warp_specialized) return launch_backward_hopper_ws(pc, launch, f.batch);
        if (hopper) return launch_backward_hopper<F>(pc, launch, f.batch, static_cast<int>(f.head_dim), fuse_dq);
        with_head_dim(f.head_dim, [&](auto dim) {
          launch_backward<F, decltype(dim)::value>(pc, max_tiles, f.batch, !fuse_dq);
        });
      });
    }
    if (p.accumulate || fuse_dq) store_accumulator(pc.dq, bp.dq_stride, pc.dq_acc, fc, fc.seq_q);
    if (p.accumulate) {
      store_accumulator(pc.dk, bp.dk_stride, pc.dk_acc, fc, fc.seq_k);
      store_accumulator(pc.dv, bp.dv_stride, pc.dv_acc, fc, fc.seq_k);
    }
  });
}

}  // namespace longtape::cuda::attn
