#pragma once
// The benchmark grid: variants x settings x dtypes x shapes x sequence lengths, and the settings a
// case runs with (one per distinct label of a variant, a Hilbert grid that fits the length).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attention/config.h"
#include "tensor/device.h"
#include "tensor/dtype.h"

namespace longtape::bench {

using Json = nlohmann::ordered_json;

// Every dimension of the grid, each list already parsed and checked.
struct Grid {
  std::vector<std::string> variants;
  Device device;
  std::vector<DType> dtypes;
  std::vector<int64_t> seq_lens, batches, heads, head_dims;  // seq_lens sorted, without repeats
  std::vector<attention::AttentionConfig> configs;  // variant settings (heads and head_dim filled per case)
  std::vector<std::string> impls;                   // requested implementations, one more grid dimension
  bool grid_given = false;                          // the token grid of the Hilbert order was set by hand
};

// One measured case.
struct CaseShape {
  std::string variant;
  attention::AttentionConfig config;  // num_heads, head_dim and grid set
  DType dtype;
  int64_t batch, seq_len;
};

// H x W with H * W = n and H <= W as close as possible: the token grid of the Hilbert order.
std::string near_square_grid(int64_t n);

// The config for one sequence length: a Hilbert grid that fits n when none was given.
attention::AttentionConfig config_for_length(const std::string& variant, attention::AttentionConfig c, int64_t n,
                                             bool grid_given);

// The distinct settings of `variant` among the grid's configs (a dense run does not repeat for
// every dilated segment set).
std::vector<attention::AttentionConfig> configs_for(const std::string& variant,
                                                    const std::vector<attention::AttentionConfig>& all);

// Every field of the config, as the "config" object of a result row.
Json config_json(const attention::AttentionConfig& c);

}  // namespace longtape::bench
