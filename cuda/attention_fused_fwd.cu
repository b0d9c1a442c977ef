// Fused attention forward on tensor cores (bf16 inputs, f32 accumulation, online softmax), and the
// host side that turns an attention::fused::Problem into launches. Every key set (dense, dilated
// branches, block lists) runs through the one kernel: a CTA owns 64 query rows of one stream and
// loops over 64-key tiles, reading strided (dilated) rows in place.
#include <cmath>
#include <limits>
#include <string>

#include "attention/fused/backends.h"
#include "cuda/attention_fused.cuh"
#include "cuda/attention_launch.h"
#include "cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

struct FwdParams {
  const bf16 *q, *k, *v;
  RowStrides qs, ks, vs;
  // write mode: out (dtype bf16) and lse; merge mode: f32 accumulator out_acc (contiguous
  // (B, Nq, H, D)) and lse are read, merged by log-sum-exp and written back.
  bf16* out;
  bf16* out_residual;  // optional: out_f32 - out
  RowStrides os;
  float* out_acc;
  float* lse;  // (B, H, Nq)
  int64_t heads;
  float scale_log2;  // softmax scale * log2(e)
  float out_scale;
  bool causal, merge;
  Streams st;
  Lists lists;
};

// kM: 16-row m-tiles per warp (a CTA owns 64 * kM query rows; K/V fragments are reused kM times).
// kSplitP: P enters P V as bf16 hi + lo parts, so O is accurate to ~16 bits (used when a block bias
// needs its gradient, whose rowsum(dO * O) must not carry bf16 rounding of P).
template <int D, int kM, bool kSplitP>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const FwdParams p) {
  using L = TileLayout<D>;
  constexpr int kNT = kTile / 8;  // key n-tiles per step
  constexpr int kDT = D / 8;      // output n-tiles
  constexpr int kRows = kTile * kM;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // kM tiles
  bf16* sK = sQ + kM * L::kElems;  // 2 stages
  bf16* sV = sK + 2 * L::kElems;

  const int h = blockIdx.y, b = blockIdx.z;
  const int br = p.st.branch_of_head[h];
  if (br < 0) return;
  const int64_t num_tiles = p.st.num_tiles[br];
  if (blockIdx.x >= num_tiles) return;
  // Heavy tiles first: with causal masking the last tiles of a stream do the most work.
  const int64_t tile_id = num_tiles - 1 - blockIdx.x;
  const int64_t tps = p.st.tiles_per_stream[br];
  const int64_t seg = tile_id / tps, qt = tile_id % tps;
  const StreamRows s = stream_rows(p.st, br, p.st.offset_of_head[h], seg);
  const int64_t q0 = qt * kRows;
  if (q0 >= s.len_q) return;

  const bf16* qb = p.q + b * p.qs.batch + h * p.qs.head + s.first_q * p.qs.row;
  const bf16* kb = p.k + b * p.ks.batch + h * p.ks.head + s.first_k * p.ks.row;
  const bf16* vb = p.v + b * p.vs.batch + h * p.vs.head + s.first_k * p.vs.row;
  const int64_t q_step = s.step * p.qs.row, k_step = s.step * p.ks.row, v_step = s.step * p.vs.row;

  // Key tiles of this query tile (block lists run with kM = 1: one query tile is one 64-row block part).
  KeyTiles keys{0, nullptr, 1};
  int64_t block_row = 0;
  if (p.lists.row_begin) {
    const int64_t list = p.lists.num_lists == 1 ? 0 : (p.lists.num_lists == p.heads ? h : b * p.heads + h);
    block_row = qt / p.lists.block_tiles;
    const int32_t* rb = p.lists.row_begin + list * (p.lists.nqb + 1);
    keys.list = p.lists.col_index + rb[block_row];
    keys.block_tiles = p.lists.block_tiles;
    keys.count = static_cast<int64_t>(rb[block_row + 1] - rb[block_row]) * p.lists.block_tiles;
  } else {
    const int64_t k_tiles = (s.len_k + kTile - 1) / kTile;
    keys.count = p.causal ? min(k_tiles, (q0 + kRows + kTile - 1) / kTile) : k_tiles;
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_in_warp = lane >> 2, col_in_quad = (lane & 3) * 2;
  const int warp_row0 = warp * 16 * kM;  // within the query tile
  // Row r of m-tile mt, half hf: q0 + warp_row0 + mt * 16 + hf * 8 + row_in_warp.
  auto row_of = [&](int mt, int hf) { return q0 + warp_row0 + mt * 16 + hf * 8 + row_in_warp; };

#pragma unroll
  for (int m = 0; m < kM; ++m) load_tile_async<D>(sQ + m * L::kElems, qb, q_step, q0 + m * kTile, s.len_q);
  cp_async_commit();

  float o[kM][kDT][4];
  float m_run[kM][2], l_run[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  // Skip key tiles that lie entirely in the causal future of every row of this query tile.
  auto visible = [&](int64_t kt) { return !p.causal || kt * kTile <= q0 + kRows - 1; };
  int64_t next = 0;
  while (next < keys.count && !visible(keys.tile(next))) ++next;
  if (next < keys.count) {
    const int64_t kt = keys.tile(next);
    load_tile_async<D>(sK, kb, k_step, kt * kTile, s.len_k);
    load_tile_async<D>(sV, vb, v_step, kt * kTile, s.len_k);
  }
  cp_async_commit();

  // The Q tile (m-tile rows of warp_row0 + ...) sits in shared memory as kM 64-row tiles.
  auto q_tile_row = [&](int mt) { return warp_row0 + mt * 16; };

  int stage = 0;
  for (int64_t i = next; i < keys.count;) {
    const int64_t kt = keys.tile(i);
    int64_t after = i + 1;
    while (after < keys.count && !visible(keys.tile(after))) ++after;
    if (after < keys.count) {  // prefetch the next key tile into the other stage
      const int64_t nkt = keys.tile(after);
      load_tile_async<D>(sK + (stage ^ 1) * L::kElems, kb, k_step, nkt * kTile, s.len_k);
      load_tile_async<D>(sV + (stage ^ 1) * L::kElems, vb, v_step, nkt * kTile, s.len_k);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* tK = sK + stage * L::kElems;
    const bf16* tV = sV + stage * L::kElems;

    // S = Q K^T for this warp's 16 * kM rows x 64 keys; each K fragment serves kM m-tiles.
    float sc[kM][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j) sc[mt][j][0] = sc[mt][j][1] = sc[mt][j][2] = sc[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kM][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        const int r = q_tile_row(mt);
        load_a<D>(a[mt], sQ + (r / kTile) * L::kElems, r % kTile, kk);
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        load_b_nk<D>(bb, tK, np * 16, kk);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_bf16(sc[mt][2 * np], a[mt], bb[0], bb[1]);
          mma_bf16(sc[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
    float bias = 0.f;
    if (p.lists.bias) {
      const int64_t kblock = kt / p.lists.block_tiles;
      bias = p.lists.bias[((static_cast<int64_t>(b) * p.heads + h) * p.lists.nqb + block_row) * p.lists.nkb + kblock] *
             kLog2e;
    }
    const int64_t k0 = kt * kTile;
    const bool need_mask = k0 + kTile > s.len_k || (p.causal && k0 + kTile - 1 > q0);
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      // Logits in log2 units, masked; online softmax per row.
      float mx[2] = {m_run[mt][0], m_run[mt][1]};
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = sc[mt][j][e] * p.scale_log2 + bias;
          if (need_mask) {
            const int64_t key = k0 + j * 8 + col_in_quad + (e & 1);
            if (key >= s.len_k || (p.causal && key > row_of(mt, e >> 1))) x = -INFINITY;
          }
          sc[mt][j][e] = x;
        }
        mx[0] = fmaxf(mx[0], fmaxf(sc[mt][j][0], sc[mt][j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[mt][j][2], sc[mt][j][3]));
      }
      float corr[2], base[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        mx[hf] = quad_max(mx[hf]);
        base[hf] = mx[hf] == -INFINITY ? 0.f : mx[hf];
        corr[hf] = exp2f(m_run[mt][hf] - base[hf]);
        m_run[mt][hf] = mx[hf];
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[mt][j][e] = exp2f(sc[mt][j][e] - base[e >> 1]);
          sum[e >> 1] += sc[mt][j][e];
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) l_run[mt][hf] = l_run[mt][hf] * corr[hf] + sum[hf];
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        o[mt][d][0] *= corr[0];
        o[mt][d][1] *= corr[0];
        o[mt][d][2] *= corr[1];
        o[mt][d][3] *= corr[1];
      }
    }
    // O += P V: P from registers as A fragments (bf16, or hi + lo), V tile [key][d].
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t a[kM][4], a_lo[kM][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        const float* f0 = sc[mt][2 * kk];
        const float* f1 = sc[mt][2 * kk + 1];
        const float vals[8] = {f0[0], f0[1], f0[2], f0[3], f1[0], f1[1], f1[2], f1[3]};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          a[mt][r] = pack_bf16(vals[2 * r], vals[2 * r + 1]);
          if (kSplitP) {
            const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&a[mt][r]);
            a_lo[mt][r] = pack_bf16(vals[2 * r] - __low2float(hi), vals[2 * r + 1] - __high2float(hi));
          }
        }
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bb[4];
        load_b_kn<D>(bb, tV, dp * 16, kk);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_bf16(o[mt][2 * dp], a[mt], bb[0], bb[1]);
          mma_bf16(o[mt][2 * dp + 1], a[mt], bb[2], bb[3]);
          if (kSplitP) {
            mma_bf16(o[mt][2 * dp], a_lo[mt], bb[0], bb[1]);
            mma_bf16(o[mt][2 * dp + 1], a_lo[mt], bb[2], bb[3]);
          }
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the prefetch of the next iteration
    stage ^= 1;
    i = after;
  }
  cp_async_wait<0>();

  // Natural-log lse; rows that saw no key get lse -inf and out 0.
  float row_lse[kM][2], inv[kM][2], old_lse[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(l_run[mt][hf]);
      row_lse[mt][hf] = l > 0.f ? (m_run[mt][hf] + log2f(l)) / kLog2e : -INFINITY;
      inv[mt][hf] = l > 0.f ? 1.f / l : 0.f;
      old_lse[mt][hf] = -INFINITY;
    }
  const int64_t lse_base = (static_cast<int64_t>(b) * p.heads + h) * p.st.seq_q;
  // Merge mode reads what earlier branches left before any lane of the quad overwrites it.
  if (p.merge) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        if (row_of(mt, hf) < s.len_q) old_lse[mt][hf] = p.lse[lse_base + s.first_q + row_of(mt, hf) * s.step];
    __syncwarp();
  }
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int64_t row = row_of(mt, hf);
      if (row >= s.len_q) continue;
      const int64_t pos = s.first_q + row * s.step;
      float* lse_ptr = p.lse + lse_base + pos;
      if (!p.merge) {
        bf16* dst = p.out + b * p.os.batch + h * p.os.head + pos * p.os.row;
        const float f = inv[mt][hf] * p.out_scale;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          const float x = o[mt][d][2 * hf] * f, y = o[mt][d][2 * hf + 1] * f;
          const uint32_t packed = pack_bf16(x, y);
          *reinterpret_cast<uint32_t*>(dst + d * 8 + col_in_quad) = packed;
          if (p.out_residual) {
            const __nv_bfloat162 rounded = *reinterpret_cast<const __nv_bfloat162*>(&packed);
            *reinterpret_cast<uint32_t*>(p.out_residual + (dst - p.out) + d * 8 + col_in_quad) =
                pack_bf16(x - __low2float(rounded), y - __high2float(rounded));
          }
        }
        if ((lane & 3) == 0) *lse_ptr = row_lse[mt][hf];
      } else {
        // Both sides are normalised outputs with their lse: weights exp(lse_side - lse_total).
        const float top = fmaxf(old_lse[mt][hf], row_lse[mt][hf]);
        const float safe = top == -INFINITY ? 0.f : top;
        const float w_old = exp2f((old_lse[mt][hf] - safe) * kLog2e), w_new = exp2f((row_lse[mt][hf] - safe) * kLog2e);
        const float total = w_old + w_new;
        const float a_old = total > 0.f ? w_old / total : 0.f;
        const float a_new = total > 0.f ? w_new / total * inv[mt][hf] : 0.f;
        float* acc = p.out_acc + ((static_cast<int64_t>(b) * p.st.seq_q + pos) * p.heads + h) * D;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          float2* cell = reinterpret_cast<float2*>(acc + d * 8 + col_in_quad);
          float2 v = *cell;
          v.x = v.x * a_old + o[mt][d][2 * hf] * a_new;
          v.y = v.y * a_old + o[mt][d][2 * hf + 1] * a_new;
          *cell = v;
        }
        if ((lane & 3) == 0) *lse_ptr = total > 0.f ? safe + logf(total) : -INFINITY;
      }
    }
  }
}

