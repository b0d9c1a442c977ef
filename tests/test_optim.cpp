// Optimizers, clipping and the learning-rate schedule against float64 values computed by hand.
#include <doctest/doctest.h>

#include <cmath>
#include <numbers>

#include "nn/optim.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::nn;

namespace {

Tensor leaf(const Shape& shape, DType dtype = DType::f64, Device device = Device::cpu()) {
  Tensor t = Tensor::randn(shape, dtype, device);
  t.requires_grad_(true);
  return t;
}

void set_random_grad(Tensor& p) { p.set_grad(Tensor::randn(p.shape(), p.dtype(), p.device())); }

void check_close(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == doctest::Approx(want[i]).epsilon(tol).scale(1.0));
}

}  // namespace

TEST_CASE("SGD with momentum and weight decay matches hand-computed steps") {
  manual_seed(11);
  Tensor w = leaf({3, 4}), b = leaf({4});
  const SGDOptions o{.lr = 0.1, .momentum = 0.9, .dampening = 0.1, .weight_decay = 0.01};
  SGD sgd({{"w", w}, {"b", b}}, o);
  std::vector<std::vector<double>> p = {w.to_vector(), b.to_vector()}, buf(2);
  for (int step = 0; step < 3; ++step) {
    set_random_grad(w);
    set_random_grad(b);
    std::vector<std::vector<double>> g = {w.grad().to_vector(), b.grad().to_vector()};
    sgd.step();
    for (int t = 0; t < 2; ++t) {
      if (step == 0) buf[t].assign(p[t].size(), 0.0);
      for (size_t i = 0; i < p[t].size(); ++i) {
        double gi = g[t][i] + o.weight_decay * p[t][i];
        buf[t][i] = step == 0 ? gi : o.momentum * buf[t][i] + (1 - o.dampening) * gi;
        p[t][i] -= o.lr * buf[t][i];
      }
    }
    check_close(w.to_vector(), p[0], 1e-12);
    check_close(b.to_vector(), p[1], 1e-12);
  }
  CHECK(sgd.step_count() == 3);
  auto state = sgd.state();
  REQUIRE(state.count("w.momentum_buffer") == 1);
  check_close(state.at("w.momentum_buffer").to_vector(), buf[0], 1e-12);
}

TEST_CASE("SGD nesterov and plain steps") {
  manual_seed(12);
  Tensor w = leaf({5});
  SGDOptions o;
  o.lr = 0.05;
  o.momentum = 0.8;
  o.nesterov = true;
  SGD sgd({{"w", w}}, o);
  std::vector<double> p = w.to_vector(), buf(5, 0.0);
  for (int step = 0; step < 2; ++step) {
    set_random_grad(w);
    auto g = w.grad().to_vector();
    sgd.step();
    for (size_t i = 0; i < p.size(); ++i) {
      buf[i] = step == 0 ? g[i] : o.momentum * buf[i] + g[i];
      p[i] -= o.lr * (g[i] + o.momentum * buf[i]);
    }
    check_close(w.to_vector(), p, 1e-12);
  }
  Tensor v = leaf({4});
  SGD plain({{"v", v}}, SGDOptions{.lr = 0.5});
  set_random_grad(v);
  auto before = v.to_vector(), g = v.grad().to_vector();
  plain.step();
  auto after = v.to_vector();
  for (size_t i = 0; i < after.size(); ++i) CHECK(after[i] == doctest::Approx(before[i] - 0.5 * g[i]));
  CHECK(plain.state().empty());  // no momentum, no state
}

TEST_CASE("AdamW with decoupled weight decay and bias correction matches float64 by hand") {
  manual_seed(13);
  Tensor w = leaf({4, 3}), b = leaf({3});
  // w decays, b does not.
  const AdamWOptions o{.lr = 0.01, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1,
                       .decays = decay_matrices_only};
  AdamW adam({{"w", w}, {"b", b}}, o);
  std::vector<std::vector<double>> p = {w.to_vector(), b.to_vector()};
  std::vector<std::vector<double>> m = {std::vector<double>(12), std::vector<double>(3)}, v = m;
  for (int step = 1; step <= 4; ++step) {
    set_random_grad(w);
    set_random_grad(b);
    std::vector<std::vector<double>> g = {w.grad().to_vector(), b.grad().to_vector()};
    adam.step();
    for (int t = 0; t < 2; ++t) {
      const double wd = t == 0 ? o.weight_decay : 0.0;
      for (size_t i = 0; i < p[t].size(); ++i) {
        m[t][i] = o.beta1 * m[t][i] + (1 - o.beta1) * g[t][i];
        v[t][i] = o.beta2 * v[t][i] + (1 - o.beta2) * g[t][i] * g[t][i];
        const double mhat = m[t][i] / (1 - std::pow(o.beta1, step));
        const double vhat = v[t][i] / (1 - std::pow(o.beta2, step));
        p[t][i] = p[t][i] * (1 - o.lr * wd) - o.lr * mhat / (std::sqrt(vhat) + o.eps);
      }
    }
    // PyTorch's form, (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), is this textbook form exactly.
    check_close(w.to_vector(), p[0], 1e-10);
    check_close(b.to_vector(), p[1], 1e-10);
  }
  auto state = adam.state();
  CHECK(state.size() == 4);
  check_close(state.at("w.exp_avg").to_vector(), m[0], 1e-12);
  check_close(state.at("b.exp_avg_sq").to_vector(), v[1], 1e-12);
  CHECK(adam.step_count() == 4);
  CHECK(adam.fused_steps() == 0);
}

