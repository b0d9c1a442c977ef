#pragma once
// Host side of the fused attention kernels: how a Problem becomes launches (cuda/attention_fused.cu)
// and the forward / backward drivers (attention_fused_fwd.cu, attention_fused_bwd.cu).
#include <vector>

#include "attention/fused/problem.h"
#include "cuda/attention_fused.cuh"
#include "cuda/attention_tuning.h"

namespace longtape::cuda::attn {

struct LaunchPlan {
  std::vector<Streams> launches;  // run in order on the current stream
  bool merge = false;    // lse mixing of several branches: results merge through an f32 accumulator
  bool prefill = false;  // some rows may be covered by no stream: out 0, lse -inf first
  float out_scale = 1.f;  // head_groups: 1 / G
  Lists lists;
};

LaunchPlan plan_launches(const attention::fused::Problem& problem);

// Runs body(Bf16Format{}) or body(F16Format{}): the 16-bit format of the inputs' dtype.
template <class Body>
void with_format(DType dtype, Body&& body) {
  LT_CHECK(dtype == DType::bf16 || dtype == DType::f16,
           "fused attention (CUDA): the 16-bit kernels take bf16 or f16 inputs, got ", dtype_name(dtype));
  if (dtype == DType::f16)
    body(F16Format{});
  else
    body(Bf16Format{});
}

// Rows [start, start + rows) of the sequence, run as a problem of their own.
struct SequenceChunk {
  int64_t start, rows;
};
// lse mixing merges branches through f32 accumulators of every row; dilated segments never cross a
// multiple of every segment length, so the sequence can run in chunks of such multiples, each a
// problem of its own, and the accumulators hold one chunk. Chunks are large enough to fill the GPU
// (rows x batch x heads at least min_row_heads); one chunk when nothing merges.
std::vector<SequenceChunk> merge_chunks(const attention::fused::Problem& problem, const LaunchPlan& plan,
                                        int64_t min_row_heads);
// `problem` with `rows` queries and keys (the stream geometry of a chunk; pointers unchanged).
attention::fused::Problem chunk_problem(const attention::fused::Problem& problem, const SequenceChunk& chunk);
// out = 0 and lse = -inf everywhere.
void fill_outputs(const attention::fused::Problem& problem);
// dst (B, rows, H, D) (elements of the problem's dtype: bf16, f16 or f32) with strides = 0.
void zero_rows(void* dst, const attention::fused::Strides& strides, const attention::fused::Problem& problem,
               int64_t rows);
// dst (B, N, H, D) in the problem's dtype (bf16 or f16) with strides = acc (contiguous f32
// (B, N, H, D)). `residual`, when set, receives acc - dst (same dtype, dst's strides).
void store_accumulator(void* dst, const attention::fused::Strides& strides, const float* acc,
                       const attention::fused::Problem& problem, int64_t rows, void* residual = nullptr);
// Whether the current device is compute capability 9.0 (where sm_90a code runs); asked once per device.
bool current_device_is_sm90();
// Whether the sm_90a kernels were built, run on the current device and cover the problem's
// shape: head dim 64 or 128, block lists of 64- or 128-key blocks (each pass adds its own terms).
bool hopper_kernels_cover(const attention::fused::Problem& problem);
void run_forward(const attention::fused::Problem& problem, const LaunchPlan& plan);
void run_backward(const attention::fused::BackwardProblem& problem, const LaunchPlan& plan);
// The same for f32 inputs: exact f32 on the CUDA cores (cuda/attention_f32_fwd.cu, attention_f32_bwd.cu).
void run_forward_f32(const attention::fused::Problem& problem, const LaunchPlan& plan);
void run_backward_f32(const attention::fused::BackwardProblem& problem, const LaunchPlan& plan);
// What last_forward_kernel() / last_backward_kernel() report; each driver sets them.
extern const char* g_last_forward_kernel;
extern const char* g_last_backward_kernel;

// A fused::Strides as the kernels' row strides.
inline RowStrides row_strides_of(const attention::fused::Strides& s) { return {s.batch, s.row, s.head}; }

// The inputs, gradient outputs, strides and scalars every backward's parameters share, as
// elements of type E (the 16-bit formats' raw bits, or f32).
template <typename E, typename Params>
void set_backward_inputs(Params& p, const attention::fused::BackwardProblem& bp, const LaunchPlan& plan) {
  const attention::fused::Problem& f = bp.forward;
  p.q = static_cast<const E*>(f.q);
  p.k = static_cast<const E*>(f.k);
  p.v = static_cast<const E*>(f.v);
  p.dout = static_cast<const E*>(bp.dout);
  p.qs = row_strides_of(f.q_stride);
  p.ks = row_strides_of(f.k_stride);
  p.vs = row_strides_of(f.v_stride);
  p.dos = row_strides_of(bp.dout_stride);
  p.lse = static_cast<const float*>(f.lse);
  p.dq = static_cast<E*>(bp.dq);
  p.dk = static_cast<E*>(bp.dk);
  p.dv = static_cast<E*>(bp.dv);
  p.dqs = row_strides_of(bp.dq_stride);
  p.dks = row_strides_of(bp.dk_stride);
  p.dvs = row_strides_of(bp.dv_stride);
  p.heads = f.heads;
  p.scale = static_cast<float>(f.scale);
  p.scale_log2 = p.scale * kLog2e;
  p.do_scale = plan.out_scale;
  p.causal = f.causal;
  p.lists = plan.lists;
  p.lists.dbias = static_cast<float*>(bp.dbias);
}

}  // namespace longtape::cuda::attn
