// Fused attention forward for f32 inputs, exact f32: S = Q K^T and O = P V as f32 FFMA on the CUDA
// cores (no TF32), online softmax and lse in f32. Every key set (dense, dilated branches read in
// place, block lists with a bias) runs through the one kernel; the launch plan is the 16-bit
// kernels' (plan_launches). A CTA of 128 threads owns 64 query rows of one stream (Q in shared
// memory for its whole life) and walks the stream's 64-key tiles; each thread holds an 8 x 4
// micro-tile of the scores (rows ty * 8 + i, keys tx + 16 j) and 8 rows x D / 16 columns of O
// (D = 128: 256 threads, 4 x 4 micro-tiles).
// Loads overlap compute without extra shared memory: the next K tile is fetched while this tile's
// softmax and P V run, the next V tile while the next scores run. lse mixing merges each branch
// into out and lse in place (they are f32), so no accumulator and no sequence chunks are needed.
#include <cmath>

#include "attention/fused/backends.h"
#include "attention/fused/cuda/attention_f32.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

using namespace f32;
// D <= 64: 128 threads with 8 x 4 score micro-tiles, three CTAs per SM (168 registers); D = 128:
// 256 threads with 4 x 4 micro-tiles (O's 8 columns per row fit; the tiles allow one CTA per SM).
template <int D>
using FwdGrid = Grid<D <= 64 ? 8 : 4>;

// Writes (or merges by log-sum-exp) the finished rows of a CTA: o holds the unnormalised rows,
// m_run their running max (log2 units, scaled), l_run this thread's share of their sums.
template <int D, int kRM = FwdGrid<D>::kRows>
__device__ __forceinline__ void store_rows_f32(const FwdParamsF32& p, const float (&o)[kRM][RowTile<D>::kDC],
                                               const float (&m_run)[kRM], const float (&l_run)[kRM],
                                               const StreamRows& s, int b, int h, int q0) {
  const int tx = FwdGrid<D>::tx(), row0 = FwdGrid<D>::row0();
  const int64_t lse_base = (static_cast<int64_t>(b) * p.heads + h) * p.st.seq_q + s.first_q;
  float l[kRM], old_lse[kRM];
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    l[i] = row_sum(l_run[i]);  // every lane takes part, whatever its row
    const int row = q0 + row0 + i;
    old_lse[i] = p.merge && row < s.len_q ? p.lse[lse_base + row * s.step] : -INFINITY;
  }
  __syncwarp();  // the merge reads every old lse of the warp's rows before any lane writes one
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const int row = q0 + row0 + i;
    if (row >= s.len_q) continue;
    const int64_t pos = s.first_q + row * s.step;
    // Natural-log lse; rows that saw no key get lse -inf and out 0.
    const float row_lse = l[i] > 0.f ? (m_run[i] + log2f(l[i])) / kLog2e : -INFINITY;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    float* dst = p.out + b * p.os.batch + h * p.os.head + pos * p.os.row;
    float new_lse = row_lse, keep = 0.f, factor = inv * p.out_scale;
    if (p.merge) {
      // Both sides are normalised outputs with their lse: weights exp(lse_side - lse_total).
      const float top = fmaxf(old_lse[i], row_lse);
      const float safe = top == -INFINITY ? 0.f : top;
      const float w_old = expf(old_lse[i] - safe), w_new = expf(row_lse - safe), total = w_old + w_new;
      keep = total > 0.f ? w_old / total : 0.f;
      factor = total > 0.f ? w_new / total * inv : 0.f;
      new_lse = total > 0.f ? safe + logf(total) : -INFINITY;
    }
    blend_row<D>(dst, o[i], factor, keep, tx, p.vec);
    if (tx == 0) p.lse[lse_base + row * s.step] = new_lse;
  }
}

