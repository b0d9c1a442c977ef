#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Every element of x.grad() against central differences, to a relative 1e-5.
void check_grad_by_differences(const std::function<Tensor()>& loss, const Tensor& x) {
  testing::check_grad_by_differences(loss, x, 1e-5);
}

// Reference softmax of a row (float64), log form optional.
std::vector<double> ref_softmax_row(const std::vector<double>& row, bool log) {
  double m = -kInf;
  for (double v : row) m = std::max(m, v);
  double s = 0;
  for (double v : row) s += std::exp(v - m);
  std::vector<double> out;
  for (double v : row) out.push_back(log ? v - m - std::log(s) : std::exp(v - m) / s);
  return out;
}

// Softmax along `dim` of a row-major tensor of `shape`, computed by plain loops.
std::vector<double> ref_softmax(const std::vector<double>& x, const Shape& shape, int64_t dim, bool log) {
  int64_t outer = 1, inner = 1;
  for (int64_t k = 0; k < dim; ++k) outer *= shape[k];
  for (size_t k = dim + 1; k < shape.size(); ++k) inner *= shape[k];
  const int64_t n = shape[dim];
  std::vector<double> out(x.size());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      std::vector<double> row;
      for (int64_t j = 0; j < n; ++j) row.push_back(x[(o * n + j) * inner + i]);
      std::vector<double> r = ref_softmax_row(row, log);
      for (int64_t j = 0; j < n; ++j) out[(o * n + j) * inner + i] = r[j];
    }
  return out;
}

}  // namespace

TEST_CASE("softmax and log_softmax match float64 loops along every dim, f32 and f64") {
  manual_seed(11);
  const Shape shape{3, 4, 5};
  for (DType dt : {DType::f32, DType::f64}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
    Tensor x = mul(Tensor::randn(shape, dt), 3.0);
    const std::vector<double> xv = x.to_vector();
    for (int64_t dim : {0, 1, 2, -1}) {
      for (bool log : {false, true}) {
        CAPTURE(dim);
        CAPTURE(log);
        Tensor y = log ? log_softmax(x, dim) : softmax(x, dim);
        CHECK(y.shape() == shape);
        CHECK(y.dtype() == dt);
        const std::vector<double> ref = ref_softmax(xv, shape, dim < 0 ? dim + 3 : dim, log);
        const std::vector<double> got = y.to_vector();
        for (size_t i = 0; i < ref.size(); ++i) CHECK(got[i] == doctest::Approx(ref[i]).epsilon(tol).scale(1.0));
      }
    }
  }
}

TEST_CASE("softmax handles rows with -inf entries") {
  Tensor x = Tensor::from_vector(std::vector<double>{0.5, -kInf, 1.5, -kInf, -kInf, 2.0, -0.25, 3.0, 1.0},
                                 {3, 3});
  std::vector<double> p = softmax(x).to_vector();
  std::vector<double> lp = log_softmax(x).to_vector();
  // row 0: the -inf entry gets probability 0 exactly, the others match a softmax of the finite ones
  const double z = std::exp(0.5) + std::exp(1.5);
  CHECK(p[1] == 0.0);
  CHECK(p[0] == doctest::Approx(std::exp(0.5) / z));
  CHECK(p[2] == doctest::Approx(std::exp(1.5) / z));
  CHECK(lp[1] == -kInf);
  CHECK(lp[0] == doctest::Approx(0.5 - std::log(z)));
  // row 1: a single finite entry takes all the mass
  CHECK(p[3] == 0.0);
  CHECK(p[4] == 0.0);
  CHECK(p[5] == doctest::Approx(1.0));
  CHECK(lp[5] == doctest::Approx(0.0));
  double row2 = p[6] + p[7] + p[8];
  CHECK(row2 == doctest::Approx(1.0));

  // the gradient stays finite and is zero where the probability is zero
  Tensor xs = x.clone().requires_grad_();
  Tensor w = Tensor::from_vector(std::vector<double>{0.3, -1.2, 0.7, 2.0, 0.1, -0.4, 1.1, 0.6, -0.9}, {3, 3});
  sum(mul(softmax(xs), w)).backward();
  std::vector<double> g = xs.grad().to_vector();
  for (double v : g) CHECK(std::isfinite(v));
  CHECK(g[1] == 0.0);
  CHECK(g[3] == 0.0);
  CHECK(g[5] == doctest::Approx(0.0));  // a one-hot row has no gradient
  // row 0 against the closed form y_i (w_i - sum_j y_j w_j)
  const double dot = p[0] * 0.3 + p[2] * 0.7;
  CHECK(g[0] == doctest::Approx(p[0] * (0.3 - dot)));
  CHECK(g[2] == doctest::Approx(p[2] * (0.7 - dot)));
}

