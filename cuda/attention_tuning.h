#pragma once
// Variants of the fused attention kernels that the kernel lab (examples/attention_lab.cpp)
// compares; the defaults are the measured best (benchmarks/lab/NOTES.md). Host-only header.

namespace longtape::cuda::attn {

struct KernelTuning {
  // K/V tiles in flight in the forward kernel: 2 or 3 (D <= 64 only); -1 picks per head dim.
  int forward_stages = -1;
  // Forward: rescale the output accumulator only on tiles where some row's running max grew.
  bool lazy_rescale = true;
};
KernelTuning& kernel_tuning();

}  // namespace longtape::cuda::attn
