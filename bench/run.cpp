#include "bench/run.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "attention/config_text.h"
#include "bench/machine.h"
#include "bench/report.h"
#include "tensor/error.h"

namespace longtape::bench {

using attention::AttentionConfig;
using attention::config_label;
using attention::format_number;
using attention::split_list;

namespace {

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  LT_CHECK(static_cast<bool>(out), "bench: cannot write ", path.string());
  out << text;
  LT_CHECK(static_cast<bool>(out), "bench: writing ", path.string(), " failed");
}

}  // namespace

Json run_benchmark(const RunOptions& a, const Json& config) {
  const Grid& g = a.grid;
  Json doc;
  doc["schema_version"] = 1;
  doc["tool"] = "longtape";
  doc["tool_version"] = "0.1.0";
  doc["created_utc"] = utc_now();
  doc["machine"] = machine_info(g.device);
  doc["config"] = config;
  doc["results"] = Json::array();
  doc["max_seq_len"] = Json::array();
  doc["quality"] = Json::array();

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  const std::string out_of_time =
      "time budget exhausted (--time-budget " + format_number(a.time_budget) + " s) before this case";
  auto over_budget = [&] { return a.time_budget > 0 && elapsed_s() > a.time_budget; };
  SearchOptions search = a.search;
  search.device = g.device;
  search.first_seq_len = g.seq_lens.front();
  search.grid_given = g.grid_given;
  if (a.time_budget > 0)
    search.deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                               std::chrono::duration<double>(a.time_budget));

  // Every series (variant, setting, dtype, shape) over the sequence lengths.
  struct Series {
    std::string variant;
    AttentionConfig base;
    DType dtype;
    int64_t batch;
    SeriesState state;
    std::vector<Json> rows;
  };
  std::vector<Series> all_series;
  for (const std::string& variant : g.variants)
    for (const AttentionConfig& setting : configs_for(variant, g.configs))
      for (DType dtype : g.dtypes)
        for (int64_t batch : g.batches)
          for (int64_t heads : g.heads)
            for (int64_t head_dim : g.head_dims) {
              AttentionConfig base = setting;
              base.num_heads = heads;
              base.head_dim = head_dim;
              all_series.push_back({variant, base, dtype, batch, {}, {}});
            }
  for (int64_t n : g.seq_lens)
    for (Series& series : all_series) {
      CaseShape s{series.variant, config_for_length(series.variant, series.base, n, g.grid_given), series.dtype,
                  series.batch, n};
      AttentionConfig unlabelled = s.config;  // the requested implementation gets its own column here
      unlabelled.impl = "auto";
      std::cerr << "bench: " << s.variant << " [" << config_label(s.variant, unlabelled) << "] " << dtype_name(s.dtype)
                << " B=" << s.batch << " N=" << n << " H=" << s.config.num_heads << " D=" << s.config.head_dim
                << " impl=" << s.config.impl << std::flush;
      Json row;
      if (over_budget()) {
        row = case_header(s, g.device);
        row["status"] = "skipped";
        row["reason"] = out_of_time;
      } else {
        row = run_case(s, a.cases, g.device, series.state);
      }
      std::cerr << " -> " << row["status"].get<std::string>();
      if (row.contains("forward_backward"))
        std::cerr << " [" << row["implementation"].get<std::string>() << "; "
                  << row["compute_precision"].get<std::string>() << "] fwd+bwd "
                  << row["forward_backward"]["median_ms"].get<double>() << " ms";
      else
        std::cerr << ": " << row["reason"].get<std::string>();
      std::cerr << "\n";
      series.rows.push_back(std::move(row));
    }
  for (Series& series : all_series)
    for (Json& row : series.rows) doc["results"].push_back(std::move(row));

  if (a.max_len_search) {
    for (const std::string& variant : g.variants)
      for (const AttentionConfig& setting : configs_for(variant, g.configs))
        for (DType dtype : g.dtypes) {
          if (!a.max_len_dtypes.empty() && std::find(a.max_len_dtypes.begin(), a.max_len_dtypes.end(),
                                                     std::string(dtype_name(dtype))) == a.max_len_dtypes.end())
            continue;
          CaseShape s{variant, setting, dtype, g.batches.front(), 0};
          s.config.num_heads = g.heads.front();
          s.config.head_dim = g.head_dims.front();
          std::cerr << "bench: max length of " << variant << " [" << config_label(variant, s.config) << "] "
                    << dtype_name(dtype) << " within " << search.budget_gib << " GiB" << std::flush;
          Json row = over_budget() ? search_skipped(s, search, out_of_time) : search_max_len(s, search);
          std::cerr << " -> " << row["max_seq_len"].get<int64_t>() << " (" << row["status"].get<std::string>() << ")\n";
          doc["max_seq_len"].push_back(std::move(row));
        }
  }
  if (a.quality) {
    for (const std::string& variant : g.variants) {
      std::cerr << "bench: quality of " << variant << " (" << a.quality_options.steps << " steps)" << std::flush;
      Json row = over_budget() ? quality_skipped(variant, a.quality_options, out_of_time)
                               : run_quality(variant, a.quality_options, g.device);
      std::cerr << " -> " << row["status"].get<std::string>();
      if (row.contains("accuracy")) std::cerr << " accuracy " << row["accuracy"].get<double>();
      std::cerr << "\n";
      doc["quality"].push_back(std::move(row));
    }
  }
  doc["total_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return doc;
}

std::vector<std::string> write_reports(Json& doc, const std::string& out_dir, bool no_plots) {
  const std::filesystem::path dir(out_dir);
  std::vector<std::string> notes;
  std::vector<std::string> outputs = {"bench.json", "bench.csv", "bench.md"};
  write_text(dir / "bench.csv", csv_report(doc));
  std::vector<std::string> pngs;
  if (no_plots) {
    notes.push_back("plots not drawn: --no-plots");
  } else {
    pngs = write_plots(doc, dir, notes);
    outputs.push_back("plots.gp");
  }
  for (const std::string& png : pngs) outputs.push_back(png);
  doc["outputs"] = outputs;
  doc["notes"] = notes;
  write_text(dir / "bench.md", markdown_report(doc));
  write_text(dir / "bench.json", doc.dump(2) + "\n");
  return pngs;
}

}  // namespace longtape::bench
