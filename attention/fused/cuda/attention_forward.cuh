#pragma once
// The forward kernels' parameters and their shared epilogue (attention/fused/cuda/attention_fused_fwd.cu on any
// sm_80+ GPU, attention/fused/cuda/attention_hopper_fwd.cu on sm_90a): one definition of how finished rows are
// normalised and written, or merged by log-sum-exp into the f32 accumulator of lse mixing.
#include "attention/fused/cuda/attention_fused.cuh"

namespace longtape::cuda::attn {

struct FwdParams : InputParams<elem16> {
  // write mode: out (the inputs' format) and lse; merge mode: f32 accumulator out_acc (contiguous
  // (B, Nq, H, D)) and lse are read, merged by log-sum-exp and written back.
  elem16* out;
  elem16* out_residual;  // optional: out_f32 - out
  RowStrides os;
  float* out_acc;
  float* lse;  // (B, H, lse_stride): row pos of (b, h) at (b * H + h) * lse_stride + pos
  int64_t lse_stride;
  float out_scale;
  bool merge;
  bool lazy_rescale;  // skip the O rescale of a tile when no row's max grew
};

// Starts the K/V copies of the first kStages - 1 visible key tiles (fetch_tile(stage, i) commits one
// cp.async group per stage; next_visible(i): the first visible tile at or after i). Returns the
// first visible tile; `fetch` is then the next tile to fetch.
template <int kStages, class NextVisible, class FetchTile>
__device__ __forceinline__ int prefetch_stages(const NextVisible& next_visible, const FetchTile& fetch_tile,
                                               int& fetch) {
  const int first = next_visible(0);
  fetch = first;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    fetch_tile(st, fetch);
    fetch = next_visible(fetch + 1);
  }
  return first;
}

// One key tile of the online softmax on the two rows a thread holds of an mma-layout score tile:
// masks scores past lim[hf] (key offset within the tile) when `masked`, raises the running max
// m_run (log2 units, scaled) and rescales l_run and the output accumulator when it grew (only then,
// with lazy_rescale: the factor is exactly 1 otherwise, and after the first tiles it rarely grows),
// and turns the scores into probabilities exp2(s * scale_log2 + bias - max), one FFMA + one MUFU
// each, added to l_run. s(j, e): element e of key n-tile j (kNT of them); o(d, e): output element;
// done(j) runs as soon as n-tile j holds probabilities (e.g. to pack them, while registers last).
template <int kNT, int kDT, class S, class O, class Done>
__device__ __forceinline__ void online_softmax_tile(const S& s, const O& o, float (&m_run)[2], float (&l_run)[2],
                                                    float bias, float scale_log2, bool lazy_rescale, bool masked,
                                                    const int (&lim)[2], const Done& done) {
  const int col_in_quad = ((threadIdx.x & 31) & 3) * 2;
  if (masked) {
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (j * 8 + col_in_quad + (e & 1) > lim[e >> 1]) s(j, e) = -INFINITY;
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s(j, 0), s(j, 1)));
    mx[1] = fmaxf(mx[1], fmaxf(s(j, 2), s(j, 3)));
  }
  float m_new[2];
  bool grew = false;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    m_new[hf] = fmaxf(m_run[hf], quad_max(mx[hf]) * scale_log2 + bias);
    grew |= m_new[hf] != m_run[hf];
  }
  if (!lazy_rescale || __any_sync(0xffffffffu, grew)) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float corr = fast_exp2(m_run[hf] - (m_new[hf] == -INFINITY ? 0.f : m_new[hf]));
      l_run[hf] *= corr;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        o(d, 2 * hf) *= corr;
        o(d, 2 * hf + 1) *= corr;
      }
    }
  }
  float shift[2];  // bias - new running max, in log2 units
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    m_run[hf] = m_new[hf];
    shift[hf] = bias - (m_new[hf] == -INFINITY ? 0.f : m_new[hf]);
  }
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s(j, e) = fast_exp2(fmaf(s(j, e), scale_log2, shift[e >> 1]));
      l_run[e >> 1] += s(j, e);
    }
    done(j);
  }
}

