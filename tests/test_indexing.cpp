#include <doctest/doctest.h>

#include <functional>
#include <vector>

#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

// Every element of x.grad() against central differences, to a relative 1e-6.
void check_grad_by_differences(const std::function<Tensor()>& loss, const Tensor& x) {
  testing::check_grad_by_differences(loss, x, 1e-6);
}

// Row-major flat offset of a multi-index.
int64_t flat(const Shape& shape, const std::vector<int64_t>& at) {
  int64_t off = 0;
  for (size_t k = 0; k < shape.size(); ++k) off = off * shape[k] + at[k];
  return off;
}

// Visits every multi-index of `shape` in row-major order.
void for_each_index(const Shape& shape, const std::function<void(const std::vector<int64_t>&)>& body) {
  const int64_t n = shape_numel(shape);
  std::vector<int64_t> at(shape.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    body(at);
    for (int64_t k = static_cast<int64_t>(shape.size()) - 1; k >= 0; --k) {
      if (++at[k] < shape[k]) break;
      at[k] = 0;
    }
  }
}

}  // namespace

TEST_CASE("cat joins along any dim, f32 and f64, and its gradient is a slice per input") {
  manual_seed(31);
  for (DType dt : {DType::f32, DType::f64}) {
    for (int64_t dim : {0, 1, 2, -1}) {
      CAPTURE(dim);
      const int64_t d = dim < 0 ? dim + 3 : dim;
      std::vector<Shape> shapes(3, Shape{2, 3, 4});
      shapes[0][d] = 1;
      shapes[1][d] = 3;
      shapes[2][d] = 2;
      std::vector<Tensor> parts;
      for (const Shape& s : shapes) parts.push_back(Tensor::randn(s, dt).requires_grad_());
      Tensor out = cat(parts, dim);
      Shape expected{2, 3, 4};
      expected[d] = 6;
      REQUIRE(out.shape() == expected);
      const auto ov = out.to_vector();
      int64_t start = 0;
      for (const Tensor& p : parts) {
        const auto pv = p.to_vector();
        for_each_index(p.shape(), [&](const std::vector<int64_t>& at) {
          std::vector<int64_t> o = at;
          o[d] += start;
          CHECK(ov[flat(expected, o)] == pv[flat(p.shape(), at)]);
        });
        start += p.shape()[d];
      }
      Tensor probe = Tensor::randn(expected, dt);
      sum(mul(out, probe)).backward();
      const auto gv = probe.to_vector();
      start = 0;
      for (const Tensor& p : parts) {
        const auto grad = p.grad().to_vector();
        REQUIRE(p.grad().shape() == p.shape());
        for_each_index(p.shape(), [&](const std::vector<int64_t>& at) {
          std::vector<int64_t> o = at;
          o[d] += start;
          CHECK(grad[flat(p.shape(), at)] == gv[flat(expected, o)]);
        });
        start += p.shape()[d];
      }
    }
  }
}

TEST_CASE("cat accepts non-contiguous inputs") {
  manual_seed(32);
  Tensor a = Tensor::randn({3, 2}, DType::f64);
  Tensor b = Tensor::randn({2, 3}, DType::f64).transpose(0, 1);  // (3, 2), strided
  Tensor out = cat({a, b}, 1);
  const auto ov = out.to_vector(), av = a.to_vector(), bv = b.contiguous().to_vector();
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j) {
      CHECK(ov[i * 4 + j] == av[i * 2 + j]);
      CHECK(ov[i * 4 + 2 + j] == bv[i * 2 + j]);
    }
}

TEST_CASE("cat names the offending tensor on bad input") {
  Tensor a = Tensor::randn({2, 3});
  CHECK_THROWS_WITH_AS(cat({a, Tensor::randn({2, 3}), Tensor::randn({3, 3})}, 1),
                       doctest::Contains("cat: tensor 2 has shape [3, 3] but tensor 0 has shape [2, 3]"), Error);
  CHECK_THROWS_WITH_AS(cat({a, Tensor::randn({2, 3, 1})}, 0), doctest::Contains("tensor 1 has shape [2, 3, 1]"),
                       Error);
  CHECK_THROWS_WITH_AS(cat({a, Tensor::randn({2, 3}, DType::f64)}, 0),
                       doctest::Contains("tensor 1 has dtype f64 but tensor 0 has dtype f32"), Error);
  CHECK_THROWS_WITH_AS(cat({}, 0), doctest::Contains("at least one tensor"), Error);
  CHECK_THROWS_WITH_AS(cat({a, a}, 2), doctest::Contains("cat: dim must be in"), Error);
}

