// CPU kernel fast paths (coalesced rows, broadcast rows, threads), GEMM row splitting, the
// batch-folded matmul, the host cache and the profiler, against float64 references.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/allocator.h"
#include "tensor/host_cache.h"
#include "tensor/ops.h"
#include "tensor/profiler.h"

using namespace longtape;

namespace {

// Runs body with the given OpenMP thread count, restoring the previous one.
void with_threads(int n, const std::function<void()>& body) {
#ifdef _OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(n);
  body();
  omp_set_num_threads(before);
#else
  (void)n;
  body();
#endif
}

void check_close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i]));
    if (!(err <= worst)) {
      worst = err;
      at = i;
    }
  }
  INFO(what << ": worst relative error " << worst << " at " << at << " (got " << got[at] << ", want " << want[at]
            << ")");
  CHECK(worst <= tol);
}

// Element (i) of a row-major tensor of `shape` read through broadcast: index into `src_shape`.
std::vector<double> broadcast_values(const std::vector<double>& src, const Shape& src_shape, const Shape& shape) {
  const int64_t n = shape_numel(shape);
  std::vector<double> out(static_cast<size_t>(n));
  const size_t nd = shape.size(), lead = nd - src_shape.size();
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t rem = flat, src_index = 0, src_stride = 1;
    for (size_t d = nd; d-- > 0;) {
      const int64_t i = rem % shape[d];
      rem /= shape[d];
      if (d >= lead) {
        const int64_t s = src_shape[d - lead];
        src_index += (s == 1 ? 0 : i) * src_stride;
        src_stride *= s;
      }
    }
    out[static_cast<size_t>(flat)] = src[static_cast<size_t>(src_index)];
  }
  return out;
}

}  // namespace

TEST_CASE("unary ops on contiguous, strided and large tensors match float64") {
  manual_seed(11);
  struct Case {
    const char* name;
    std::function<Tensor(const Tensor&)> op;
    std::function<double(double)> ref;
  };
  const double c = 0.7978845608028654;
  std::vector<Case> cases = {
      {"exp", [](const Tensor& x) { return exp(x); }, [](double v) { return std::exp(v); }},
      {"tanh", [](const Tensor& x) { return tanh(x); }, [](double v) { return std::tanh(v); }},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }, [](double v) { return 1 / (1 + std::exp(-v)); }},
      {"gelu_tanh", [](const Tensor& x) { return gelu(x, GeluApprox::tanh); },
       [c](double v) { return 0.5 * v * (1 + std::tanh(c * (v + 0.044715 * v * v * v))); }},
      {"gelu_erf", [](const Tensor& x) { return gelu(x); },
       [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }},
      {"relu", [](const Tensor& x) { return relu(x); }, [](double v) { return v > 0 ? v : 0; }},
      {"neg", [](const Tensor& x) { return neg(x); }, [](double v) { return -v; }},
      {"mul_scalar", [](const Tensor& x) { return mul(x, 1.5); }, [](double v) { return 1.5 * v; }},
      {"add_scalar", [](const Tensor& x) { return add(x, -0.25); }, [](double v) { return v - 0.25; }},
  };
  // 300 x 257 is above the threading grain; the transposed view walks a strided inner dim.
  Tensor x = Tensor::randn({300, 257});
  Tensor xt = Tensor::randn({257, 300}).transpose(0, 1);
  for (const Case& k : cases) {
    for (const Tensor& in : {x, xt}) {
      std::vector<double> values = in.contiguous().to_vector(), want(values.size());
      for (size_t i = 0; i < values.size(); ++i) want[i] = k.ref(values[i]);
      for (int threads : {1, 2}) {
        std::vector<double> got;
        with_threads(threads, [&] { got = k.op(in).to_vector(); });
        check_close(got, want, 2e-6, k.name);
      }
    }
  }
}