// Writes (or merges) the two rows a thread holds of an accumulator in mma layout: o(d, e) is
// element e of output n-tile d (e < 2: row row_of(0), else row_of(1)), m_run / l_run the running
// max (log2 units, scaled) and this thread's partial row sums, out in format F. Call with the
// whole warp.
template <class F, int D, class OAt, class RowOf>
__device__ __forceinline__ void store_forward_rows(const FwdParams& p, const OAt& o, const float (&m_run)[2],
                                                   const float (&l_run)[2], const StreamRows& s, int b, int h,
                                                   const RowOf& row_of) {
  constexpr int kDT = D / 8;
  const int lane = threadIdx.x & 31, col_in_quad = (lane & 3) * 2;
  // Natural-log lse; rows that saw no key get lse -inf and out 0.
  float row_lse[2], inv[2], old_lse[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = quad_sum(l_run[hf]);
    row_lse[hf] = l > 0.f ? (m_run[hf] + log2f(l)) / kLog2e : -INFINITY;
    inv[hf] = l > 0.f ? 1.f / l : 0.f;
  }
  const int64_t lse_base = (static_cast<int64_t>(b) * p.heads + h) * p.lse_stride;
  // Merge mode reads what earlier branches left before any lane of the quad overwrites it.
  if (p.merge) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (row_of(hf) < s.len_q) old_lse[hf] = p.lse[lse_base + s.first_q + row_of(hf) * s.step];
    __syncwarp();
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = row_of(hf);
    if (row >= s.len_q) continue;
    const int64_t pos = s.first_q + row * s.step;
    float* lse_ptr = p.lse + lse_base + pos;
    if (!p.merge) {
      elem16* dst = p.out + b * p.os.batch + h * p.os.head + pos * p.os.row;
      const float f = inv[hf] * p.out_scale;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        const float x = o(d, 2 * hf) * f, y = o(d, 2 * hf + 1) * f;
        const uint32_t packed = F::pack(x, y);
        *reinterpret_cast<uint32_t*>(dst + d * 8 + col_in_quad) = packed;
        if (p.out_residual) {
          const float2 rounded = F::unpack(packed);
          *reinterpret_cast<uint32_t*>(p.out_residual + (dst - p.out) + d * 8 + col_in_quad) =
              F::pack(x - rounded.x, y - rounded.y);
        }
      }
      if ((lane & 3) == 0) *lse_ptr = row_lse[hf];
    } else {
      // Both sides are normalised outputs with their lse: weights exp(lse_side - lse_total).
      const float top = fmaxf(old_lse[hf], row_lse[hf]);
      const float safe = top == -INFINITY ? 0.f : top;
      const float w_old = exp2f((old_lse[hf] - safe) * kLog2e), w_new = exp2f((row_lse[hf] - safe) * kLog2e);
      const float total = w_old + w_new;
      const float a_old = total > 0.f ? w_old / total : 0.f;
      const float a_new = total > 0.f ? w_new / total * inv[hf] : 0.f;
      float* acc = p.out_acc + ((static_cast<int64_t>(b) * p.st.seq_q + pos) * p.heads + h) * D;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        float2* cell = reinterpret_cast<float2*>(acc + d * 8 + col_in_quad);
        float2 v = *cell;
        v.x = v.x * a_old + o(d, 2 * hf) * a_new;
        v.y = v.y * a_old + o(d, 2 * hf + 1) * a_new;
        *cell = v;
      }
      if ((lane & 3) == 0) *lse_ptr = total > 0.f ? safe + logf(total) : -INFINITY;
    }
  }
}

// The sm_90a forward (attention/fused/cuda/sm90a/attention_hopper_fwd.cu) over one launch's streams; head_dim 64
// or 128, inputs in format F. Only call it where hopper_forward_usable() says so.
template <class F>
void launch_forward_hopper(const FwdParams& params, const Streams& streams, int64_t batch, int head_dim);

}  // namespace longtape::cuda::attn
