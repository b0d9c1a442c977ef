#pragma once
// Shared pieces of the parallel-variant tests (ring, head_parallel): the attention config of an
// inner single-device variant with its mixing and branches, wrapped for P ranks, random inputs,
// a forward + backward run, and the comparison of a parallel result with the single-device one.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/config.h"
#include "tensor/autograd/node.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"

namespace longtape::testing {

struct InnerVariant {
  std::string name;  // the single-device variant
  attention::Mixing mixing = attention::Mixing::lse;
  std::vector<int64_t> segments, dilations;
};

inline attention::AttentionConfig parallel_config(const InnerVariant& inner, int64_t heads, int64_t dim, bool causal,
                                                  int64_t ranks) {
  attention::AttentionConfig c;
  c.num_heads = heads;
  c.head_dim = dim;
  c.causal = causal;
  c.mixing = inner.mixing;
  if (!inner.segments.empty()) {
    c.segment_lengths = inner.segments;
    c.dilation_rates = inner.dilations;
  }
  c.inner_variant = inner.name;
  c.ranks = ranks;
  return c;
}

// Largest |a - b| (both read on the CPU); equal infinities (rows no key reaches) count as equal,
// anything else non-finite fails.
inline double max_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.defined());
  REQUIRE(b.defined());
  REQUIRE(a.shape() == b.shape());
  auto x = a.cpu().to_vector(), y = b.cpu().to_vector();
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(x[i]) && x[i] == y[i]) continue;
    const double d = std::abs(x[i] - y[i]);
    m = std::isfinite(d) ? std::max(m, d) : 1e300;
  }
  return m;
}

// Inputs, runs and checks of a parallel-variant case (tests take them with a using-directive).
namespace parallel_cases {

// The inputs of a case: q, k, v (B, N, H, D) and the gradients of out and lse.
struct AttentionInputs {
  Tensor q, k, v, dout, dlse;
};
// Fresh random inputs of `dtype` (lse's gradient in f32 unless the inputs are f64).
inline AttentionInputs random_attention_inputs(int64_t b, int64_t n, int64_t h, int64_t d,
                                               DType dtype = DType::f64) {
  return {Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, n, h, d}, dtype),
          Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, h, n}, dtype == DType::f64 ? DType::f64 : DType::f32)};
}

// out, lse and the gradients of q, k and v.
struct AttentionResults {
  Tensor out, lse, dq, dk, dv;
};

// Forward, then backward with the given gradients of out and lse (so the lse path is checked too).
inline AttentionResults run_with_gradients(
    const std::function<attention::AttentionOutput(const Tensor&, const Tensor&, const Tensor&)>& forward,
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& dlse) {
  Tensor ql = q.detach().clone().requires_grad_(), kl = k.detach().clone().requires_grad_(),
         vl = v.detach().clone().requires_grad_();
  attention::AttentionOutput res = forward(ql, kl, vl);
  autograd::run_backward({res.out, res.lse}, {dout, dlse}, false);
  return {res.out.detach(), res.lse.detach(), ql.grad(), kl.grad(), vl.grad()};
}
inline AttentionResults run_with_gradients(attention::Attention& attention, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& dout, const Tensor& dlse) {
  return run_with_gradients(
      [&](const Tensor& ql, const Tensor& kl, const Tensor& vl) { return attention.forward_with_lse(ql, kl, vl); }, q,
      k, v, dout, dlse);
}

// The results of the ranks' token chunks (in rank order) joined along the sequence.
inline AttentionResults join_rank_chunks(const std::vector<AttentionResults>& parts) {
  auto join = [&](Tensor AttentionResults::*field, int64_t dim) {
    std::vector<Tensor> pieces;
    for (const AttentionResults& part : parts) pieces.push_back(part.*field);
    return pieces.size() == 1 ? pieces[0] : cat(pieces, dim);
  };
  return {join(&AttentionResults::out, 1), join(&AttentionResults::lse, 2), join(&AttentionResults::dq, 1),
          join(&AttentionResults::dk, 1), join(&AttentionResults::dv, 1)};
}

// Every field of `got` within tol of `want` (max_diff < tol), or bit for bit when tol is 0.
inline void check_results(const AttentionResults& got, const AttentionResults& want, double tol,
                          const std::string& what) {
  INFO(what);
  auto close = [&](const Tensor& a, const Tensor& b) {
    const double d = max_diff(a, b);
    return tol == 0.0 ? d == 0.0 : d < tol;
  };
  CHECK(close(got.out, want.out));
  CHECK(close(got.lse, want.lse));
  CHECK(close(got.dq, want.dq));
  CHECK(close(got.dk, want.dk));
  CHECK(close(got.dv, want.dv));
}

}  // namespace parallel_cases
}  // namespace longtape::testing
