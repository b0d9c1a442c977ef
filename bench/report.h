#pragma once
// Benchmark reports: every figure lives in one JSON document (see
// benchmarks/bench_schema.json); the CSV, markdown, terminal table and gnuplot plots are views of
// that document, so they cannot disagree with it.
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace longtape::bench {

using Json = nlohmann::ordered_json;

// One line per measured or skipped case, all numeric fields flattened.
std::string csv_report(const Json& doc);
// Machine and configuration summary, then the timing, max-length and quality tables.
std::string markdown_report(const Json& doc);
// A compact fixed-width table for the terminal.
std::string terminal_table(const Json& doc);

// Writes DIR/plots.gp with its data files and, when gnuplot is on PATH, runs it to draw
// DIR/time_vs_n_<dtype>.png and DIR/memory_vs_n_<dtype>.png (log-log, one line per variant and
// configuration). Returns the PNG files drawn; a reason why none were drawn goes to `notes`.
std::vector<std::string> write_plots(const Json& doc, const std::filesystem::path& dir, std::vector<std::string>& notes);

// Rows with status "measured" in results, max_seq_len and quality: 0 means no case could run.
size_t measured_rows(const Json& doc);

// True when `program` is an executable file in a folder of PATH.
bool program_on_path(const std::string& program);

}  // namespace longtape::bench
