// Version counters: every in-place write bumps a counter shared by all views of a storage, and a
// backward whose saved tensors were modified in place since the forward throws instead of
// returning wrong gradients (like torch's "modified by an in-place operation" check).
#include <doctest/doctest.h>

#include <functional>
#include <string>
#include <vector>

#include "attention/fused/fused_attention.h"
#include "tensor/autograd/node.h"
#include "nn/layers.h"
#include "nn/optim.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

constexpr const char* kModified = "has been modified by an in-place operation";

Tensor leaf(const Shape& shape, double lo = 0.5) {
  // Positive values (log, sqrt, div stay defined), distinct per element.
  const int64_t n = shape_numel(shape);
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = lo + 0.1 * static_cast<double>(i % 7);
  return Tensor::from_vector(v, shape).requires_grad_();
}

// Runs forward, then `modify`, then backward; expects the named op's in-place error.
void expect_refused(const std::string& op, const std::function<Tensor()>& forward,
                    const std::function<void()>& modify) {
  INFO("op " << op);
  Tensor y = forward();
  modify();
  const std::string want = op + " saved a tensor at version ";
  CHECK_THROWS_WITH_AS(sum(y).backward(), doctest::Contains(kModified), Error);
  Tensor y2 = forward();
  modify();
  CHECK_THROWS_WITH_AS(sum(y2).backward(), doctest::Contains(want.c_str()), Error);
}

}  // namespace

TEST_CASE("version counter: in-place writes bump it, every view of the storage sees it") {
  Tensor t = Tensor::zeros({4, 3}, DType::f64);
  const uint64_t v0 = t.version();
  Tensor view = t.narrow(0, 1, 2), flat = t.view({12}), tr = t.transpose(0, 1), det = t.detach();
  t.fill_(1.0);
  CHECK(t.version() == v0 + 1);
  view.copy_(Tensor::ones({2, 3}, DType::f64));
  CHECK(t.version() == v0 + 2);
  flat.zero_();
  for (const Tensor& x : {t, view, flat, tr, det}) CHECK(x.version() == v0 + 3);
  Tensor copy = t.clone();
  const uint64_t c0 = copy.version();
  t.fill_(2.0);
  CHECK(copy.version() == c0);  // a clone has storage (and a counter) of its own
  CHECK(t.version() == v0 + 4);
  // An out-of-place op leaves its inputs' versions alone.
  (void)add(t, t);
  CHECK(t.version() == v0 + 4);
}

TEST_CASE("backward refuses saved tensors modified in place: elementwise, activations, matmul") {
  Tensor a = leaf({3, 4}), b = leaf({3, 4}, 1.0), m = leaf({4, 2});
  auto bump = [](const Tensor& t) { return [t] { Tensor(t).copy_(t.detach().clone()); }; };
  expect_refused("mul", [&] { return mul(a, b); }, bump(a));
  expect_refused("mul", [&] { return mul(a, b); }, bump(b));
  expect_refused("div", [&] { return div(a, b); }, bump(b));
  expect_refused("matmul", [&] { return matmul(a, m); }, bump(m));
  expect_refused("matmul", [&] { return matmul(a, m); }, bump(a));
  expect_refused("relu", [&] { return relu(a); }, bump(a));
  expect_refused("gelu", [&] { return gelu(a); }, bump(a));
  expect_refused("log", [&] { return log(a); }, bump(a));
  expect_refused("pow_scalar", [&] { return pow(a, 3.0); }, bump(a));
  // Ops that save their output: modifying the output (or a view of it) is caught.
  Tensor out;
  auto bump_out = [&] { out.narrow(0, 0, 1).fill_(0.25); };
  expect_refused("tanh", [&] { return out = tanh(a); }, bump_out);
  expect_refused("sigmoid", [&] { return out = sigmoid(a); }, bump_out);
  expect_refused("exp", [&] { return out = exp(a); }, bump_out);
  expect_refused("sqrt", [&] { return out = sqrt(a); }, bump_out);
  expect_refused("softmax", [&] { return out = softmax(a, -1); }, bump_out);
  expect_refused("log_softmax", [&] { return out = log_softmax(a, 1); }, bump_out);
}

TEST_CASE("backward refuses saved tensors modified in place: layer_norm, embedding, index ops") {
  Tensor x = leaf({3, 4}), w = leaf({4}, 1.0), bias = leaf({4}, 0.1);
  expect_refused("layer_norm", [&] { return layer_norm(x, w, bias, 1e-5); }, [&] { x.fill_(0.3); });
  expect_refused("layer_norm", [&] { return layer_norm(x, w, bias, 1e-5); }, [&] { w.fill_(2.0); });

  Tensor table = leaf({5, 3});
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{0, 2, 2, 4}, {4});
  // The backward scatters into the rows the indices name: changed indices would scatter wrongly.
  expect_refused("embedding", [&] { return embedding(table, ids); },
                 [&] { ids.copy_(Tensor::from_vector(std::vector<int64_t>{1, 1, 1, 1}, {4})); });
  expect_refused("index_select", [&] { return index_select(table, 0, ids); },
                 [&] { ids.copy_(Tensor::from_vector(std::vector<int64_t>{3, 3, 0, 0}, {4})); });
  Tensor gidx = Tensor::from_vector(std::vector<int64_t>{0, 1, 2, 0, 1, 2}, {2, 3});
  expect_refused("gather", [&] { return gather(table, 0, gidx); }, [&] { gidx.zero_(); });
}