TEST_CASE("split by sizes and by chunk gives views whose gradients land in place") {
  manual_seed(33);
  Tensor x = Tensor::randn({7, 3}, DType::f64).requires_grad_();
  std::vector<Tensor> parts = split(x, std::vector<int64_t>{2, 0, 5}, 0);
  REQUIRE(parts.size() == 3);
  CHECK(parts[0].shape() == Shape{2, 3});
  CHECK(parts[1].shape() == Shape{0, 3});
  CHECK(parts[2].shape() == Shape{5, 3});
  CHECK(parts[2].storage() == x.storage());
  const auto xv = x.to_vector(), p2 = parts[2].to_vector();
  for (int i = 0; i < 15; ++i) CHECK(p2[i] == xv[6 + i]);

  std::vector<Tensor> chunks = split(x, 3, 0);
  REQUIRE(chunks.size() == 3);
  CHECK(chunks[0].shape() == Shape{3, 3});
  CHECK(chunks[2].shape() == Shape{1, 3});
  CHECK(chunks[2].to_vector()[1] == xv[19]);
  std::vector<Tensor> cols = split(x, 2, -1);
  REQUIRE(cols.size() == 2);
  CHECK(cols[1].shape() == Shape{7, 1});

  // gradient: 2 * chunk0 + 3 * chunk2, zero on the untouched middle chunk
  Tensor loss = add(sum(mul(chunks[0], 2.0)), sum(mul(chunks[2], 3.0)));
  loss.backward();
  const auto g = x.grad().to_vector();
  for (int i = 0; i < 21; ++i) CHECK(g[i] == (i < 9 ? 2.0 : i < 18 ? 0.0 : 3.0));

  CHECK_THROWS_WITH_AS(split(x, std::vector<int64_t>{2, 4}, 0), doctest::Contains("sum to 6 but dim 0"), Error);
  CHECK_THROWS_WITH_AS(split(x, 0, 0), doctest::Contains("chunk size must be > 0"), Error);
}

TEST_CASE("stack inserts a new dim at any position") {
  manual_seed(34);
  std::vector<Tensor> ts;
  for (int i = 0; i < 3; ++i) ts.push_back(Tensor::randn({2, 4}, DType::f64).requires_grad_());
  for (int64_t dim : {0, 1, 2, -1}) {
    CAPTURE(dim);
    const int64_t d = dim < 0 ? dim + 3 : dim;
    Tensor out = stack(ts, dim);
    Shape expected{2, 4};
    expected.insert(expected.begin() + d, 3);
    REQUIRE(out.shape() == expected);
    const auto ov = out.to_vector();
    for (int64_t t = 0; t < 3; ++t) {
      const auto tv = ts[t].to_vector();
      for_each_index({2, 4}, [&](const std::vector<int64_t>& at) {
        std::vector<int64_t> o = at;
        o.insert(o.begin() + d, t);
        CHECK(ov[flat(expected, o)] == tv[flat({2, 4}, at)]);
      });
    }
  }
  Tensor probe = Tensor::randn({2, 3, 4}, DType::f64);
  sum(mul(stack(ts, 1), probe)).backward();
  const auto pv = probe.to_vector(), g1 = ts[1].grad().to_vector();
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) CHECK(g1[i * 4 + j] == pv[(i * 3 + 1) * 4 + j]);
  CHECK_THROWS_WITH_AS(stack({ts[0], Tensor::randn({4, 2}, DType::f64)}, 0),
                       doctest::Contains("stack: tensor 1 has shape [4, 2] but tensor 0 has shape [2, 4]"), Error);
  CHECK_THROWS_WITH_AS(stack(ts, 3), doctest::Contains("stack: dim must be in"), Error);
}

