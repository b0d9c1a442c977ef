// CPU/CUDA parity of block-sparse attention (every pattern, adaptive, Hilbert schedule) and of the
// Hilbert token ordering: f32 on the GPU against float64 on the CPU, forward (out, lse) and backward
// (dq, dk, dv). Skips with a message when no GPU is present.
#include <doctest/doctest.h>

#include "attention/block_sparse.h"
#include "attention/registry.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

using testing::check_close;
using testing::fresh_seed;
using testing::Result;
using testing::run_on;

namespace {

void check_results(const Result& gpu, const Result& cpu, const std::string& what) {
  testing::check_results_close(gpu, cpu, {1e-4, 1e-5, 1e-4, 1e-5, 1e-3, 1e-4}, what);
}

// q, k, v and an output gradient, (B, N, H, D) float64 on the CPU, drawn in that order.
struct QkvDout {
  Tensor q, k, v, dout;
};
QkvDout random_qkv_dout(int64_t B, int64_t N, int64_t H, int64_t D) {
  auto draw = [&] { return Tensor::randn({B, N, H, D}, DType::f64); };
  return {draw(), draw(), draw(), draw()};
}

// 7 blocks of 16 tokens, the last one ragged (N = 100).
AttentionConfig make_config(const std::string& pattern, bool causal) {
  return {.num_heads = 3, .head_dim = 32, .dilation_rates = {2, 3}, .causal = causal, .pattern = pattern,
          .block_size = 16, .density = 0.4, .window = 64, .global_blocks = 1, .seed = 5};
}

}  // namespace

TEST_CASE("CUDA parity: block_sparse patterns, adaptive and the Hilbert schedule, f32 against CPU f64" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const auto [q, k, v, dout] = random_qkv_dout(2, 100, 3, 32);
  for (bool causal : {false, true}) {
    for (const char* pattern : {"all", "local_window", "dilated", "global_local", "random", "adaptive"}) {
      for (const char* schedule : {"natural", "hilbert"}) {
        const std::string what = std::string(pattern) + (causal ? " causal" : "") + " schedule " + schedule;
        INFO(what);
        AttentionConfig config = make_config(pattern, causal);
        config.schedule = schedule;
        manual_seed(seed + 1);  // the adaptive scorer draws its weights: same on both devices
        auto cpu_attention = make_attention("block_sparse", config);
        cpu_attention->to(DType::f64);
        Result cpu = run_on(*cpu_attention, q, k, v, dout, Device::cpu(), DType::f64);
        manual_seed(seed + 1);
        auto gpu_attention = make_attention("block_sparse", config);
        gpu_attention->to(Device::cuda());
        Result gpu = run_on(*gpu_attention, q, k, v, dout, Device::cuda(), DType::f32);
        check_results(gpu, cpu, what);
        if (std::string(pattern) == "adaptive") {
          // Scorer gradients agree as well (the f32 scores select the same blocks here).
          auto* a = dynamic_cast<AdaptiveBlockSparseAttention*>(cpu_attention.get());
          auto* b = dynamic_cast<AdaptiveBlockSparseAttention*>(gpu_attention.get());
          REQUIRE(a != nullptr);
          REQUIRE(b != nullptr);
          CHECK(a->last_pattern() == b->last_pattern());
          check_close(b->scorer_q().grad().cpu().to(DType::f64), a->scorer_q().grad(), 1e-3, 1e-4,
                      what + " scorer_q grad");
        }
      }
    }
  }
}

TEST_CASE("CUDA: the Hilbert schedule gives the same block-sparse output as the natural one" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t B = 2, N = 100, H = 3, D = 32;
  Tensor q = Tensor::randn({B, N, H, D}).to(Device::cuda()), k = Tensor::randn({B, N, H, D}).to(Device::cuda()),
         v = Tensor::randn({B, N, H, D}).to(Device::cuda());
  for (const char* pattern : {"local_window", "global_local", "random"}) {
    INFO(std::string(pattern));
    AttentionConfig config = make_config(pattern, true);
    auto natural = make_attention("block_sparse", config);
    config.schedule = "hilbert";
    auto hilbert = make_attention("block_sparse", config);
    // Every chunk has the same shape under both schedules, so the same kernels compute every row;
    // allow rounding-level differences in case a library picks a different GEMM algorithm.
    check_close(hilbert->forward(q, k, v).cpu().to(DType::f64), natural->forward(q, k, v).cpu().to(DType::f64), 1e-6,
                1e-7, std::string(pattern) + " hilbert vs natural schedule");
  }
}

TEST_CASE("CUDA parity: Hilbert token ordering around block_sparse and dense" * doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const auto [q, k, v, dout] = random_qkv_dout(1, 96, 3, 32);
  for (const char* variant : {"block_sparse", "dense"}) {
    INFO(std::string(variant));
    AttentionConfig config = make_config("local_window", true);
    config.order = "hilbert";
    config.grid = "8x12";
    auto cpu_attention = make_attention(variant, config);
    auto gpu_attention = make_attention(variant, config);
    Result cpu = run_on(*cpu_attention, q, k, v, dout, Device::cpu(), DType::f64);
    Result gpu = run_on(*gpu_attention, q, k, v, dout, Device::cuda(), DType::f32);
    check_results(gpu, cpu, std::string(variant) + " hilbert order");
  }
}
