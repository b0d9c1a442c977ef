#pragma once
// Variants of the fused attention kernels that the kernel lab (examples/attention_lab.cpp)
// compares; the defaults are the measured best (benchmarks/lab/NOTES.md). Host-only header.

namespace longtape::cuda::attn {

struct KernelTuning {
  // Resident forward CTAs per SM asked of the register allocator: 0 (no bound), 3 or 4;
  // -1 picks per head dim.
  int forward_min_blocks = -1;
};
KernelTuning& kernel_tuning();

}  // namespace longtape::cuda::attn