TEST_CASE("softmax and log_softmax gradients match central differences") {
  manual_seed(12);
  for (int64_t dim : {0, 1, 2}) {
    for (bool log : {false, true}) {
      CAPTURE(dim);
      CAPTURE(log);
      Tensor x = Tensor::randn({2, 3, 4}, DType::f64).requires_grad_();
      Tensor w = Tensor::randn({2, 3, 4}, DType::f64);
      auto loss = [&] { return sum(mul(log ? log_softmax(x, dim) : softmax(x, dim), w)); };
      loss().backward();
      check_grad_by_differences(loss, x);
    }
  }
}

TEST_CASE("softmax rejects bad dims and integer input") {
  Tensor x = Tensor::randn({2, 3});
  CHECK_THROWS_WITH_AS(softmax(x, 2), doctest::Contains("softmax: dim must be in"), Error);
  CHECK_THROWS_WITH_AS(log_softmax(Tensor::from_vector(std::vector<int64_t>{1, 2}, {2})),
                       doctest::Contains("must be a floating tensor"), Error);
}

TEST_CASE("layer_norm matches float64 loops with and without affine parameters") {
  manual_seed(13);
  const int64_t rows = 6, cols = 7;
  for (DType dt : {DType::f32, DType::f64}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
    Tensor x = add(mul(Tensor::randn({2, 3, cols}, dt), 2.0), 0.7);
    Tensor w = Tensor::randn({cols}, dt);
    Tensor b = Tensor::randn({cols}, dt);
    const double eps = 1e-5;
    const auto xv = x.to_vector(), wv = w.to_vector(), bv = b.to_vector();
    for (bool affine : {true, false}) {
      CAPTURE(affine);
      Tensor y = affine ? layer_norm(x, w, b, eps) : layer_norm(x, Tensor(), Tensor(), eps);
      CHECK(y.shape() == x.shape());
      const auto yv = y.to_vector();
      for (int64_t r = 0; r < rows; ++r) {
        double mu = 0, var = 0;
        for (int64_t c = 0; c < cols; ++c) mu += xv[r * cols + c];
        mu /= cols;
        for (int64_t c = 0; c < cols; ++c) var += (xv[r * cols + c] - mu) * (xv[r * cols + c] - mu);
        var /= cols;
        for (int64_t c = 0; c < cols; ++c) {
          double h = (xv[r * cols + c] - mu) / std::sqrt(var + eps);
          double ref = affine ? h * wv[c] + bv[c] : h;
          CHECK(yv[r * cols + c] == doctest::Approx(ref).epsilon(tol).scale(1.0));
        }
      }
    }
  }
}

