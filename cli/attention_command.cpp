// `longtape attention`: runs one registered attention variant on .npy inputs and writes its
// output (and, given --dout, the input gradients) as .npy files.
//
//   longtape attention --variant dilated --segments 2048,4096 --dilations 1,2 --q q.npy --k k.npy
//       --v v.npy [--dout dout.npy] --out-dir out/
//   longtape attention --variant ring --inner dilated --ranks P [--ring-layout contiguous|zigzag] ...
//       (as in train and bench; the old --parallel ring|head spelling still works and is deprecated)
//   longtape attention --variant block_sparse --pattern random --density 0.5 --block-size 64 ...
//       [--schedule hilbert] [--order hilbert --grid 32x32]   (order applies to any variant)
//       [--impl auto|fused|composed]
//
// Inputs are (B, N, H, D) float32/float64 arrays in C order; H and D are read from q. Outputs:
// DIR/o.npy (B, N, H, D), DIR/lse.npy (B, H, N) and with --dout DIR/dq.npy, dk.npy, dv.npy; all
// float64 when computing in f64, float32 otherwise. One line on stdout says which implementation
// ran the forward and in what precision. Every input is read and checked before anything is
// computed, and the outputs are written only when the whole command succeeded.
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attention/config.h"
#include "attention/registry.h"
#include "cli/command_registry.h"
#include "cli/impl_flag.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "cli/variant_flags.h"
#include "io/tensor_io.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::cli {

