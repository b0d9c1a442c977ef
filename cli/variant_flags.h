#pragma once
// Command-line flags that become AttentionConfig fields, shared by `longtape bench` and
// `longtape patterns`, and the short label that names a configuration in tables and plots.
#include <CLI/CLI.hpp>

#include <cstdint>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "attention/config.h"
#include "cli/numeric_flags.h"
#include "tensor/error.h"

namespace longtape::cli {

// Fields every variant family reads (dilated fields come separately: bench takes several sets).
struct VariantFlags {
  std::string pattern = "local_window";  // block_sparse
  int64_t block_size = 64;
  int64_t window = 256;
  int64_t global_blocks = 1;
  double density = 0.25;
  uint64_t seed = 0;
  std::string schedule = "natural";  // block_sparse: natural | hilbert
  std::string order = "natural";     // natural | hilbert (token order of the core variants)
  int64_t ranks = 1;                 // ring, head_parallel
  std::string inner = "dilated";     // the core variant of hilbert, ring, head_parallel
};

inline void add_variant_flags(CLI::App& sub, VariantFlags& f) {
  sub.add_option("--pattern", f.pattern,
                 "block_sparse: all, local_window, dilated, global_local, random or adaptive (default local_window)");
  sub.add_option("--block-size", f.block_size, "block_sparse: tokens per block (default 64)")
      ->transform(count_in<int64_t>(1));
  sub.add_option("--window", f.window, "block_sparse local_window/global_local: window in tokens (default 256)")
      ->transform(count_in<int64_t>(0));
  sub.add_option("--global-blocks", f.global_blocks, "block_sparse global_local: leading global blocks (default 1)")
      ->transform(count_in<int64_t>(0));
  sub.add_option("--density", f.density, "block_sparse random/adaptive: fraction of key blocks kept (default 0.25)")
      ->transform(real_in(0.0, 1.0));
  sub.add_option("--pattern-seed", f.seed, "block_sparse random: seed of the drawn blocks (default 0)")
      ->transform(integer_in<uint64_t>());
  sub.add_option("--schedule", f.schedule, "block_sparse: block processing order, natural or hilbert");
  sub.add_option("--order", f.order, "token order of the core variant: natural or hilbert (default natural)");
  sub.add_option("--ranks", f.ranks, "ring, head_parallel: number of ranks P (default 1)")
      ->transform(integer_in<int64_t>(1, kMaxRanks));
  sub.add_option("--inner", f.inner, "hilbert, ring, head_parallel: the core variant they run (default dilated)");
}

inline void apply_variant_flags(const VariantFlags& f, attention::AttentionConfig& c) {
  c.pattern = f.pattern;
  c.block_size = f.block_size;
  c.window = f.window;
  c.global_blocks = f.global_blocks;
  c.density = f.density;
  c.seed = f.seed;
  c.schedule = f.schedule;
  c.order = f.order;
  c.ranks = f.ranks;
  c.inner_variant = f.inner;
}

// Splits "a,b;c" on `sep`, trimming spaces; empty items are dropped.
inline std::vector<std::string> split_list(const std::string& text, char sep) {
  std::vector<std::string> items;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, sep)) {
    const size_t a = item.find_first_not_of(" \t");
    const size_t b = item.find_last_not_of(" \t");
    if (a != std::string::npos) items.push_back(item.substr(a, b - a + 1));
  }
  return items;
}

inline std::string join_ints(const std::vector<int64_t>& values, const char* sep = ",") {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? sep : "") + std::to_string(values[i]);
  return out;
}

inline std::string format_number(double value) {
  std::ostringstream os;
  os << value;
  return os.str();
}

// The config fields that change what variant `name` computes or how fast, as "field=value" items.
// Unknown variants list every field. Used to label results and to run each distinct setting once.
inline std::vector<std::string> relevant_config_items(const std::string& name, const attention::AttentionConfig& c) {
  std::vector<std::string> items;
  auto dilated_items = [&] {
    items.push_back("w=" + join_ints(c.segment_lengths));
    items.push_back("r=" + join_ints(c.dilation_rates));
    items.push_back(attention::mixing_name(c.mixing));
  };
  auto block_items = [&](bool adaptive) {
    const std::string pattern = adaptive ? std::string("adaptive") : c.pattern;
    items.push_back(pattern);
    items.push_back("bs=" + std::to_string(c.block_size));
    if (pattern == "local_window" || pattern == "global_local") items.push_back("win=" + std::to_string(c.window));
    if (pattern == "global_local") items.push_back("global=" + std::to_string(c.global_blocks));
    if (pattern == "random" || pattern == "adaptive") items.push_back("density=" + format_number(c.density));
    if (pattern == "random") items.push_back("seed=" + std::to_string(c.seed));
    if (pattern == "dilated") items.push_back("r=" + join_ints(c.dilation_rates));
    if (c.schedule != "natural") items.push_back("schedule=" + c.schedule);
  };
  auto core_items = [&](const std::string& core) {
    if (core == "dense") {
    } else if (core == "dilated") {
      dilated_items();
    } else if (core == "block_sparse") {
      block_items(c.pattern == "adaptive");
    } else if (core == "block_sparse_adaptive") {
      block_items(true);
    } else {
      dilated_items();
      block_items(false);
    }
  };
  if (name == "hilbert" || name == "ring" || name == "head_parallel") {
    items.push_back("inner=" + c.inner_variant);
    core_items(c.inner_variant);
    if (name != "hilbert") items.push_back("P=" + std::to_string(c.ranks));
  } else if (name == "dense" || name == "dilated" || name == "block_sparse" || name == "block_sparse_adaptive") {
    core_items(name);
    if (c.order != "natural") items.push_back("order=" + c.order);
  } else {
    core_items(name);
    items.push_back("order=" + c.order);
    items.push_back("P=" + std::to_string(c.ranks));
    items.push_back("inner=" + c.inner_variant);
  }
  if (c.causal) items.push_back("causal");
  if (c.impl != "auto") items.push_back("impl=" + c.impl);  // a requested implementation changes the cost
  return items;
}

inline std::string config_label(const std::string& name, const attention::AttentionConfig& c) {
  std::string label;
  for (const std::string& item : relevant_config_items(name, c)) label += (label.empty() ? "" : " ") + item;
  return label.empty() ? "-" : label;
}

}  // namespace longtape::cli