TEST_CASE("backward refuses tensors saved by the fused attention op once modified in place") {
  manual_seed(3);
  Tensor q = Tensor::randn({1, 8, 2, 4}, DType::f64).requires_grad_();
  Tensor k = Tensor::randn({1, 8, 2, 4}, DType::f64).requires_grad_();
  Tensor v = Tensor::randn({1, 8, 2, 4}, DType::f64).requires_grad_();
  attention::CoreOptions options;
  options.scale = 0.5;
  options.impl = attention::Impl::fused;
  auto run = [&] { return attention::fused_attention(q, k, v, attention::CoreKeys{}, options).out; };
  // Untouched: the backward runs.
  sum(run()).backward();
  REQUIRE(q.grad().defined());
  expect_refused("fused_attention", run, [&] { k.fill_(0.1); });
  expect_refused("fused_attention", run, [&] { v.narrow(1, 0, 2).zero_(); });
  Tensor out;
  {
    attention::AttentionOutput r = attention::fused_attention(q, k, v, attention::CoreKeys{}, options);
    out = r.out;
    r.out.fill_(0.0);  // the output itself is saved (rowsum(dO * O))
  }
  CHECK_THROWS_WITH_AS(sum(out).backward(), doctest::Contains("fused_attention saved a tensor at version"), Error);
}

TEST_CASE("the error names the versions; unsaved tensors and later forwards are fine") {
  Tensor a = leaf({2, 2}), b = leaf({2, 2});
  Tensor y = mul(a, b);
  const uint64_t v = a.version();
  a.fill_(1.0);
  a.fill_(1.5);
  try {
    sum(y).backward();
    FAIL("expected the in-place check to throw");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("one of the tensors needed for gradient computation has been modified by an in-place "
                   "operation: mul saved a tensor at version " +
                   std::to_string(v) + ", now at version " + std::to_string(v + 2)) != std::string::npos);
  }
  // add saves nothing: modifying its inputs does not matter to its backward.
  Tensor z = add(a, b);
  a.fill_(0.5);
  sum(z).backward();
  CHECK(a.grad().defined());
  // A forward after the modification saves the new version.
  a.zero_grad_();
  Tensor y2 = mul(a, b);
  sum(y2).backward();
  CHECK(a.grad().to_vector() == b.detach().to_vector());
  // The SavedTensor helper checks the same way.
  autograd::SavedTensor saved(b);
  CHECK(saved.unpack("helper").same(saved.unpack("helper")));
  b.fill_(3.0);
  CHECK_THROWS_WITH_AS(saved.unpack("helper"), doctest::Contains("helper saved a tensor at version"), Error);
}

TEST_CASE("optimizers update parameters in place: versions move, training keeps working, a stale graph is refused") {
  manual_seed(5);
  nn::Linear layer(4, 3);
  Tensor x = Tensor::randn({6, 4});
  nn::SGD sgd(layer.named_parameters(), nn::SGDOptions{0.01});
  const Tensor weight = layer.named_parameters()[0].second;
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 5; ++step) {
    sgd.zero_grad();
    Tensor loss = sum(mul(layer.forward(x), layer.forward(x)));
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    const uint64_t before = weight.version();
    sgd.step();
    CHECK(weight.version() > before);
  }
  CHECK(last < first);
  // A step between the forward and the backward invalidates the graph (matmul saved the weight).
  sgd.zero_grad();
  Tensor loss = sum(layer.forward(x));
  loss.backward(Tensor(), /*retain_graph=*/true);
  sgd.step();
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains(kModified), Error);
}

TEST_CASE("a leaf's first gradient is kept without a copy only when nothing else can see it") {
  manual_seed(17);
  const Shape shape{3, 5};
  auto values = [](const Tensor& t) { return t.detach().to_vector(); };
  // Fresh gradient of a scaled leaf: taken as .grad as it is (one allocation for the whole
  // backward: the scaled gradient itself), and the next backward adds into it in place without
  // touching the caller's tensors.
  Tensor x = Tensor::randn(shape).requires_grad_();
  const Tensor g = Tensor::randn(shape);
  const std::vector<double> g_before = values(g);
  Tensor y = mul(x, 1.5);
  const int64_t before = memory_stats(Device::cpu()).num_allocs;
  y.backward(g);
  CHECK(memory_stats(Device::cpu()).num_allocs - before == 1);
  const std::vector<double> first = values(x.grad()), want = values(mul(g, 1.5));
  CHECK(first == want);
  mul(x, 1.5).backward(g);
  const std::vector<double> twice = values(x.grad());
  for (size_t i = 0; i < twice.size(); ++i) CHECK(twice[i] == doctest::Approx(2 * want[i]).epsilon(1e-6));
  CHECK(values(g) == g_before);

  // One gradient reaching two leaves (add passes it to both): each leaf owns a separate copy.
  Tensor a = Tensor::randn(shape).requires_grad_(), b = Tensor::randn(shape).requires_grad_();
  add(a, b).backward(g);
  CHECK(a.grad().storage() != b.grad().storage());
  CHECK(a.grad().storage() != g.storage());
  a.grad().fill_(0.0);
  CHECK(values(b.grad()) == g_before);
  CHECK(values(g) == g_before);

  // A leaf root's gradient is the caller's tensor: copied, so the caller's later writes stay theirs.
  Tensor root = Tensor::randn(shape).requires_grad_();
  Tensor given = Tensor::randn(shape);
  const std::vector<double> given_before = values(given);
  root.backward(given);
  CHECK(root.grad().storage() != given.storage());
  given.fill_(3.0);
  CHECK(values(root.grad()) == given_before);

  // A gradient that is a view of the caller's tensor (reshape's backward) is copied too.
  Tensor flat = Tensor::randn({15}).requires_grad_();
  Tensor g2 = Tensor::randn(shape);
  const std::vector<double> g2_before = values(g2);
  flat.reshape(shape).backward(g2);
  CHECK(flat.grad().storage() != g2.storage());
  g2.fill_(-1.0);
  CHECK(values(flat.grad()) == g2_before);
}