namespace {

// Options that become AttentionConfig fields: the variant settings every command shares
// (VariantFlags, registered here with this command's own help and aliases) and the dilated
// branches, mixing, scale and kernels. A variant that needs more settings adds its flags in
// add_config_flags and turns them into config fields in to_config.
struct ConfigFlags : VariantFlags {
  std::string segments;
  std::string dilations;
  std::string mixing = "lse";
  bool causal = false;
  std::optional<double> scale;
  std::string parallel = "none";  // none | ring | head (deprecated spelling of --variant ring|head_parallel)
  std::string grid;               // token grid of the Hilbert order
  std::string impl = "auto";
};

void add_config_flags(CLI::App& sub, ConfigFlags& f) {
  sub.add_option("--segments", f.segments, "dilated: segment lengths, comma-separated (e.g. 2048,4096)");
  sub.add_option("--dilations", f.dilations,
                 "dilated: dilation rates, comma-separated, one per segment length (default: all 1)");
  sub.add_option("--mixing", f.mixing, "dilated: how branches combine: lse (default) or head_groups");
  sub.add_flag("--causal", f.causal, "causal attention: a query sees only keys at positions <= its own");
  sub.add_option("--scale", f.scale, "softmax scale (default 1/sqrt(head_dim))")
      ->transform(real_in(0.0, std::numeric_limits<double>::max(), /*lo_open=*/true));
  sub.add_option("--ranks", f.ranks,
                 "ring, head_parallel: number of ranks P, run as threads of this process (default 1)")
      ->transform(integer_in<int64_t>(1, kMaxRanks));
  sub.add_option("--inner", f.inner, "hilbert, ring, head_parallel: the core variant they run (default dilated)");
  sub.add_option("--parallel", f.parallel,
                 "deprecated: --parallel ring|head --variant X is --variant ring|head_parallel --inner X");
  sub.add_option("--ring-layout", f.ring_layout,
                 "ring: tokens per rank, contiguous (default) or zigzag (chunks r and 2P-1-r of 2P: balanced "
                 "causal work)");
  sub.add_option("--pattern", f.pattern,
                 "block_sparse: all, local_window (default), dilated (block distances from --dilations), "
                 "global_local, random or adaptive");
  sub.add_option("--block-size", f.block_size, "block_sparse: tokens per block (default 64)")
      ->transform(count_in<int64_t>(1));
  sub.add_option("--density", f.density, "block_sparse random/adaptive: fraction of key blocks kept (default 0.25)")
      ->transform(real_in(0.0, 1.0));
  sub.add_option("--window", f.window, "block_sparse local_window/global_local: window in tokens (default 256)")
      ->transform(count_in<int64_t>(0));
  sub.add_option("--global-blocks", f.global_blocks, "block_sparse global_local: leading global blocks (default 1)")
      ->transform(count_in<int64_t>(0));
  sub.add_option("--pattern-seed,--seed", f.seed,
                 "block_sparse random: seed of the drawn blocks (default 0; --seed is a deprecated alias)")
      ->transform(integer_in<uint64_t>());
  sub.add_option("--order", f.order, "token order: natural (default) or hilbert (any variant)");
  sub.add_option("--grid", f.grid, "with --order hilbert: token grid HxW (default: a square, N must be one)");
  sub.add_option("--schedule", f.schedule,
                 "block_sparse: block processing order, natural (default) or hilbert (same output)");
  sub.add_option("--impl", f.impl, impl_help());
}

attention::AttentionConfig to_config(const ConfigFlags& f, int64_t num_heads, int64_t head_dim) {
  attention::AttentionConfig config;
  config.num_heads = num_heads;
  config.head_dim = head_dim;
  if (!f.segments.empty()) {
    config.segment_lengths = attention::parse_int_list(f.segments, "--segments");
    config.dilation_rates = f.dilations.empty() ? std::vector<int64_t>(config.segment_lengths.size(), 1)
                                                : attention::parse_int_list(f.dilations, "--dilations");
  } else if (f.pattern == "dilated" && !f.dilations.empty()) {
    config.dilation_rates = attention::parse_int_list(f.dilations, "--dilations");  // block_sparse block distances
  } else {
    LT_CHECK(f.dilations.empty(), "--dilations needs --segments (one segment length per dilation rate), or "
             "--pattern dilated (block distances of block_sparse)");
  }
  config.mixing = attention::parse_mixing(f.mixing);
  config.causal = f.causal;
  config.softmax_scale = f.scale;
  LT_CHECK(f.parallel == "none" || f.parallel == "ring" || f.parallel == "head",
           "--parallel must be none, ring or head, got \"", f.parallel, "\"");
  LT_CHECK(f.ranks >= 1, "--ranks must be >= 1, got ", f.ranks);
  config.parallel = f.parallel;
  apply_variant_flags(f, config);  // its inner variant is variant_to_run's to set
  config.grid = f.grid;
  config.impl = checked_impl(f.impl);
  return config;
}

// The registered name to run: --variant itself, or the parallel wrapper running it as inner variant.
std::string variant_to_run(const ConfigFlags& f, const std::string& variant, attention::AttentionConfig& config) {
  const bool ring = variant == "ring" || f.parallel == "ring";
  LT_CHECK(f.ring_layout == "contiguous" || ring, "--ring-layout ", f.ring_layout, " needs --variant ring, got --variant ",
           variant);
  if (f.parallel == "none") {
    config.inner_variant = f.inner;
    LT_CHECK(f.ranks == 1 || variant == "ring" || variant == "head_parallel", "--ranks ", f.ranks,
             " needs --variant ring or head_parallel, got --variant ", variant);
    return variant;
  }
  config.inner_variant = variant;
  return attention::parallel_variant(f.parallel);
}

// Flag values the library would otherwise meet only after the inputs are read: every list value
// and the grid within the command line's size limits (size_limits.h).
void check_flag_sizes(const ConfigFlags& f) {
  if (!f.segments.empty()) check_list_bound(attention::parse_int_list(f.segments, "--segments"), "--segments");
  if (!f.dilations.empty()) check_list_bound(attention::parse_int_list(f.dilations, "--dilations"), "--dilations");
  check_grid_text(f.grid, "--grid");
}

Tensor load_input(const std::string& path, const char* what) {
  Tensor t = io::load_npy(path);
  LT_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, "--", what, " ", path,
           ": expected a float32 or float64 array, got ", dtype_name(t.dtype()));
  LT_CHECK(t.dim() == 4, "--", what, " ", path, ": expected a 4-d (batch, sequence, heads, head_dim) array, got shape ",
           shape_str(t.shape()));
  for (int64_t d = 0; d < 4; ++d)
    LT_CHECK(t.size(d) >= 1, "--", what, " ", path, ": every dimension of (batch, sequence, heads, head_dim) must be "
             ">= 1, got shape ", shape_str(t.shape()));
  return t;
}

// Writes every (file name, tensor) into `dir` or none of them: each goes to a temporary name
// first, and only when all are written are they renamed into place (earlier outputs of the same
// names stay untouched when anything fails).
void save_all(const std::filesystem::path& dir, const std::vector<std::pair<std::string, Tensor>>& outputs) {
  std::filesystem::create_directories(dir);
  const std::string suffix = ".partial." + std::to_string(getpid());
  std::vector<std::filesystem::path> written;
  try {
    for (const auto& [name, tensor] : outputs) {
      const std::filesystem::path temp = dir / (name + suffix);
      written.push_back(temp);
      io::save_npy(temp.string(), tensor);
    }
    for (const auto& [name, tensor] : outputs) std::filesystem::rename(dir / (name + suffix), dir / name);
  } catch (...) {
    std::error_code ignored;
    for (const auto& temp : written) std::filesystem::remove(temp, ignored);
    throw;
  }
}

struct AttentionArgs {
  std::string variant;
  ConfigFlags flags;
  std::string device = "cpu";
  std::string dtype;
  std::string q, k, v, dout;
  std::string out_dir;
};