TEST_CASE("AdamW skips parameters without gradient and restores state exactly") {
  manual_seed(14);
  Tensor a = leaf({6}, DType::f32), c = leaf({2, 2}, DType::f32);
  auto c_before = c.to_vector();
  AdamW adam({{"a", a}, {"c", c}}, AdamWOptions{.lr = 0.1});
  set_random_grad(a);
  adam.step();
  CHECK(c.to_vector() == c_before);
  auto state = adam.state();
  CHECK(state.count("a.exp_avg") == 1);
  CHECK(state.count("c.exp_avg") == 0);

  // A second optimizer loaded with the first one's state continues identically.
  Tensor a2 = Tensor::empty({6});
  a2.copy_(a);
  a2.requires_grad_(true);
  AdamW other({{"a", a2}}, AdamWOptions{.lr = 0.1});
  std::map<std::string, Tensor> only_a = {{"a.exp_avg", state.at("a.exp_avg")},
                                          {"a.exp_avg_sq", state.at("a.exp_avg_sq")}};
  other.load_state(only_a, adam.step_count());
  Tensor g = Tensor::randn({6});
  a.set_grad(g);
  a2.set_grad(g);
  adam.step();
  other.step();
  CHECK(a.to_vector() == a2.to_vector());

  CHECK_THROWS_WITH_AS(other.load_state({{"a.momentum", Tensor::zeros({6})}}, 1),
                       doctest::Contains("not <parameter>.<exp_avg|exp_avg_sq>"), Error);
  CHECK_THROWS_WITH_AS(other.load_state({{"a.exp_avg", Tensor::zeros({5})}}, 1), doctest::Contains("has shape [5]"),
                       Error);
}

TEST_CASE("optimizer arguments are checked") {
  manual_seed(15);
  Tensor w = leaf({3});
  CHECK_THROWS_WITH_AS(AdamW({{"w", w}}, AdamWOptions{.lr = -1.0}), doctest::Contains("lr must be"), Error);
  CHECK_THROWS_WITH_AS(AdamW({{"w", w}}, AdamWOptions{.beta1 = 1.0}), doctest::Contains("beta1"), Error);
  CHECK_THROWS_WITH_AS(AdamW({{"w", w}, {"w", leaf({2})}}, AdamWOptions{}), doctest::Contains("appears twice"), Error);
  CHECK_THROWS_WITH_AS(SGD({{"w", w}, {"v", w}}, SGDOptions{}), doctest::Contains("same tensor"), Error);
  CHECK_THROWS_WITH_AS(SGD({{"w", w}}, SGDOptions{.nesterov = true}), doctest::Contains("nesterov"), Error);
  Tensor not_leaf = mul(w, 2.0);
  CHECK_THROWS_WITH_AS(SGD({{"x", not_leaf}}, SGDOptions{}), doctest::Contains("leaf"), Error);
  SGD ok({{"w", w}}, SGDOptions{});
  auto before = w.to_vector();
  ok.step();  // no gradient: nothing moves, the step still counts
  CHECK(w.to_vector() == before);
  CHECK(ok.step_count() == 1);
  CHECK_THROWS_AS(ok.set_lr(std::nan("")), Error);
  CHECK_THROWS_AS(ok.set_step_count(-2), Error);
}

