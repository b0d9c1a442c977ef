// `longtape bench`: forward and forward+backward cost of every registered attention variant over a
// grid of sequence lengths, batch sizes, heads, head dims, dtypes and variant configurations.
//
//   longtape bench [--variants dense,dilated] [--device cpu|cuda] [--dtype f32,bf16]
//       [--seq-lens 1024,2048] [--batch 1] [--heads 8] [--head-dim 64]
//       [--segments "512,1024;2048" --dilations "1,2;1"] [--mixing lse,head_groups] [--causal off|on|both]
//       [--impl auto|fused|composed, or a comma-separated list of them]
//       [--warmup 3] [--repeats 10] [--max-len-budget-gib 8] [--quality] [--quick] --out-dir DIR
//
// Protocol: a fresh module and fresh random inputs per case; `warmup` untimed runs, then `repeats`
// timed runs (CUDA events on the GPU, a monotonic clock on the CPU), median reported. The forward
// is timed without recording (inference); forward+backward records the tape and back-propagates a
// random output gradient into q, k, v (gradients cleared outside the timed region). Peak memory
// comes from one extra run each, after emptying the pool cache and resetting the peak: allocated
// and reserved bytes of the CUDA pool, or the host allocator's counters on the CPU. Both include
// the inputs (q, k, v and the output gradient).
//
// Useful FLOPs count only attended (query, key) pairs with their multiplicity: forward 4 * pairs *
// head_dim (QK^T and PV), backward 2.5 times that. Pairs come from the variant's definition
// (attention/pattern_map.h) or, for variants it does not know, from running the variant.
//
// Every row records the implementation that ran it and the precision of its math, as the module
// reports them after the timed runs (forward at the row's top level, each phase in its figures).
//
// A case that cannot run (a config the variant rejects, out of memory, too slow for
// --case-time-limit) is reported as skipped with its reason; an unexpected error as failed. No
// case stops the run.#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "attention/config.h"
#include "attention/registry.h"
#include "bench/report.h"
#include "bench/run.h"
#include "cli/command_registry.h"
#include "cli/impl_flag.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "cli/variant_flags.h"
#include "tensor/allocator.h"
#include "tensor/error.h"