TEST_CASE("index_select picks slices along a dim for i32 and i64 indices; repeats accumulate in backward") {
  manual_seed(35);
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor a = Tensor::randn({3, 5, 2}, dt).requires_grad_();
    const std::vector<int64_t> ids{4, 0, 4, 2};
    const auto av = a.to_vector();
    for (const Tensor& index : {Tensor::from_vector(ids, {4}), Tensor::from_vector(std::vector<int32_t>{4, 0, 4, 2}, {4})}) {
      Tensor out = index_select(a, 1, index);
      REQUIRE(out.shape() == Shape{3, 4, 2});
      const auto ov = out.to_vector();
      for_each_index({3, 4, 2}, [&](const std::vector<int64_t>& at) {
        CHECK(ov[flat({3, 4, 2}, at)] == av[flat({3, 5, 2}, {at[0], ids[at[1]], at[2]})]);
      });
    }
    Tensor probe = Tensor::randn({3, 4, 2}, dt);
    sum(mul(index_select(a, 1, Tensor::from_vector(ids, {4})), probe)).backward();
    const auto pv = probe.to_vector(), gv = a.grad().to_vector();
    for_each_index({3, 5, 2}, [&](const std::vector<int64_t>& at) {
      double ref = 0;
      for (int64_t j = 0; j < 4; ++j)
        if (ids[j] == at[1]) ref += pv[flat({3, 4, 2}, {at[0], j, at[2]})];
      CHECK(gv[flat({3, 5, 2}, at)] == doctest::Approx(ref).epsilon(1e-6));
    });
  }
  // strided input along dim 0
  Tensor t = Tensor::randn({4, 3}, DType::f64).transpose(0, 1);  // (3, 4)
  Tensor picked = index_select(t, 0, Tensor::from_vector(std::vector<int64_t>{2, 1}, {2}));
  const auto tv = t.contiguous().to_vector(), pk = picked.to_vector();
  for (int j = 0; j < 4; ++j) {
    CHECK(pk[j] == tv[2 * 4 + j]);
    CHECK(pk[4 + j] == tv[1 * 4 + j]);
  }
}

TEST_CASE("index_select rejects bad indices") {
  Tensor a = Tensor::randn({3, 4});
  CHECK_THROWS_WITH_AS(index_select(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 4}, {2})),
                       doctest::Contains("index_select: index 4 at position 1 is out of range [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(index_select(a, 0, Tensor::from_vector(std::vector<int64_t>{0, 1}, {1, 2})),
                       doctest::Contains("index must be 1-d"), Error);
  CHECK_THROWS_WITH_AS(index_select(a, 0, Tensor::ones({2})), doctest::Contains("must be an i64 or i32 tensor"),
                       Error);
}

TEST_CASE("gather follows torch semantics, including an index smaller than the input") {
  manual_seed(36);
  const Shape a_shape{3, 4, 5};
  const Shape i_shape{2, 6, 3};  // smaller than a outside dim 1, longer along it
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor a = Tensor::randn(a_shape, dt);
    std::vector<int64_t> ids(shape_numel(i_shape));
    const auto r = Tensor::rand({static_cast<int64_t>(ids.size())}, DType::f64).to_vector();
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(r[i] * 4) % 4;
    for (const Tensor& index :
         {Tensor::from_vector(ids, i_shape), cast(Tensor::from_vector(ids, i_shape), DType::i32)}) {
      Tensor out = gather(a, 1, index);
      REQUIRE(out.shape() == i_shape);
      const auto av = a.to_vector(), ov = out.to_vector();
      for_each_index(i_shape, [&](const std::vector<int64_t>& at) {
        const int64_t k = ids[flat(i_shape, at)];
        CHECK(ov[flat(i_shape, at)] == av[flat(a_shape, {at[0], k, at[2]})]);
      });
    }
  }
  // gradient: scatter of the probe into the positions read, checked by central differences
  Tensor a = Tensor::randn({3, 4}, DType::f64).requires_grad_();
  Tensor index = Tensor::from_vector(std::vector<int64_t>{3, 3, 0, 1, 2, 1}, {2, 3});
  Tensor probe = Tensor::randn({2, 3}, DType::f64);
  auto loss = [&] { return sum(mul(gather(a, 1, index), probe)); };
  loss().backward();
  check_grad_by_differences(loss, a);
  const auto g = a.grad().to_vector(), pv = probe.to_vector();
  CHECK(g[3] == doctest::Approx(pv[0] + pv[1]));  // row 0 reads column 3 twice
  CHECK(g[2 * 4 + 0] == 0.0);                     // row 2 is never read

  // along dim 0 of a strided input
  Tensor t = Tensor::randn({4, 3}, DType::f64).transpose(0, 1);  // (3, 4)
  Tensor idx0 = Tensor::from_vector(std::vector<int64_t>{2, 0, 1, 1}, {1, 4});
  const auto tv = t.contiguous().to_vector(), gt0 = gather(t, 0, idx0).to_vector();
  for (int j = 0; j < 4; ++j) CHECK(gt0[j] == tv[std::vector<int64_t>{2, 0, 1, 1}[j] * 4 + j]);
}

