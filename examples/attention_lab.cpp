// Kernel lab for the attention core: times each attention configuration of interest with the
// fused kernels and (optionally) the composed path, checks fused against composed on the same
// inputs, and prints one markdown row per case. GPU only.
//   build/bin/attention_lab [--impl fused|composed|both] [--quick] [--atomic-dq] [--only TEXT]
//                           [--n N] [--dim D] [--fwd-stages 2|3] [--eager-rescale] [--portable] [--hopper-wg 2|3]
//                           [--no-chunks] [--portable-bwd] [--hopper-bwd-wg 1|2] [--list-tiles-64]
//                           [--acc-zeroed]
//                           [--hopper-bwd-ctas 2|3] [--hopper-bwd-split] [--hopper-bwd-waited]
//                           [--hopper-fused-dq] [--hopper-bwd-ws]
//                           [--dtype bf16|f16|f32] [--heads H [--head-offset O --total-heads T]] [--profile]
// (--only runs the cases whose label contains TEXT, or is TEXT after a leading '=', --n and --dim
// those of that sequence length and head dim, e.g. for a profiler run of one case;
// --fwd-stages picks the forward kernel's K/V pipeline depth, default: per head dim;
// --eager-rescale rescales the forward accumulator on every key tile; --portable keeps forward and
// backward on the sm_80 kernels on a Hopper GPU (--portable-bwd the backward only); --hopper-wg
// and --hopper-bwd-wg set the sm_90a kernels' warpgroups at D = 64; --hopper-bwd-split keeps bf16
// backward products in bf16 with P and dS as hi + lo parts instead of rescaled f16;
// --hopper-bwd-waited waits for each tile's last backward products before the next tile (D = 64;
// by default they run on into it);
// --list-tiles-64 keeps the sm_90a forward on block lists at one 64-key list tile per step;
// --acc-zeroed has every lse branch's backward add into zeroed accumulators (no first writer);
// --hopper-fused-dq runs the sm_90a backward with dQ by atomics (NOTES v18); --hopper-bwd-ws runs
// the warp-specialized sm_90a backward, dQ by bulk reductions (NOTES v28); --no-chunks runs lse
// mixing over the whole sequence at once, with accumulators of every row; --dtype sets the inputs'
// dtype, default bf16: f32 runs the exact-f32 kernels on the CUDA cores; --heads runs the dilated
// cases on H heads, heads O.. of T as a head_parallel rank holds them; --n with a length not in
// the list adds the dilated cases at that length; --profile runs one more forward + backward per
// case between cudaProfilerStart and cudaProfilerStop, for `nsys --capture-range=cudaProfilerApi`
// or `ncu --profile-from-start off`.)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "attention/registry.h"
#include "tensor/backend_options.h"
#include "tensor/ops.h"
#ifdef LONGTAPE_WITH_CUDA
#include "attention/fused/cuda/attention_tuning.h"
#include "tensor/cuda/memory_pool.h"
#include "tensor/cuda/runtime.h"
#include "tensor/cuda/timer.h"
#include <cuda_profiler_api.h>
#endif

using namespace longtape;
using attention::AttentionConfig;