template <int D, int kM, bool kSplitP>
void launch_forward_variant(const FwdParams& params, int64_t max_tiles, int64_t batch) {
  const size_t smem = (kM + 4) * TileLayout<D>::kElems * sizeof(bf16);
  static bool configured = false;  // the attribute is per function; setting it again is harmless
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D, kM, kSplitP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(params.heads), static_cast<unsigned>(batch));
  attention_forward_kernel<D, kM, kSplitP><<<grid, kThreads, smem, impl::stream()>>>(params);
  CUDA_CHECK_LAUNCH();
}

// One 64-row m-tile per warp: 128-row query tiles (kM = 2) measured 5-10% slower on the H200
// (255 registers, half the resident CTAs; notes in benchmarks/lab/NOTES.md). Split P only when a
// block bias needs its gradient.
template <int D>
void launch_forward(const FwdParams& params, const Streams& streams, int64_t batch, bool split_p) {
  int64_t max_tiles = 0;
  for (int br = 0; br < kMaxBranches; ++br) max_tiles = std::max(max_tiles, streams.num_tiles[br]);
  if (max_tiles == 0) return;
  FwdParams p = params;
  p.st = streams;
  if (split_p)
    launch_forward_variant<D, 1, true>(p, max_tiles, batch);
  else
    launch_forward_variant<D, 1, false>(p, max_tiles, batch);
}

}  // namespace

