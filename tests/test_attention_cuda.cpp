// CPU/CUDA parity of the composed attention path: f32 and bf16 on the GPU against float64 on the
// CPU, forward (out, lse) and backward (dq, dk, dv). Skips with a message when no GPU is present.
#include <doctest/doctest.h>

#include "attention/multihead.h"
#include "attention/registry.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

using testing::check_close;
using testing::check_results_close;
using testing::fresh_seed;
using testing::Result;
using testing::run_on;

namespace {

// Dense reads only heads, head dim and causal; dilated: ragged segments, w % r != 0, H % r != 0.
AttentionConfig make_config(Mixing mixing, bool causal) {
  return {.num_heads = 5, .head_dim = 32, .segment_lengths = {16, 48, 100}, .dilation_rates = {1, 3, 4},
          .mixing = mixing, .causal = causal};
}

}  // namespace

TEST_CASE("CUDA parity: dense and dilated, f32 and bf16 against CPU f64" * doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t B = 2, N = 90, H = 5, D = 32;
  struct Case {
    std::string variant;
    Mixing mixing;
  };
  for (const Case& c : {Case{"dense", Mixing::lse}, Case{"dilated", Mixing::lse}, Case{"dilated", Mixing::head_groups}})
    for (bool causal : {false, true}) {
      INFO(c.variant << " " << mixing_name(c.mixing) << " causal " << causal);
      auto attn = make_attention(c.variant, make_config(c.mixing, causal));
      Tensor q = Tensor::randn({B, N, H, D}, DType::f64), k = Tensor::randn({B, N, H, D}, DType::f64);
      Tensor v = Tensor::randn({B, N, H, D}, DType::f64), dout = Tensor::randn({B, N, H, D}, DType::f64);
      Result ref = run_on(*attn, q, k, v, dout, Device::cpu(), DType::f64);
      Result f32 = run_on(*attn, q, k, v, dout, Device::cuda(), DType::f32);
      check_results_close(f32, ref, {1e-4, 1e-5, 1e-5, 1e-5, 1e-4, 1e-5}, "f32");
      // bf16: compare with f64 on the same bf16-rounded inputs, so only the computation's error counts.
      auto rounded = [](const Tensor& t) { return t.to(DType::bf16).to(DType::f64); };
      Tensor qb = rounded(q), kb = rounded(k), vb = rounded(v), db = rounded(dout);
      Result ref_b = run_on(*attn, qb, kb, vb, db, Device::cpu(), DType::f64);
      Result bf = run_on(*attn, qb, kb, vb, db, Device::cuda(), DType::bf16);
      // The lse is computed in f32 even for bf16 inputs.
      check_results_close(bf, ref_b, {2e-2, 1e-3, 1e-4, 1e-4, 3e-2, 1e-3}, "bf16");
    }
}

TEST_CASE("CUDA parity: multihead layer forward and parameter gradients" * doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  AttentionConfig c = make_config(Mixing::lse, true);
  MultiheadAttention cpu_layer(64, 4, "dilated", c, true, true, 1.0, true);
  MultiheadAttention gpu_layer(64, 4, "dilated", c, true, true, 1.0, true);
  gpu_layer.load_state_dict(cpu_layer.state_dict());
  gpu_layer.to(Device::cuda());
  Tensor x = Tensor::randn({2, 70, 64}), g = Tensor::randn({2, 70, 64});
  Tensor y_cpu = cpu_layer.forward(x);
  Tensor y_gpu = gpu_layer.forward(x.to(Device::cuda()));
  check_close(y_gpu.cpu().to(DType::f64), y_cpu.to(DType::f64), 1e-4, 1e-5, "multihead out");
  y_cpu.backward(g);
  y_gpu.backward(g.to(Device::cuda()));
  auto cpu_params = cpu_layer.named_parameters(), gpu_params = gpu_layer.named_parameters();
  REQUIRE(cpu_params.size() == gpu_params.size());
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    INFO(cpu_params[i].first);
    check_close(gpu_params[i].second.grad().cpu().to(DType::f64), cpu_params[i].second.grad().to(DType::f64), 1e-3,
                1e-4, "parameter gradient");
  }
}