namespace {

struct Case {
  std::string label, variant;
  int64_t n, heads, dim;
  AttentionConfig config;
  double pairs;  // attended (query, key) pairs per (batch, head), for TFLOP/s
};

AttentionConfig base(int64_t heads, int64_t dim) {
  AttentionConfig c;
  c.num_heads = heads;
  c.head_dim = dim;
  return c;
}

Case dense(int64_t n, int64_t dim, bool causal) {
  AttentionConfig c = base(12, dim);
  c.causal = causal;
  return {std::string("dense") + (causal ? " causal" : ""), "dense", n, 12, dim, c,
          causal ? 0.5 * n * (n + 1.0) : 1.0 * n * n};
}

Case dilated(int64_t n, attention::Mixing mixing, bool causal = false, int64_t dim = 64) {
  AttentionConfig c = base(12, dim);
  c.causal = causal;
  c.segment_lengths = {2048, 4096, 8192};
  c.dilation_rates = {1, 2, 4};
  c.mixing = mixing;
  // Pairs: each branch's streams of length w/r, per head (lse: all heads every branch; groups: 1/3).
  double pairs = 0;
  for (int i = 0; i < 3; ++i) {
    const double w = static_cast<double>(c.segment_lengths[i]), r = static_cast<double>(c.dilation_rates[i]);
    const double len = w / r;  // stream length
    pairs += (n / w) * (causal ? 0.5 * len * (len + 1) : len * len) * (mixing == attention::Mixing::lse ? 1.0 : 1.0 / 3.0);
  }
  return {std::string("dilated ") + attention::mixing_name(mixing) + (causal ? " causal" : ""), "dilated", n, 12, dim,
          c, pairs};
}

Case block_sparse(int64_t n, int64_t window, int64_t block = 64) {
  AttentionConfig c = base(12, 64);
  c.pattern = "local_window";
  c.block_size = block;
  c.window = window;
  const int64_t nb = n / block, w = window / block / 2;
  double blocks = 0;
  for (int64_t i = 0; i < nb; ++i) blocks += static_cast<double>(std::min(nb - 1, i + w) - std::max<int64_t>(0, i - w) + 1);
  const std::string label = "block_sparse local_window w=" + std::to_string(window) +
                            (block == 64 ? std::string() : " block " + std::to_string(block));
  return Case{label, "block_sparse", n, 12, 64, c, blocks * static_cast<double>(block * block)};
}

#ifdef LONGTAPE_WITH_CUDA
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run(const Case& cs, const std::string& impl, int repeats, DType dtype, bool profile) {
  AttentionConfig config = cs.config;
  config.impl = impl;
  auto layer = attention::make_attention(cs.variant, config);
  const Device gpu = Device::cuda(0);
  const Shape shape{1, cs.n, cs.heads, cs.dim};
  auto input = [&] { return Tensor::randn(shape, DType::f32, gpu).to(dtype).detach().requires_grad_(); };
  Tensor q = input(), k = input(), v = input();
  Tensor dout = Tensor::randn(shape, DType::f32, gpu).to(dtype).detach();
  cuda::DeviceTimer timer(0);
  std::vector<double> fwd, both;
  cuda::synchronize(0);
  cuda::pool_reset_peak(0);
  for (int i = 0; i < repeats + 3; ++i) {
    timer.start();
    {
      NoGradGuard no_grad;
      Tensor o = layer->forward(q, k, v);
    }
    timer.stop();
    if (i >= 3) fwd.push_back(timer.elapsed_ms());
  }
  for (int i = 0; i < repeats + 3; ++i) {
    q.zero_grad_();
    k.zero_grad_();
    v.zero_grad_();
    timer.start();
    Tensor o = layer->forward(q, k, v);
    o.backward(dout);
    timer.stop();
    if (i >= 3) both.push_back(timer.elapsed_ms());
  }
  const double peak_mib = static_cast<double>(cuda::pool_stats(0).peak_allocated_bytes) / 1048576.0;
  if (profile) {  // one more forward + backward inside the profiler's capture range
    q.zero_grad_();
    k.zero_grad_();
    v.zero_grad_();
    cuda::synchronize(0);
    cudaProfilerStart();
    Tensor o = layer->forward(q, k, v);
    o.backward(dout);
    cuda::synchronize(0);
    cudaProfilerStop();
  }
  const double f = median(fwd), fb = median(both);
  const double flops_fwd = 4.0 * cs.pairs * cs.dim * cs.heads;  // QK^T and PV
  const std::string backend = layer->last_backend() == "composed"
                                  ? layer->last_backend()
                                  : layer->last_backend() + " (fwd " + cuda::attn::last_forward_kernel() + ", bwd " +
                                        cuda::attn::last_backward_kernel() + ")";
  std::printf("| %s | %s | %s | %lld | %lld | %.3f | %.3f | %.1f | %.1f | %.0f |\n", cs.label.c_str(),
              backend.c_str(), layer->last_precision().c_str(), static_cast<long long>(cs.n),
              static_cast<long long>(cs.dim), f, fb, flops_fwd / f / 1e9, 3.5 * flops_fwd / fb / 1e9, peak_mib);
  std::fflush(stdout);
}
#endif

}  // namespace

