#pragma once
// Variants of the fused attention kernels that the kernel lab (examples/attention_lab.cpp)
// compares; the defaults are the measured best (benchmarks/lab/NOTES.md). Host-only header.

namespace longtape::cuda::attn {

struct KernelTuning {
  // K/V tiles in flight in the forward kernel: 2 or 3 (D <= 64 only); -1 picks per head dim.
  int forward_stages = -1;
  // Forward: rescale the output accumulator only on tiles where some row's running max grew.
  bool lazy_rescale = true;
  // Forward on sm_90a warpgroup MMA where the GPU and the build have it (dense and dilated).
  bool hopper_forward = true;
  // Warpgroups (64 query rows each) per CTA of the Hopper forward at D = 64: 2 or 3.
  int hopper_warpgroups = 2;
  // Hopper forward on block lists of 64-token blocks at D = 64 without causal masking or a bias:
  // list tiles two at a time into 128-key tiles (false: one 64-key tile per step).
  bool hopper_forward_list_pairs = true;
  // Backward on sm_90a warpgroup MMA where usable (D = 64 or 128; not for a block-bias gradient).
  bool hopper_backward = true;
  // Without the deterministic switch: dQ added with atomics by the sm_90a dK/dV CTAs (no dQ
  // CTAs). Off: measured slower than the deterministic kernel on every lab case (NOTES v18), so
  // that kernel serves both modes.
  bool hopper_backward_fused_dq = false;
  // Without the deterministic switch: rescaled bf16 problems at D = 64 without block lists run
  // the warp-specialized sm_90a backward (a producer warp streams query tiles, two consumer
  // warpgroups of 64 keys each, dQ added by bulk tensor reductions). Off: measured 1-17% slower
  // than the dK/dV + dQ kernels (NOTES v28).
  bool hopper_backward_warp_specialized = false;
  // Hopper backward at D = 64 without block lists: each tile's last product group runs on while
  // the CTA waits for the next tile (three stages of streamed tiles; false: waited for at once).
  bool hopper_backward_async = true;
  // Warpgroups (64 keys or queries each) per CTA of the Hopper backward kernels at D = 64: 1 or 2.
  int hopper_backward_warpgroups = 1;
  // CTAs per SM the one-warpgroup Hopper backward at D = 64 is compiled for: 2 (up to 255
  // registers) or 3 (168 registers: the rescaled f16 form fits, the hi + lo form spills a little);
  // 0 = the form's own choice (3 rescaled, 2 hi + lo).
  int hopper_backward_ctas_per_sm = 0;
  // bf16 dense and lse-mixed problems on the Hopper backward: q, k, v, dO rescaled into f16
  // copies, P and dS as one f16 part each (false: bf16 products with hi + lo parts).
  bool hopper_backward_rescaled = true;
  // lse mixing's backward: the launch of a branch that covers every row (dilation 1) runs first
  // and writes the f32 accumulators instead of adding into zeroed ones.
  bool backward_first_launch_writes = true;
  // lse mixing runs in sequence chunks of at least this many rows x batch x heads
  // (attention/fused/cuda/attention_launch.h): backward (three f32 accumulators, the peak of a training step)
  // and forward (one accumulator; smaller chunks there cost speed and save no peak memory).
  long long backward_chunk_row_heads = 3LL << 16;
  long long forward_chunk_row_heads = 3LL << 19;
};
KernelTuning& kernel_tuning();
// Which forward kernel the last fused CUDA forward ran: "sm90a-wgmma" or "sm80-mma" (reports).
const char* last_forward_kernel();
// The same for the last fused CUDA backward.
const char* last_backward_kernel();

}  // namespace longtape::cuda::attn
