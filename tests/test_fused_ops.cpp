// Fused training ops against their composed forms and float64 central differences (bias_gelu,
// cross_entropy fused with log-softmax, layer_norm), each recorded as one tape node; index checks
// raised on the CPU at once; and the mixed-precision policy on the CPU (bf16 rounds the operands
// of matmul and attention and computes in f32; master weights and gradients stay f32; AdamW and
// SGD update bf16 parameters through f32 state).
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention/multihead.h"
#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/node.h"
#include "nn/layers.h"
#include "nn/optim.h"
#include "support/device_parity.h"
#include "support/test_utils.h"
#include "tensor/device_checks.h"
#include "tensor/ops.h"
#include "tensor/precision.h"

using namespace longtape;
using longtape::testing::fresh_seed;
using longtape::testing::normwise_rel_err;

namespace {

Tensor randn64(const Shape& shape) { return Tensor::randn(shape, DType::f64); }

// Gradients of sum(f(inputs) * w) for leaf copies of `inputs`.
std::vector<Tensor> grads_of(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                             const Tensor& w) {
  for (Tensor& t : inputs) t = t.detach().clone().requires_grad_();
  sum(mul(f(inputs), w)).backward();
  std::vector<Tensor> out;
  for (Tensor& t : inputs) out.push_back(t.grad());
  return out;
}

// The bf16 value of each element (round to nearest even), as f64.
std::vector<double> bf16_rounded(const std::vector<double>& v) {
  std::vector<double> out;
  for (double x : v) out.push_back(static_cast<float>(bfloat16(static_cast<float>(x))));
  return out;
}

}  // namespace

TEST_CASE("bias_gelu is one node and matches gelu(x + bias) forward and backward (f32, f64, both approximations)") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  for (DType dt : {DType::f64, DType::f32})
    for (GeluApprox approx : {GeluApprox::erf, GeluApprox::tanh}) {
      Tensor x = mul(randn64({3, 5, 24}), 2.0).to(dt), b = randn64({24}).to(dt), w = randn64({3, 5, 24}).to(dt);
      auto fused = [&](const std::vector<Tensor>& in) { return bias_gelu(in[0], in[1], approx); };
      auto composed = [&](const std::vector<Tensor>& in) { return gelu(add(in[0], in[1]), approx); };
      const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
      CHECK(normwise_rel_err(fused({x, b}), composed({x, b})) < tol);
      const auto gf = grads_of(fused, {x, b}, w), gc = grads_of(composed, {x, b}, w);
      CHECK(normwise_rel_err(gf[0], gc[0]) < tol);
      CHECK(normwise_rel_err(gf[1], gc[1]) < tol);
      Tensor xl = x.detach().clone().requires_grad_();
      Tensor y = bias_gelu(xl, b.detach().clone().requires_grad_(), approx);
      REQUIRE(y.grad_fn() != nullptr);
      CHECK(y.grad_fn()->op_name == "bias_gelu");
      for (const auto& edge : y.grad_fn()->next_edges)  // straight to the leaves: one node
        CHECK(dynamic_cast<autograd::AccumulateGrad*>(edge.node.get()) != nullptr);
    }
  Tensor x = randn64({4, 7}).requires_grad_(), b = randn64({7}).requires_grad_();
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return bias_gelu(in[0], in[1]); }, {x, b});
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return bias_gelu(in[0], in[1], GeluApprox::tanh); },
                            {x, b});
  CHECK_THROWS_WITH_AS(bias_gelu(randn64({4, 7}), randn64({6})),
                       doctest::Contains("bias_gelu: bias must have shape [7] to match x [4, 7], got [6]"), Error);
  CHECK_THROWS_WITH_AS(bias_gelu(randn64({4, 7}), Tensor::randn({7})), doctest::Contains("bias_gelu: bias must be f64"),
                       Error);
}