template <int D>
__global__ void __launch_bounds__(FwdGrid<D>::kThreads, D <= 64 ? 3 : 1)
    attention_forward_f32_kernel(const FwdParamsF32 p) {
  using T = RowTile<D>;
  constexpr int kRM = FwdGrid<D>::kRows, kThreadsCta = FwdGrid<D>::kThreads;
  extern __shared__ __align__(16) float smem_f32[];
  float* sQ = smem_f32;
  float* sK = sQ + T::kFloats;
  float* sV = sK + T::kFloats;
  float* sP = sV + T::kFloats;  // kTile x kLdP probabilities

  __shared__ int32_t list_cache[kListCache];
  CtaTile t;  // t.tiles: the key tiles of this query tile
  if (!cta_tile<true, kThreadsCta>(p, list_cache, t)) return;
  const StreamRows& s = t.s;
  const int b = t.b, h = t.h, q0 = t.row0, len_k = static_cast<int>(s.len_k);
  const auto in = stream_inputs(p, s, b, h);
  const float* bias_row = bias_row_of(p, b, h, t.block);
  // The next key tile at or after i that holds a key of the stream some row of this tile sees.
  auto next_visible = [&](int i) {
    while (i < t.tiles.count &&
           (t.tiles.tile(i) * kTile >= len_k || (p.causal && t.tiles.tile(i) * kTile > q0 + kTile - 1)))
      ++i;
    return i;
  };

  const int tx = FwdGrid<D>::tx(), row0 = FwdGrid<D>::row0();
  int i = next_visible(0);
  load_rows<D, kThreadsCta>(sQ, in.q, in.q_step, q0, s.len_q, p.vec);
  if (i < t.tiles.count) load_rows<D, kThreadsCta>(sK, in.k, in.k_step, t.tiles.tile(i) * kTile, len_k, p.vec);
  cp_async_commit();
  if (i < t.tiles.count) load_rows<D, kThreadsCta>(sV, in.v, in.v_step, t.tiles.tile(i) * kTile, len_k, p.vec);
  cp_async_commit();

  float o[kRM][T::kDC], m_run[kRM], l_run[kRM];
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
#pragma unroll
    for (int c = 0; c < T::kDC; ++c) o[r][c] = 0.f;
  }

  while (i < t.tiles.count) {
    const int kt = t.tiles.tile(i), k0 = kt * kTile;
    const int next = next_visible(i + 1);
    cp_async_wait<1>();  // Q and this K tile (this V tile may still be in flight)
    __syncthreads();
    float sc[kRM][kCols];
#pragma unroll
    for (int r = 0; r < kRM; ++r)
#pragma unroll
      for (int j = 0; j < kCols; ++j) sc[r][j] = 0.f;
    rows_dot_cols<D, kRM>(sc, sQ, sK, row0, tx);
    __syncthreads();  // every thread is done with sK
    if (next < t.tiles.count) load_rows<D, kThreadsCta>(sK, in.k, in.k_step, t.tiles.tile(next) * kTile, len_k, p.vec);
    cp_async_commit();

    const float bias = bias_row ? bias_row[kt / p.lists.block_tiles] * kLog2e : 0.f;
    const bool masked = k0 + kTile > len_k || (p.causal && k0 + kTile - 1 > q0);
#pragma unroll
    for (int r = 0; r < kRM; ++r) {
      const int q = q0 + row0 + r;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int key = k0 + tx + kTx * j;
        float x = fmaf(sc[r][j], p.scale_log2, bias);
        if (masked && (key >= len_k || (p.causal && key > q))) x = -INFINITY;
        sc[r][j] = x;
        mx = fmaxf(mx, x);
      }
      const float m_new = fmaxf(m_run[r], row_max(mx));
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m_run[r] - m_safe);
      m_run[r] = m_new;
      l_run[r] *= corr;
#pragma unroll
      for (int c = 0; c < T::kDC; ++c) o[r][c] *= corr;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const float pr = exp2f(sc[r][j] - m_safe);
        l_run[r] += pr;
        sP[(row0 + r) * kLdP + tx + kTx * j] = pr;
      }
    }
    cp_async_wait<1>();  // this V tile (the next K tile may still be in flight)
    __syncthreads();     // and every row of P
    rows_times_tile<D, kRM, false>(o, sP, sV, row0, tx);
    __syncthreads();  // every thread is done with sV and sP
    if (next < t.tiles.count) load_rows<D, kThreadsCta>(sV, in.v, in.v_step, t.tiles.tile(next) * kTile, len_k, p.vec);
    cp_async_commit();
    i = next;
  }
  cp_async_wait<0>();
  store_rows_f32<D, kRM>(p, o, m_run, l_run, s, b, h, q0);
}

template <int D>
void launch_forward_f32(const FwdParamsF32& params, int64_t batch) {
  const int64_t max_tiles = max_tiles_of(params.st);
  if (max_tiles == 0) return;
  const size_t smem = (3 * RowTile<D>::kFloats + kTile * kLdP) * sizeof(float);
  launch_with_shared<attention_forward_f32_kernel<D>>(cta_grid(max_tiles, params.heads, batch), FwdGrid<D>::kThreads,
                                                      smem, params);
}


}  // namespace

void run_forward_f32(const attention::fused::Problem& pr, const LaunchPlan& plan) {
  FwdParamsF32 p{};
  set_inputs<float>(p, pr, plan);
  p.out = static_cast<float*>(pr.out);
  p.os = row_strides_of(pr.out_stride);
  p.lse = static_cast<float*>(pr.lse);
  p.merge = plan.merge;
  p.out_scale = plan.out_scale;
  p.vec = f32::rows_aligned({{p.q, p.qs}, {p.k, p.ks}, {p.v, p.vs}, {p.out, p.os}});
  if (plan.prefill) fill_outputs(pr);
  g_last_forward_kernel = "f32-simt";
  for (const Streams& launch : plan.launches) {
    p.st = launch;
    with_head_dim(pr.head_dim, [&](auto dim) { launch_forward_f32<decltype(dim)::value>(p, pr.batch); });
  }
}

}  // namespace longtape::cuda::attn
