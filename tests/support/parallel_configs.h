#pragma once
// The attention configs of the parallel-variant tests (ring, head_parallel): an inner
// single-device variant with its mixing and branches, wrapped for P ranks.
#include <cstdint>
#include <string>
#include <vector>

#include "attention/config.h"

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

}  // namespace longtape::testing
