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

template <int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const FwdParams p) {
  using L = TileLayout<D>;
  constexpr int kNT = kTile / 8;  // key n-tiles per step
  constexpr int kDT = D / 8;      // output n-tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + L::kElems;  // 2 stages
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
  const int64_t q0 = qt * kTile;
  if (q0 >= s.len_q) return;

  const bf16* qb = p.q + b * p.qs.batch + h * p.qs.head + s.first_q * p.qs.row;
  const bf16* kb = p.k + b * p.ks.batch + h * p.ks.head + s.first_k * p.ks.row;
  const bf16* vb = p.v + b * p.vs.batch + h * p.vs.head + s.first_k * p.vs.row;
  const int64_t q_step = s.step * p.qs.row, k_step = s.step * p.ks.row, v_step = s.step * p.vs.row;

  // Key tiles of this query tile.
  KeyTiles keys{0, nullptr, 1};
  int64_t list_entry0 = 0, block_row = 0;
  if (p.lists.row_begin) {
    const int64_t list = p.lists.num_lists == 1 ? 0 : (p.lists.num_lists == p.heads ? h : b * p.heads + h);
    block_row = qt / p.lists.block_tiles;
    const int32_t* rb = p.lists.row_begin + list * (p.lists.nqb + 1);
    list_entry0 = rb[block_row];
    keys.list = p.lists.col_index + list_entry0;
    keys.block_tiles = p.lists.block_tiles;
    keys.count = static_cast<int64_t>(rb[block_row + 1] - rb[block_row]) * p.lists.block_tiles;
  } else {
    const int64_t k_tiles = (s.len_k + kTile - 1) / kTile;
    keys.count = p.causal ? min(k_tiles, qt + 1) : k_tiles;
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_in_warp = lane >> 2, col_in_quad = (lane & 3) * 2;
  const int64_t row_a = q0 + warp * 16 + row_in_warp, row_b = row_a + 8;  // this thread's two rows

  load_tile_async<D>(sQ, qb, q_step, q0, s.len_q);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  // Skip key tiles that lie entirely in the causal future of every row of this query tile.
  auto visible = [&](int64_t kt) { return !p.causal || kt * kTile <= q0 + kTile - 1; };
  int64_t next = 0;
  while (next < keys.count && !visible(keys.tile(next))) ++next;
  if (next < keys.count) {
    const int64_t kt = keys.tile(next);
    load_tile_async<D>(sK, kb, k_step, kt * kTile, s.len_k);
    load_tile_async<D>(sV, vb, v_step, kt * kTile, s.len_k);
  }
  cp_async_commit();

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

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float sc[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a<D>(a, sQ, warp * 16, kk);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        load_b_nk<D>(bb, tK, np * 16, kk);
        mma_bf16(sc[2 * np], a, bb[0], bb[1]);
        mma_bf16(sc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // Logits in log2 units, masked.
    float bias = 0.f;
    if (p.lists.bias) {
      const int64_t kblock = kt / p.lists.block_tiles;
      bias = p.lists.bias[((static_cast<int64_t>(b) * p.heads + h) * p.lists.nqb + block_row) * p.lists.nkb + kblock] *
             kLog2e;
    }
    const int64_t k0 = kt * kTile;
    const bool need_mask = k0 + kTile > s.len_k || (p.causal && k0 + kTile - 1 > q0);
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[j][e] * p.scale_log2 + bias;
        if (need_mask) {
          const int64_t key = k0 + j * 8 + col_in_quad + (e & 1);
          const int64_t row = e < 2 ? row_a : row_b;
          if (key >= s.len_k || (p.causal && key > row)) x = -INFINITY;
        }
        sc[j][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(sc[j][0], sc[j][1]));
      mx_b = fmaxf(mx_b, fmaxf(sc[j][2], sc[j][3]));
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    const float base_a = mx_a == -INFINITY ? 0.f : mx_a, base_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      sc[j][0] = exp2f(sc[j][0] - base_a);
      sc[j][1] = exp2f(sc[j][1] - base_a);
      sc[j][2] = exp2f(sc[j][2] - base_b);
      sc[j][3] = exp2f(sc[j][3] - base_b);
      sum_a += sc[j][0] + sc[j][1];
      sum_b += sc[j][2] + sc[j][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int d = 0; d < kDT; ++d) {
      o[d][0] *= corr_a;
      o[d][1] *= corr_a;
      o[d][2] *= corr_b;
      o[d][3] *= corr_b;
    }
    // O += P V: P (16 x 64) from registers as A fragments, V tile [key][d].
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
      a[1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
      a[2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      a[3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bb[4];
        load_b_kn<D>(bb, tV, dp * 16, kk);
        mma_bf16(o[2 * dp], a, bb[0], bb[1]);
        mma_bf16(o[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // the stage is overwritten by the prefetch of the next iteration
    stage ^= 1;
    i = after;
  }
  cp_async_wait<0>();

  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  // Natural-log lse; rows that saw no key get lse -inf and out 0.
  const float lse_a = l_a > 0.f ? (m_a + log2f(l_a)) / kLog2e : -INFINITY;
  const float lse_b = l_b > 0.f ? (m_b + log2f(l_b)) / kLog2e : -INFINITY;
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;

  // Merge mode reads what earlier branches left before any lane of the quad overwrites it.
  float old_lse[2] = {-INFINITY, -INFINITY};
  if (p.merge) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = half ? row_b : row_a;
      if (row < s.len_q)
        old_lse[half] = p.lse[(static_cast<int64_t>(b) * p.heads + h) * p.st.seq_q + s.first_q + row * s.step];
    }
    __syncwarp();
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = half ? row_b : row_a;
    if (row >= s.len_q) continue;
    const int64_t pos = s.first_q + row * s.step;
    const float row_lse = half ? lse_b : lse_a, inv = half ? inv_b : inv_a;
    float* lse_ptr = p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.st.seq_q + pos;
    if (!p.merge) {
      bf16* dst = p.out + b * p.os.batch + h * p.os.head + pos * p.os.row;
      const float f = inv * p.out_scale;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        const float x = o[d][2 * half] * f, y = o[d][2 * half + 1] * f;
        const uint32_t packed = pack_bf16(x, y);
        *reinterpret_cast<uint32_t*>(dst + d * 8 + col_in_quad) = packed;
        if (p.out_residual) {
          const __nv_bfloat162 rounded = *reinterpret_cast<const __nv_bfloat162*>(&packed);
          *reinterpret_cast<uint32_t*>(p.out_residual + (dst - p.out) + d * 8 + col_in_quad) =
              pack_bf16(x - __low2float(rounded), y - __high2float(rounded));
        }
      }
      if ((lane & 3) == 0) *lse_ptr = row_lse;
    } else {
      // Both sides are normalised outputs with their lse: weights exp(lse_side - lse_total).
      const float top = fmaxf(old_lse[half], row_lse);
      const float safe = top == -INFINITY ? 0.f : top;
      const float w_old = exp2f((old_lse[half] - safe) * kLog2e), w_new = exp2f((row_lse - safe) * kLog2e);
      const float total = w_old + w_new;
      const float a_old = total > 0.f ? w_old / total : 0.f, a_new = total > 0.f ? w_new / total * inv : 0.f;
      float* acc = p.out_acc + ((static_cast<int64_t>(b) * p.st.seq_q + pos) * p.heads + h) * D;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        float2* cell = reinterpret_cast<float2*>(acc + d * 8 + col_in_quad);
        float2 v = *cell;
        v.x = v.x * a_old + o[d][2 * half] * a_new;
        v.y = v.y * a_old + o[d][2 * half + 1] * a_new;
        *cell = v;
      }
      if ((lane & 3) == 0) *lse_ptr = total > 0.f ? safe + logf(total) : -INFINITY;
    }
  }
}

template <int D>
void launch_forward(const FwdParams& params, int64_t max_tiles, int64_t batch) {
  const size_t smem = 5 * TileLayout<D>::kElems * sizeof(bf16);
  static bool configured = false;  // the attribute is per function and device; setting it twice is harmless
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(params.heads), static_cast<unsigned>(batch));
  attention_forward_kernel<D><<<grid, kThreads, smem, impl::stream()>>>(params);
  CUDA_CHECK_LAUNCH();
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
  for (const Streams& launch : plan.launches) {
    p.st = launch;
    p.merge = plan.merge;
    p.out_scale = plan.out_scale;
    int64_t max_tiles = 0;
    for (int br = 0; br < kMaxBranches; ++br) max_tiles = std::max(max_tiles, launch.num_tiles[br]);
    if (max_tiles == 0) continue;
    switch (pr.head_dim) {
      case 32: launch_forward<32>(p, max_tiles, pr.batch); break;
      case 64: launch_forward<64>(p, max_tiles, pr.batch); break;
      case 128: launch_forward<128>(p, max_tiles, pr.batch); break;
      default: LT_CHECK(false, "fused attention (CUDA): head_dim must be 32, 64 or 128, got ", pr.head_dim);
    }
  }
  if (plan.merge) store_accumulator(pr.out, pr.out_stride, p.out_acc, pr, pr.seq_q, pr.out_residual);
}

}  // namespace longtape::cuda::attn