int main(int argc, char** argv) {
#ifndef LONGTAPE_WITH_CUDA
  std::cerr << "attention_lab: built without CUDA\n";
  return 1;
#else
  std::string impl = "fused";
  bool quick = false, profile = false;
  std::string only;
  int64_t only_n = 0, only_dim = 0, heads = 0, head_offset = 0, total_heads = 0;
  DType dtype = DType::bf16;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--impl") && i + 1 < argc) impl = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--profile")) profile = true;
    else if (!std::strcmp(argv[i], "--atomic-dq")) set_deterministic_algorithms(false);
    else if (!std::strcmp(argv[i], "--hopper-fused-dq")) {
      set_deterministic_algorithms(false);
      cuda::attn::kernel_tuning().hopper_backward_fused_dq = true;
    }
    else if (!std::strcmp(argv[i], "--hopper-bwd-ws")) {
      set_deterministic_algorithms(false);
      cuda::attn::kernel_tuning().hopper_backward_warp_specialized = true;
    }
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
    else if (!std::strcmp(argv[i], "--n") && i + 1 < argc) only_n = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--dim") && i + 1 < argc) only_dim = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--heads") && i + 1 < argc) heads = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--head-offset") && i + 1 < argc) head_offset = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--total-heads") && i + 1 < argc) total_heads = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc) {
      const std::string name = argv[++i];
      if (name != "bf16" && name != "f16" && name != "f32") {
        std::cerr << "attention_lab: --dtype takes bf16, f16 or f32, got '" << name << "'\n";
        return 2;
      }
      dtype = dtype_from_name(name);
    }
    else if (!std::strcmp(argv[i], "--fwd-stages") && i + 1 < argc)
      cuda::attn::kernel_tuning().forward_stages = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--eager-rescale"))
      cuda::attn::kernel_tuning().lazy_rescale = false;
    else if (!std::strcmp(argv[i], "--portable")) {
      cuda::attn::kernel_tuning().hopper_forward = false;
      cuda::attn::kernel_tuning().hopper_backward = false;
    } else if (!std::strcmp(argv[i], "--portable-bwd"))
      cuda::attn::kernel_tuning().hopper_backward = false;
    else if (!std::strcmp(argv[i], "--hopper-bwd-wg") && i + 1 < argc)
      cuda::attn::kernel_tuning().hopper_backward_warpgroups = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--hopper-bwd-waited"))
      cuda::attn::kernel_tuning().hopper_backward_async = false;
    else if (!std::strcmp(argv[i], "--hopper-bwd-split"))
      cuda::attn::kernel_tuning().hopper_backward_rescaled = false;
    else if (!std::strcmp(argv[i], "--acc-zeroed"))
      cuda::attn::kernel_tuning().backward_first_launch_writes = false;
    else if (!std::strcmp(argv[i], "--list-tiles-64"))
      cuda::attn::kernel_tuning().hopper_forward_list_pairs = false;
    else if (!std::strcmp(argv[i], "--hopper-bwd-ctas") && i + 1 < argc)
      cuda::attn::kernel_tuning().hopper_backward_ctas_per_sm = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--no-chunks")) {
      cuda::attn::kernel_tuning().forward_chunk_row_heads = 1LL << 50;
      cuda::attn::kernel_tuning().backward_chunk_row_heads = 1LL << 50;
    } else if (!std::strcmp(argv[i], "--hopper-wg") && i + 1 < argc)
      cuda::attn::kernel_tuning().hopper_warpgroups = std::atoi(argv[++i]);
    else {
      std::cerr << "attention_lab: unknown argument '" << argv[i] << "'\n";
      return 2;
    }
  }
  std::vector<Case> cases{dense(16384, 64, false), dense(16384, 64, true), dense(16384, 128, false),
                          block_sparse(16384, 4096), block_sparse(16384, 1536), block_sparse(16384, 1536, 128),
                          // 10% of the blocks at a length where block-sparse attention is used.
                          dense(65536, 64, false), block_sparse(65536, 6144)};
  for (int64_t n : {int64_t{32768}, int64_t{131072}})
    for (auto m : {attention::Mixing::lse, attention::Mixing::head_groups}) cases.push_back(dilated(n, m));
  // Causal dilated: balanced when it takes about half the non-causal time.
  cases.push_back(dilated(32768, attention::Mixing::lse, true));
  cases.push_back(dilated(32768, attention::Mixing::lse, false, 128));
  if (only_n != 0 && only_n != 32768 && only_n != 131072)
    for (auto m : {attention::Mixing::lse, attention::Mixing::head_groups}) cases.push_back(dilated(only_n, m));
  if (heads > 0)
    for (Case& cs : cases) {
      if (cs.variant != "dilated") continue;
      cs.heads = cs.config.num_heads = heads;
      cs.config.head_offset = head_offset;
      cs.config.total_heads = total_heads;
      cs.label += " heads " + std::to_string(head_offset) + ".." + std::to_string(head_offset + heads) + " of " +
                  std::to_string(total_heads > 0 ? total_heads : heads);
    }
  std::printf("| case | impl | precision | N | D | fwd ms | fwd+bwd ms | fwd TFLOP/s | f+b TFLOP/s | peak MiB |\n");
  std::printf("|---|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
  for (const Case& cs : cases) {
    if (!only.empty() && (only[0] == '=' ? cs.label != only.substr(1) : cs.label.find(only) == std::string::npos))
      continue;
    if ((only_n != 0 && cs.n != only_n) || (only_dim != 0 && cs.dim != only_dim)) continue;
    for (const std::string& which : impl == "both" ? std::vector<std::string>{"fused", "composed"}
                                                   : std::vector<std::string>{impl}) {
      if (which == "composed" && cs.variant == "dense" && cs.n > 8192) continue;  // N x N scores
      try {
        run(cs, which, quick ? 3 : 10, dtype, profile);
      } catch (const std::exception& e) {
        std::printf("| %s | %s | error: %s |\n", cs.label.c_str(), which.c_str(), e.what());
      }
    }
  }
  return 0;
#endif
}
