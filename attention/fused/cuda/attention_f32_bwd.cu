// Fused attention backward for f32 inputs, exact f32 (FFMA on the CUDA cores, no TF32), flash style
// like the 16-bit backward (attention/fused/cuda/attention_fused_bwd.cu), on the same launch plan:
//   delta = rowsum(dO * O) - dlse                       (one small kernel)
//   dK, dV: a CTA of 256 threads owns 64 keys of a stream and loops over the query tiles that see
//           them, recomputing P^T = exp(S^T - lse) and dS^T = P^T (dP^T - delta) per tile (4 x 4
//           micro-tile per thread); without the deterministic switch it also adds dQ = dS K into
//           dq with f32 atomics
//   deterministic mode (the default): no atomics; dQ (and the block-bias gradient, which the
//           dK/dV kernel writes in both modes) comes from a second kernel in which a CTA owns 64
//           queries.
// dq, dk, dv are f32: they are zeroed first and every kernel adds its rows into them through their
// strides (several lse branches add in launch order), so no f32 accumulator is needed.
#include <cmath>

#include "attention/fused/backends.h"
#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/attention_f32.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

using namespace f32;
using BwdGrid = Grid<4>;  // 256 threads, 4 x 4 micro-tiles
constexpr int kBwdThreads = BwdGrid::kThreads;
constexpr int kBwdRows = BwdGrid::kRows;
// One CTA per SM (8 warps; at two, 128 registers, the kernels spill): the inner loops are not
// unrolled, which keeps the registers below 255 without spills at every head dim.
constexpr int kBwdUnroll = 1;

// delta[i] = sum_d dO * O - dlse for row i = (b, h, r) of the (B, H, N) statistics: a half warp per
// row, each thread summing every 16th column.
__global__ void delta_f32_kernel(float* delta, const float* out, RowStrides os, const float* dout, RowStrides ds,
                                 const float* dlse, int64_t heads, int64_t rows, int64_t total, int dim) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kTx;
  const int part = static_cast<int>(threadIdx.x % kTx);
  float sum = 0.f;
  if (i < total) {
    const int64_t bh = i / rows, pos = i % rows;
    const int64_t b = bh / heads, h = bh % heads;
    const float* o_row = out + b * os.batch + h * os.head + pos * os.row;
    const float* g_row = dout + b * ds.batch + h * ds.head + pos * ds.row;
    for (int d = part; d < dim; d += kTx) sum = fmaf(o_row[d], g_row[d], sum);
  }
  sum = row_sum(sum);  // every lane takes part in the shuffles
  if (i < total && part == 0) delta[i] = sum - (dlse ? dlse[i] : 0.f);
}

// The two score-shaped products of a backward tile, c1 = A1 B1^T and c2 = A2 B2^T, for this
// thread's rows row0 + r of the A tiles and columns tx + 16 j of the B tiles.
template <int D>
__device__ __forceinline__ void rows_dot_cols_pair(float (&c1)[kBwdRows][kCols], float (&c2)[kBwdRows][kCols],
                                                   const float* a1, const float* b1, const float* a2,
                                                   const float* b2, int row0, int tx) {
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r)
#pragma unroll
    for (int j = 0; j < kCols; ++j) c1[r][j] = c2[r][j] = 0.f;
  rows_dot_cols<D, kBwdRows, kBwdUnroll>(c1, a1, b1, row0, tx);
  rows_dot_cols<D, kBwdRows, kBwdUnroll>(c2, a2, b2, row0, tx);
}

// Both kernels' input tiles (RowTile<D> each) at the start of the dynamic shared memory: Q, dO, K,
// V. Returns what follows them.
template <int D>
__device__ __forceinline__ float* input_tiles(float*& q, float*& dout, float*& k, float*& v) {
  extern __shared__ __align__(16) float smem_f32[];
  q = smem_f32;
  dout = q + RowTile<D>::kFloats;
  k = dout + RowTile<D>::kFloats;
  v = k + RowTile<D>::kFloats;
  return v + RowTile<D>::kFloats;
}