void run_forward(const attention::fused::Problem& pr, const LaunchPlan& plan) {
  FwdParams p{};
  p.q = static_cast<const bf16*>(pr.q);
  p.k = static_cast<const bf16*>(pr.k);
  p.v = static_cast<const bf16*>(pr.v);
  p.qs = {pr.q_stride.batch, pr.q_stride.row, pr.q_stride.head};
  p.ks = {pr.k_stride.batch, pr.k_stride.row, pr.k_stride.head};
  p.vs = {pr.v_stride.batch, pr.v_stride.row, pr.v_stride.head};
  p.out = static_cast<bf16*>(pr.out);
  p.out_residual = static_cast<bf16*>(pr.out_residual);
  p.os = {pr.out_stride.batch, pr.out_stride.row, pr.out_stride.head};
  p.lse = static_cast<float*>(pr.lse);
  p.heads = pr.heads;
  p.scale_log2 = static_cast<float>(pr.scale) * kLog2e;
  p.causal = pr.causal;
  p.lists = plan.lists;

  // lse mixing with several branches: merge into an f32 accumulator, then convert once.
  std::shared_ptr<Storage> acc;
  if (plan.merge) {
    const size_t n = static_cast<size_t>(pr.batch * pr.seq_q * pr.heads * pr.head_dim);
    acc = impl::scratch(n * sizeof(float));
    CUDA_CHECK(cudaMemsetAsync(acc->data, 0, n * sizeof(float), impl::stream()));
    p.out_acc = static_cast<float*>(acc->data);
  }
  if (plan.prefill) fill_outputs(pr);
  const bool split_p = pr.blocks.bias != nullptr && pr.out_residual != nullptr;
  for (const Streams& launch : plan.launches) {
    p.merge = plan.merge;
    p.out_scale = plan.out_scale;
    switch (pr.head_dim) {
      case 32: launch_forward<32>(p, launch, pr.batch, split_p); break;
      case 64: launch_forward<64>(p, launch, pr.batch, split_p); break;
      case 128: launch_forward<128>(p, launch, pr.batch, split_p); break;
      default: LT_CHECK(false, "fused attention (CUDA): head_dim must be 32, 64 or 128, got ", pr.head_dim);
    }
  }
  if (plan.merge) store_accumulator(pr.out, pr.out_stride, p.out_acc, pr, pr.seq_q, pr.out_residual);
}

}  // namespace longtape::cuda::attn