TEST_CASE("cross_entropy (fused) matches log_softmax + gather and float64 central differences, ignored rows too") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  std::mt19937_64 rng(seed);
  const int64_t rows = 29, classes = 13;
  std::vector<int64_t> t(rows);
  for (auto& v : t) v = static_cast<int64_t>(rng() % classes);
  t[2] = t[11] = -100;
  Tensor targets = Tensor::from_vector(t, {rows});
  Tensor target_col = Tensor::from_vector(std::vector<int64_t>(t.begin(), t.end()), {rows, 1});
  std::vector<double> mask(rows);
  std::vector<int64_t> safe(rows);
  for (int64_t r = 0; r < rows; ++r) {
    mask[r] = t[r] == -100 ? 0.0 : 1.0;
    safe[r] = t[r] == -100 ? 0 : t[r];
  }
  Tensor safe_col = Tensor::from_vector(safe, {rows, 1});
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor logits = mul(randn64({rows, classes}), 3.0).to(dt);
    Tensor m = Tensor::from_vector(mask, {rows, 1}).to(dt);
    auto composed = [&](const std::vector<Tensor>& in) {
      Tensor picked = gather(log_softmax(in[0], -1), 1, safe_col);
      return neg(div(sum(mul(picked, m)), sum(m)));
    };
    auto fused = [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets); };
    const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
    CHECK(normwise_rel_err(fused({logits}), composed({logits})) < tol);
    Tensor w = Tensor::ones({}, dt == DType::f64 ? DType::f64 : DType::f32);
    const auto gf = grads_of(fused, {logits}, w), gc = grads_of(composed, {logits}, w.to(dt));
    CHECK(normwise_rel_err(gf[0], gc[0]) < tol);
    Tensor loss = cross_entropy(logits.detach().clone().requires_grad_(), targets);
    CHECK(loss.dtype() == (dt == DType::f64 ? DType::f64 : DType::f32));
    REQUIRE(loss.grad_fn() != nullptr);
    CHECK(loss.grad_fn()->op_name == "cross_entropy");
  }
  autograd::check_gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets); },
                            {randn64({rows, classes}).requires_grad_()});
  // (B, T, C) with a custom ignore_index.
  Tensor targets3 = Tensor::from_vector(std::vector<int64_t>{1, 4, 0, 4, 2, 3}, {2, 3});
  autograd::check_gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets3, 4); },
                            {randn64({2, 3, 5}).requires_grad_()});
}

TEST_CASE("layer_norm is one node and matches its composed form and central differences") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  Tensor x = add(mul(randn64({3, 4, 19}), 1.5), 0.7), wt = randn64({19}), b = randn64({19});
  Tensor w = randn64({3, 4, 19});
  auto fused = [](const std::vector<Tensor>& in) { return layer_norm(in[0], in[1], in[2], 1e-5); };
  auto composed = [](const std::vector<Tensor>& in) {
    Tensor mu = mean(in[0], {-1}, true);
    Tensor centred = sub(in[0], mu);
    Tensor var = mean(mul(centred, centred), {-1}, true);
    return add(mul(mul(centred, rsqrt(add(var, 1e-5))), in[1]), in[2]);
  };
  CHECK(normwise_rel_err(fused({x, wt, b}), composed({x, wt, b})) < 1e-12);
  const auto gf = grads_of(fused, {x, wt, b}, w), gc = grads_of(composed, {x, wt, b}, w);
  for (size_t i = 0; i < 3; ++i) CHECK(normwise_rel_err(gf[i], gc[i]) < 1e-11);
  Tensor y = layer_norm(x.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_(),
                        b.detach().clone().requires_grad_());
  CHECK(y.grad_fn()->op_name == "layer_norm");
  for (const auto& edge : y.grad_fn()->next_edges)
    CHECK(dynamic_cast<autograd::AccumulateGrad*>(edge.node.get()) != nullptr);
  autograd::check_gradcheck(fused, {randn64({5, 6}).requires_grad_(), randn64({6}).requires_grad_(),
                                    randn64({6}).requires_grad_()});
}