template <int D>
__global__ void __launch_bounds__(kBwdThreads, 1) attention_backward_dkdv_f32_kernel(const BwdParamsF32 p) {
  using T = RowTile<D>;
  float *sQ, *sdO, *sK, *sV;
  float* sPt = input_tiles<D>(sQ, sdO, sK, sV);  // then P^T [key][query], kLdP a row
  float* sdSt = sPt + kTile * kLdP;  // dS^T [key][query]
  float* sLse = sdSt + kTile * kLdP;  // this query tile's lse (log2 units) and delta
  float* sDelta = sLse + kTile;
  __shared__ float bias_part[kBwdThreads / 32];

  __shared__ int32_t list_cache[kListCache];
  CtaTile t;  // t.tiles: the query tiles that see this key tile
  if (!cta_tile<false, kBwdThreads>(p, list_cache, t)) return;
  const StreamRows& s = t.s;
  const int b = t.b, h = t.h, k0 = t.row0, len_q = static_cast<int>(s.len_q), block_col = t.block;
  const auto in = backward_inputs(p, s, b, h);
  // Causal: query tiles before this key tile see none of its keys.
  auto visible = [&](int qt) { return qt * kTile < len_q && (!p.causal || qt * kTile + kTile - 1 >= k0); };

  const int tx = BwdGrid::tx(), row0 = BwdGrid::row0();
  load_rows<D, kBwdThreads>(sK, in.k, in.k_step, k0, s.len_k, p.vec);
  load_rows<D, kBwdThreads>(sV, in.v, in.v_step, k0, s.len_k, p.vec);
  cp_async_commit();

  float dk[kBwdRows][T::kDC], dv[kBwdRows][T::kDC];
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r)
#pragma unroll
    for (int c = 0; c < T::kDC; ++c) dk[r][c] = dv[r][c] = 0.f;

  for (int i = 0; i < t.tiles.count; ++i) {
    const int qt = t.tiles.tile(i);
    if (!visible(qt)) continue;
    const int q0 = qt * kTile;
    load_rows<D, kBwdThreads>(sQ, in.q, in.q_step, q0, len_q, p.vec);
    load_rows<D, kBwdThreads>(sdO, in.dout, in.g_step, q0, len_q, p.vec);
    if (threadIdx.x < kTile) {
      const int row = q0 + threadIdx.x;
      const bool valid = row < len_q;
      sLse[threadIdx.x] = valid ? lse_log2(p.lse[in.lse_row0 + row * s.step]) : INFINITY;
      sDelta[threadIdx.x] = valid ? p.delta[in.lse_row0 + row * s.step] : 0.f;
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T: this thread's keys row0 + r, queries tx + 16 j.
    float st[kBwdRows][kCols], dpt[kBwdRows][kCols];
    rows_dot_cols_pair<D>(st, dpt, sK, sQ, sV, sdO, row0, tx);
    const float bias = bias_log2(p, b, h, qt / p.lists.block_tiles, block_col);
    float ds_sum = 0.f;
#pragma unroll
    for (int r = 0; r < kBwdRows; ++r) {
      const int key = k0 + row0 + r;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int col = tx + kTx * j;
        // Padded keys and (causal) queries before the key see nothing; padded queries have lse +inf.
        const bool seen = key < s.len_k && (!p.causal || q0 + col >= key);
        const float pr = seen ? exp2f(fmaf(st[r][j], p.scale_log2, bias - sLse[col])) : 0.f;
        const float ds = pr * fmaf(dpt[r][j], p.do_scale, -sDelta[col]);
        sPt[(row0 + r) * kLdP + col] = pr;
        sdSt[(row0 + r) * kLdP + col] = ds;
        ds_sum += ds;
      }
    }
    if (p.lists.dbias) {  // block bias gradient: the sum of dS over the (query block, key block) pair
      for (int off = 16; off > 0; off >>= 1) ds_sum += __shfl_xor_sync(0xffffffffu, ds_sum, off);
      if ((threadIdx.x & 31) == 0) bias_part[threadIdx.x / 32] = ds_sum;
    }
    __syncthreads();  // P^T, dS^T and the bias parts are complete
    if (p.lists.dbias && threadIdx.x == 0) {
      float total = 0.f;
      for (int w = 0; w < kBwdThreads / 32; ++w) total += bias_part[w];
      p.lists.dbias[block_pair(p, b, h, qt / p.lists.block_tiles, block_col)] = total;
    }
    // dV += P^T dO, dK += dS^T Q (scaled at the end).
    rows_times_tile<D, kBwdRows, false, kBwdUnroll>(dv, sPt, sdO, row0, tx);
    rows_times_tile<D, kBwdRows, false, kBwdUnroll>(dk, sdSt, sQ, row0, tx);
    if (p.atomic_dq) {
      // dQ (queries row0 + r of this tile) += dS K over this CTA's keys: dS read from dS^T.
      float dq[kBwdRows][T::kDC];
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r)
#pragma unroll
        for (int c = 0; c < T::kDC; ++c) dq[r][c] = 0.f;
      rows_times_tile<D, kBwdRows, true, kBwdUnroll>(dq, sdSt, sK, row0, tx);
#pragma unroll
      for (int r = 0; r < kBwdRows; ++r) {
        const int64_t row = q0 + row0 + r;
        if (row >= len_q) continue;
        float* dst = p.dq + b * p.dqs.batch + h * p.dqs.head + (s.first_q + row * s.step) * p.dqs.row;
#pragma unroll
        for (int c = 0; c < T::kDC; ++c) atomicAdd(dst + T::col(c, tx), dq[r][c] * p.scale);
      }
    }
    __syncthreads();  // every thread is done with this query tile before the next one lands
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r) {
    const int64_t key = k0 + row0 + r;
    if (key >= s.len_k) continue;
    const int64_t pos = s.first_k + key * s.step;
    blend_row<D>(p.dk + b * p.dks.batch + h * p.dks.head + pos * p.dks.row, dk[r], p.scale, 1.f, tx, p.vec);
    blend_row<D>(p.dv + b * p.dvs.batch + h * p.dvs.head + pos * p.dvs.row, dv[r], p.do_scale, 1.f, tx, p.vec);
  }
}