TEST_CASE("layer_norm gradients for x, weight and bias match central differences") {
  manual_seed(14);
  Tensor x = Tensor::randn({3, 5}, DType::f64).requires_grad_();
  Tensor w = add(Tensor::randn({5}, DType::f64), 1.0).requires_grad_();
  Tensor b = Tensor::randn({5}, DType::f64).requires_grad_();
  Tensor probe = Tensor::randn({3, 5}, DType::f64);
  auto loss = [&] { return sum(mul(layer_norm(x, w, b, 1e-5), probe)); };
  loss().backward();
  check_grad_by_differences(loss, x);
  check_grad_by_differences(loss, w);
  check_grad_by_differences(loss, b);

  // without parameters only x gets a gradient
  Tensor x2 = Tensor::randn({4, 6}, DType::f64).requires_grad_();
  Tensor probe2 = Tensor::randn({4, 6}, DType::f64);
  auto loss2 = [&] { return sum(mul(layer_norm(x2, Tensor(), Tensor()), probe2)); };
  loss2().backward();
  check_grad_by_differences(loss2, x2);
}

TEST_CASE("layer_norm rejects mismatched parameters") {
  Tensor x = Tensor::randn({2, 4});
  CHECK_THROWS_WITH_AS(layer_norm(x, Tensor::ones({3}), Tensor()), doctest::Contains("weight must have shape [4]"),
                       Error);
  CHECK_THROWS_WITH_AS(layer_norm(x, Tensor(), Tensor::ones({4}, DType::f64)),
                       doctest::Contains("bias must have dtype f32"), Error);
  CHECK_THROWS_WITH_AS(layer_norm(x, Tensor(), Tensor(), -1.0), doctest::Contains("eps must be >= 0"), Error);
}

TEST_CASE("embedding gathers rows for i32 and i64 indices and accumulates repeated rows") {
  manual_seed(15);
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor weight = Tensor::randn({5, 3}, dt).requires_grad_();
    const std::vector<int64_t> ids{4, 0, 2, 4, 4, 1};
    Tensor idx64 = Tensor::from_vector(ids, {2, 3});
    Tensor idx32 = Tensor::from_vector(std::vector<int32_t>{4, 0, 2, 4, 4, 1}, {2, 3});
    const auto wv = weight.to_vector();
    for (const Tensor& idx : {idx64, idx32}) {
      Tensor out = embedding(weight, idx);
      CHECK(out.shape() == Shape{2, 3, 3});
      const auto ov = out.to_vector();
      for (size_t j = 0; j < ids.size(); ++j)
        for (int64_t e = 0; e < 3; ++e) CHECK(ov[j * 3 + e] == wv[ids[j] * 3 + e]);
    }
    // gradient: each row receives the sum of the probe rows that looked it up
    Tensor probe = Tensor::randn({2, 3, 3}, dt);
    sum(mul(embedding(weight, idx64), probe)).backward();
    const auto pv = probe.to_vector(), gv = weight.grad().to_vector();
    for (int64_t row = 0; row < 5; ++row)
      for (int64_t e = 0; e < 3; ++e) {
        double ref = 0;
        for (size_t j = 0; j < ids.size(); ++j)
          if (ids[j] == row) ref += pv[j * 3 + e];
        CHECK(gv[row * 3 + e] == doctest::Approx(ref).epsilon(1e-6));
      }
  }
}

