#pragma once
// Helpers shared by several test executables: fresh random seeds, float64 attention problems for
// the oracle, CPU/GPU parity runs and comparisons, and finite-difference gradient checks.
// Header-only; include after <doctest/doctest.h>.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "tensor/autograd/grad_mode.h"
#include "support/attention_oracle.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"

namespace longtape::testing {

// Fresh inputs every run; tests print the seed through doctest's INFO so a failure can be replayed.
inline uint64_t fresh_seed() {
  static std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

}  // namespace longtape::testing

// Declares `name`, a fresh seed, and reports it with any failure in the rest of the enclosing scope
// (doctest's INFO), so that the run can be replayed with it.
#define LT_FRESH_SEED(name)                                \
  const uint64_t name = ::longtape::testing::fresh_seed(); \
  INFO("seed " << name)

namespace longtape::testing {

// ------------------------------------------------------------------------------------------------
// Attention against the float64 oracle

// q, k, v, dout (B, N, H, D) as f64 leaves, with their values as vectors for the oracle.
struct Problem {
  int64_t B, N, H, D;
  Tensor q, k, v, dout;
  std::vector<double> qv, kv, vv, doutv;
};

inline Problem make_problem(int64_t B, int64_t N, int64_t H, int64_t D, uint64_t seed) {
  Problem p{B, N, H, D, {}, {}, {}, {}, {}, {}, {}, {}};
  const size_t size = static_cast<size_t>(B * N * H * D);
  p.qv = oracle::random_values(size, seed + 1, -1.5, 1.5);
  p.kv = oracle::random_values(size, seed + 2, -1.5, 1.5);
  p.vv = oracle::random_values(size, seed + 3, -1.0, 1.0);
  p.doutv = oracle::random_values(size, seed + 4, -1.0, 1.0);
  const Shape shape{B, N, H, D};
  p.q = Tensor::from_vector(p.qv, shape).requires_grad_();
  p.k = Tensor::from_vector(p.kv, shape).requires_grad_();
  p.v = Tensor::from_vector(p.vv, shape).requires_grad_();
  p.dout = Tensor::from_vector(p.doutv, shape);
  return p;
}

// The oracle's scaled error of a tensor against float64 values, with the same relative and
// absolute tolerance.
inline double max_scaled_error(const Tensor& got, const std::vector<double>& want, double tol) {
  return oracle::max_scaled_error(got.to_vector(), want, tol, tol);
}

// ------------------------------------------------------------------------------------------------
// CPU/GPU parity of attention

// Forward (out, lse) and backward (dq, dk, dv) of one run, as f64 tensors on the CPU.
struct Result {
  Tensor out, lse, dq, dk, dv;
};

// Runs `attention` on copies of q, k, v converted to `dtype` on `device`, then backward with dout.
inline Result run_on(attention::Attention& attention, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& dout, Device device, DType dtype) {
  auto prepare = [&](const Tensor& t) { return t.to(dtype).to(device).detach().requires_grad_(); };
  Tensor ql = prepare(q), kl = prepare(k), vl = prepare(v);
  attention::AttentionOutput r = attention.forward_with_lse(ql, kl, vl);
  r.out.backward(dout.to(dtype).to(device));
  auto host = [](const Tensor& t) { return t.detach().cpu().to(DType::f64); };
  return {host(r.out), host(r.lse), host(ql.grad()), host(kl.grad()), host(vl.grad())};
}

// max |a - b| <= rtol * max |b| + atol, with equal infinities required where b is infinite (lse of
// rows without keys) and finite values required everywhere else.
inline void check_close(const Tensor& got, const Tensor& expected, double rtol, double atol,
                        const std::string& what) {
  auto a = got.to_vector(), b = expected.to_vector();
  REQUIRE(a.size() == b.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b[i])) {
      CHECK(a[i] == b[i]);
      continue;
    }
    CHECK(std::isfinite(a[i]));
    scale = std::max(scale, std::abs(b[i]));
    worst = std::max(worst, std::abs(a[i] - b[i]));
  }
  INFO(what << ": max error " << worst << " for values up to " << scale);
  CHECK(worst <= rtol * scale + atol);
}

// Tolerances (rtol, atol) of a Result comparison: the output, the lse and the three gradients.
struct ResultTolerances {
  double out_rtol, out_atol, lse_rtol, lse_atol, grad_rtol, grad_atol;
};

// check_close of every field of `got` against `want`, labelled "<what> out" and so on.
inline void check_results_close(const Result& got, const Result& want, const ResultTolerances& tol,
                                const std::string& what) {
  check_close(got.out, want.out, tol.out_rtol, tol.out_atol, what + " out");
  check_close(got.lse, want.lse, tol.lse_rtol, tol.lse_atol, what + " lse");
  check_close(got.dq, want.dq, tol.grad_rtol, tol.grad_atol, what + " dq");
  check_close(got.dk, want.dk, tol.grad_rtol, tol.grad_atol, what + " dk");
  check_close(got.dv, want.dv, tol.grad_rtol, tol.grad_atol, what + " dv");
}

// ------------------------------------------------------------------------------------------------
// Finite differences

// Central difference of the scalar loss() with respect to element `i` of the contiguous f64 leaf x.
inline double central_difference(const std::function<Tensor()>& loss, const Tensor& x, int64_t i,
                                 double h = 1e-6) {
  NoGradGuard no_grad;
  double* p = x.data<double>() + i;
  const double saved = *p;
  *p = saved + h;
  const double up = loss().item();
  *p = saved - h;
  const double down = loss().item();
  *p = saved;
  return (up - down) / (2 * h);
}

// Checks every element of x.grad() (already computed from loss()) against central differences,
// to a relative `epsilon` (absolute for values below 1).
inline void check_grad_by_differences(const std::function<Tensor()>& loss, const Tensor& x, double epsilon) {
  REQUIRE(x.grad().defined());
  const std::vector<double> analytic = x.grad().to_vector();
  REQUIRE(analytic.size() == static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i)
    CHECK(analytic[i] == doctest::Approx(central_difference(loss, x, i)).epsilon(epsilon).scale(1.0));
}

}  // namespace longtape::testing