template <int D>
__global__ void __launch_bounds__(kBwdThreads, 1) attention_backward_dq_f32_kernel(const BwdParamsF32 p) {
  using T = RowTile<D>;
  float *sQ, *sdO, *sK, *sV;
  float* sdS = input_tiles<D>(sQ, sdO, sK, sV);  // then dS [query][key], kLdP a row

  __shared__ int32_t list_cache[kListCache];
  CtaTile t;  // t.tiles: the key tiles of this query tile
  if (!cta_tile<true, kBwdThreads>(p, list_cache, t)) return;
  const StreamRows& s = t.s;
  const int b = t.b, h = t.h, qt = t.tile, q0 = t.row0, len_k = static_cast<int>(s.len_k);
  const auto in = backward_inputs(p, s, b, h);
  auto visible = [&](int kt) { return kt * kTile < len_k && (!p.causal || kt * kTile <= q0 + kTile - 1); };

  const int tx = BwdGrid::tx(), row0 = BwdGrid::row0();
  float lse2[kBwdRows], delta[kBwdRows];
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r) {
    const int row = q0 + row0 + r;
    lse2[r] = row < s.len_q ? lse_log2(p.lse[in.lse_row0 + row * s.step]) : INFINITY;
    delta[r] = row < s.len_q ? p.delta[in.lse_row0 + row * s.step] : 0.f;
  }
  load_rows<D, kBwdThreads>(sQ, in.q, in.q_step, q0, s.len_q, p.vec);
  load_rows<D, kBwdThreads>(sdO, in.dout, in.g_step, q0, s.len_q, p.vec);
  cp_async_commit();

  float dq[kBwdRows][T::kDC];
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r)
#pragma unroll
    for (int c = 0; c < T::kDC; ++c) dq[r][c] = 0.f;

  for (int i = 0; i < t.tiles.count; ++i) {
    const int kt = t.tiles.tile(i);
    if (!visible(kt)) continue;
    const int k0 = kt * kTile;
    load_rows<D, kBwdThreads>(sK, in.k, in.k_step, k0, len_k, p.vec);
    load_rows<D, kBwdThreads>(sV, in.v, in.v_step, k0, len_k, p.vec);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // S = Q K^T and dP = dO V^T: this thread's queries row0 + r, keys tx + 16 j.
    float sc[kBwdRows][kCols], dp[kBwdRows][kCols];
    rows_dot_cols_pair<D>(sc, dp, sQ, sK, sdO, sV, row0, tx);
    const float bias = bias_log2(p, b, h, qt / p.lists.block_tiles, kt / p.lists.block_tiles);
#pragma unroll
    for (int r = 0; r < kBwdRows; ++r) {
      const int q = q0 + row0 + r;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int key = k0 + tx + kTx * j;
        const bool seen = key < len_k && (!p.causal || key <= q);
        const float pr = seen ? exp2f(fmaf(sc[r][j], p.scale_log2, bias - lse2[r])) : 0.f;
        sdS[(row0 + r) * kLdP + tx + kTx * j] = pr * fmaf(dp[r][j], p.do_scale, -delta[r]);
      }
    }
    __syncthreads();  // dS is complete
    rows_times_tile<D, kBwdRows, false, kBwdUnroll>(dq, sdS, sK, row0, tx);
    __syncthreads();  // every thread is done with sK and sdS
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < kBwdRows; ++r) {
    const int64_t row = q0 + row0 + r;
    if (row >= s.len_q) continue;
    blend_row<D>(p.dq + b * p.dqs.batch + h * p.dqs.head + (s.first_q + row * s.step) * p.dqs.row, dq[r], p.scale,
                 1.f, tx, p.vec);
  }
}