TEST_CASE("clip_grad_norm scales to the global norm and returns the norm before") {
  manual_seed(16);
  Tensor a = leaf({3, 3}), b = leaf({5}), none = leaf({2});
  set_random_grad(a);
  set_random_grad(b);
  auto ga = a.grad().to_vector(), gb = b.grad().to_vector();
  double sq = 0;
  for (double x : ga) sq += x * x;
  for (double x : gb) sq += x * x;
  const double norm = std::sqrt(sq);
  CHECK(grad_norm({a, b, none}) == doctest::Approx(norm).epsilon(1e-12));
  // Above the norm: nothing changes.
  CHECK(clip_grad_norm({a, b, none}, norm * 2) == doctest::Approx(norm).epsilon(1e-12));
  CHECK(a.grad().to_vector() == ga);
  // Below: every gradient scales by max_norm / norm.
  const double max_norm = norm / 3;
  CHECK(clip_grad_norm({a, b, none}, max_norm) == doctest::Approx(norm).epsilon(1e-12));
  auto ca = a.grad().to_vector(), cb = b.grad().to_vector();
  for (size_t i = 0; i < ca.size(); ++i) CHECK(ca[i] == doctest::Approx(ga[i] * max_norm / (norm + 1e-6)));
  for (size_t i = 0; i < cb.size(); ++i) CHECK(cb[i] == doctest::Approx(gb[i] * max_norm / (norm + 1e-6)));
  CHECK(grad_norm({a, b}) == doctest::Approx(max_norm).epsilon(1e-6));
  CHECK_FALSE(none.grad().defined());
  CHECK_THROWS_AS(clip_grad_norm({a}, 0.0), Error);
}

TEST_CASE("cosine schedule: linear warmup, cosine decay, then min_lr") {
  CosineSchedule s{.base_lr = 1.0, .min_lr = 0.1, .warmup_steps = 4, .total_steps = 14};
  CHECK(s.lr_at(0) == doctest::Approx(0.25));
  CHECK(s.lr_at(3) == doctest::Approx(1.0));
  CHECK(s.lr_at(4) == doctest::Approx(1.0));
  CHECK(s.lr_at(9) == doctest::Approx(0.1 + 0.45 * (1 + std::cos(std::numbers::pi * 0.5))));
  CHECK(s.lr_at(9) == doctest::Approx(0.55));
  CHECK(s.lr_at(14) == doctest::Approx(0.1));
  CHECK(s.lr_at(100) == doctest::Approx(0.1));
  for (int64_t t = 5; t < 14; ++t) CHECK(s.lr_at(t) < s.lr_at(t - 1));
  Tensor w = leaf({2});
  SGD sgd({{"w", w}}, SGDOptions{});
  s.apply(sgd, 9);
  CHECK(sgd.lr() == doctest::Approx(0.55));
  CHECK_THROWS_AS(s.lr_at(-1), Error);
  CosineSchedule no_warmup{.base_lr = 2.0, .min_lr = 0.0, .warmup_steps = 0, .total_steps = 10};
  CHECK(no_warmup.lr_at(0) == doctest::Approx(2.0));
  CHECK(no_warmup.lr_at(5) == doctest::Approx(1.0));
}

TEST_CASE("fused CUDA AdamW matches the CPU AdamW" * doctest::skip(!cuda_available())) {
  manual_seed(17);
  // Sizes around the kernel's chunk size (4096) and a tiny one, so chunk edges are exercised.
  std::vector<Shape> shapes = {{4097}, {3, 5}, {64, 130}, {1}};
  NamedTensors cpu_params, gpu_params;
  for (size_t i = 0; i < shapes.size(); ++i) {
    Tensor c = Tensor::randn(shapes[i]);
    Tensor g = Tensor::empty(shapes[i], DType::f32, Device::cuda());
    g.copy_(c);
    c.requires_grad_(true);
    g.requires_grad_(true);
    cpu_params.emplace_back("p" + std::to_string(i), c);
    gpu_params.emplace_back("p" + std::to_string(i), g);
  }
  AdamWOptions o{.lr = 0.01, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05,
                 .decays = decay_matrices_only};
  AdamW cpu(cpu_params, o), gpu(gpu_params, o);
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      Tensor g = Tensor::randn(shapes[i]);
      cpu_params[i].second.set_grad(g);
      gpu_params[i].second.set_grad(g.to(Device::cuda()));
    }
    cpu.step();
    gpu.step();
  }
  CHECK(gpu.fused_steps() == 5);
  for (size_t i = 0; i < shapes.size(); ++i) {
    auto want = cpu_params[i].second.to_vector(), got = gpu_params[i].second.to_vector();
    double worst = 0;
    for (size_t j = 0; j < want.size(); ++j) worst = std::max(worst, std::abs(want[j] - got[j]));
    CHECK(worst < 1e-5);
  }
  auto cs = cpu.state(), gs = gpu.state();
  auto want = cs.at("p2.exp_avg_sq").to_vector(), got = gs.at("p2.exp_avg_sq").to_vector();
  for (size_t j = 0; j < want.size(); ++j) CHECK(got[j] == doctest::Approx(want[j]).epsilon(1e-5));
}