TEST_CASE("index checks on the CPU are immediate and name the position, value and range") {
  CHECK(pending_device_checks() == 0);
  CHECK_THROWS_WITH_AS(cross_entropy(randn64({3, 4}), Tensor::from_vector(std::vector<int64_t>{0, 7, 1}, {3})),
                       doctest::Contains("cross_entropy: target 7 at position 1 is out of range [0, 4) and is not "
                                         "ignore_index (-100)"),
                       Error);
  CHECK_THROWS_WITH_AS(embedding(randn64({5, 2}), Tensor::from_vector(std::vector<int64_t>{0, 4, -1}, {3})),
                       doctest::Contains("embedding: index -1 at position 2 is out of range [0, 5)"), Error);
  CHECK(pending_device_checks() == 0);
}

TEST_CASE("precision names parse strictly; AutocastScope nests and restores") {
  CHECK(parse_precision("bf16") == Precision::bf16);
  CHECK(parse_precision("tf32") == Precision::tf32);
  CHECK(precision_for("auto", Device::cpu()) == Precision::f32);
  CHECK(default_precision(Device::cuda(0)) == Precision::bf16);
  CHECK_THROWS_WITH_AS(parse_precision("fp16"), doctest::Contains("expected auto, f32, tf32 or bf16, got 'fp16'"),
                       Error);
  CHECK(autocast_precision() == Precision::f32);
  {
    AutocastScope outer(Precision::bf16);
    CHECK(autocast_precision() == Precision::bf16);
    {
      AutocastScope inner(Precision::tf32);
      CHECK(autocast_precision() == Precision::tf32);
    }
    CHECK(autocast_precision() == Precision::bf16);
  }
  CHECK(autocast_precision() == Precision::f32);
}

