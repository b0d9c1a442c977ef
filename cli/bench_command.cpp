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
// case stops the run.
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention/config.h"
#include "attention/multihead.h"
#include "attention/pattern_map.h"
#include "attention/registry.h"
#include "autograd/grad_mode.h"
#include "cli/bench.h"
#include "cli/command_registry.h"
#include "cli/impl_flag.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "cli/variant_flags.h"
#include "nn/data.h"
#include "nn/language_model.h"
#include "nn/optim.h"
#include "tensor/allocator.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"
#ifdef LONGTAPE_WITH_CUDA
#include "cuda/runtime.h"
#include "cuda/timer.h"
#endif

namespace longtape::cli {

namespace {

using bench::Json;
using attention::AttentionConfig;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
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
  std::optional<std::chrono::steady_clock::time_point> deadline;  // from time_budget
  std::string out_dir = "bench-out";
  bool no_plots = false;
  uint64_t seed = 0;
  bool quality = false;
  int64_t quality_steps = 200;
  int64_t quality_seq_len = 256;
  int64_t quality_batch = 16;
  std::string quality_segments = "64,256";
  std::string quality_dilations = "1,4";
  std::string command_line;
};

// ---------------------------------------------------------------------------------------------
// Small helpers

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

std::string first_line_of_command(const std::string& command) {
  std::string out;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[512];
    if (std::fgets(buffer, sizeof(buffer), pipe)) out = buffer;
    pclose(pipe);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

// The NVIDIA kernel driver version ("580.159.04"): from /proc, else from nvidia-smi.
std::string nvidia_driver_version() {
  std::ifstream in("/proc/driver/nvidia/version");
  std::string line;
  if (std::getline(in, line)) {
    std::istringstream words(line);
    std::string word;
    while (words >> word)
      if (!word.empty() && std::isdigit(static_cast<unsigned char>(word[0])) && word.find('.') != std::string::npos)
        return word;
  }
  const std::string smi = first_line_of_command("nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null");
  return smi.empty() ? "unknown" : smi;
}

Json machine_info(Device device) {
  Json m;
  struct utsname names {};
  if (uname(&names) == 0) {
    m["os"] = std::string(names.sysname) + " " + names.release;
    m["arch"] = names.machine;
    m["hostname"] = names.nodename;
  }
  m["cpu"] = cpu_model();
  m["cpu_threads"] = std::thread::hardware_concurrency();
#ifdef _OPENMP
  m["omp_max_threads"] = omp_get_max_threads();
#else
  m["omp_max_threads"] = 1;
#endif
#ifdef __VERSION__
  m["compiler"] = __VERSION__;
#endif
#ifdef NDEBUG
  m["build"] = "release";
#else
  m["build"] = "debug";
#endif
#ifdef LONGTAPE_WITH_CUDA
  m["cuda_backend"] = true;
#else
  m["cuda_backend"] = false;
#endif
  const std::string commit = first_line_of_command("git rev-parse --short HEAD 2>/dev/null");
  if (!commit.empty()) m["git_commit"] = commit;
  m["gpu"] = nullptr;
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) {
    const cuda::DeviceProperties p = cuda::device_properties(device.index);
    Json gpu;
    gpu["index"] = device.index;
    gpu["name"] = p.name;
    gpu["compute_capability"] = std::to_string(p.compute_major) + "." + std::to_string(p.compute_minor);
    gpu["memory_bytes"] = p.total_memory_bytes;
    gpu["multiprocessors"] = p.multiprocessors;
    gpu["driver_version"] = nvidia_driver_version();
    gpu["cuda_driver_version"] = cuda::cuda_version_string(p.driver_version);
    gpu["cuda_runtime_version"] = cuda::cuda_version_string(p.runtime_version);
    m["gpu"] = gpu;
  }
#else
  (void)device;
  (void)nvidia_driver_version;
#endif
  return m;
}

void synchronize(Device device) {
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) cuda::synchronize(device.index);
#else
  (void)device;
#endif
}

