// Post-accumulate gradient hooks: a leaf's hook runs once per backward, as soon as its gradient for
// that backward is final (after every use has accumulated into it), before the rest of the backward.
#include <doctest/doctest.h>

#include <vector>

#include "tensor/autograd/node.h"
#include "support/test_utils.h"
#include "tensor/error.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

// What a hook saw: how often it ran and the leaf's gradient each time.
struct Seen {
  int calls = 0;
  std::vector<Tensor> grads;
};

uint64_t watch(const Tensor& leaf, Seen& seen) {
  return autograd::register_post_accumulate_grad_hook(leaf, [&seen](const Tensor& t) {
    ++seen.calls;
    seen.grads.push_back(t.grad().clone());
  });
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  const Tensor d = sub(a.to(DType::f64), b.to(DType::f64));
  return amax(maximum(d, neg(d))).item();
}

}  // namespace

TEST_CASE("post-accumulate grad hook: once per backward with the final gradient, also for a leaf used several times") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  Tensor w = Tensor::randn({4, 3}).requires_grad_();
  Tensor b = Tensor::randn({4, 3}).requires_grad_();
  Tensor unused = Tensor::randn({2}).requires_grad_();
  const Tensor x = Tensor::randn({4, 3});
  Seen on_w, on_b, on_unused;
  watch(w, on_w);
  watch(b, on_b);
  watch(unused, on_unused);
  // w is used by four ops: loss = sum(w*x) + sum(w*w) + sum(w*b); dL/dw = x + 2w + b, dL/db = w.
  auto loss_of = [&] { return add(add(sum(mul(w, x)), sum(mul(w, w))), sum(mul(w, b))); };
  loss_of().backward();
  REQUIRE(on_w.calls == 1);
  REQUIRE(on_b.calls == 1);
  CHECK(on_unused.calls == 0);  // no gradient in this backward, no call
  const Tensor w64 = w.detach().to(DType::f64), b64 = b.detach().to(DType::f64), x64 = x.to(DType::f64);
  const Tensor want_w = add(add(x64, mul(w64, 2.0)), b64);
  CHECK(max_abs_diff(on_w.grads[0], want_w) < 1e-5);
  CHECK(max_abs_diff(on_b.grads[0], w64) < 1e-6);
  CHECK(max_abs_diff(on_w.grads[0], w.grad()) == 0.0);  // what the hook saw is what backward left

  // A second backward without zeroing: the hook runs again and sees the accumulated total.
  loss_of().backward();
  REQUIRE(on_w.calls == 2);
  CHECK(max_abs_diff(on_w.grads[1], mul(want_w, 2.0)) < 1e-5);
  CHECK(on_b.calls == 2);

  // grad() writes no .grad and runs no hook.
  autograd::grad({loss_of()}, {w});
  CHECK(on_w.calls == 2);
}

TEST_CASE("post-accumulate grad hook: runs as soon as the leaf is final, before the rest of the backward") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  Tensor early = Tensor::randn({5}).requires_grad_();  // used first in the forward: final last
  Tensor late = Tensor::randn({5}).requires_grad_();   // used only by the last op: final first
  bool early_done_when_late_ran = true;
  int late_calls = 0;
  autograd::register_post_accumulate_grad_hook(late, [&](const Tensor&) {
    ++late_calls;
    early_done_when_late_ran = early.grad().defined();
  });
  const Tensor hidden = tanh(mul(early, 1.5));
  sum(mul(exp(hidden), late)).backward();
  CHECK(late_calls == 1);
  CHECK_FALSE(early_done_when_late_ran);
  CHECK(early.grad().defined());
}

TEST_CASE("post-accumulate grad hook: removal, and clear errors for tensors that are no leaves") {
  manual_seed(testing::fresh_seed());
  Tensor w = Tensor::randn({3}).requires_grad_();
  Seen seen;
  const uint64_t id = watch(w, seen);
  sum(mul(w, w)).backward();
  CHECK(seen.calls == 1);
  autograd::remove_post_accumulate_grad_hook(w, id);
  autograd::remove_post_accumulate_grad_hook(w, id + 100);  // unknown ids are ignored
  sum(mul(w, w)).backward();
  CHECK(seen.calls == 1);

  const Tensor non_leaf = mul(w, 2.0);
  CHECK_THROWS_WITH_AS(autograd::register_post_accumulate_grad_hook(non_leaf, [](const Tensor&) {}),
                       doctest::Contains("expected a leaf tensor that requires grad, got a non-leaf tensor"), Error);
  CHECK_THROWS_WITH_AS(autograd::register_post_accumulate_grad_hook(Tensor::randn({2}), [](const Tensor&) {}),
                       doctest::Contains("got a tensor without requires_grad"), Error);
  CHECK_THROWS_WITH_AS(autograd::register_post_accumulate_grad_hook(w, {}),
                       doctest::Contains("expected a hook, got an empty function"), Error);
}
