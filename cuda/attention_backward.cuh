#pragma once
// The backward kernels' parameters and shared pieces (cuda/attention_fused_bwd.cu on any sm_80+
// GPU, cuda/sm90a/attention_hopper_bwd.cu on sm_90a): the CTA -> stream tile mapping, lse in
// log2 units, and how finished gradient rows are written or accumulated.
#include "cuda/attention_fused.cuh"

namespace longtape::cuda::attn {

struct BwdParams {
  const elem16 *q, *k, *v, *dout;
  RowStrides qs, ks, vs, dos;
  const float* lse;    // (B, H, lse_stride), natural log
  const float* delta;  // (B, H, lse_stride)
  int64_t lse_stride;
  // write mode: gradients in the inputs' format with strides; accumulate mode: contiguous f32
  // (B, N, H, D) buffers
  elem16 *dq, *dk, *dv;
  RowStrides dqs, dks, dvs;
  float *dq_acc, *dk_acc, *dv_acc;
  bool accumulate;
  int64_t heads;
  float scale, scale_log2, do_scale;
  bool causal;
  Streams st;
  Lists lists;
};

// The backward's inputs of one stream: q, k, v and dO at the stream's first row with their row
// steps, and the index of its first row in lse and delta.
struct BackwardInputs : StreamInputs {
  const elem16* dout;
  int64_t g_step, lse_row0;
};
__device__ __forceinline__ BackwardInputs backward_inputs(const BwdParams& p, const StreamRows& s, int b, int h) {
  BackwardInputs in;
  static_cast<StreamInputs&>(in) = stream_inputs(p, s, b, h);
  in.dout = p.dout + b * p.dos.batch + h * p.dos.head + s.first_q * p.dos.row;
  in.g_step = s.step * p.dos.row;
  in.lse_row0 = (static_cast<int64_t>(b) * p.heads + h) * p.lse_stride + s.first_q;
  return in;
}

// lse in log2 units; rows that saw no key get +inf so that their P is 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Stores a 16 x D accumulator row pair of one warp: a write in format F or an f32 accumulate.
// acc(d, e): element e of output n-tile d (e < 2: row row_a, else row_a + 8).
template <class F, int D, class AccAt>
__device__ __forceinline__ void store_rows(const AccAt& acc, float factor, int64_t row_a, int64_t len,
                                           const StreamRows& s, bool accumulate, elem16* dst, RowStrides ds,
                                           float* dst_acc, int64_t b, int64_t h, int64_t heads, int64_t seq) {
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
        float2 v = *cell;
        v.x += acc(d, 2 * half) * factor;
        v.y += acc(d, 2 * half + 1) * factor;
        *cell = v;
      }
    }
  }
}


// The sm_90a backward (dK/dV and dQ kernels) over one launch's streams: D = 64 or 128,
// deterministic, inputs in format F. Only call it where hopper_backward_usable()
// (attention_fused_bwd.cu) says so.
template <class F>
void launch_backward_hopper(const BwdParams& params, const Streams& streams, int64_t batch, int head_dim);

}  // namespace longtape::cuda::attn