TEST_CASE("embedding rejects bad indices") {
  Tensor weight = Tensor::randn({4, 2});
  CHECK_THROWS_WITH_AS(embedding(weight, Tensor::from_vector(std::vector<int64_t>{1, 4}, {2})),
                       doctest::Contains("embedding: index 4 at position 1 is out of range [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(embedding(weight, Tensor::from_vector(std::vector<int32_t>{-1}, {1})),
                       doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(embedding(weight, Tensor::ones({2})), doctest::Contains("must be an i64 or i32 tensor"),
                       Error);
  CHECK_THROWS_WITH_AS(embedding(Tensor::randn({4}), Tensor::from_vector(std::vector<int64_t>{1}, {1})),
                       doctest::Contains("weight must be 2-d"), Error);
}

namespace {
// Mean negative log-likelihood over non-ignored rows, by plain loops.
double ref_cross_entropy(const std::vector<double>& logits, const std::vector<int64_t>& targets, int64_t classes,
                         int64_t ignore) {
  double total = 0;
  int64_t count = 0;
  for (size_t r = 0; r < targets.size(); ++r) {
    if (targets[r] == ignore) continue;
    std::vector<double> row(logits.begin() + r * classes, logits.begin() + (r + 1) * classes);
    total -= ref_softmax_row(row, true)[targets[r]];
    ++count;
  }
  return count ? total / count : 0.0;
}
}  // namespace

TEST_CASE("cross_entropy matches float64 loops for (N, C) and (B, T, C) with ignore_index") {
  manual_seed(16);
  for (DType dt : {DType::f32, DType::f64}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
    // (N, C) with the default ignore_index
    Tensor logits = mul(Tensor::randn({6, 5}, dt), 2.0);
    std::vector<int64_t> t{0, 4, -100, 2, 2, -100};
    Tensor loss = cross_entropy(logits, Tensor::from_vector(t, {6}));
    CHECK(loss.dim() == 0);
    CHECK(loss.item() == doctest::Approx(ref_cross_entropy(logits.to_vector(), t, 5, -100)).epsilon(tol));
    // (B, T, C) with a custom ignore_index that is also a valid class
    Tensor logits3 = Tensor::randn({2, 3, 4}, dt);
    std::vector<int64_t> t3{1, 3, 0, 3, 2, 1};
    Tensor loss3 = cross_entropy(logits3, Tensor::from_vector(t3, {2, 3}), 3);
    CHECK(loss3.item() == doctest::Approx(ref_cross_entropy(logits3.to_vector(), t3, 4, 3)).epsilon(tol));
  }
}

TEST_CASE("cross_entropy gradient is (softmax - onehot) / count and matches central differences") {
  manual_seed(17);
  Tensor logits = Tensor::randn({2, 3, 4}, DType::f64).requires_grad_();
  std::vector<int64_t> t{1, -100, 0, 3, 3, -100};
  Tensor targets = Tensor::from_vector(t, {2, 3});
  auto loss = [&] { return mul(cross_entropy(logits, targets), 1.7); };
  loss().backward();
  check_grad_by_differences(loss, logits);

  const auto lv = logits.to_vector(), gv = logits.grad().to_vector();
  for (size_t r = 0; r < t.size(); ++r) {
    std::vector<double> row(lv.begin() + r * 4, lv.begin() + (r + 1) * 4);
    std::vector<double> p = ref_softmax_row(row, false);
    for (int64_t c = 0; c < 4; ++c) {
      double ref = t[r] == -100 ? 0.0 : 1.7 * (p[c] - (c == t[r] ? 1.0 : 0.0)) / 4.0;
      CHECK(gv[r * 4 + c] == doctest::Approx(ref).scale(1.0));
    }
  }
}

TEST_CASE("cross_entropy with every target ignored gives zero loss and zero gradient") {
  manual_seed(18);
  Tensor logits = Tensor::randn({3, 4}).requires_grad_();
  Tensor loss = cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{-1, -1, -1}, {3}), -1);
  CHECK(loss.item() == 0.0);
  loss.backward();
  for (double g : logits.grad().to_vector()) CHECK(g == 0.0);
}

TEST_CASE("cross_entropy rejects out-of-range targets and bad shapes") {
  Tensor logits = Tensor::randn({3, 4});
  CHECK_THROWS_WITH_AS(cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{0, 4, 1}, {3})),
                       doctest::Contains("target 4 at position 1 is out of range [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{0, -5, 1}, {3})),
                       doctest::Contains("target -5 at position 1"), Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{0, 1}, {2})),
                       doctest::Contains("targets must have shape [3]"), Error);
  CHECK_THROWS_WITH_AS(cross_entropy(Tensor::randn({4}), Tensor::from_vector(std::vector<int64_t>{0}, {1})),
                       doctest::Contains("logits must be (N, C) or (B, T, C)"), Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, Tensor::ones({3})), doctest::Contains("must be an i64 or i32 tensor"),
                       Error);
}

