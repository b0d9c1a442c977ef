// Dilated attention forward + backward on the CPU at growing sequence lengths, printing time and
// peak host memory: the composed path keeps O(N * w / r) per branch, so bytes per token stay flat
// while dense attention would grow them with N. "peak MiB" counts tensor memory (memory_stats);
// "peak RSS" is the process's resident peak during the same run (Linux only).
//
//   attention_memory [max_n = 65536] [segments = 2048,4096,8192] [dilations = 1,2,4]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "attention/registry.h"
#include "tensor/error.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

// Resets the kernel's record of this process's peak resident memory (Linux >= 4.0).
bool reset_peak_rss() {
  std::ofstream refs("/proc/self/clear_refs");
  if (!refs) return false;
  refs << "5";
  return static_cast<bool>(refs.flush());
}

// Peak resident memory since the last reset, in MiB, or -1 where /proc is not available.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmHWM:") {
      double kib = 0;
      status >> kib;
      return kib / 1024.0;
    }
    std::getline(status, key);
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int64_t max_n = argc > 1 ? std::atoll(argv[1]) : 65536;
    attention::AttentionConfig config;
    config.num_heads = 8;
    config.head_dim = 64;
    config.segment_lengths = attention::parse_int_list(argc > 2 ? argv[2] : "2048,4096,8192", "segments");
    config.dilation_rates = attention::parse_int_list(argc > 3 ? argv[3] : "1,2,4", "dilations");
    config.mixing = attention::Mixing::lse;
    auto attn = attention::make_attention("dilated", config);
    const Device cpu = Device::cpu();
    manual_seed(0);

    std::printf("dilated attention, CPU f32, B = 1, H = 8, D = 64, segments %s, dilations %s, mixing lse\n",
                shape_str(config.segment_lengths).c_str(), shape_str(config.dilation_rates).c_str());
    std::printf("%8s %11s %11s %11s %17s %14s\n", "N", "forward s", "backward s", "peak MiB", "peak bytes/token",
                "peak RSS MiB");
    for (int64_t n = 8192; n <= max_n; n *= 2) {
      Tensor q = Tensor::randn({1, n, 8, 64}).requires_grad_();
      Tensor k = Tensor::randn({1, n, 8, 64}).requires_grad_();
      Tensor v = Tensor::randn({1, n, 8, 64}).requires_grad_();
      Tensor dout = Tensor::randn({1, n, 8, 64});
      // Peak counted above what is already held (the inputs), so it is what attention itself needs.
      const int64_t held = memory_stats(cpu).allocated_bytes;
      reset_peak_memory(cpu);
      reset_peak_rss();
      const auto t0 = std::chrono::steady_clock::now();
      Tensor out = attn->forward(q, k, v);
      const auto t1 = std::chrono::steady_clock::now();
      out.backward(dout);
      const auto t2 = std::chrono::steady_clock::now();
      const double peak = static_cast<double>(memory_stats(cpu).peak_allocated_bytes - held);
      std::printf("%8lld %11.2f %11.2f %11.1f %17.0f %14.1f\n", static_cast<long long>(n),
                  std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count(),
                  peak / (1024.0 * 1024.0), peak / static_cast<double>(n), peak_rss_mib());
      std::fflush(stdout);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "attention_memory: %s\n", e.what());
    return 1;
  }
}
