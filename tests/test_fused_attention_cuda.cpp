// The fused CUDA attention kernels (bf16 and f16 inputs, f32 accumulation and lse) against the
// float64 oracle on the same rounded values: for the output, the lse and every gradient the fused
// error may be at most twice the error of the composed path fed the same bf16 (f16) inputs on the
// GPU (which upcasts to f32). Each case runs in both input formats. Dense, dilated (both mixings), block lists with a bias, the adaptive
// pattern, through make_attention with impl = "fused" and through fused_attention directly.
// Every case is reported as skipped when no GPU is visible (or longtape was built without CUDA).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "attention/registry.h"
#include "tensor/autograd/node.h"
#include "tensor/backend_options.h"
#include "support/attention_oracle.h"
#include "support/fused_attention_cases.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::fused_cases;

namespace {

// The 16-bit input formats the kernels take; every case runs in each.
const DType kHalfTypes[] = {DType::bf16, DType::f16};

// The values of a case as `dtype` holds them, so that the oracle sees exactly what the kernels see.
Inputs random_half_inputs(const Dims& dims, DType dtype, uint64_t seed, int64_t bias_block_size = 0) {
  return random_inputs(dims, seed, bias_block_size, dtype);
}

// Below this (relative to max(1, magnitude)) two errors are not told apart: far under bf16's
// resolution (4e-3), near f32 rounding of the accumulations. The bf16 results (out, dq, dk, dv) get
// no wider floor: the fused kernels feed P and dS to bf16 tensor cores, one rounding more than the
// composed path, and where that shows (seen at 2.1-2.5x on some seeds) this test reports it. The
// composed path on bf16 inputs may itself be off by up to 3e-2.
// f16 carries 3 more mantissa bits than bf16 (resolution 5e-4): the same floor, and the composed
// path on f16 inputs may be off by up to 8 times less.
constexpr double kErrorFloor = 1e-4;
constexpr ErrorBounds kBf16Bounds{kErrorFloor, 3e-2};
constexpr ErrorBounds kF16Bounds{kErrorFloor, 4e-3};
ErrorBounds bounds_for(DType dtype) { return dtype == DType::f16 ? kF16Bounds : kBf16Bounds; }

// One case: the oracle once, the composed path in `dtype` on the GPU, then every fused implementation.
void check_case(const std::string& what, DType dtype, const Inputs& inputs, const KeyMasks& keys,
                const std::vector<Labeled>& fused, const AttendFn& composed) {
  const Results want = oracle_results(inputs, keys);
  const Results ref = run_case(composed, inputs, want.lse, dtype, kGpu);
  for (const Labeled& impl : fused) {
    const std::string name = what + " (" + impl.label + ", " + dtype_name(dtype) + ")";
    INFO(name);
    check_no_worse_than_composed(run_case(impl.attend, inputs, want.lse, dtype, kGpu), ref, want, bounds_for(dtype),
                                 name);
  }
}

// N = 400: 7 blocks of 64 (the last 16 tokens) or 4 blocks of 128 (the last 16 tokens); a window of
// 256 tokens (2 blocks of 64 or 1 of 128 each side); 40% random blocks.
AttentionConfig block_config(const std::string& pattern, int64_t block_size, bool causal, uint64_t pattern_seed) {
  AttentionConfig c = core_config(3, 64, causal);
  c.block_size = block_size;
  c.window = 256;
  c.global_blocks = 1;
  c.density = 0.4;
  c.seed = pattern_seed;
  c.pattern = pattern;
  return c;
}

BlockPatternOptions block_options(int64_t block_size, bool causal, uint64_t pattern_seed) {
  return {.block_size = block_size, .window = 256, .global_blocks = 1, .density = 0.4, .seed = pattern_seed,
          .causal = causal};
}

// The kernels a case runs with: on a Hopper GPU the sm_90a kernels by default, and the portable
// sm_80 kernels that other GPUs run; both must pass every case.
// Chunked: lse mixing runs in sequence chunks of one segment-length period (256 rows here, so
// N = 300 and N = 1000 end in a ragged chunk), as it does at long N with the default size.
// hi + lo: the sm_90a backward keeps bf16 products with P and dS as hi + lo parts instead of
// rescaling bf16 inputs into f16 copies (its default).
// atomic dQ: set_deterministic_algorithms(false) with the sm_90a backward's fused-dQ form (dQ
// added with atomics by the dK/dV CTAs). accumulators zeroed: every lse branch's backward adds
// into zeroed f32 accumulators (by default the dilation-1 branch runs first and writes them).
// warp-specialized: set_deterministic_algorithms(false) with the warp-specialized sm_90a backward
// (rescaled bf16 at D = 64 without block lists; elsewhere the non-deterministic mode's kernels).
// products waited: the sm_90a backward at D = 64 waits for each tile's last products before the
// next tile starts (by default they run on while it starts; three stages).
struct ForwardKernels {
  std::string label;
  bool hopper = true;
  bool chunked = false;
  bool split_backward = false;
  bool atomic_dq = false;
  bool list_pairs = true;
  bool first_launch_writes = true;
  bool async_backward = true;
  bool warp_specialized = false;
};
const std::vector<ForwardKernels> kForwardKernels{
    {.label = ""},
    {.label = " [portable kernels]", .hopper = false},
    {.label = " [chunked]", .chunked = true},
    {.label = " [hi + lo backward]", .split_backward = true},
    {.label = " [atomic dQ]", .atomic_dq = true},
    {.label = " [atomic dQ, hi + lo, chunked]", .chunked = true, .split_backward = true, .atomic_dq = true},
    {.label = " [accumulators zeroed]", .first_launch_writes = false},
    {.label = " [products waited]", .async_backward = false},
    {.label = " [products waited, hi + lo, chunked]", .chunked = true, .split_backward = true, .async_backward = false},
    {.label = " [warp-specialized]", .atomic_dq = true, .warp_specialized = true},
    {.label = " [warp-specialized, chunked]", .chunked = true, .atomic_dq = true, .warp_specialized = true}};

// Block lists: the default kernels, the sm_90a fused-dQ form, and the sm_90a forward at one
// 64-key list tile per step (by default it takes two at a time where nothing is causal or biased).
const std::vector<ForwardKernels> kBlockListKernels{
    {.label = ""}, {.label = " [atomic dQ]", .atomic_dq = true}, {.label = " [64-key list tiles]", .list_pairs = false}};

class ForwardKernelScope {
 public:
  explicit ForwardKernelScope(const ForwardKernels& kernels) {
#ifdef LONGTAPE_WITH_CUDA
    previous_ = cuda::attn::kernel_tuning();
    previous_deterministic_ = deterministic_algorithms();
    set_deterministic_algorithms(!kernels.atomic_dq);
    cuda::attn::kernel_tuning().hopper_backward_fused_dq = kernels.atomic_dq && !kernels.warp_specialized;
    cuda::attn::kernel_tuning().hopper_backward_warp_specialized = kernels.warp_specialized;
    cuda::attn::kernel_tuning().hopper_forward = kernels.hopper;
    cuda::attn::kernel_tuning().hopper_backward = kernels.hopper;
    cuda::attn::kernel_tuning().hopper_backward_rescaled = !kernels.split_backward;
    cuda::attn::kernel_tuning().hopper_forward_list_pairs = kernels.list_pairs;
    cuda::attn::kernel_tuning().backward_first_launch_writes = kernels.first_launch_writes;
    cuda::attn::kernel_tuning().hopper_backward_async = kernels.async_backward;
    if (kernels.chunked) cuda::attn::kernel_tuning().forward_chunk_row_heads = 1;
    if (kernels.chunked) cuda::attn::kernel_tuning().backward_chunk_row_heads = 1;
#else
    (void)kernels;
#endif
  }
  ~ForwardKernelScope() {
#ifdef LONGTAPE_WITH_CUDA
    cuda::attn::kernel_tuning() = previous_;
    set_deterministic_algorithms(previous_deterministic_);
#endif
  }