TEST_CASE("dropout with a seed is deterministic, scales kept values and backprops through the same mask") {
  manual_seed(19);
  for (DType dt : {DType::f32, DType::f64}) {
    const double p = 0.3;
    Tensor x = add(Tensor::randn({64, 64}, dt), 0.01).requires_grad_();
    Tensor a = dropout(x, p, true, 1234);
    Tensor b = dropout(x, p, true, 1234);
    Tensor c = dropout(x, p, true, 99);
    const auto xv = x.to_vector(), av = a.to_vector(), bv = b.to_vector(), cv = c.to_vector();
    CHECK(av == bv);
    CHECK(av != cv);
    int64_t kept = 0;
    for (size_t i = 0; i < xv.size(); ++i) {
      const bool is_kept = av[i] != 0.0;
      kept += is_kept;
      if (is_kept) CHECK(av[i] == doctest::Approx(xv[i] / (1 - p)).epsilon(1e-6));
    }
    const double kept_fraction = static_cast<double>(kept) / static_cast<double>(xv.size());
    CHECK(kept_fraction == doctest::Approx(1 - p).epsilon(0.05));

    // gradient = mask / (1 - p) for each element
    Tensor probe = Tensor::randn({64, 64}, dt);
    sum(mul(dropout(x, p, true, 1234), probe)).backward();
    const auto gv = x.grad().to_vector(), pv = probe.to_vector();
    for (size_t i = 0; i < xv.size(); ++i) {
      const double ref = av[i] != 0.0 ? pv[i] / (1 - p) : 0.0;
      CHECK(gv[i] == doctest::Approx(ref).epsilon(1e-6));
    }
  }
}

TEST_CASE("dropout without a seed follows the default generator") {
  Tensor x = add(Tensor::rand({1000}, DType::f64), 0.5);
  manual_seed(20);
  Tensor a = dropout(x, 0.5);
  Tensor b = dropout(x, 0.5);
  manual_seed(20);
  Tensor a2 = dropout(x, 0.5);
  CHECK(a.to_vector() == a2.to_vector());
  CHECK(a.to_vector() != b.to_vector());  // the generator advanced between calls
}

TEST_CASE("dropout is the identity when not training or p == 0, and rejects p outside [0, 1)") {
  manual_seed(21);
  Tensor x = Tensor::randn({5, 5});
  CHECK(dropout(x, 0.5, false).to_vector() == x.to_vector());
  CHECK(dropout(x, 0.0).to_vector() == x.to_vector());
  CHECK_THROWS_WITH_AS(dropout(x, 1.0), doctest::Contains("dropout: p must be in [0, 1), got 1"), Error);
  CHECK_THROWS_WITH_AS(dropout(x, -0.1), doctest::Contains("p must be in [0, 1)"), Error);
}

TEST_CASE("softmax of a 0-d tensor is 1; cross_entropy accepts strided logits and i32 targets") {
  manual_seed(22);
  Tensor s = mul(Tensor::randn({}, DType::f64), 5.0);
  CHECK(softmax(s).dim() == 0);
  CHECK(softmax(s).item() == doctest::Approx(1.0));
  CHECK(log_softmax(s, 0).item() == doctest::Approx(0.0).scale(1.0));

  Tensor logits = Tensor::randn({5, 3}, DType::f64).transpose(0, 1);  // (3, 5), strided
  std::vector<int64_t> t{4, 0, 2};
  const double ref = ref_cross_entropy(logits.contiguous().to_vector(), t, 5, -100);
  CHECK(cross_entropy(logits, Tensor::from_vector(t, {3})).item() == doctest::Approx(ref).epsilon(1e-12));
  CHECK(cross_entropy(logits, Tensor::from_vector(std::vector<int32_t>{4, 0, 2}, {3})).item() ==
        doctest::Approx(ref).epsilon(1e-12));
}
