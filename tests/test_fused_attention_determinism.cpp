// The fused CUDA attention backward in its two modes: the deterministic default (a dQ kernel of
// its own, no atomics) and set_deterministic_algorithms(false) (on the portable kernels, dQ
// gathered with atomics inside the dK/dV kernel; the sm_90a backward keeps its dQ CTAs unless the
// lab asks otherwise). Deterministic runs must be bitwise equal; both modes must agree to bf16
// rounding.
#include <doctest/doctest.h>

#include "attention/fused/fused_attention.h"
#include "support/test_utils.h"
#include "tensor/backend_options.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

namespace {

struct Grads {
  std::vector<double> dq, dk, dv;
};

Grads backward_once(const Tensor& q0, const Tensor& k0, const Tensor& v0, const Tensor& dout, const CoreKeys& keys,
                    const CoreOptions& options) {
  Tensor q = q0.detach().requires_grad_(), k = k0.detach().requires_grad_(), v = v0.detach().requires_grad_();
  AttentionOutput r = fused_attention(q, k, v, keys, options);
  r.out.backward(dout);
  return {q.grad().to_vector(), k.grad().to_vector(), v.grad().to_vector()};
}

double max_abs_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

double max_abs(const std::vector<double>& a) {
  double worst = 0;
  for (double x : a) worst = std::max(worst, std::abs(x));
  return worst;
}

}  // namespace

TEST_CASE("fused CUDA attention backward: deterministic mode is bitwise repeatable and agrees with the default" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  manual_seed(seed);
  const Device gpu = Device::cuda(0);
  const Shape shape{2, 333, 4, 64};
  auto input = [&] { return Tensor::randn(shape, DType::f32, gpu).to(DType::bf16).detach(); };
  const Tensor q = input(), k = input(), v = input(), dout = input();
  for (const bool dilated : {false, true}) {
    CoreKeys keys;
    if (dilated) {
      keys.kind = fused::KeySet::dilated;
      keys.branches = {{64, 1}, {128, 2}, {256, 4}};
    }
    CoreOptions options;
    options.scale = 0.125;
    options.causal = true;
    INFO((dilated ? "dilated lse" : "dense") << " causal");
    set_deterministic_algorithms(true);
    const Grads first = backward_once(q, k, v, dout, keys, options);
    const Grads second = backward_once(q, k, v, dout, keys, options);
    set_deterministic_algorithms(false);
    const Grads fast = backward_once(q, k, v, dout, keys, options);
    set_deterministic_algorithms(true);  // the default
    CHECK(first.dq == second.dq);
    CHECK(first.dk == second.dk);
    CHECK(first.dv == second.dv);
    // Same math, other summation order: equal to bf16 rounding of the result.
    for (auto field : {&Grads::dq, &Grads::dk, &Grads::dv}) {
      const double scale = std::max(1e-3, max_abs(first.*field));
      CHECK(max_abs(first.*field) > 0.0);
      CHECK(max_abs_difference(first.*field, fast.*field) <= 1e-2 * scale);
    }
  }
}