namespace longtape::cli {

namespace {

using bench::Json;
using attention::AttentionConfig;
using bench::Grid;

constexpr double kMaxSeconds = 1e9;  // --case-time-limit, --time-budget

struct BenchArgs {
  std::string variants;
  std::string device = "cpu";
  std::string dtypes = "f32";
  std::string seq_lens;
  std::string batches = "1";
  std::string heads = "8";
  std::string head_dims = "64";
  std::string segments = "512,1024,2048";
  std::string dilations = "1,2,4";
  std::string mixings = "lse";
  std::string causal = "off";
  std::string impls = "auto";
  VariantFlags flags;
  int warmup = 3;
  int repeats = 10;
  bool quick = false;
  double max_len_budget_gib = 0.0;
  int64_t max_len_cap = int64_t{1} << 20;
  int64_t max_len_granule = 256;
  double case_time_limit = 60.0;
  double time_budget = 0.0;     // seconds for the whole run; 0 = none
  std::string max_len_dtypes;  // dtypes searched; empty = all of the grid
  std::string out_dir = "bench-out";
  bool no_plots = false;
  uint64_t seed = 0;
  bool quality = false;
  bench::QualityOptions quality_options;  // steps, seq_len, batch, precision (the rest from other flags)
  std::string quality_segments = "64,256";
  std::string quality_dilations = "1,4";
  std::string command_line;
};

// ---------------------------------------------------------------------------------------------
// Flags into the grid and the run's options

std::vector<int64_t> parse_positive_list(const std::string& text, const char* what) {
  std::vector<int64_t> values = attention::parse_int_list(text, what);
  for (int64_t v : values) LT_CHECK(v > 0, what, ": every value must be > 0, got ", text);
  check_list_bound(values, what);
  return values;
}

Grid build_grid(const BenchArgs& a) {
  Grid g;
  const std::vector<std::string> registered = attention::registered_attention_names();
  if (a.variants.empty() || a.variants == "all") {
    g.variants = registered;
  } else {
    for (const std::string& name : split_list(a.variants, ',')) {
      LT_CHECK(std::find(registered.begin(), registered.end(), name) != registered.end(), "--variants: unknown variant '",
               name, "'; registered: ", [&] {
                 std::string all;
                 for (const auto& r : registered) all += (all.empty() ? "" : ", ") + r;
                 return all;
               }());
      g.variants.push_back(name);
    }
  }
  LT_CHECK(!g.variants.empty(), "--variants: no variant to run");
  g.device = Device::parse(a.device);
  LT_CHECK(!g.device.is_cuda() || cuda_available(), "--device ", a.device,
           ": no CUDA device is available (or longtape was built without CUDA)");
  for (const std::string& name : split_list(a.dtypes, ',')) {
    const DType t = dtype_from_name(name);
    LT_CHECK(is_floating(t), "--dtype: expected floating dtypes (f32, bf16, f16, f64), got ", name);
    g.dtypes.push_back(t);
  }
  LT_CHECK(!g.dtypes.empty(), "--dtype: no dtype given");
  g.seq_lens = parse_positive_list(a.seq_lens, "--seq-lens");
  std::sort(g.seq_lens.begin(), g.seq_lens.end());
  g.seq_lens.erase(std::unique(g.seq_lens.begin(), g.seq_lens.end()), g.seq_lens.end());
  g.batches = parse_positive_list(a.batches, "--batch");
  g.heads = parse_positive_list(a.heads, "--heads");
  g.head_dims = parse_positive_list(a.head_dims, "--head-dim");
  LT_CHECK(a.warmup >= 0, "--warmup must be >= 0, got ", a.warmup);
  LT_CHECK(a.repeats >= 1, "--repeats must be >= 1, got ", a.repeats);
  LT_CHECK(a.max_len_budget_gib >= 0, "--max-len-budget-gib must be >= 0 (0 skips the search), got ",
           a.max_len_budget_gib);
  LT_CHECK(a.max_len_granule >= 1, "--max-len-granule must be >= 1, got ", a.max_len_granule);
  LT_CHECK(a.max_len_cap >= a.max_len_granule, "--max-len-cap must be >= --max-len-granule (", a.max_len_granule,
           "), got ", a.max_len_cap);
  LT_CHECK(a.time_budget >= 0 && a.case_time_limit >= 0, "--time-budget and --case-time-limit must be >= 0");
  size_t dtype_bytes = 1;
  for (DType t : g.dtypes) dtype_bytes = std::max(dtype_bytes, dtype_size(t));
  check_input_sizes(g.batches, g.seq_lens, g.heads, g.head_dims, dtype_bytes);
  if (a.quality)
    check_count("tokens per training step",
                {{"--quality-batch", a.quality_options.batch}, {"--quality-seq-len", a.quality_options.seq_len}});

  const std::vector<std::string> segment_sets = split_list(a.segments, ';');
  const std::vector<std::string> dilation_sets = split_list(a.dilations, ';');
  LT_CHECK(!segment_sets.empty(), "--segments: expected at least one set such as \"512,1024\"");
  LT_CHECK(dilation_sets.empty() || dilation_sets.size() == segment_sets.size(), "--dilations: expected ",
           segment_sets.size(), " ';'-separated sets (one per --segments set), got ", dilation_sets.size());
  std::vector<bool> causal_modes;
  if (a.causal == "off") causal_modes = {false};
  else if (a.causal == "on") causal_modes = {true};
  else if (a.causal == "both") causal_modes = {false, true};
  else LT_CHECK(false, "--causal must be off, on or both, got ", a.causal);
  const std::vector<std::string> mixings = split_list(a.mixings, ',');
  LT_CHECK(!mixings.empty(), "--mixing: expected lse, head_groups or both comma-separated");
  g.impls = parse_impl_list(a.impls);
  for (size_t s = 0; s < segment_sets.size(); ++s) {
    const std::vector<int64_t> segments = parse_positive_list(segment_sets[s], "--segments");
    const std::vector<int64_t> dilations = dilation_sets.empty() ? std::vector<int64_t>(segments.size(), 1)
                                                                 : parse_positive_list(dilation_sets[s], "--dilations");
    LT_CHECK(dilations.size() == segments.size(), "--dilations: set ", s, " has ", dilations.size(),
             " rates but its --segments set has ", segments.size(), " lengths");
    for (const std::string& mixing : mixings)
      for (bool causal : causal_modes)
        for (const std::string& impl : g.impls) {
          AttentionConfig c;
          apply_variant_flags(a.flags, c);
          c.segment_lengths = segments;
          c.dilation_rates = dilations;
          c.mixing = attention::parse_mixing(mixing);
          c.causal = causal;
          c.impl = impl;
          g.configs.push_back(c);
        }
  }
  return g;
}

// The settings of the quality model: the dilated flags of --quality-*, blocks and windows scaled
// to the short training sequence.
AttentionConfig quality_attention_config(const BenchArgs& a) {
  AttentionConfig c;
  apply_variant_flags(a.flags, c);
  c.segment_lengths = parse_positive_list(a.quality_segments, "--quality-segments");
  c.dilation_rates = parse_positive_list(a.quality_dilations, "--quality-dilations");
  LT_CHECK(c.segment_lengths.size() == c.dilation_rates.size(), "--quality-dilations: expected ",
           c.segment_lengths.size(), " rates (one per --quality-segments length), got ", c.dilation_rates.size());
  // Blocks and windows scaled to the short training sequence, so block_sparse stays sparse.
  c.block_size = std::max<int64_t>(1, std::min(c.block_size, a.quality_options.seq_len / 8));
  c.window = std::max<int64_t>(c.block_size, std::min(c.window, a.quality_options.seq_len / 4));
  c.causal = true;  // the language model is causal
  c.impl = parse_impl_list(a.impls).front();
  return c;
}

Json options_json(const BenchArgs& a, const Grid& g) {
  Json o;
  o["command_line"] = a.command_line;
  o["variants"] = g.variants;
  o["device"] = g.device.str();
  Json dtypes = Json::array();
  for (DType t : g.dtypes) dtypes.push_back(dtype_name(t));
  o["dtypes"] = dtypes;
  o["seq_lens"] = g.seq_lens;
  o["batches"] = g.batches;
  o["heads"] = g.heads;
  o["head_dims"] = g.head_dims;
  o["segments"] = a.segments;
  o["dilations"] = a.dilations;
  o["mixing"] = a.mixings;
  o["causal"] = a.causal;
  o["impls"] = g.impls;
  o["pattern"] = a.flags.pattern;
  o["block_size"] = a.flags.block_size;
  o["window"] = a.flags.window;
  o["global_blocks"] = a.flags.global_blocks;
  o["density"] = a.flags.density;
  o["pattern_seed"] = a.flags.seed;
  o["schedule"] = a.flags.schedule;
  o["order"] = a.flags.order;
  o["ranks"] = a.flags.ranks;
  o["inner"] = a.flags.inner;
  o["warmup"] = a.warmup;
  o["repeats"] = a.repeats;
  o["quick"] = a.quick;
  o["seed"] = a.seed;
  o["case_time_limit_s"] = a.case_time_limit;
  o["time_budget_s"] = a.time_budget;
  o["max_len_dtypes"] = a.max_len_dtypes.empty() ? dtypes : Json(split_list(a.max_len_dtypes, ','));
  o["max_len_budget_gib"] = a.max_len_budget_gib;
  o["max_len_cap"] = a.max_len_cap;
  o["max_len_granule"] = a.max_len_granule;
  o["quality"] = a.quality;
  const bench::QualityOptions& quality = a.quality_options;
  o["quality_steps"] = quality.steps;
  o["quality_seq_len"] = quality.seq_len;
  o["quality_batch"] = quality.batch;
  o["quality_segments"] = a.quality_segments;
  o["quality_dilations"] = a.quality_dilations;
  o["quality_precision"] = quality.precision;
  o["timing"] = g.device.is_cuda() ? "CUDA events on the current stream, median of the timed runs"
                                   : "steady_clock, median of the timed runs";
  o["flops"] = "forward 4 * attended_pairs * head_dim; forward_backward 3.5x forward (backward 2.5x)";
  o["forward_mode"] = "forward timed without recording (inference); forward_backward records and back-propagates";
  return o;
}

int run_bench(const BenchArgs& a) {
  bench::RunOptions run;
  run.grid = build_grid(a);
  run.grid.grid_given = false;
  const std::filesystem::path dir(a.out_dir);
  std::filesystem::create_directories(dir);
  run.cases = {a.warmup, a.repeats, a.case_time_limit, a.seed};
  run.search.budget_gib = a.max_len_budget_gib;
  run.search.cap = a.max_len_cap;
  run.search.granule = a.max_len_granule;
  run.search.case_time_limit = a.case_time_limit;
  run.search.seed = a.seed;
  run.max_len_search = a.max_len_budget_gib > 0;
  run.max_len_dtypes = split_list(a.max_len_dtypes, ',');
  run.quality = a.quality;
  if (a.quality) {
    run.quality_options = a.quality_options;
    run.quality_options.seed = a.seed;
    run.quality_options.attention = quality_attention_config(a);
    run.quality_options.precision = checked_precision(a.quality_options.precision, "--quality-precision");
  }
  run.time_budget = a.time_budget;

  Json doc = bench::run_benchmark(run, options_json(a, run.grid));
  const std::vector<std::string> pngs = bench::write_reports(doc, a.out_dir, a.no_plots);

  std::cout << bench::terminal_table(doc);
  for (const auto& note : doc["notes"]) std::cout << "note: " << note.get<std::string>() << "\n";
  std::cout << "wrote " << (dir / "bench.json").string() << ", bench.csv, bench.md";
  for (const std::string& png : pngs) std::cout << ", " << png;
  std::cout << "\n";
  if (bench::measured_rows(doc) == 0) {
    std::cerr << "longtape bench: error: no case could run (every case was skipped or failed; the reasons are in "
              << (dir / "bench.md").string() << ")\n";
    return 1;
  }
  return 0;
}

std::string join_argv(CLI::App& sub) {
  std::string line = "longtape bench";
  for (const CLI::Option* opt : sub.get_options()) {
    if (opt->count() == 0 || opt->get_name() == "--help") continue;
    line += " " + opt->get_name();
    const std::vector<std::string>& values = opt->results();
    if (opt->get_expected_max() == 0) continue;  // a flag: its name says it all
    for (const std::string& value : values) line += " " + value;
  }
  return line;
}

const RegisterCommand bench_command(
    "bench", "benchmark every attention variant: forward and forward+backward time, memory, max length, quality",
    [](CLI::App& sub) -> std::function<int()> {
      auto a = std::make_shared<BenchArgs>();
      sub.add_option("--variants", a->variants, "comma-separated variants (default: every registered one)");
      sub.add_option("--device", a->device, "cpu or cuda[:N] (default cpu)");
      sub.add_option("--dtype,--dtypes", a->dtypes, "comma-separated dtypes: f32, bf16, f64 (default f32)");
      auto* seq_lens = sub.add_option("--seq-lens", a->seq_lens,
                                      "comma-separated sequence lengths (default 1024,2048,4096 on the CPU, "
                                      "4096,...,65536 on a GPU)");
      sub.add_option("--batch", a->batches, "comma-separated batch sizes (default 1)");
      auto* heads = sub.add_option("--heads", a->heads, "comma-separated head counts (default 8)");
      auto* head_dim = sub.add_option("--head-dim", a->head_dims, "comma-separated head dims (default 64)");
      auto* segments = sub.add_option("--segments", a->segments,
                                      "dilated segment lengths; ';' separates configurations, e.g. \"512,1024;2048\" "
                                      "(default 512,1024,2048)");
      auto* dilations = sub.add_option("--dilations", a->dilations,
                                       "dilation rates, one ';'-separated set per --segments set (default 1,2,4)");
      sub.add_option("--mixing", a->mixings, "dilated mixing modes to run: lse, head_groups or lse,head_groups");
      sub.add_option("--causal", a->causal, "off (default), on, or both");
      sub.add_option("--impl", a->impls,
                     std::string(impl_help()) + "; a comma-separated list runs each (e.g. fused,composed)");
      add_variant_flags(sub, a->flags);
      auto* warmup = sub.add_option("--warmup", a->warmup, "untimed runs before timing (default 3)")
          ->transform(count_in<int>(0));
      auto* repeats = sub.add_option("--repeats", a->repeats, "timed runs; the median is reported (default 10)")
          ->transform(count_in<int>(1));
      sub.add_flag("--quick", a->quick,
                   "a grid small enough for a 2-core CPU in a few minutes (options given explicitly still apply)");
      auto* budget = sub.add_option("--max-len-budget-gib", a->max_len_budget_gib,
                                    "longest N whose forward+backward peak memory fits this many GiB (0 = skip)")
          ->transform(real_in(0.0, 1024.0));
      auto* cap = sub.add_option("--max-len-cap", a->max_len_cap, "largest N the search tries (default 1048576)")
          ->transform(count_in<int64_t>(1));
      sub.add_option("--max-len-granule", a->max_len_granule, "resolution of the search in tokens (default 256)")
          ->transform(count_in<int64_t>(1));
      auto* limit = sub.add_option("--case-time-limit", a->case_time_limit,
                                   "skip a case (and longer ones) once one forward+backward takes longer, seconds "
                                   "(default 60; 0 = no limit)")
          ->transform(real_in(0.0, kMaxSeconds));
      sub.add_option("--time-budget", a->time_budget,
                     "seconds for the whole run: cases left when it is spent are reported as skipped, longest "
                     "sequences first (default 0 = no budget)")
          ->transform(real_in(0.0, kMaxSeconds));
      sub.add_option("--max-len-dtype", a->max_len_dtypes,
                     "comma-separated dtypes for the max-length search (default: every dtype of the grid)");
      sub.add_option("--out-dir", a->out_dir, "folder for bench.json, bench.csv, bench.md and plots (default bench-out)");
      sub.add_flag("--no-plots", a->no_plots, "do not write or draw the gnuplot plots");
      sub.add_option("--seed", a->seed, "seed of the random inputs (default 0)")
          ->transform(integer_in<uint64_t>());
      sub.add_flag("--quality", a->quality, "also train a small model per variant on the recall task");
      auto* quality_steps = sub.add_option("--quality-steps", a->quality_options.steps,
                                           "training steps per variant (default 200)")
          ->transform(count_in<int64_t>(1));
      auto* quality_len = sub.add_option("--quality-seq-len", a->quality_options.seq_len,
                                         "recall sequence length (default 256)")
          ->transform(count_in<int64_t>(1));
      auto* quality_batch = sub.add_option("--quality-batch", a->quality_options.batch,
                                           "training batch size (default 16)")
          ->transform(count_in<int64_t>(1));
      auto* quality_segments = sub.add_option("--quality-segments", a->quality_segments,
                                              "dilated segments of the quality model (default 64,256)");
      auto* quality_dilations = sub.add_option("--quality-dilations", a->quality_dilations,
                                               "dilation rates of the quality model (default 1,4)");
      sub.add_option("--quality-precision", a->quality_options.precision, precision_help());
      return [a, &sub, seq_lens, heads, head_dim, segments, dilations, warmup, repeats, budget, cap, limit, quality_steps,
              quality_len, quality_batch, quality_segments, quality_dilations] {
        BenchArgs args = *a;
        args.command_line = join_argv(sub);
        const bool on_gpu = Device::parse(args.device).is_cuda();
        auto unset = [](const CLI::Option* opt) { return opt->count() == 0; };
        if (args.quick) {
          // Small enough for a 2-core CPU: every variant, three lengths, a small max-length search.
          if (unset(seq_lens)) args.seq_lens = "256,512,1024";
          if (unset(heads)) args.heads = "4";
          if (unset(head_dim)) args.head_dims = "32";
          if (unset(segments)) args.segments = "128,256,512";
          if (unset(dilations)) args.dilations = "1,2,4";
          if (unset(warmup)) args.warmup = 2;
          if (unset(repeats)) args.repeats = 10;
          if (unset(budget)) args.max_len_budget_gib = 0.0625;
          if (unset(cap)) args.max_len_cap = 16384;
          if (unset(limit)) args.case_time_limit = 10.0;
          if (unset(quality_steps)) args.quality_options.steps = 40;
          if (unset(quality_len)) args.quality_options.seq_len = 128;
          if (unset(quality_batch)) args.quality_options.batch = 8;
          if (unset(quality_segments)) args.quality_segments = "32,128";
          if (unset(quality_dilations)) args.quality_dilations = "1,4";
        } else if (unset(seq_lens)) {
          args.seq_lens = on_gpu ? "4096,8192,16384,32768,65536" : "1024,2048,4096";
        }
        return run_bench(args);
      };
    });

}  // namespace
}  // namespace longtape::cli