 private:
#ifdef LONGTAPE_WITH_CUDA
  cuda::attn::KernelTuning previous_;
  bool previous_deterministic_ = true;
#endif
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Dense

TEST_CASE("fused CUDA dense attention (bf16, f16): N not a multiple of 64, head dims 32, 64, 128" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  for (DType dtype : kHalfTypes)
  for (const ForwardKernels& kernels : kForwardKernels) {
  if (kernels.chunked) continue;  // chunks concern lse mixing only
  const ForwardKernelScope scope(kernels);
  for (int64_t n : {200, 333})
    for (int64_t head_dim : {32, 64, 128})
      for (bool causal : {false, true}) {
        const Dims dims{2, n, n, 3, head_dim};
        const AttentionConfig config = core_config(dims.H, dims.D, causal);
        const KeyMasks keys{oracle::repeat_heads(oracle::dense_mask(n, causal), dims.H), config.scale(), 1.0};
        const Inputs inputs = random_half_inputs(dims, dtype, seed + static_cast<uint64_t>(n + head_dim));
        const std::string what = "dense N " + std::to_string(n) + " D " + std::to_string(head_dim) +
                                 (causal ? " causal" : "") + kernels.label;
        check_case(what, dtype, inputs, keys,
                   {{"variant", through_variant("dense", config, kCudaFused)},
                    {"op", through_op(CoreKeys{}, config.scale(), causal, kCudaFused)}},
                   through_variant("dense", config, kComposed));
#ifdef LONGTAPE_WITH_CUDA
        // On a Hopper GPU (its forward ran) the row's backward is the one it names.
        if (kernels.warp_specialized && dtype == DType::bf16 && head_dim == 64 &&
            std::string(cuda::attn::last_forward_kernel()).starts_with("sm90a"))
          CHECK(std::string(cuda::attn::last_backward_kernel()) == "sm90a-wgmma-f16-ws");
#endif
      }
  // Fewer queries than keys and the other way round (non-causal).
  for (const auto& [nq, nk] : {std::pair<int64_t, int64_t>{200, 333}, {333, 200}}) {
    const Dims dims{2, nq, nk, 2, 64};
    const AttentionConfig config = core_config(dims.H, dims.D, false);
    const KeyMasks keys{oracle::repeat_heads(rectangular_dense_mask(nq, nk), dims.H), config.scale(), 1.0};
    const Inputs inputs = random_half_inputs(dims, dtype, seed + 7 * static_cast<uint64_t>(nq));
    const std::string what = "dense Nq " + std::to_string(nq) + " Nk " + std::to_string(nk) + kernels.label;
    check_case(what, dtype, inputs, keys,
               {{"variant", through_variant("dense", config, kCudaFused)},
                {"op", through_op(CoreKeys{}, config.scale(), false, kCudaFused)}},
               through_variant("dense", config, kComposed));
  }
  }
}

// ------------------------------------------------------------------------------------------------
// Dilated

TEST_CASE("fused CUDA dilated attention (bf16, f16): lse and head_groups, ragged segments, H % G != 0" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const std::vector<int64_t> segments{64, 128, 256}, dilations{1, 2, 4};
  const std::vector<DilatedBranch> branches = branches_of(segments, dilations);
  struct Shape3 {
    int64_t batch, n, heads;
  };
  // N = 300: ragged last segments of every branch; N = 1000: many segments and a ragged last one.
  for (DType dtype : kHalfTypes)
  for (const ForwardKernels& kernels : kForwardKernels) {
  const ForwardKernelScope scope(kernels);
  for (const Shape3& shape : {Shape3{2, 300, 6}, Shape3{2, 300, 5}, Shape3{1, 1000, 6}, Shape3{1, 1000, 5}})
    for (Mixing mixing : {Mixing::lse, Mixing::head_groups})
      for (bool causal : {false, true}) {
        const Dims dims{shape.batch, shape.n, shape.n, shape.heads, 64};
        AttentionConfig config = core_config(dims.H, dims.D, causal);
        config.segment_lengths = segments;
        config.dilation_rates = dilations;
        config.mixing = mixing;
        const bool groups = mixing == Mixing::head_groups;
        const KeyMasks keys{groups ? oracle::dilated_head_groups_mask(dims.Nq, dims.H, branches, causal)
                                   : oracle::dilated_lse_mask(dims.Nq, dims.H, branches, causal),
                            config.scale(), groups ? oracle::head_groups_out_scale(branches) : 1.0};
        const Inputs inputs = random_half_inputs(dims, dtype, seed + static_cast<uint64_t>(shape.n + shape.heads));
        const std::string what = "dilated " + mixing_name(mixing) + " N " + std::to_string(shape.n) + " H " +
                                 std::to_string(shape.heads) + (causal ? " causal" : "") + kernels.label;
        CoreKeys core;
        core.kind = fused::KeySet::dilated;
        core.branches = branches;
        core.mixing = groups ? fused::BranchMixing::head_groups : fused::BranchMixing::lse;
        check_case(what, dtype, inputs, keys,
                   {{"variant", through_variant("dilated", config, kCudaFused)},
                    {"op", through_op(core, config.scale(), causal, kCudaFused)}},
                   through_variant("dilated", config, kComposed));
      }
  }
}

// q, k, v and dO as head slices of wider (B, N, 12, D) tensors (rows at a pitch, as head_parallel
// passes a rank's own rows to its core) give exactly the results of their contiguous copies: the
// kernels read every row at its stride, forward and backward. Dense and dilated lse, both formats,
// the default kernels and the hi + lo backward.
TEST_CASE("fused CUDA attention reads head slices in place: q, k, v and dO at a row pitch equal contiguous copies "
          "bit for bit" * doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  for (DType dtype : kHalfTypes)
    for (const ForwardKernels& kernels : {kForwardKernels[0], kForwardKernels[3]})
      for (const std::string variant : {"dense", "dilated"}) {
        const ForwardKernelScope scope(kernels);
        AttentionConfig config = core_config(6, 64, variant == "dilated");
        config.impl = "fused";
        if (variant == "dilated") {
          config.segment_lengths = {64, 128, 256};
          config.dilation_rates = {1, 2, 4};
          config.mixing = Mixing::lse;
        }
        manual_seed(seed);
        auto wide = [&] { return Tensor::randn({2, 300, 12, 64}, DType::f32, kGpu).to(dtype); };
        const Tensor qw = wide(), kw = wide(), vw = wide(), gw = wide();
        const Tensor hw = Tensor::randn({2, 12, 300}, DType::f32, kGpu);
        auto run = [&](bool in_place) {
          auto pick = [&](const Tensor& w, int64_t dim) {
            const Tensor slice = w.narrow(dim, 3, 6);
            return in_place ? slice : slice.contiguous();
          };
          Tensor q = pick(qw, 2).detach().requires_grad_(), k = pick(kw, 2).detach().requires_grad_(),
                 v = pick(vw, 2).detach().requires_grad_();
          auto module = make_attention(variant, config);
          const AttentionOutput r = module->forward_with_lse(q, k, v);
          CHECK(module->last_backend() == fused::backend_name(kCudaFused));
          autograd::run_backward({r.out, r.lse}, {pick(gw, 2), pick(hw, 1)}, false);
          return std::vector<Tensor>{r.out.detach(), r.lse.detach(), q.grad(), k.grad(), v.grad()};
        };
        const std::vector<Tensor> sliced = run(true), copied = run(false);
        const char* names[] = {"out", "lse", "dq", "dk", "dv"};
        for (size_t i = 0; i < sliced.size(); ++i) {
          INFO(variant << " " << dtype_name(dtype) << kernels.label << ": " << names[i]);
          const Tensor difference = sub(sliced[i].to(DType::f64), copied[i].to(DType::f64));
          CHECK(amax(maximum(difference, neg(difference))).item() == 0.0);
        }
      }
}

// bf16 inputs far from unit scale (the sm_90a backward rescales dense and lse-mixed problems by
// powers of two into f16 copies; any wrong factor shows here): q x 8, k / 8, v x 64, dO and dlse
// x 256, so that every gradient is well above the error floor. Dense, dilated lse (gradients
// through accumulators) and head_groups (bf16 products).
TEST_CASE("fused CUDA attention (bf16): inputs far from unit scale" * doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const std::vector<int64_t> segments{64, 128, 256}, dilations{1, 2, 4};
  const std::vector<DilatedBranch> branches = branches_of(segments, dilations);
  auto scaled = [](std::vector<double> values, double by) {
    for (double& x : values) x *= by;
    return round_to(values, DType::bf16);
  };
  for (const ForwardKernels& kernels : kForwardKernels) {
    if (kernels.chunked) continue;
    const ForwardKernelScope scope(kernels);
    for (int64_t head_dim : {64, 128})
      for (int kind = 0; kind < 3; ++kind) {  // dense, dilated lse, dilated head_groups
        const bool dilated = kind > 0, groups = kind == 2;
        const Dims dims{2, 300, 300, 4, head_dim};
        Inputs inputs = random_half_inputs(dims, DType::bf16, seed + static_cast<uint64_t>(head_dim + kind));
        inputs.q = scaled(inputs.q, 8.0);
        inputs.k = scaled(inputs.k, 1.0 / 8.0);
        inputs.v = scaled(inputs.v, 64.0);
        inputs.g = scaled(inputs.g, 256.0);
        inputs.h = scaled(inputs.h, 256.0);
        AttentionConfig config = core_config(dims.H, dims.D, false);
        std::string what = std::string(groups ? "dilated head_groups" : dilated ? "dilated lse" : "dense") + " D " +
                           std::to_string(head_dim) +
                           " scaled inputs" + kernels.label;
        if (!dilated) {
          const KeyMasks keys{oracle::repeat_heads(oracle::dense_mask(dims.Nq, false), dims.H), config.scale(), 1.0};
          check_case(what, DType::bf16, inputs, keys,
                     {{"op", through_op(CoreKeys{}, config.scale(), false, kCudaFused)}},
                     through_variant("dense", config, kComposed));
          continue;
        }
        config.segment_lengths = segments;
        config.dilation_rates = dilations;
        config.mixing = groups ? Mixing::head_groups : Mixing::lse;
        const KeyMasks keys{groups ? oracle::dilated_head_groups_mask(dims.Nq, dims.H, branches, false)
                                   : oracle::dilated_lse_mask(dims.Nq, dims.H, branches, false),
                            config.scale(), groups ? oracle::head_groups_out_scale(branches) : 1.0};
        CoreKeys core;
        core.kind = fused::KeySet::dilated;
        core.branches = branches;
        core.mixing = groups ? fused::BranchMixing::head_groups : fused::BranchMixing::lse;
        check_case(what, DType::bf16, inputs, keys, {{"op", through_op(core, config.scale(), false, kCudaFused)}},
                   through_variant("dilated", config, kComposed));
      }
  }
}

// ------------------------------------------------------------------------------------------------
// Block lists

TEST_CASE("fused CUDA block-sparse attention (bf16, f16): local_window, random, all; block sizes 64 and 128" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 400, 400, 3, 64};
  for (DType dtype : kHalfTypes)
  for (int64_t block_size : {64, 128})
    for (BlockPattern pattern : {BlockPattern::local_window, BlockPattern::random, BlockPattern::all})
      for (bool causal : {false, true}) {
        const std::string name(to_string(pattern));
        const AttentionConfig config = block_config(name, block_size, causal, seed);
        const BlockPatternOptions options = block_options(block_size, causal, seed);
        const KeyMasks keys{oracle::block_pattern_masks(pattern, dims.Nq, dims.H, options), config.scale(), 1.0};
        const Inputs inputs =
            random_half_inputs(dims, dtype, seed + static_cast<uint64_t>(block_size) + 31 * static_cast<uint64_t>(pattern));
        const std::string what =
            "block_sparse " + name + " block_size " + std::to_string(block_size) + (causal ? " causal" : "");
        CoreKeys core;
        core.kind = fused::KeySet::blocks;
        core.block_size = block_size;
        const int64_t blocks = num_blocks_for(dims.Nq, block_size);
        std::vector<BlockLists> per_head;
        for (int64_t h = 0; h < dims.H; ++h) per_head.push_back(block_pattern(pattern, blocks, options, h));
        core.block_lists = make_block_lists(std::move(per_head));
        for (const ForwardKernels& kernels : kBlockListKernels) {
          const ForwardKernelScope scope(kernels);
          check_case(what + kernels.label, dtype, inputs, keys,
                     {{"variant", through_variant("block_sparse", config, kCudaFused)},
                      {"op", through_op(core, config.scale(), causal, kCudaFused)}},
                     through_variant("block_sparse", config, kComposed));
        }
      }
}

TEST_CASE("fused CUDA block-sparse op (bf16, f16) with a block bias, per-(batch, head) lists and empty rows" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 400, 400, 3, 64};
  const int64_t block_size = 64, blocks = num_blocks_for(dims.Nq, block_size);
  for (DType dtype : kHalfTypes)
  for (bool causal : {false, true}) {
    const BlockPatternOptions options = block_options(block_size, causal, seed);
    std::vector<std::pair<std::string, std::vector<BlockLists>>> arrangements;
    arrangements.push_back({"shared global_local", {block_pattern(BlockPattern::global_local, blocks, options)}});
    std::vector<BlockLists> per_batch_head;
    for (int64_t l = 0; l < dims.B * dims.H; ++l)
      per_batch_head.push_back(block_pattern(BlockPattern::random, blocks, options, l));
    arrangements.push_back({"random per (batch, head)", per_batch_head});
    // Query block 1 sees nothing; under causal masking query block 2 sees only a later block.
    arrangements.push_back({"empty rows", {BlockLists{{0}, {}, {3}, {1, 3}, {4}, {0, 5}, {6}}}});
    for (const auto& [label, lists] : arrangements)
      for (bool biased : {true, false}) {
        oracle::HeadMasks masks = oracle::block_mask(lists, block_size, dims.Nq, causal);
        if (lists.size() == 1) masks = oracle::repeat_heads(masks[0], dims.H);
        const double scale = 0.125;
        const KeyMasks keys{masks, scale, 1.0};
        const Inputs inputs = random_half_inputs(dims, dtype, seed + lists.size(), biased ? block_size : 0);
        CoreKeys core;
        core.kind = fused::KeySet::blocks;
        core.block_size = block_size;
        core.block_lists = make_block_lists(lists);
        const std::string what = "blocks, " + label + (biased ? ", bias" : "") + (causal ? ", causal" : "");
        for (const ForwardKernels& kernels : kBlockListKernels) {
          const ForwardKernelScope scope(kernels);
          check_case(what + kernels.label, dtype, inputs, keys, {{"op", through_op(core, scale, causal, kCudaFused)}},
                     composed_blocks(lists, block_size, scale, causal));
        }
      }
  }
}

