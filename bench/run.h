#pragma once
// A whole benchmark run: every case of the grid (lengths as the outer loop, so a time budget cuts
// the longest sequences of every variant rather than whole variants), the max-length searches and
// the quality runs, into one JSON document; then its views written to a folder.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/cases.h"
#include "bench/grid.h"
#include "bench/max_length.h"
#include "bench/quality.h"

namespace longtape::bench {

using Json = nlohmann::ordered_json;

struct RunOptions {
  Grid grid;
  CaseOptions cases;
  SearchOptions search;                     // device, deadline and first_seq_len are set by the run
  bool max_len_search = false;              // run the max-length search (search.budget_gib > 0)
  std::vector<std::string> max_len_dtypes;  // dtype names searched; empty = every dtype of the grid
  bool quality = false;
  QualityOptions quality_options;
  double time_budget = 0.0;  // seconds for the whole run; 0 = none
};

// Runs everything; progress lines go to stderr. `config` becomes the document's "config" object.
Json run_benchmark(const RunOptions& options, const Json& config);

// Writes DIR/bench.csv, the plots (unless `no_plots`), DIR/bench.md and DIR/bench.json, recording
// the outputs and notes in `doc`. Returns the PNG files drawn.
std::vector<std::string> write_reports(Json& doc, const std::string& dir, bool no_plots);

}  // namespace longtape::bench