TEST_CASE("gelu_mlp is one node equal to fc1 -> bias_gelu -> fc2, recomputing its hidden rows in chunks") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  manual_seed(seed);
  const int64_t E = 6, H = 16, Eo = 5;
  for (DType dt : {DType::f64, DType::f32})
    for (int64_t chunk : {0, 3, 10}) {
      CAPTURE(chunk);
      Tensor x = randn64({2, 5, E}).to(dt), w1 = randn64({H, E}).to(dt), b1 = randn64({H}).to(dt),
             w2 = randn64({Eo, H}).to(dt), b2 = randn64({Eo}).to(dt), w = randn64({2, 5, Eo}).to(dt);
      auto fused = [&](const std::vector<Tensor>& in) {
        return gelu_mlp(in[0], in[1], in[2], in[3], in[4], GeluApprox::erf, chunk);
      };
      auto composed = [&](const std::vector<Tensor>& in) {
        return add(matmul(bias_gelu(matmul(in[0], in[1].transpose(0, 1)), in[2]), in[3].transpose(0, 1)), in[4]);
      };
      const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
      CHECK(normwise_rel_err(fused({x, w1, b1, w2, b2}), composed({x, w1, b1, w2, b2})) < tol);
      const auto gf = grads_of(fused, {x, w1, b1, w2, b2}, w), gc = grads_of(composed, {x, w1, b1, w2, b2}, w);
      for (size_t i = 0; i < gf.size(); ++i) {
        CAPTURE(i);
        REQUIRE(gf[i].defined());
        CHECK(gf[i].shape() == gc[i].shape());
        CHECK(normwise_rel_err(gf[i], gc[i]) < tol);
      }
      // Under bf16 (CPU: bf16-rounded operands) the fused node rounds exactly what the composed
      // products round, so it still matches them, and differs from f32 at bf16's scale.
      if (dt == DType::f32) {
        AutocastScope bf16(Precision::bf16);
        CHECK(normwise_rel_err(fused({x, w1, b1, w2, b2}), composed({x, w1, b1, w2, b2})) < 1e-5);
        const auto lf = grads_of(fused, {x, w1, b1, w2, b2}, w), lc = grads_of(composed, {x, w1, b1, w2, b2}, w);
        for (size_t i = 0; i < lf.size(); ++i) CHECK(normwise_rel_err(lf[i], lc[i]) < 1e-5);
        CHECK(normwise_rel_err(lf[0], gf[0]) > 1e-5);
      }
    }
  Tensor x = randn64({7, 3}).requires_grad_(), w1 = randn64({8, 3}).requires_grad_(),
         b1 = randn64({8}).requires_grad_(), w2 = randn64({4, 8}).requires_grad_(), b2 = randn64({4}).requires_grad_();
  autograd::check_gradcheck(
      [](const std::vector<Tensor>& in) { return gelu_mlp(in[0], in[1], in[2], in[3], in[4], GeluApprox::tanh, 2); },
      {x, w1, b1, w2, b2});
  autograd::check_gradcheck(
      [](const std::vector<Tensor>& in) { return gelu_mlp(in[0], in[1], in[2], in[3], Tensor(), GeluApprox::erf, 3); },
      {x, w1, b1, w2});
  Tensor y = gelu_mlp(x, w1, b1, w2);
  REQUIRE(y.grad_fn() != nullptr);
  CHECK(y.grad_fn()->op_name == "gelu_mlp");
  for (const auto& edge : y.grad_fn()->next_edges)  // straight to the leaves: one node
    CHECK(dynamic_cast<autograd::AccumulateGrad*>(edge.node.get()) != nullptr);
  CHECK_THROWS_WITH_AS(gelu_mlp(randn64({7, 3}), randn64({8, 4}), randn64({8}), randn64({4, 8})),
                       doctest::Contains("gelu_mlp: expected x (..., E), w1 (H, E), b1 (H,), w2 (E_out, H), got x [7, 3]"),
                       Error);
  CHECK_THROWS_WITH_AS(gelu_mlp(Tensor::randn({7, 3}), randn64({8, 3}), randn64({8}), randn64({4, 8})),
                       doctest::Contains("gelu_mlp: x must be f64"), Error);
  CHECK_THROWS_WITH_AS(gelu_mlp(randn64({7, 3}), randn64({8, 3}), randn64({8}), randn64({4, 8}), Tensor(), GeluApprox::erf, -1),
                       doctest::Contains("chunk_rows must be >= 0"), Error);
  CHECK_THROWS_WITH_AS(gelu_mlp(randn64({7, 3}), randn64({8, 3}), randn64({8}), randn64({4, 8}), randn64({5})),
                       doctest::Contains("gelu_mlp: b2 must be (4,) or undefined, got [5]"), Error);
}

TEST_CASE("MLP with and without hidden recomputation gives the same outputs and gradients") {
  manual_seed(fresh_seed());
  nn::MLP mlp(6, 20);
  mlp.to(DType::f64);
  Tensor x = randn64({3, 4, 6}), w = randn64({3, 4, 6});
  std::vector<std::vector<Tensor>> grads;
  std::vector<Tensor> outputs;
  for (bool recompute : {true, false}) {
    mlp.recompute_hidden = recompute;
    mlp.zero_grad();
    Tensor xl = x.clone().requires_grad_();
    Tensor y = mlp.forward(xl);
    sum(mul(y, w)).backward();
    outputs.push_back(y.detach());
    std::vector<Tensor> g{xl.grad()};
    for (auto& [name, p] : mlp.named_parameters()) g.push_back(p.grad().clone());
    grads.push_back(g);
  }
  CHECK(normwise_rel_err(outputs[0], outputs[1]) < 1e-12);
  REQUIRE(grads[0].size() == 5);
  for (size_t i = 0; i < grads[0].size(); ++i) CHECK(normwise_rel_err(grads[0][i], grads[1][i]) < 1e-12);
}