TEST_CASE("binary ops with every broadcast layout match float64, on one thread and on two") {
  manual_seed(12);
  const Shape full{16, 33, 96};
  const std::vector<Shape> other_shapes = {{16, 33, 96}, {96}, {33, 1}, {16, 1, 96}, {1}, {16, 33, 1}};
  for (const Shape& os : other_shapes) {
    Tensor a = Tensor::randn(full);
    Tensor b = add(mul(Tensor::rand(os), 2.0), 0.5);  // away from 0 for div
    const std::vector<double> av = a.to_vector(), bv = broadcast_values(b.to_vector(), os, full);
    struct Op {
      const char* name;
      std::function<Tensor(const Tensor&, const Tensor&)> f;
      std::function<double(double, double)> ref;
    };
    std::vector<Op> ops = {
        {"add", [](const Tensor& p, const Tensor& q) { return add(p, q); }, [](double p, double q) { return p + q; }},
        {"sub", [](const Tensor& p, const Tensor& q) { return sub(p, q); }, [](double p, double q) { return p - q; }},
        {"mul", [](const Tensor& p, const Tensor& q) { return mul(p, q); }, [](double p, double q) { return p * q; }},
        {"div", [](const Tensor& p, const Tensor& q) { return div(p, q); }, [](double p, double q) { return p / q; }},
        {"maximum", [](const Tensor& p, const Tensor& q) { return maximum(p, q); },
         [](double p, double q) { return p > q ? p : q; }},
    };
    for (const Op& op : ops) {
      std::vector<double> want(av.size());
      for (size_t i = 0; i < av.size(); ++i) want[i] = op.ref(av[i], bv[i]);
      for (int threads : {1, 2}) {
        std::vector<double> got, got_swapped;
        with_threads(threads, [&] {
          got = op.f(a, b).to_vector();
          got_swapped = op.f(b, a).to_vector();  // the broadcast operand first
        });
        INFO("shape " << shape_str(os) << ", threads " << threads);
        check_close(got, want, 1e-6, op.name);
        std::vector<double> want_swapped(av.size());
        for (size_t i = 0; i < av.size(); ++i) want_swapped[i] = op.ref(bv[i], av[i]);
        check_close(got_swapped, want_swapped, 1e-6, op.name);
      }
    }
  }
}

TEST_CASE("where, copy and fill on strided views match the element-by-element result") {
  manual_seed(13);
  Tensor a = Tensor::randn({64, 1100});
  Tensor b = Tensor::randn({1100});
  Tensor cond = gt(Tensor::randn({64, 1}), Tensor::zeros({}));
  Tensor w = where(cond, a, b);
  const auto av = a.to_vector(), bv = b.to_vector(), cv = cond.to_vector(), wv = w.to_vector();
  for (int64_t r = 0; r < 64; ++r)
    for (int64_t j = 0; j < 1100; ++j)
      CHECK(wv[r * 1100 + j] == (cv[r] != 0 ? av[r * 1100 + j] : bv[j]));
  // A transposed copy (strided source) and a cast.
  Tensor t = a.transpose(0, 1).contiguous();
  const auto tv = t.to_vector();
  for (int64_t r = 0; r < 64; ++r)
    for (int64_t j = 0; j < 1100; ++j) CHECK(tv[j * 64 + r] == av[r * 1100 + j]);
  Tensor d = cast(a, DType::f64);
  CHECK(d.to_vector() == av);
  Tensor f = Tensor::full({70, 1000}, 2.5);
  for (double v : f.to_vector()) CHECK(v == 2.5);
}

TEST_CASE("sums over leading, trailing and all dims match float64 and do not depend on the thread count") {
  manual_seed(14);
  Tensor x = Tensor::randn({48, 40, 96});
  const auto xv = x.to_vector();
  const std::vector<std::vector<int64_t>> dim_sets = {{0, 1}, {2}, {1}, {0}, {0, 1, 2}, {0, 2}};
  for (const auto& dims : dim_sets) {
    Tensor one, two;
    with_threads(1, [&] { one = sum(x, dims); });
    with_threads(2, [&] { two = sum(x, dims); });
    INFO("dims " << shape_str(dims));
    CHECK(one.to_vector() == two.to_vector());  // bitwise: one fixed order per output
    // float64 reference
    std::vector<bool> reduced(3, false);
    for (int64_t d : dims) reduced[static_cast<size_t>(d)] = true;
    const Shape s = x.shape();
    Shape out_shape;
    for (int d = 0; d < 3; ++d)
      if (!reduced[d]) out_shape.push_back(s[d]);
    std::vector<double> want(static_cast<size_t>(shape_numel(out_shape)), 0.0);
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t j = 0; j < s[1]; ++j)
        for (int64_t k = 0; k < s[2]; ++k) {
          int64_t o = 0;
          const int64_t idx[3] = {i, j, k};
          for (int d = 0; d < 3; ++d)
            if (!reduced[d]) o = o * s[d] + idx[d];
          want[static_cast<size_t>(o)] += xv[(i * s[1] + j) * s[2] + k];
        }
    check_close(one.to_vector(), want, 1e-6, "sum");
  }
  // max over leading dims (the column path) and over the last dim
  Tensor m0 = amax(x, {0}), m2 = amax(x, {2});
  const auto m0v = m0.to_vector(), m2v = m2.to_vector();
  for (int64_t j = 0; j < 40; ++j)
    for (int64_t k = 0; k < 96; ++k) {
      double want = -INFINITY;
      for (int64_t i = 0; i < 48; ++i) want = std::max(want, xv[(i * 40 + j) * 96 + k]);
      CHECK(m0v[j * 96 + k] == want);
    }
  for (int64_t i = 0; i < 48 * 40; ++i) {
    double want = -INFINITY;
    for (int64_t k = 0; k < 96; ++k) want = std::max(want, xv[i * 96 + k]);
    CHECK(m2v[i] == want);
  }
}