TEST_CASE("gather rejects bad index shapes and values") {
  Tensor a = Tensor::randn({3, 4});
  CHECK_THROWS_WITH_AS(gather(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 1}, {2})),
                       doctest::Contains("index must have the same number of dims as input"), Error);
  CHECK_THROWS_WITH_AS(gather(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 1, 2, 0}, {4, 1})),
                       doctest::Contains("is larger than input of shape [3, 4] in dim 0"), Error);
  CHECK_THROWS_WITH_AS(gather(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 4}, {1, 2})),
                       doctest::Contains("gather: index 4 at position 1 is out of range [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(gather(a, 0, Tensor::from_vector(std::vector<int32_t>{-1}, {1, 1})),
                       doctest::Contains("gather: index -1 at position 0"), Error);
}

TEST_CASE("scatter_add adds src at index and sends gradients to input and src") {
  manual_seed(37);
  const Shape a_shape{3, 5, 2};
  const Shape i_shape{2, 4, 2};
  const Shape s_shape{3, 6, 2};  // src larger than index: its extra entries are unused
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor a = Tensor::randn(a_shape, dt).requires_grad_();
    Tensor src = Tensor::randn(s_shape, dt).requires_grad_();
    std::vector<int64_t> ids(shape_numel(i_shape));
    const auto r = Tensor::rand({static_cast<int64_t>(ids.size())}, DType::f64).to_vector();
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(r[i] * 5) % 5;
    Tensor index = Tensor::from_vector(ids, i_shape);
    const std::vector<double> a_before = a.to_vector();
    Tensor out = scatter_add(a, 1, index, src);
    REQUIRE(out.shape() == a_shape);
    CHECK(a.to_vector() == a_before);  // the input is not modified

    std::vector<double> ref = a_before;
    const auto sv = src.to_vector();
    for_each_index(i_shape, [&](const std::vector<int64_t>& at) {
      ref[flat(a_shape, {at[0], ids[flat(i_shape, at)], at[2]})] += sv[flat(s_shape, at)];
    });
    const auto ov = out.to_vector();
    for (size_t i = 0; i < ref.size(); ++i)
      CHECK(ov[i] == doctest::Approx(ref[i]).epsilon(dt == DType::f32 ? 1e-6 : 1e-14));

    Tensor probe = Tensor::randn(a_shape, dt);
    sum(mul(out, probe)).backward();
    const auto pv = probe.to_vector(), ga = a.grad().to_vector(), gs = src.grad().to_vector();
    for (size_t i = 0; i < pv.size(); ++i) CHECK(ga[i] == pv[i]);
    REQUIRE(src.grad().shape() == s_shape);
    for_each_index(s_shape, [&](const std::vector<int64_t>& at) {
      const bool used = at[0] < i_shape[0] && at[1] < i_shape[1] && at[2] < i_shape[2];
      const double expect = used ? pv[flat(a_shape, {at[0], ids[flat(i_shape, at)], at[2]})] : 0.0;
      CHECK(gs[flat(s_shape, at)] == expect);
    });
  }
  // central differences for both inputs
  Tensor a = Tensor::randn({4, 3}, DType::f64).requires_grad_();
  Tensor src = Tensor::randn({2, 3}, DType::f64).requires_grad_();
  Tensor index = Tensor::from_vector(std::vector<int32_t>{1, 1, 3, 0, 1, 2}, {2, 3});
  Tensor probe = Tensor::randn({4, 3}, DType::f64);
  auto loss = [&] { return sum(mul(exp(scatter_add(a, 0, index, src)), probe)); };
  loss().backward();
  check_grad_by_differences(loss, a);
  check_grad_by_differences(loss, src);
}

TEST_CASE("scatter_add rejects mismatched operands") {
  Tensor a = Tensor::randn({3, 4});
  Tensor src = Tensor::randn({3, 4});
  CHECK_THROWS_WITH_AS(scatter_add(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 9}, {1, 2}), src),
                       doctest::Contains("scatter_add: index 9 at position 1 is out of range [0, 4)"), Error);
  CHECK_THROWS_WITH_AS(scatter_add(a, 1, Tensor::from_vector(std::vector<int64_t>{0, 1, 2, 3, 0}, {1, 5}), src),
                       doctest::Contains("is larger than src of shape [3, 4] in dim 1"), Error);
  CHECK_THROWS_WITH_AS(scatter_add(a, 1, Tensor::from_vector(std::vector<int64_t>{0}, {1, 1}), Tensor::randn({3, 4}, DType::f64)),
                       doctest::Contains("src must have dtype f32"), Error);
  CHECK_THROWS_WITH_AS(scatter_add(a, 0, Tensor::from_vector(std::vector<int64_t>{0}, {1}), src),
                       doctest::Contains("index must have the same number of dims as input"), Error);
}
