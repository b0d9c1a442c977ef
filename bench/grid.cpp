#include "bench/grid.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "attention/config_text.h"

namespace longtape::bench {

using attention::AttentionConfig;

std::string near_square_grid(int64_t n) {
  int64_t h = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (h > 1 && n % h != 0) --h;
  h = std::max<int64_t>(h, 1);
  return std::to_string(h) + "x" + std::to_string(n / h);
}

AttentionConfig config_for_length(const std::string& variant, AttentionConfig c, int64_t n, bool grid_given) {
  if (attention::uses_token_grid(variant, c) && !grid_given) c.grid = near_square_grid(n);
  return c;
}

Json config_json(const AttentionConfig& c) {
  Json j;
  j["num_heads"] = c.num_heads;
  j["head_dim"] = c.head_dim;
  j["segment_lengths"] = c.segment_lengths;
  j["dilation_rates"] = c.dilation_rates;
  j["mixing"] = attention::mixing_name(c.mixing);
  j["causal"] = c.causal;
  j["softmax_scale"] = c.scale();
  j["dropout"] = c.dropout;
  j["pattern"] = c.pattern;
  j["block_size"] = c.block_size;
  j["density"] = c.density;
  j["window"] = c.window;
  j["global_blocks"] = c.global_blocks;
  j["seed"] = c.seed;
  j["order"] = c.order;
  j["grid"] = c.grid;
  j["schedule"] = c.schedule;
  j["parallel"] = c.parallel;
  j["ranks"] = c.ranks;
  j["inner_variant"] = c.inner_variant;
  j["impl"] = c.impl;
  return j;
}

std::vector<AttentionConfig> configs_for(const std::string& variant, const std::vector<AttentionConfig>& all) {
  std::vector<AttentionConfig> out;
  std::set<std::string> seen;
  for (const AttentionConfig& c : all)
    if (seen.insert(attention::config_label(variant, c)).second) out.push_back(c);
  return out;
}

}  // namespace longtape::bench
