#pragma once
// The longest sequence whose forward+backward peak memory fits a budget: grow from the grid's
// shortest length (at most 2x, and no further than quadratic memory growth allows, so no probe
// asks for far more than the budget), then bisect to `granule` tokens.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "bench/grid.h"
#include "tensor/device.h"

namespace longtape::bench {

using Json = nlohmann::ordered_json;

struct SearchOptions {
  Device device;
  double budget_gib = 0.0;
  int64_t cap = int64_t{1} << 20;  // largest N tried
  int64_t granule = 256;           // resolution in tokens
  int64_t first_seq_len = 256;     // where the search starts (rounded down to the granule)
  double case_time_limit = 60.0;   // seconds for one probe; 0 = no limit
  uint64_t seed = 0;               // of the random inputs
  bool grid_given = false;         // the Hilbert token grid was set by hand
  std::optional<std::chrono::steady_clock::time_point> deadline;  // stop searching after it
};

// The max_seq_len row of case `s` (seq_len ignored).
Json search_max_len(CaseShape s, const SearchOptions& options);

// The row of a search that did not run, with its reason.
Json search_skipped(const CaseShape& s, const SearchOptions& options, const std::string& reason);

}  // namespace longtape::bench