TEST_CASE("matmul: split rows, batches and transposed operands match float64 products") {
  manual_seed(15);
  auto reference = [](const std::vector<double>& a, const std::vector<double>& b, int64_t batch, int64_t m,
                      int64_t k, int64_t n) {
    std::vector<double> c(static_cast<size_t>(batch * m * n), 0.0);
    for (int64_t z = 0; z < batch; ++z)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t p = 0; p < k; ++p) s += a[(z * m + i) * k + p] * b[(z * k + p) * n + j];
          c[(z * m + i) * n + j] = s;
        }
    return c;
  };
  // Large enough that the product is split over threads: (1000, 96) @ (96, 120).
  Tensor a = Tensor::randn({1000, 96}), b = Tensor::randn({96, 120});
  const auto want = reference(a.to_vector(), b.to_vector(), 1, 1000, 96, 120);
  for (int threads : {1, 2}) {
    std::vector<double> got, got_t;
    with_threads(threads, [&] {
      got = matmul(a, b).to_vector();
      // the same operands stored transposed: both enter the product without a copy
      got_t = matmul(a.transpose(0, 1).contiguous().transpose(0, 1), b.transpose(0, 1).contiguous().transpose(0, 1))
                  .to_vector();
    });
    check_close(got, want, 1e-5, "matmul");
    check_close(got_t, want, 1e-5, "matmul of transposed storage");
  }
  // Batched (8, 130, 64) @ (8, 64, 70) splits over the batch.
  Tensor ba = Tensor::randn({8, 130, 64}), bb = Tensor::randn({8, 64, 70});
  check_close(matmul(ba, bb).to_vector(), reference(ba.to_vector(), bb.to_vector(), 8, 130, 64, 70), 1e-5,
              "batched matmul");
  // (B, T, K) @ (K, N) folds the batch into rows: same values as the per-batch products.
  Tensor x = Tensor::randn({4, 50, 32}), w = Tensor::randn({32, 24});
  std::vector<double> wrep;
  for (int z = 0; z < 4; ++z) {
    auto wv = w.to_vector();
    wrep.insert(wrep.end(), wv.begin(), wv.end());
  }
  Tensor y = matmul(x, w);
  CHECK(y.shape() == Shape{4, 50, 24});
  check_close(y.to_vector(), reference(x.to_vector(), wrep, 4, 50, 32, 24), 1e-5, "folded matmul");
}

TEST_CASE("gradcheck: matmul of a batch with a plain (and a transposed) weight") {
  manual_seed(16);
  Tensor x = Tensor::randn({3, 5, 4}, DType::f64).requires_grad_();
  Tensor w = Tensor::randn({4, 6}, DType::f64).requires_grad_();
  Tensor wt = Tensor::randn({6, 4}, DType::f64).requires_grad_();
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {x, w});
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1].transpose(0, 1)); },
                            {x, wt});
  // 2-D times a transposed weight (the Linear layout), and a transposed input.
  Tensor a = Tensor::randn({7, 4}, DType::f64).requires_grad_();
  autograd::check_gradcheck(
      [](const std::vector<Tensor>& in) { return matmul(in[0].transpose(0, 1), in[1]); },
      {Tensor::randn({4, 7}, DType::f64).requires_grad_(), Tensor::randn({4, 3}, DType::f64).requires_grad_()});
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1].transpose(0, 1)); },
                            {a, wt});
}