TEST_CASE("fused CUDA adaptive block-sparse (bf16, f16): outputs, input and scorer gradients" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 400, 400, 3, 64};
  for (DType dtype : kHalfTypes)
  for (bool causal : {false, true}) {
    const std::string what = std::string("adaptive") + (causal ? " causal " : " ") + dtype_name(dtype);
    INFO(what);
    AttentionConfig config = block_config("adaptive", 64, causal, seed);
    config.density = 0.5;  // 4 of 7 blocks per row
    auto fused = adaptive_module(config, "fused", seed), composed = adaptive_module(config, "composed", seed);
    fused->to(kGpu);
    composed->to(kGpu);
    const Inputs inputs = random_half_inputs(dims, dtype, seed + (causal ? 7 : 0));
    // A first forward (no backward) fixes the pattern both implementations select.
    const std::vector<BlockLists> pattern = selected_pattern(*fused, inputs, dtype, kGpu);
    const Tensor scorer_q64 = fused->scorer_q().detach().cpu().to(DType::f64);
    const Tensor scorer_k64 = fused->scorer_k().detach().cpu().to(DType::f64);
    const KeyMasks keys{oracle::block_mask(pattern, config.block_size, dims.Nq, causal), config.scale(), 1.0};
    // The oracle's lse of the selected pattern masks the loss.
    const std::vector<double> loss_lse =
        oracle_results(with_adaptive_scores(inputs, scorer_q64, scorer_k64, config.block_size), keys).lse;

    // The reference: the composed path in f64 on the CPU on the same pattern with the scores as bias,
    // so that the scorer gradients have a float64 reference too.
    Tensor ref_scorer_q = scorer_q64.detach().requires_grad_(), ref_scorer_k = scorer_k64.detach().requires_grad_();
    const AdaptiveResults want = run_adaptive_case(
        composed_with_scores(pattern, config.block_size, config.scale(), causal, ref_scorer_q, ref_scorer_k), inputs,
        loss_lse, DType::f64, Device::cpu(), ref_scorer_q, ref_scorer_k);

    const AdaptiveResults got = run_adaptive_case(through_adaptive(fused, kCudaFused), inputs, loss_lse, dtype, kGpu,
                                                  fused->scorer_q(), fused->scorer_k());
    const AdaptiveResults ref = run_adaptive_case(through_adaptive(composed, kComposed), inputs, loss_lse, dtype, kGpu,
                                                  composed->scorer_q(), composed->scorer_k());
    CHECK(fused->last_pattern() == pattern);
    CHECK(composed->last_pattern() == pattern);
    // scorer_q is compared as dbias; scorer_k is checked the same way below.
    check_no_worse_than_composed(with_scorer_q_as_dbias(got), with_scorer_q_as_dbias(ref),
                                 with_scorer_q_as_dbias(want), bounds_for(dtype), what + " (dbias = scorer_q)");
    const Deviation fused_k = deviation(got.dscorer_k, want.dscorer_k);
    const Deviation composed_k = deviation(ref.dscorer_k, want.dscorer_k);
    INFO("scorer_k gradient: fused error " << fused_k.max_error << ", composed error " << composed_k.max_error);
    CHECK(fused_k.broken == 0);
    CHECK(fused_k.max_error <= 2.0 * composed_k.max_error + kErrorFloor * std::max(1.0, fused_k.max_magnitude));
  }
}

