#pragma once
// The backward kernels' parameters and shared pieces (attention/fused/cuda/attention_fused_bwd.cu on any sm_80+
// GPU, attention/fused/cuda/sm90a/attention_hopper_bwd.cu on sm_90a; the stream inputs and lse in log2 units
// also serve the f32 kernels): the CTA -> stream tile mapping, lse in log2 units, and how
// finished gradient rows are written or accumulated.
#include <vector>

#include "attention/fused/cuda/attention_fused.cuh"

namespace longtape::cuda::attn {

// The 16-bit backward. Write mode: gradients in the inputs' format with strides; accumulate mode:
// contiguous f32 (B, N, H, D) buffers.
struct BwdParams : BackwardParams<elem16> {
  float *dq_acc, *dk_acc, *dv_acc;
  bool accumulate;
  // Accumulate mode: this launch covers every row and writes the f32 buffers instead of adding
  // into them (the first of a merge's launches; the buffers are not zeroed then).
  bool accumulate_first;
  // Set for bf16 inputs rescaled into f16 copies (the sm_90a backward's RescaledF16 mode): the
  // product scalars on the device, indexed by BwdRescale; null otherwise.
  const float* rescale;
};

// The scalars of the rescaled backward. With q, k, v, dO multiplied by powers of two a, b, c, g,
// P computed as P * 2^p_log2 and dS as dS * 2^s_log2 (kept within f16's range and precision):
enum BwdRescale : int {
  kRescaleScoreLog2,  // scale * log2(e) / (a b): S' = a b S
  kRescaleProbLog2,   // p_log2, added to P's exponent
  kRescaleDp,         // do_scale * 2^(s_log2 - p_log2) / (c g): dP' = c g dP
  kRescaleDelta,      // 2^(s_log2 - p_log2): delta in the units of P'
  kRescaleDk,         // scale / (2^s_log2 a): dK = dS'^T Q' times this
  kRescaleDv,         // do_scale / (2^p_log2 g): dV = P'^T dO' times this
  kRescaleDq,         // scale / (2^s_log2 b): dQ = dS' K' times this
  kRescaleCount
};

// The backward's inputs of one stream: q, k, v and dO at the stream's first row with their row
// steps, and the index of its first row in lse and delta (elements of the parameters' pointers:
// elem16, or float for the f32 kernels).
template <class T>
struct BackwardInputsOf : StreamInputsOf<T> {
  const T* dout;
  int64_t g_step, lse_row0;
};
using BackwardInputs = BackwardInputsOf<elem16>;
template <class Params>
__device__ __forceinline__ auto backward_inputs(const Params& p, const StreamRows& s, int b, int h) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.q)>>;
  BackwardInputsOf<T> in;
  static_cast<StreamInputsOf<T>&>(in) = stream_inputs(p, s, b, h);
  in.dout = p.dout + b * p.dos.batch + h * p.dos.head + s.first_q * p.dos.row;
  in.g_step = s.step * p.dos.row;
  in.lse_row0 = (static_cast<int64_t>(b) * p.heads + h) * p.lse_stride + s.first_q;
  return in;
}

// lse in log2 units; rows that saw no key get +inf so that their P is 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// The two score-shaped products of a backward tile for one warp's 16 rows (row0 of the A tiles)
// against kTile columns: c1 = A1 B1^T and c2 = A2 B2^T, the B tiles stored [n][k]
// (S = Q K^T with dP = dO V^T, or S^T = K Q^T with dP^T = V dO^T).
template <class F, int D>
__device__ __forceinline__ void warp_product_pair(float (&c1)[kTile / 8][4], float (&c2)[kTile / 8][4],
                                                  const elem16* a1, const elem16* a2, int row0, const elem16* b1,
                                                  const elem16* b2) {
  constexpr int kNT = kTile / 8;
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) c1[j][e] = c2[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t x1[4], x2[4];
    load_a<D>(x1, a1, row0, kk);
    load_a<D>(x2, a2, row0, kk);
    mma_tile_b_pair<F, D, false, false>(c1, x1, x1, b1, c2, x2, x2, b2, kk);
  }
}

// Stores a 16 x D accumulator row pair of one warp: a write in format F, or into f32 rows (added,
// or written where `first`).
// acc(d, e): element e of output n-tile d (e < 2: row row_a, else row_a + 8).
template <class F, int D, class AccAt>
__device__ __forceinline__ void store_rows(const AccAt& acc, float factor, int64_t row_a, int64_t len,
                                           const StreamRows& s, bool accumulate, bool first, elem16* dst,
                                           RowStrides ds, float* dst_acc, int64_t b, int64_t h, int64_t heads,
                                           int64_t seq) {
  const int col = ((threadIdx.x & 31) & 3) * 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row_a + half * 8;
    if (row >= len) continue;
    const int64_t pos = s.first_k + row * s.step;  // first_q == first_k for every stream
    if (!accumulate) {
      elem16* out = dst + b * ds.batch + h * ds.head + pos * ds.row;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        *reinterpret_cast<uint32_t*>(out + d * 8 + col) =
            F::pack(acc(d, 2 * half) * factor, acc(d, 2 * half + 1) * factor);
    } else {
      float* out = dst_acc + ((b * seq + pos) * heads + h) * D;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        float2* cell = reinterpret_cast<float2*>(out + d * 8 + col);
        const float2 add{acc(d, 2 * half) * factor, acc(d, 2 * half + 1) * factor};
        if (first) {
          *cell = add;
        } else {
          const float2 v = *cell;
          *cell = make_float2(v.x + add.x, v.y + add.y);
        }
      }
    }
  }
}


// The sm_90a backward over one launch's streams: D = 64 or 128, inputs in format F; fuse_dq adds
// dQ into params.dq_acc with atomics from the dK/dV CTAs (not deterministic), otherwise dQ CTAs
// write it. Only call it where hopper_backward_usable() (attention_fused_bwd.cu) says so.
template <class F>
void launch_backward_hopper(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim,
                            bool fuse_dq);
// The same for bf16 problems whose q, k, v and dO were rescaled into f16 copies (params.rescale set).
void launch_backward_hopper_rescaled(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim,
                                     bool fuse_dq);
// The warp-specialized sm_90a backward (attention_hopper_bwd_ws.cu) for rescaled bf16 problems
// where hopper_backward_ws_covers(): dK and dV written (or accumulated) as the kernels above, dQ
// added into params.dq_acc (zeroed f32) with bulk reductions, so not deterministic. Its dQ boxes
// reach up to hopper_backward_ws_dq_padding() elements past the accumulator's end (zeros are
// added there), so the accumulator is allocated that much longer.
bool hopper_backward_ws_covers(int64_t head_dim, bool lists);
int64_t hopper_backward_ws_dq_padding(const std::vector<Streams>& launches, int64_t heads);
void launch_backward_hopper_ws(const BwdParams& params, const Streams& streams, int64_t batch);

}  // namespace longtape::cuda::attn