TEST_CASE("bf16 matmul on the CPU: bf16-rounded operands, f32 math, f32 gradients of the rounded products") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t M = 9, K = 40, N = 7;
  Tensor a = Tensor::randn({M, K}), b = Tensor::randn({K, N}), go = Tensor::randn({M, N});
  Tensor al = a.clone().requires_grad_(), bl = b.clone().requires_grad_();
  Tensor y;
  {
    AutocastScope bf16(Precision::bf16);
    y = matmul(al, bl);
  }
  y.backward(go);  // outside the scope: the node remembers its precision
  CHECK(y.dtype() == DType::f32);
  CHECK(al.grad().dtype() == DType::f32);
  // float64 references from the rounded values.
  const std::vector<double> ar = bf16_rounded(a.to_vector()), br = bf16_rounded(b.to_vector()),
                            gr = bf16_rounded(go.to_vector());
  std::vector<double> yref(M * N, 0.0), daref(M * K, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) {
        yref[i * N + j] += ar[i * K + k] * br[k * N + j];
        daref[i * K + k] += gr[i * N + j] * br[k * N + j];
      }
  CHECK(normwise_rel_err(y, Tensor::from_vector(yref, {M, N})) < 1e-6);
  CHECK(normwise_rel_err(al.grad(), Tensor::from_vector(daref, {M, K})) < 1e-6);
  // The rounding happened: the f32 product differs at bf16's scale.
  const double vs_f32 = normwise_rel_err(y, matmul(a, b));
  CHECK(vs_f32 > 1e-5);
  CHECK(vs_f32 < 2e-2);
  // f64 operands are never lowered.
  const Tensor f32_product = matmul(a, b).to(DType::f64);
  AutocastScope bf16(Precision::bf16);
  Tensor a64 = a.to(DType::f64), b64 = b.to(DType::f64);
  CHECK(normwise_rel_err(matmul(a64, b64), f32_product) < 1e-6);
  CHECK(matmul(a64, b64).dtype() == DType::f64);
}

TEST_CASE("under bf16 a bf16 operand meets an f32 one (CPU): the f32 one is rounded, the bf16 one's gradient is bf16") {
  manual_seed(fresh_seed());
  Tensor a = Tensor::randn({5, 12}).to(DType::bf16).requires_grad_(), b = Tensor::randn({12, 3}).requires_grad_();
  CHECK_THROWS_WITH_AS(matmul(a, b), doctest::Contains("matmul: operand dtypes differ: bf16 and f32"), Error);
  Tensor y;
  {
    AutocastScope bf16(Precision::bf16);
    y = matmul(a, b);
  }
  CHECK(y.dtype() == DType::f32);
  const Tensor ref = matmul(a.detach().to(DType::f32), b.detach().to(DType::bf16).to(DType::f32));
  CHECK(normwise_rel_err(y, ref) < 1e-6);
  y.backward(Tensor::ones({5, 3}));
  CHECK(a.grad().dtype() == DType::bf16);
  CHECK(b.grad().dtype() == DType::f32);
  CHECK(normwise_rel_err(b.grad(), matmul(a.detach().to(DType::f32).transpose(0, 1), Tensor::ones({5, 3}))) < 1e-6);
}

TEST_CASE("a bf16 matmul keeps its bf16 operand copies for backward, not the f32 inputs") {
  manual_seed(fresh_seed());
  Tensor w = Tensor::randn({6, 5}).requires_grad_();
  Tensor x = Tensor::randn({4, 6}).requires_grad_();
  Tensor h = mul(x, 2.0);  // an f32 activation that only the product reads
  const Tensor h_rounded = h.detach().to(DType::bf16).to(DType::f32);
  std::weak_ptr<Storage> h_storage = h.storage();
  Tensor y;
  {
    AutocastScope bf16(Precision::bf16);
    y = matmul(h, w);
  }
  h = Tensor();
  CHECK(h_storage.expired());  // the graph holds the bf16 copy only
  sum(y).backward();
  CHECK(normwise_rel_err(w.grad(), matmul(h_rounded.transpose(0, 1), Tensor::ones({4, 5}))) < 1e-6);
  REQUIRE(x.grad().defined());
  CHECK(x.grad().dtype() == DType::f32);
}