// ------------------------------------------------------------------------------------------------
// Selection on the GPU

TEST_CASE("fused CUDA selection: bf16, f16 and f32 select the CUDA kernels and auto runs them" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 150, 150, 3, 64};
  for (bool causal : {false, true}) {
    AttentionConfig config = core_config(dims.H, dims.D, causal);
    config.segment_lengths = {64, 128};
    config.dilation_rates = {1, 2};
    // bf16 values: exact in f32, and in f16 down to 2^-17 (below that f16 rounds them by less
    // than 2^-25, far under the tolerances here)
    const Inputs inputs = random_half_inputs(dims, DType::bf16, seed + (causal ? 1 : 0));
    CoreOptions options;
    options.scale = config.scale();
    options.causal = causal;
    for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
      INFO("dtype " << dtype_name(dtype) << (causal ? " causal" : ""));
      Tensor q = leaf_on(inputs.q, dims.q_shape(), dtype, kGpu), k = leaf_on(inputs.k, dims.k_shape(), dtype, kGpu),
             v = leaf_on(inputs.v, dims.k_shape(), dtype, kGpu);
      const fused::Selection selection = select_core(q, k, v, CoreKeys{}, options);
      INFO("backend " << fused::backend_name(selection.backend) << ", reason: " << selection.reason);
      // Either the fused kernels run it, or the selector says why not: never both, never neither.
      CHECK(selection.fused() == selection.reason.empty());
      CHECK(selection.backend == fused::Backend::cuda_fused);  // f32: the exact-f32 kernels
      CHECK_FALSE(compute_precision(selection.backend, dtype).empty());

      // impl = auto runs either way and matches the oracle.
      for (const char* variant : {"dense", "dilated"}) {
        INFO(variant);
        config.impl = "auto";
        auto module = make_attention(variant, config);
        const KeyMasks keys{
            std::string(variant) == "dense"
                ? oracle::repeat_heads(oracle::dense_mask(dims.Nq, causal), dims.H)
                : oracle::dilated_lse_mask(dims.Nq, dims.H, branches_of(config.segment_lengths, config.dilation_rates),
                                           causal),
            config.scale(), 1.0};
        const Results want = oracle_results(inputs, keys);
        const Results got = run_case(
            [&](const Tensor& a, const Tensor& b, const Tensor& c, const Tensor&) {
              return module->forward_with_lse(a, b, c);
            },
            inputs, want.lse, dtype, kGpu);
        CHECK(module->last_backend() == (selection.fused() ? "fused-cuda" : "composed"));
        // f32 tolerances for f32 inputs; bf16 or f16 rounding of out and gradients otherwise.
        const double tolerance = dtype == DType::f32 ? 1e-4 : dtype == DType::f16 ? 4e-3 : 2e-2;
        for (const Field& field : kFields) {
          const auto& w = want.*field.values;
          if (w.empty()) continue;
          INFO(std::string(field.name));
          const Deviation dev = deviation(got.*field.values, w);
          check_pattern(dev, got.*field.values, w);
          INFO("max error " << dev.max_error << " for values up to " << dev.max_magnitude);
          CHECK(dev.max_error <= tolerance * std::max(1.0, dev.max_magnitude));
        }
      }
    }
  }

  // Dropout in training mode: the selector says why, impl = fused refuses, auto runs composed.
  {
    manual_seed(seed);
    AttentionConfig config = core_config(dims.H, dims.D, false);
    config.dropout = 0.1;
    Tensor q = Tensor::randn(dims.q_shape(), DType::bf16, kGpu), k = Tensor::randn(dims.k_shape(), DType::bf16, kGpu),
           v = Tensor::randn(dims.k_shape(), DType::bf16, kGpu);
    CoreOptions options;
    options.scale = config.scale();
    options.dropout = 0.1;
    const fused::Selection selection = select_core(q, k, v, CoreKeys{}, options);
    CHECK_FALSE(selection.fused());
    CHECK(selection.reason.find("dropout") != std::string::npos);
    config.impl = "fused";
    CHECK_THROWS_WITH_AS(make_attention("dense", config)->forward(q, k, v), doctest::Contains("dropout"), Error);
    config.impl = "auto";
    auto automatic = make_attention("dense", config);
    automatic->forward(q, k, v);
    CHECK(automatic->last_backend() == "composed");
  }
}