TEST_CASE("softmax and log_softmax rows match float64, and their gradients pass gradcheck") {
  manual_seed(17);
  Tensor x = mul(Tensor::randn({600, 130}), 4.0);
  const auto xv = x.to_vector();
  const auto sv = softmax(x, -1).to_vector(), lv = log_softmax(x, -1).to_vector();
  std::vector<double> want_s(xv.size()), want_l(xv.size());
  for (int64_t r = 0; r < 600; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < 130; ++c) m = std::max(m, xv[r * 130 + c]);
    for (int64_t c = 0; c < 130; ++c) s += std::exp(xv[r * 130 + c] - m);
    for (int64_t c = 0; c < 130; ++c) {
      want_s[r * 130 + c] = std::exp(xv[r * 130 + c] - m) / s;
      want_l[r * 130 + c] = xv[r * 130 + c] - m - std::log(s);
    }
  }
  check_close(sv, want_s, 1e-6, "softmax");
  check_close(lv, want_l, 1e-6, "log_softmax");
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return softmax(in[0], -1); },
                            {Tensor::randn({3, 7}, DType::f64).requires_grad_()});
}

TEST_CASE("host cache: freed blocks are reused by size class and the cap gives memory back") {
  CHECK(host_cache::class_size(1) == 64);
  CHECK(host_cache::class_size(1000) == 1024);
  CHECK(host_cache::class_size(1025) == 1280);            // four classes per power of two
  CHECK(host_cache::class_size((1 << 20) + 1) == 1310720);  // 1 MiB + 1 -> 1.25 MiB
  for (size_t n : {size_t{1}, size_t{100}, size_t{4097}, size_t{3} << 20, (size_t{1} << 30) + 7}) {
    const size_t c = host_cache::class_size(n);
    CHECK(c >= n);
    CHECK(c <= n + n / 4 + 64);
    CHECK(c % 64 == 0);
  }
  const size_t old_cap = host_cache::cap();
  host_cache::set_cap(size_t{64} << 20);
  {
    Tensor warm = Tensor::empty({1 << 18});  // 1 MiB
  }
  const MemoryStats before = memory_stats(Device::cpu());
  for (int i = 0; i < 5; ++i) {
    Tensor t = Tensor::empty({(1 << 18) - 5});  // same size class: served from the cache
    t.fill_(1.0);
  }
  const MemoryStats after = memory_stats(Device::cpu());
  CHECK(after.cache_hits - before.cache_hits >= 5);
  CHECK(after.device_allocs == before.device_allocs);
  CHECK(after.reserved_bytes >= after.allocated_bytes);
  // A cap below the cached bytes gives the excess back; a block above the cap is never kept.
  host_cache::set_cap(0);
  CHECK(host_cache::stats().cached_bytes == 0);
  {
    Tensor big = Tensor::empty({1 << 16});
  }
  CHECK(host_cache::stats().cached_bytes == 0);
  host_cache::set_cap(old_cap);
  // Reused memory is not zeroed, so zeros() must still give zeros.
  {
    Tensor dirty = Tensor::full({1 << 16}, 7.0);
  }
  for (double v : Tensor::zeros({1 << 16}).to_vector()) REQUIRE(v == 0.0);
}

TEST_CASE("profiler: kernels and backward nodes become rows only while recording") {
  manual_seed(18);
  Tensor w = Tensor::randn({32, 16}).requires_grad_();
  Tensor x = Tensor::randn({64, 32});
  profiler::stop();
  (void)matmul(x, w);
  profiler::start();
  {
    profiler::Scope phase("test phase");
    Tensor loss = sum(gelu(matmul(x, w), GeluApprox::tanh));
    loss.backward();
  }
  profiler::stop();
  (void)matmul(x, w);  // after stop: not counted
  const auto rows = profiler::rows();
  auto find = [&](const std::string& name) -> const profiler::Row* {
    for (const auto& r : rows)
      if (r.name == name) return &r;
    return nullptr;
  };
  const profiler::Row* gemm = find("gemm");
  REQUIRE(gemm != nullptr);
  CHECK(gemm->calls == 3);  // the forward product, and dX and dW in backward
  CHECK(gemm->bytes > 0);
  const profiler::Row* phase = find("test phase");
  REQUIRE(phase != nullptr);
  CHECK(phase->calls == 1);
  CHECK(phase->total_s >= phase->self_s);
  CHECK(find("matmul backward") != nullptr);
  CHECK(find("unary:gelu_tanh") != nullptr);
  const std::string table = profiler::table();
  CHECK(table.find("gemm") != std::string::npos);
  CHECK(table.find("total (self)") != std::string::npos);
}