TEST_CASE("bf16 multihead attention on the CPU stays close to f32 and gives every f32 parameter an f32 gradient") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  attention::AttentionConfig config;
  config.segment_lengths = {8, 16};
  config.dilation_rates = {1, 2};
  config.causal = true;
  attention::MultiheadAttention mha(32, 4, "dilated", config);
  Tensor x = Tensor::randn({2, 16, 32});
  Tensor ref = mha.forward(x);
  Tensor y;
  {
    AutocastScope bf16(Precision::bf16);
    y = mha.forward(x);
    sum(mul(y, y)).backward();
  }
  CHECK(y.dtype() == DType::f32);
  const double diff = normwise_rel_err(y, ref);
  CHECK(diff > 0.0);
  CHECK(diff < 3e-2);
  for (const auto& [name, p] : mha.named_parameters()) {
    INFO(name);
    REQUIRE(p.grad().defined());
    CHECK(p.grad().dtype() == DType::f32);
    for (double v : p.grad().to_vector()) REQUIRE(std::isfinite(v));
  }
}

TEST_CASE("AdamW and SGD update bf16 parameters through f32 state, matching a float64 reference") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t n = 257;
  Tensor p32 = Tensor::randn({n});
  Tensor p = p32.to(DType::bf16);
  const std::vector<double> p0 = p.to_vector();  // the bf16 starting values
  std::vector<Tensor> grads = {Tensor::randn({n}), Tensor::randn({n})};
  nn::AdamWOptions o;
  o.lr = 0.05;
  o.weight_decay = 0.1;
  nn::AdamW adamw({{"p", p}}, o);
  std::vector<double> ref = p0, m(n, 0.0), v(n, 0.0);
  for (int step = 1; step <= 2; ++step) {
    p.set_grad(grads[step - 1].to(DType::bf16));
    adamw.step();
    const std::vector<double> g = bf16_rounded(grads[step - 1].to_vector());
    const double b1 = 1 - std::pow(0.9, step), b2 = 1 - std::pow(0.999, step);
    for (int64_t i = 0; i < n; ++i) {
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      ref[i] = ref[i] * (1 - o.lr * o.weight_decay) - o.lr / b1 * m[i] / (std::sqrt(v[i]) / std::sqrt(b2) + o.eps);
    }
    ref = bf16_rounded(ref);  // the parameter is stored in bf16 after every step
  }
  CHECK(p.dtype() == DType::bf16);
  CHECK(adamw.state().at("p.exp_avg").dtype() == DType::f32);
  const std::vector<double> got = p.to_vector();
  for (int64_t i = 0; i < n; ++i) CHECK(got[i] == doctest::Approx(ref[i]).epsilon(1e-2).scale(1e-2));
  CHECK(normwise_rel_err(p, Tensor::from_vector(p0, {n})) > 1e-3);  // it moved

  Tensor q = Tensor::randn({n}).to(DType::bf16);
  const std::vector<double> q0 = q.to_vector();
  nn::SGD sgd({{"q", q}}, nn::SGDOptions{.lr = 0.5, .momentum = 0.9});
  q.set_grad(grads[0]);
  sgd.step();
  const std::vector<double> g = grads[0].to_vector(), q1 = q.to_vector();
  for (int64_t i = 0; i < n; ++i) CHECK(q1[i] == doctest::Approx(q0[i] - 0.5 * g[i]).epsilon(1e-2).scale(1e-2));
}