// Times one call of `fn`: CUDA events on the GPU, a monotonic clock (after a sync) otherwise.
class CaseTimer {
 public:
  explicit CaseTimer(Device device) : device_(device) {
#ifdef LONGTAPE_WITH_CUDA
    if (device.is_cuda()) events_ = std::make_unique<cuda::DeviceTimer>(device.index);
#endif
  }
  double milliseconds(const std::function<void()>& fn) {
#ifdef LONGTAPE_WITH_CUDA
    if (events_) {
      synchronize(device_);
      events_->start();
      fn();
      events_->stop();
      return events_->elapsed_ms();
    }
#endif
    synchronize(device_);
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    synchronize(device_);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

 private:
  Device device_;
#ifdef LONGTAPE_WITH_CUDA
  std::unique_ptr<cuda::DeviceTimer> events_;
#endif
};

struct Peak {
  int64_t allocated = 0;
  int64_t reserved = 0;
};

// Peak memory of one call of `fn`, the pool emptied first so reserved bytes mean what this call
// needed. `setup` runs after the reset (its allocations count).
Peak measure_peak(Device device, const std::function<void()>& fn) {
  synchronize(device);
  empty_cache(device);
  reset_peak_memory(device);
  fn();
  synchronize(device);
  const MemoryStats stats = memory_stats(device);
  return {stats.peak_allocated_bytes, stats.peak_reserved_bytes};
}

double median(std::vector<double> v) {
  LT_CHECK(!v.empty(), "bench: no timed run to take the median of");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Json timing_json(const std::vector<double>& ms) {
  LT_CHECK(!ms.empty(), "bench: no timed run to report");
  Json t;
  double sum = 0.0;
  for (double x : ms) sum += x;
  const double mean = sum / static_cast<double>(ms.size());
  double var = 0.0;
  for (double x : ms) var += (x - mean) * (x - mean);
  t["median_ms"] = median(ms);
  t["min_ms"] = *std::min_element(ms.begin(), ms.end());
  t["max_ms"] = *std::max_element(ms.begin(), ms.end());
  t["mean_ms"] = mean;
  t["stdev_ms"] = ms.size() > 1 ? std::sqrt(var / static_cast<double>(ms.size() - 1)) : 0.0;
  t["runs"] = ms.size();
  return t;
}

// How an exception becomes a row: out of memory and rejected configurations are skipped (they
// cannot run here), internal errors and anything that is not a longtape::Error are failures.
struct Classified {
  std::string status;
  std::string reason;
  bool out_of_memory = false;
};

Classified classify(const std::exception& e, const std::string& stage) {
  const std::string what = e.what();
  const bool oom = dynamic_cast<const OutOfMemoryError*>(&e) != nullptr || what.find("out of memory") != std::string::npos;
  if (oom) return {"skipped", "out of memory (" + stage + "): " + what, true};
  if (dynamic_cast<const Error*>(&e) != nullptr && what.rfind("internal error", 0) != 0)
    return {"skipped", "cannot run (" + stage + "): " + what, false};
  return {"failed", "error (" + stage + "): " + what, false};
}

// H x W with H * W = n and H <= W as close as possible: the token grid of the Hilbert order.
std::string near_square_grid(int64_t n) {
  int64_t h = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (h > 1 && n % h != 0) --h;
  h = std::max<int64_t>(h, 1);
  return std::to_string(h) + "x" + std::to_string(n / h);
}

bool uses_token_grid(const std::string& variant, const AttentionConfig& c) {
  return variant == "hilbert" || c.order == "hilbert";
}

// The config for one sequence length: a Hilbert grid that fits n when none was given.
AttentionConfig config_for_length(const std::string& variant, AttentionConfig c, int64_t n, bool grid_given) {
  if (uses_token_grid(variant, c) && !grid_given) c.grid = near_square_grid(n);
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

std::vector<int64_t> parse_positive_list(const std::string& text, const char* what) {
  std::vector<int64_t> values = attention::parse_int_list(text, what);
  for (int64_t v : values) LT_CHECK(v > 0, what, ": every value must be > 0, got ", text);
  check_list_bound(values, what);
  return values;
}

// ---------------------------------------------------------------------------------------------
// The grid

struct Grid {
  std::vector<std::string> variants;
  Device device;
  std::vector<DType> dtypes;
  std::vector<int64_t> seq_lens, batches, heads, head_dims;
  std::vector<AttentionConfig> configs;  // variant settings (heads and head_dim filled per case)
  std::vector<std::string> impls;        // requested implementations, one more grid dimension
  bool grid_given = false;
};

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
    LT_CHECK(is_floating(t), "--dtype: expected floating dtypes (f32, bf16, f64), got ", name);
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
    check_count("tokens per training step", {{"--quality-batch", a.quality_batch}, {"--quality-seq-len", a.quality_seq_len}});

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

// The distinct settings of `variant` among the grid's configs (a dense run does not repeat for
// every dilated segment set).
std::vector<AttentionConfig> configs_for(const std::string& variant, const std::vector<AttentionConfig>& all) {
  std::vector<AttentionConfig> out;
  std::set<std::string> seen;
  for (const AttentionConfig& c : all)
    if (seen.insert(config_label(variant, c)).second) out.push_back(c);
  return out;
}

// ---------------------------------------------------------------------------------------------
// One case

struct CaseShape {
  std::string variant;
  AttentionConfig config;  // num_heads, head_dim and grid set
  DType dtype;
  int64_t batch, seq_len;
};

struct Inputs {
  Tensor q, k, v, dout;
  int64_t bytes = 0;
};

Inputs make_inputs(const CaseShape& s, Device device, uint64_t seed) {
  manual_seed(seed);
  const Shape shape{s.batch, s.seq_len, s.config.num_heads, s.config.head_dim};
  auto random = [&] { return Tensor::randn(shape, DType::f32, device).to(s.dtype).detach(); };
  Inputs in;
  in.q = random().requires_grad_();
  in.k = random().requires_grad_();
  in.v = random().requires_grad_();
  in.dout = random();
  in.bytes = 4 * shape_numel(shape) * static_cast<int64_t>(dtype_size(s.dtype));
  return in;
}

std::shared_ptr<attention::Attention> make_module(const CaseShape& s, Device device) {
  std::shared_ptr<attention::Attention> module = attention::make_attention(s.variant, s.config);
  module->to(device);
  module->eval();  // no dropout while timing
  return module;
}

void clear_grads(Inputs& in, attention::Attention& module) {
  in.q.set_grad(Tensor());
  in.k.set_grad(Tensor());
  in.v.set_grad(Tensor());
  module.zero_grad();
}

Json case_header(const CaseShape& s, Device device) {
  Json row;
  row["variant"] = s.variant;
  row["status"] = "measured";
  row["reason"] = "";
  row["config_label"] = config_label(s.variant, s.config);
  row["device"] = device.str();
  row["dtype"] = dtype_name(s.dtype);
  row["batch"] = s.batch;
  row["seq_len"] = s.seq_len;
  row["heads"] = s.config.num_heads;
  row["head_dim"] = s.config.head_dim;
  row["causal"] = s.config.causal;
  row["config"] = config_json(s.config);
  row["implementation"] = "none";  // until a forward has run
  row["compute_precision"] = "none";
  return row;
}

// What ran the module's last forward, into a row or a phase's figures.
void record_ran(Json& where, const attention::Attention& module) {
  where["implementation"] = module.last_backend();
  where["compute_precision"] = module.last_precision();
}

struct SeriesState {
  std::string stop_reason;  // set once a case ran out of memory or time: longer ones are skipped
  double last_fwdbwd_ms = 0.0;
  int64_t last_seq_len = 0;
};

Json run_case(const CaseShape& s, const BenchArgs& a, Device device, SeriesState& series) {
  Json row = case_header(s, device);
  auto skip = [&](const std::string& status, const std::string& reason) {
    row["status"] = status;
    row["reason"] = reason;
    return row;
  };
  if (!series.stop_reason.empty()) return skip("skipped", series.stop_reason);
  const double limit_ms = a.case_time_limit * 1000.0;
  if (a.case_time_limit > 0 && series.last_seq_len > 0) {
    // Attention cost grows at most quadratically in N: refuse a case predicted far over the limit.
    const double ratio = static_cast<double>(s.seq_len) / static_cast<double>(series.last_seq_len);
    const double predicted = series.last_fwdbwd_ms * ratio * ratio;
    if (predicted > 4.0 * limit_ms) {
      series.stop_reason = "too slow: forward+backward predicted to take about " + format_number(predicted / 1000.0) +
                           " s at N = " + std::to_string(s.seq_len) + " (--case-time-limit " +
                           format_number(a.case_time_limit) + " s)";
      return skip("skipped", series.stop_reason);
    }
  }

  std::string stage = "construct";
  try {
    std::shared_ptr<attention::Attention> module = make_module(s, device);
    stage = "inputs";
    Inputs in = make_inputs(s, device, a.seed);
    row["inputs_bytes"] = in.bytes;

    stage = "attended pairs";
    int64_t pairs = 0;
    if (auto analytic = attention::analytic_attended_pairs(s.variant, s.config, s.seq_len)) {
      pairs = *analytic;
      row["pairs_method"] = "analytic";
    } else {
      pairs = attention::probed_attended_pairs(*module, s.seq_len, s.dtype, device);
      row["pairs_method"] = "probe";
    }
    pairs *= s.batch;
    const double forward_flops = 4.0 * static_cast<double>(pairs) * static_cast<double>(s.config.head_dim);
    const double fwdbwd_flops = forward_flops * 3.5;
    row["attended_pairs"] = pairs;
    row["flops"] = {{"forward", forward_flops}, {"forward_backward", fwdbwd_flops}};

    CaseTimer timer(device);
    auto forward_once = [&] {
      NoGradGuard no_grad;
      attention::AttentionOutput result = module->forward_with_lse(in.q, in.k, in.v);
      (void)result;
    };
    auto fwdbwd_once = [&] {
      Tensor out = module->forward(in.q, in.k, in.v);
      out.backward(in.dout);
    };
    auto timed_fwdbwd = [&] {
      clear_grads(in, *module);
      return timer.milliseconds(fwdbwd_once);
    };

    stage = "forward+backward";
    // The first run doubles as the time-limit check.
    const double first_ms = timed_fwdbwd();
    record_ran(row, *module);
    if (a.case_time_limit > 0 && first_ms > limit_ms) {
      series.stop_reason = "too slow: one forward+backward took " + format_number(first_ms / 1000.0) + " s at N = " +
                           std::to_string(s.seq_len) + " (--case-time-limit " + format_number(a.case_time_limit) + " s)";
      return skip("skipped", series.stop_reason);
    }
    for (int i = 1; i < a.warmup; ++i) timed_fwdbwd();
    std::vector<double> fwdbwd_ms;
    for (int i = 0; i < a.repeats; ++i) fwdbwd_ms.push_back(timed_fwdbwd());
    clear_grads(in, *module);
    Json fwdbwd_ran;
    record_ran(fwdbwd_ran, *module);

    stage = "forward";
    for (int i = 0; i < a.warmup; ++i) timer.milliseconds(forward_once);
    std::vector<double> forward_ms;
    for (int i = 0; i < a.repeats; ++i) forward_ms.push_back(timer.milliseconds(forward_once));
    Json forward_ran;
    record_ran(forward_ran, *module);

    stage = "memory";
    const Peak forward_peak = measure_peak(device, forward_once);
    const Peak fwdbwd_peak = measure_peak(device, [&] {
      clear_grads(in, *module);
      fwdbwd_once();
    });
    clear_grads(in, *module);

    const double tokens = static_cast<double>(s.batch * s.seq_len);
    auto figures = [&](const std::vector<double>& ms, double flops, const Peak& peak, const Json& ran) {
      Json t = timing_json(ms);
      const double seconds = t["median_ms"].get<double>() / 1000.0;
      t["tokens_per_s"] = tokens / seconds;
      t["tflops"] = flops / seconds / 1e12;
      t["peak_allocated_bytes"] = peak.allocated;
      t["peak_reserved_bytes"] = peak.reserved;
      t.update(ran);
      return t;
    };
    row.update(forward_ran);
    row["forward"] = figures(forward_ms, forward_flops, forward_peak, forward_ran);
    row["forward_backward"] = figures(fwdbwd_ms, fwdbwd_flops, fwdbwd_peak, fwdbwd_ran);
    series.last_fwdbwd_ms = median(fwdbwd_ms);
    series.last_seq_len = s.seq_len;
  } catch (const std::exception& e) {
    const Classified c = classify(e, stage);
    row.erase("forward");
    row.erase("forward_backward");
    if (c.out_of_memory)
      series.stop_reason = "a shorter sequence (N = " + std::to_string(s.seq_len) + ") already ran out of memory";
    empty_cache(device);
    return skip(c.status, c.reason);
  }
  return row;
}

// ---------------------------------------------------------------------------------------------
// Max sequence length under a memory budget

struct Probe {
  bool fits = false;
  bool out_of_memory = false;
  Peak peak;
  double ms = 0.0;
};

Probe probe_length(CaseShape s, const Grid& g, const BenchArgs& a, int64_t budget) {
  s.config = config_for_length(s.variant, s.config, s.seq_len, g.grid_given);
  Probe p;
  try {
    const auto t0 = std::chrono::steady_clock::now();
    p.peak = measure_peak(g.device, [&] {
      std::shared_ptr<attention::Attention> module = make_module(s, g.device);
      Inputs in = make_inputs(s, g.device, a.seed);
      Tensor out = module->forward(in.q, in.k, in.v);
      out.backward(in.dout);
    });
    p.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    p.fits = p.peak.allocated <= budget;
  } catch (const std::exception& e) {
    const Classified c = classify(e, "forward+backward");
    empty_cache(g.device);
    if (!c.out_of_memory) throw;
    p.out_of_memory = true;
    p.fits = false;
  }
  empty_cache(g.device);
  return p;
}

Json search_header(const CaseShape& s, const Grid& g, const BenchArgs& a) {
  Json row;
  row["variant"] = s.variant;
  row["status"] = "measured";
  row["reason"] = "";
  row["config_label"] = config_label(s.variant, s.config);
  row["device"] = g.device.str();
  row["dtype"] = dtype_name(s.dtype);
  row["batch"] = s.batch;
  row["heads"] = s.config.num_heads;
  row["head_dim"] = s.config.head_dim;
  row["causal"] = s.config.causal;
  row["config"] = config_json(s.config);
  row["budget_bytes"] = static_cast<int64_t>(a.max_len_budget_gib * kGiB);
  row["granule"] = a.max_len_granule;
  row["cap"] = a.max_len_cap;
  return row;
}

Json search_skipped(const CaseShape& s, const Grid& g, const BenchArgs& a, const std::string& reason) {
  Json row = search_header(s, g, a);
  row["status"] = "skipped";
  row["reason"] = reason;
  row["max_seq_len"] = 0;
  row["peak_allocated_bytes"] = 0;
  row["peak_reserved_bytes"] = 0;
  row["reached_cap"] = false;
  row["note"] = "";
  row["probes"] = Json::array();
  row["seconds"] = 0.0;
  return row;
}

Json search_max_len(CaseShape s, const Grid& g, const BenchArgs& a) {
  const int64_t budget = static_cast<int64_t>(a.max_len_budget_gib * kGiB);
  const int64_t granule = a.max_len_granule, cap = a.max_len_cap;
  Json row = search_header(s, g, a);
  Json probes = Json::array();
  const auto t0 = std::chrono::steady_clock::now();
  const double limit_ms = a.case_time_limit * 1000.0;

  int64_t lo = 0, hi = 0;  // lo fits (0 = none yet), hi does not (0 = unknown)
  Probe lo_probe;
  std::string stopped;
  auto run = [&](int64_t n) {
    if (a.deadline && std::chrono::steady_clock::now() > *a.deadline) {
      stopped = "stopped early: the time budget (--time-budget) ran out during the search";
      return Probe{};
    }
    s.seq_len = n;
    Probe p = probe_length(s, g, a, budget);
    probes.push_back({{"seq_len", n},
                      {"fits", p.fits},
                      {"out_of_memory", p.out_of_memory},
                      {"peak_allocated_bytes", p.peak.allocated},
                      {"peak_reserved_bytes", p.peak.reserved},
                      {"ms", p.ms}});
    if (p.fits) {
      lo = n;
      lo_probe = p;
    } else {
      hi = n;
    }
    if (a.case_time_limit > 0 && p.ms > limit_ms)
      stopped = "stopped early: one forward+backward took " + format_number(p.ms / 1000.0) + " s at N = " +
                std::to_string(n) + " (--case-time-limit " + format_number(a.case_time_limit) + " s)";
    return p;
  };
  try {
    int64_t n = std::min(cap, std::max(granule, g.seq_lens.front() / granule * granule));
    run(n);
    while (lo > 0 && hi == 0 && lo < cap && stopped.empty()) {
      // Grow by at most 2x, and by no more than memory that grows quadratically in N allows, so
      // that no probe asks for far more than the budget (the CPU has no out-of-memory error).
      const double room = std::sqrt(static_cast<double>(budget) / std::max<double>(1.0, static_cast<double>(lo_probe.peak.allocated)));
      int64_t next = std::min<int64_t>(2 * lo, static_cast<int64_t>(static_cast<double>(lo) * room));
      next = next / granule * granule;
      if (next <= lo) next = lo + granule;
      next = std::min(next, cap);
      if (a.case_time_limit > 0) {
        const double ratio = static_cast<double>(next) / static_cast<double>(lo);
        if (lo_probe.ms * ratio * ratio > 4.0 * limit_ms) {
          stopped = "stopped early: a forward+backward at N = " + std::to_string(next) + " is predicted to take over " +
                    format_number(4.0 * a.case_time_limit) + " s (--case-time-limit)";
          break;
        }
      }
      run(next);
    }
    while (lo > 0 && hi > 0 && hi - lo > granule && stopped.empty()) {
      const int64_t mid = (lo + hi) / 2 / granule * granule;
      if (mid <= lo || mid >= hi) break;
      run(mid);
    }
    if (lo == 0 && hi > 0) {
      row["status"] = "skipped";
      row["reason"] = "even N = " + std::to_string(hi) + " does not fit the budget of " +
                      format_number(a.max_len_budget_gib) + " GiB";
    } else if (lo == 0) {
      row["status"] = "skipped";
      row["reason"] = stopped.empty() ? std::string("no sequence length was measured") : stopped;
    }
  } catch (const std::exception& e) {
    const Classified c = classify(e, "max length search");
    row["status"] = c.status;
    row["reason"] = c.reason;
  }
  row["max_seq_len"] = lo;
  row["peak_allocated_bytes"] = lo > 0 ? lo_probe.peak.allocated : 0;
  row["peak_reserved_bytes"] = lo > 0 ? lo_probe.peak.reserved : 0;
  row["reached_cap"] = lo >= cap;
  row["note"] = stopped;
  row["probes"] = probes;
  row["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

// ---------------------------------------------------------------------------------------------
// Quality: the same small model trained with each variant on the recall task

AttentionConfig quality_attention_config(const BenchArgs& a) {
  AttentionConfig c;
  apply_variant_flags(a.flags, c);
  c.segment_lengths = parse_positive_list(a.quality_segments, "--quality-segments");
  c.dilation_rates = parse_positive_list(a.quality_dilations, "--quality-dilations");
  LT_CHECK(c.segment_lengths.size() == c.dilation_rates.size(), "--quality-dilations: expected ",
           c.segment_lengths.size(), " rates (one per --quality-segments length), got ", c.dilation_rates.size());
  // Blocks and windows scaled to the short training sequence, so block_sparse stays sparse.
  c.block_size = std::max<int64_t>(1, std::min(c.block_size, a.quality_seq_len / 8));
  c.window = std::max<int64_t>(c.block_size, std::min(c.window, a.quality_seq_len / 4));
  c.causal = true;  // the language model is causal
  c.impl = parse_impl_list(a.impls).front();
  return c;
}

Json quality_skipped(const std::string& variant, const BenchArgs& a, const std::string& reason) {
  Json row;
  row["variant"] = variant;
  row["status"] = "skipped";
  row["reason"] = reason;
  row["config_label"] = config_label(variant, quality_attention_config(a));
  row["steps"] = a.quality_steps;
  row["seq_len"] = a.quality_seq_len;
  row["batch"] = a.quality_batch;
  return row;
}

Json run_quality(const std::string& variant, const BenchArgs& a, Device device) {
  Json row;
  row["variant"] = variant;
  row["status"] = "measured";
  row["reason"] = "";
  const AttentionConfig attention_config = quality_attention_config(a);
  row["config_label"] = config_label(variant, attention_config);
  row["steps"] = a.quality_steps;
  row["seq_len"] = a.quality_seq_len;
  row["batch"] = a.quality_batch;
  std::string stage = "setup";
  try {
    nn::RecallTaskConfig task_config;
    task_config.seq_len = a.quality_seq_len;
    task_config.num_pairs = 8;
    task_config.num_queries = 4;
    task_config.seed = a.seed;
    nn::RecallTask task(task_config);

    nn::LanguageModelConfig mc;
    mc.vocab_size = task.vocab_size();
    mc.max_seq_len = task.seq_len();
    mc.embed_dim = 64;
    mc.num_layers = 2;
    mc.num_heads = 4;
    mc.attention = variant;
    mc.attention_config = attention_config;
    if (uses_token_grid(variant, attention_config)) mc.attention_config.grid = near_square_grid(task.seq_len());
    row["config"] = config_json([&] {
      AttentionConfig shown = mc.attention_config;
      shown.num_heads = mc.num_heads;
      shown.head_dim = mc.embed_dim / mc.num_heads;
      return shown;
    }());
    row["model"] = {{"embed_dim", mc.embed_dim},
                    {"num_layers", mc.num_layers},
                    {"num_heads", mc.num_heads},
                    {"vocab_size", mc.vocab_size},
                    {"optimizer", "AdamW lr 3e-3 cosine to 3e-4, weight decay 0.01, clip 1.0"}};
    manual_seed(a.seed);
    nn::LanguageModel model(mc);
    model.to(device);
    nn::AdamWOptions adamw;
    adamw.lr = 3e-3;
    adamw.weight_decay = 0.01;
    adamw.decays = nn::decay_matrices_only;
    nn::AdamW optimizer(model.named_parameters(), adamw);
    nn::CosineSchedule schedule{3e-3, 3e-4, std::max<int64_t>(1, a.quality_steps / 10), a.quality_steps};

    stage = "training";
    std::vector<double> step_ms, losses;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t step = 0; step < a.quality_steps; ++step) {
      const auto s0 = std::chrono::steady_clock::now();
      nn::Batch batch = task.batch(a.quality_batch, step, nn::Split::train, device);
      Tensor loss = cross_entropy(model.forward(batch.inputs), batch.targets, nn::kIgnoreIndex);
      optimizer.zero_grad();
      loss.backward();
      nn::clip_grad_norm(model.parameters(), 1.0);
      schedule.apply(optimizer, step);
      optimizer.step();
      losses.push_back(loss.item());  // item() waits for the device
      if (step == 0) record_ran(row, model.blocks->at_as<nn::TransformerBlock>(0)->attn->core());
      step_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count());
    }
    const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    stage = "evaluation";
    model.eval();
    NoGradGuard no_grad;
    nn::AccuracyCount total;
    for (int64_t i = 0; i < 4; ++i) {
      nn::Batch test = task.batch(32, i, nn::Split::heldout, device);
      const nn::AccuracyCount part = nn::accuracy(model.forward(test.inputs), test.targets);
      total.correct += part.correct;
      total.total += part.total;
    }
    const size_t tail = std::min<size_t>(10, losses.size());
    double tail_loss = 0.0;
    for (size_t i = losses.size() - tail; i < losses.size(); ++i) tail_loss += losses[i];
    row["accuracy"] = total.value();
    row["scored_positions"] = total.total;
    row["chance"] = 1.0 / static_cast<double>(task.config().num_values);
    row["final_loss"] = tail > 0 ? tail_loss / static_cast<double>(tail) : 0.0;
    row["ms_per_step"] = median(step_ms);
    row["train_seconds"] = train_seconds;
    row["tokens_per_s"] = static_cast<double>(a.quality_batch * a.quality_seq_len) / (median(step_ms) / 1000.0);
    row["parameters"] = model.num_parameters();
  } catch (const std::exception& e) {
    const Classified c = classify(e, stage);
    row["status"] = c.status;
    row["reason"] = c.reason;
    empty_cache(device);
  }
  return row;
}

// ---------------------------------------------------------------------------------------------

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
  o["quality_steps"] = a.quality_steps;
  o["quality_seq_len"] = a.quality_seq_len;
  o["quality_batch"] = a.quality_batch;
  o["quality_segments"] = a.quality_segments;
  o["quality_dilations"] = a.quality_dilations;
  o["timing"] = g.device.is_cuda() ? "CUDA events on the current stream, median of the timed runs"
                                   : "steady_clock, median of the timed runs";
  o["flops"] = "forward 4 * attended_pairs * head_dim; forward_backward 3.5x forward (backward 2.5x)";
  o["forward_mode"] = "forward timed without recording (inference); forward_backward records and back-propagates";
  return o;
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  LT_CHECK(static_cast<bool>(out), "bench: cannot write ", path.string());
  out << text;
  LT_CHECK(static_cast<bool>(out), "bench: writing ", path.string(), " failed");
}

int run_bench(BenchArgs a) {
  Grid g = build_grid(a);
  g.grid_given = false;
  const std::filesystem::path dir(a.out_dir);
  std::filesystem::create_directories(dir);

  Json doc;
  doc["schema_version"] = 1;
  doc["tool"] = "longtape";
  doc["tool_version"] = "0.1.0";
  doc["created_utc"] = utc_now();
  doc["machine"] = machine_info(g.device);
  doc["config"] = options_json(a, g);
  doc["results"] = Json::array();
  doc["max_seq_len"] = Json::array();
  doc["quality"] = Json::array();
  std::vector<std::string> notes;

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  const std::string out_of_time =
      "time budget exhausted (--time-budget " + format_number(a.time_budget) + " s) before this case";
  auto over_budget = [&] { return a.time_budget > 0 && elapsed_s() > a.time_budget; };
  if (a.time_budget > 0)
    a.deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                          std::chrono::duration<double>(a.time_budget));

  // Every series (variant, setting, dtype, shape) over the sequence lengths. Lengths are the outer
  // loop, so that a time budget cuts the longest sequences of every variant, not whole variants.
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
        row = run_case(s, a, g.device, series.state);
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

  if (a.max_len_budget_gib > 0) {
    const std::vector<std::string> search_dtypes = split_list(a.max_len_dtypes, ',');
    for (const std::string& variant : g.variants)
      for (const AttentionConfig& setting : configs_for(variant, g.configs))
        for (DType dtype : g.dtypes) {
          if (!search_dtypes.empty() &&
              std::find(search_dtypes.begin(), search_dtypes.end(), std::string(dtype_name(dtype))) == search_dtypes.end())
            continue;
          CaseShape s{variant, setting, dtype, g.batches.front(), 0};
          s.config.num_heads = g.heads.front();
          s.config.head_dim = g.head_dims.front();
          std::cerr << "bench: max length of " << variant << " [" << config_label(variant, s.config) << "] "
                    << dtype_name(dtype) << " within " << a.max_len_budget_gib << " GiB" << std::flush;
          Json row;
          if (over_budget()) {
            row = search_skipped(s, g, a, out_of_time);
          } else {
            row = search_max_len(s, g, a);
          }
          std::cerr << " -> " << row["max_seq_len"].get<int64_t>() << " (" << row["status"].get<std::string>() << ")\n";
          doc["max_seq_len"].push_back(std::move(row));
        }
  }
  if (a.quality) {
    for (const std::string& variant : g.variants) {
      std::cerr << "bench: quality of " << variant << " (" << a.quality_steps << " steps)" << std::flush;
      Json row = over_budget() ? quality_skipped(variant, a, out_of_time) : run_quality(variant, a, g.device);
      std::cerr << " -> " << row["status"].get<std::string>();
      if (row.contains("accuracy")) std::cerr << " accuracy " << row["accuracy"].get<double>();
      std::cerr << "\n";
      doc["quality"].push_back(std::move(row));
    }
  }
  doc["total_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::vector<std::string> outputs = {"bench.json", "bench.csv", "bench.md"};
  write_text(dir / "bench.csv", bench::csv_report(doc));
  std::vector<std::string> pngs;
  if (a.no_plots) {
    notes.push_back("plots not drawn: --no-plots");
  } else {
    pngs = bench::write_plots(doc, dir, notes);
    outputs.push_back("plots.gp");
  }
  for (const std::string& png : pngs) outputs.push_back(png);
  doc["outputs"] = outputs;
  doc["notes"] = notes;
  write_text(dir / "bench.md", bench::markdown_report(doc));
  write_text(dir / "bench.json", doc.dump(2) + "\n");

  std::cout << bench::terminal_table(doc);
  for (const std::string& note : notes) std::cout << "note: " << note << "\n";
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
      auto* quality_steps = sub.add_option("--quality-steps", a->quality_steps, "training steps per variant (default 200)")
          ->transform(count_in<int64_t>(1));
      auto* quality_len = sub.add_option("--quality-seq-len", a->quality_seq_len, "recall sequence length (default 256)")
          ->transform(count_in<int64_t>(1));
      auto* quality_batch = sub.add_option("--quality-batch", a->quality_batch, "training batch size (default 16)")
          ->transform(count_in<int64_t>(1));
      auto* quality_segments = sub.add_option("--quality-segments", a->quality_segments,
                                              "dilated segments of the quality model (default 64,256)");
      auto* quality_dilations = sub.add_option("--quality-dilations", a->quality_dilations,
                                               "dilation rates of the quality model (default 1,4)");
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
          if (unset(quality_steps)) args.quality_steps = 40;
          if (unset(quality_len)) args.quality_seq_len = 128;
          if (unset(quality_batch)) args.quality_batch = 8;
          if (unset(quality_segments)) args.quality_segments = "32,128";
          if (unset(quality_dilations)) args.quality_dilations = "1,4";
        } else if (unset(seq_lens)) {
          args.seq_lens = on_gpu ? "4096,8192,16384,32768,65536" : "1024,2048,4096";
        }
        return run_bench(std::move(args));
      };
    });

}  // namespace

}  // namespace longtape::cli
