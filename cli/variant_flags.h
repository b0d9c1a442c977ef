#pragma once
// Command-line flags that become AttentionConfig fields, shared by `longtape bench` and
// `longtape patterns`.
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "attention/config.h"
#include "attention/config_text.h"
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
  std::string ring_layout = "contiguous";  // ring: contiguous | zigzag
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
  sub.add_option("--ring-layout", f.ring_layout,
                 "ring: tokens per rank, contiguous (default) or zigzag (chunks r and 2P-1-r of 2P: balanced causal work)");
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
  c.ring_layout = f.ring_layout;
  c.inner_variant = f.inner;
}

// The text helpers and labels live with the attention settings; the commands use them unqualified.
using attention::config_label;
using attention::format_number;
using attention::join_ints;
using attention::relevant_config_items;
using attention::split_list;

}  // namespace longtape::cli