// Reads and checks every input (flags, q, k, v, dout) before computing, and writes the outputs
// only once everything has been computed: a failing command leaves no output behind.
int run_attention(const AttentionArgs& a) {
  check_flag_sizes(a.flags);
  const Device device = Device::parse(a.device);
  LT_CHECK(!device.is_cuda() || cuda_available(), "--device ", a.device,
           ": no CUDA device is available (or longtape was built without CUDA)");
  Tensor q_file = load_input(a.q, "q"), k_file = load_input(a.k, "k"), v_file = load_input(a.v, "v");
  LT_CHECK(k_file.shape() == v_file.shape(), "--k and --v must have the same shape, got ", shape_str(k_file.shape()),
           " and ", shape_str(v_file.shape()));
  LT_CHECK(q_file.size(0) == k_file.size(0) && q_file.size(2) == k_file.size(2) && q_file.size(3) == k_file.size(3),
           "--q ", shape_str(q_file.shape()), " and --k ", shape_str(k_file.shape()),
           " must agree in batch, heads and head_dim");
  const DType dtype = a.dtype.empty() ? q_file.dtype() : dtype_from_name(a.dtype);
  LT_CHECK(is_floating(dtype), "--dtype must be f32, f64, bf16 or f16, got ", dtype_name(dtype));
  const DType out_dtype = dtype == DType::f64 ? DType::f64 : DType::f32;
  const bool backward = !a.dout.empty();
  Tensor dout_file;
  if (backward) {
    dout_file = io::load_npy(a.dout);
    LT_CHECK(dout_file.dtype() == DType::f32 || dout_file.dtype() == DType::f64, "--dout ", a.dout,
             ": expected a float32 or float64 array, got ", dtype_name(dout_file.dtype()));
    LT_CHECK(dout_file.shape() == q_file.shape(), "--dout ", a.dout, ": expected shape ", shape_str(q_file.shape()),
             " (the output's, which is q's), got ", shape_str(dout_file.shape()));
  }

  auto config = to_config(a.flags, q_file.size(2), q_file.size(3));
  auto attention = attention::make_attention(variant_to_run(a.flags, a.variant, config), config);
  attention->eval();

  auto prepare = [&](const Tensor& t) {
    Tensor x = t.to(dtype).to(device).detach();
    if (backward) x.requires_grad_();
    return x;
  };
  Tensor q = prepare(q_file), k = prepare(k_file), v = prepare(v_file);
  attention::AttentionOutput result = attention->forward_with_lse(q, k, v);
  auto host = [&](const Tensor& t) { return t.detach().to(out_dtype).to(Device::cpu()); };
  std::vector<std::pair<std::string, Tensor>> outputs{{"o.npy", host(result.out)}, {"lse.npy", host(result.lse)}};
  if (backward) {
    LT_CHECK(dout_file.shape() == result.out.shape(), "--dout ", a.dout, ": expected shape ",
             shape_str(result.out.shape()), " (the output's), got ", shape_str(dout_file.shape()));
    result.out.backward(dout_file.to(dtype).to(device));
    outputs.emplace_back("dq.npy", host(q.grad()));
    outputs.emplace_back("dk.npy", host(k.grad()));
    outputs.emplace_back("dv.npy", host(v.grad()));
  }
  const std::filesystem::path dir(a.out_dir);
  save_all(dir, outputs);
  std::cout << "attention " << a.variant << ": q " << shape_str(q.shape()) << " " << dtype_name(dtype) << " on "
            << device.str() << " -> " << dir.string() << "/o.npy" << (backward ? " (+ dq, dk, dv)" : "") << "\n";
  std::cout << "attention " << a.variant << ": " << ran_with(*attention) << "; --impl " << config.impl << "\n";
  return 0;
}

const RegisterCommand attention_command(
    "attention", "run one attention variant on .npy inputs (B, N, H, D); write o.npy, lse.npy [, dq, dk, dv]",
    [](CLI::App& sub) -> std::function<int()> {
      auto args = std::make_shared<AttentionArgs>();
      sub.add_option("--variant", args->variant, "registered attention variant (dense, dilated, ...)")->required();
      add_config_flags(sub, args->flags);
      sub.add_option("--device", args->device, "cpu or cuda[:N] (default cpu)");
      sub.add_option("--dtype", args->dtype, "compute dtype: f32, f64, bf16 or f16 (default: the dtype of q.npy)");
      sub.add_option("--q", args->q, "queries, .npy (B, N, H, D) float32/float64")->required();
      sub.add_option("--k", args->k, "keys, .npy (B, N, H, D)")->required();
      sub.add_option("--v", args->v, "values, .npy (B, N, H, D)")->required();
      sub.add_option("--dout", args->dout, "gradient of the output, .npy (B, N, H, D): also write dq, dk, dv");
      sub.add_option("--out-dir", args->out_dir, "folder for the output files (created if missing)")->required();
      return [args] { return run_attention(*args); };
    });

}  // namespace

}  // namespace longtape::cli
