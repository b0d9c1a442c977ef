#pragma once
// Shared pieces of the parallel-variant tests (ring, head_parallel): the attention config of an
// inner single-device variant with its mixing and branches, wrapped for P ranks, and the
// comparison of a parallel result with the single-device one.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention/config.h"
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

}  // namespace longtape::testing