template <int D>
void launch_backward_f32(const BwdParamsF32& p, int64_t max_tiles, int64_t batch) {
  const dim3 grid = cta_grid(max_tiles, p.heads, batch);
  const size_t smem_dkdv = (4 * RowTile<D>::kFloats + 2 * kTile * kLdP + 2 * kTile) * sizeof(float);
  launch_with_shared<attention_backward_dkdv_f32_kernel<D>>(grid, kBwdThreads, smem_dkdv, p);
  if (p.atomic_dq) return;
  const size_t smem_dq = (4 * RowTile<D>::kFloats + kTile * kLdP) * sizeof(float);
  launch_with_shared<attention_backward_dq_f32_kernel<D>>(grid, kBwdThreads, smem_dq, p);
}


}  // namespace

void run_backward_f32(const attention::fused::BackwardProblem& bp, const LaunchPlan& plan) {
  const attention::fused::Problem& f = bp.forward;
  const cudaStream_t stream = impl::stream();
  BwdParamsF32 p{};
  set_backward_inputs<float>(p, bp, plan);
  p.atomic_dq = !bp.deterministic;
  p.vec = f32::rows_aligned({{p.q, p.qs},
                             {p.k, p.ks},
                             {p.v, p.vs},
                             {p.dout, p.dos},
                             {p.dq, p.dqs},
                             {p.dk, p.dks},
                             {p.dv, p.dvs}});

  const int64_t rows_q = f.batch * f.heads * f.seq_q;
  auto delta = impl::scratch(static_cast<size_t>(rows_q) * sizeof(float));
  p.delta = static_cast<const float*>(delta->data);
  if (rows_q > 0) {
    const int64_t threads = rows_q * kTx;
    delta_f32_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
        static_cast<float*>(delta->data), static_cast<const float*>(f.out), row_strides_of(f.out_stride), p.dout, p.dos,
        static_cast<const float*>(bp.dlse), f.heads, f.seq_q, rows_q, static_cast<int>(f.head_dim));
    CUDA_CHECK_LAUNCH();
  }
  zero_block_bias_grad(bp, plan);
  zero_rows(bp.dq, bp.dq_stride, f, f.seq_q);
  zero_rows(bp.dk, bp.dk_stride, f, f.seq_k);
  zero_rows(bp.dv, bp.dv_stride, f, f.seq_k);
  g_last_backward_kernel = "f32-simt";
  for (const Streams& launch : plan.launches) {
    p.st = launch;
    const int64_t max_tiles = max_tiles_of(launch);
    if (max_tiles == 0) continue;
    with_head_dim(f.head_dim, [&](auto dim) { launch_backward_f32<decltype(dim)::value>(p, max_tiles, f.batch); });
  }
}

}  // namespace longtape::cuda::attn
