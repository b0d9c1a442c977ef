#include <doctest/doctest.h>

#include <cmath>

#include "tensor/autograd/grad_mode.h"
#include "tensor/ops.h"

using namespace longtape;

TEST_CASE("views share storage and reshape copies only when needed") {
  manual_seed(1);
  Tensor a = Tensor::randn({2, 3, 4});
  Tensor t = a.transpose(0, 2);
  CHECK(t.shape() == Shape{4, 3, 2});
  CHECK(t.storage() == a.storage());
  CHECK_FALSE(t.is_contiguous());
  auto va = a.to_vector();
  auto vt = t.contiguous().to_vector();
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) CHECK(vt[(k * 3 + j) * 2 + i] == va[(i * 3 + j) * 4 + k]);
  Tensor r = a.reshape({6, 4});
  CHECK(r.storage() == a.storage());
  Tensor r2 = t.reshape({24});
  CHECK(r2.storage() != a.storage());
  CHECK_THROWS_WITH_AS(a.view({5, 5}), doctest::Contains("needs 25 elements"), Error);
  CHECK_THROWS_AS(t.view({24}), Error);
}

TEST_CASE("broadcast add backward sums to input shapes") {
  manual_seed(2);
  Tensor a = Tensor::randn({3, 1}, DType::f64).requires_grad_();
  Tensor b = Tensor::randn({4}, DType::f64).requires_grad_();
  Tensor y = sum(mul(add(a, b), add(a, b)));
  y.backward();
  auto av = a.to_vector(), bv = b.to_vector();
  auto ga = a.grad().to_vector(), gb = b.grad().to_vector();
  for (int i = 0; i < 3; ++i) {
    double e = 0;
    for (int j = 0; j < 4; ++j) e += 2 * (av[i] + bv[j]);
    CHECK(ga[i] == doctest::Approx(e));
  }
  for (int j = 0; j < 4; ++j) {
    double e = 0;
    for (int i = 0; i < 3; ++i) e += 2 * (av[i] + bv[j]);
    CHECK(gb[j] == doctest::Approx(e));
  }
}

TEST_CASE("100k-node chain backward and release do not overflow the stack") {
  Tensor x = Tensor::randn({4}, DType::f64).requires_grad_();
  {
    Tensor y = x;
    for (int i = 0; i < 100000; ++i) y = add(y, 1e-6);
    sum(y).backward();
  }
  for (double g : x.grad().to_vector()) CHECK(g == 1.0);
}

TEST_CASE("second backward through a freed graph raises; retain_graph allows it") {
  Tensor x = Tensor::randn({3}, DType::f64).requires_grad_();
  Tensor y = sum(exp(x));
  y.backward();
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("second time"), Error);
  Tensor z = sum(exp(x));
  x.zero_grad_();
  z.backward(Tensor(), true);
  z.backward();
  auto xv = x.to_vector();
  auto g = x.grad().to_vector();
  for (int i = 0; i < 3; ++i) CHECK(g[i] == doctest::Approx(2 * std::exp(xv[i])));
}

TEST_CASE("NoGradGuard stops recording; detach cuts history") {
  Tensor x = Tensor::randn({3}).requires_grad_();
  {
    NoGradGuard g;
    Tensor y = mul(x, 2.0);
    CHECK_FALSE(y.requires_grad());
  }
  Tensor y = mul(x, 2.0);
  CHECK(y.requires_grad());
  CHECK_FALSE(y.is_leaf());
  CHECK(y.detach().is_leaf());
  CHECK_FALSE(y.detach().requires_grad());
}
