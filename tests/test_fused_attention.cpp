// The fused CPU attention kernels (dense, dilated with both mixings, block lists with a bias,
// forward and backward) against the float64 oracle. In f64 they must agree to rounding; in f32 their
// error may be at most twice the composed path's error on the same f32 inputs, for the output, the
// lse and every gradient. The variants run through make_attention with impl = "fused", and the
// fused op runs directly on the same key sets. The loss weighs both the output and the finite lse
// entries, so the backward of the lse is exercised too.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "attention/registry.h"
#include "support/attention_oracle.h"
#include "support/fused_attention_cases.h"
#include "support/test_utils.h"
#include "tensor/allocator.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::fused_cases;

namespace {

constexpr fused::Backend kCpuFused = fused::Backend::cpu_fused;

// f64: agreement to rounding (relative to the largest magnitude of each tensor).
void check_matches_oracle(const Results& got, const Results& want, const std::string& what) {
  for (const Field& field : kFields) {
    const auto& w = want.*field.values;
    if (w.empty()) continue;
    const auto& g = got.*field.values;
    INFO(what << " " << std::string(field.name));
    const Deviation dev = deviation(g, w);
    check_pattern(dev, g, w);
    INFO("max error " << dev.max_error << " for values up to " << dev.max_magnitude);
    CHECK(dev.max_error <= 1e-10 * dev.max_magnitude + 1e-13);
  }
}

// f32: the floor keeps two tiny errors from flaking; a composed error above 1e-3 would make the
// comparison meaningless.
constexpr double kF32Floor = 1e-6;
constexpr ErrorBounds kF32Bounds{kF32Floor, 1e-3};

// The whole check of one case: f64 against the oracle, then f32 against the oracle on f32-rounded
// inputs, next to the composed path on the same inputs. The oracle runs once for all of `fused`.
void check_case(const std::string& what, const Inputs& inputs, const KeyMasks& keys, const std::vector<Labeled>& fused,
                const AttendFn& composed) {
  {
    const Results want = oracle_results(inputs, keys);
    for (const Labeled& impl : fused) {
      const std::string name = what + " (" + impl.label + ") f64";
      INFO(name);
      check_matches_oracle(run_case(impl.attend, inputs, want.lse, DType::f64), want, name);
    }
  }
  {
    const Inputs in = rounded_to(inputs, DType::f32);
    const Results want = oracle_results(in, keys);
    const Results ref = run_case(composed, in, want.lse, DType::f32);
    for (const Labeled& impl : fused) {
      const std::string name = what + " (" + impl.label + ") f32";
      INFO(name);
      check_no_worse_than_composed(run_case(impl.attend, in, want.lse, DType::f32), ref, want, kF32Bounds, name);
    }
  }
}

// Masks of heads [offset, offset + count) of a list of per-head masks.
oracle::HeadMasks head_slice(const oracle::HeadMasks& all, int64_t offset, int64_t count) {
  return {all.begin() + offset, all.begin() + offset + count};
}

// The dilated variant and the fused op on the same streams (mixing and head slice from `config`),
// both against the oracle and next to the composed variant.
void check_dilated_case(const std::string& what, const Inputs& inputs, const KeyMasks& keys,
                        const AttentionConfig& config, const std::vector<DilatedBranch>& branches, bool causal) {
  const CoreKeys core{
      .kind = fused::KeySet::dilated,
      .branches = branches,
      .mixing = config.mixing == Mixing::head_groups ? fused::BranchMixing::head_groups : fused::BranchMixing::lse,
      .head_offset = config.head_offset,
      .total_heads = config.total_heads};
  check_case(what, inputs, keys,
             {{"variant", through_variant("dilated", config, kCpuFused)},
              {"op", through_op(core, config.scale(), causal, kCpuFused)}},
             through_variant("dilated", config, kComposed));
}

int64_t count_empty_rows(const oracle::HeadMasks& masks, int64_t rows) {
  int64_t empty = 0;
  for (const auto& mask : masks)
    for (int64_t p = 0; p < rows; ++p) empty += mask.row_empty(p) ? 1 : 0;
  return empty;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Selection

TEST_CASE("parse_impl reads auto, fused and composed and rejects anything else") {
  CHECK(parse_impl("auto") == Impl::automatic);
  CHECK(parse_impl("fused") == Impl::fused);
  CHECK(parse_impl("composed") == Impl::composed);
  for (Impl impl : {Impl::automatic, Impl::fused, Impl::composed}) CHECK(parse_impl(impl_name(impl)) == impl);
  CHECK_THROWS_AS(parse_impl("flash"), Error);
  CHECK_THROWS_AS(parse_impl(""), Error);
}

TEST_CASE("select_core picks the fused CPU kernels for f32 and f64 problems on the CPU") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  for (DType dtype : {DType::f32, DType::f64}) {
    INFO("dtype " << dtype_name(dtype));
    Tensor q = Tensor::randn({2, 20, 3, 8}, dtype), k = Tensor::randn({2, 20, 3, 8}, dtype),
           v = Tensor::randn({2, 20, 3, 8}, dtype);
    CoreOptions options;
    options.scale = 0.3;
    std::vector<CoreKeys> key_sets(3);
    key_sets[1].kind = fused::KeySet::dilated;
    key_sets[1].branches = {{8, 1}, {16, 2}};
    key_sets[2].kind = fused::KeySet::blocks;
    key_sets[2].block_size = 8;
    key_sets[2].block_lists = make_block_lists({BlockLists{{0}, {0, 1}, {1, 2}}});
    for (const CoreKeys& keys : key_sets) {
      const fused::Selection selection = select_core(q, k, v, keys, options);
      INFO("key set " << static_cast<int>(keys.kind) << ", reason: " << selection.reason);
      CHECK(selection.fused());
      CHECK(selection.backend == fused::Backend::cpu_fused);
      CHECK(selection.reason.empty());
    }
    CHECK(std::string(fused::backend_name(fused::Backend::cpu_fused)) == "fused-cpu");
    CHECK_FALSE(compute_precision(fused::Backend::cpu_fused, dtype).empty());
  }
}

TEST_CASE("the selector's answers per dtype: CUDA kernels take bf16, f16 and f32, the CPU kernels f32 and f64") {
  fused::Problem p;
  p.batch = 2;
  p.heads = 3;
  p.head_dim = 64;
  p.seq_q = p.seq_k = 200;
  p.scale = 0.125;
  p.q_stride = p.k_stride = p.v_stride = p.out_stride = {200 * 3 * 64, 3 * 64, 64};
  for (DType dtype : {DType::bf16, DType::f16}) {
    INFO("dtype " << dtype_name(dtype));
    p.dtype = dtype;
    CHECK(fused::cuda_unsupported_reason(p) == "");
    // The CPU kernels compute in f32 or f64 only: a 16-bit problem on the CPU runs composed, and says so.
    const fused::Selection cpu = fused::select_backend(p, Device::cpu(), 0.0);
    CHECK(cpu.backend == fused::Backend::composed);
    CHECK(cpu.reason.find("f32 or f64") != std::string::npos);
    CHECK(cpu.reason.find(dtype_name(dtype)) != std::string::npos);
    // The same problem with what the CUDA kernels refuse: the reason names the limit.
    fused::Problem odd = p;
    odd.head_dim = 48;
    CHECK(fused::cuda_unsupported_reason(odd).find("head_dim 32, 64 or 128, got 48") != std::string::npos);
    CHECK(compute_precision(fused::Backend::cuda_fused, dtype) ==
          std::string(dtype_name(dtype)) + " tensor cores, f32 accumulation");
    CHECK(compute_precision(fused::Backend::composed, dtype) ==
          std::string("f32 (") + dtype_name(dtype) + " inputs upcast)");
  }
  for (DType dtype : {DType::f32, DType::f64}) {
    INFO("dtype " << dtype_name(dtype));
    p.dtype = dtype;
    const std::string reason = fused::cuda_unsupported_reason(p);
    if (dtype == DType::f32)
      CHECK(reason == "");  // exact f32 on the CUDA cores
    else
      CHECK(reason == std::string("the fused CUDA kernels take bf16, f16 or f32 inputs, got ") + dtype_name(dtype));
    CHECK(fused::select_backend(p, Device::cpu(), 0.0).backend == fused::Backend::cpu_fused);
  }
  // f32 on CUDA: the precision says exact f32, and the f32 kernels take rows at any stride (odd
  // strides and unaligned pointers fall back to scalar loads); the other limits still apply.
  {
    fused::Problem f = p;
    f.dtype = DType::f32;
    CHECK(compute_precision(fused::Backend::cuda_fused, DType::f32) == "f32 exact (CUDA-core FMA, no TF32)");
    f.q_stride = {200 * 3 * 65, 3 * 65, 65};
    CHECK(fused::cuda_unsupported_reason(f) == "");
    fused::Problem half = f;
    half.dtype = DType::bf16;  // the 16-bit kernels move 16-byte chunks only
    CHECK(fused::cuda_unsupported_reason(half).find("multiples of 8") != std::string::npos);
    f.head_dim = 48;
    CHECK(fused::cuda_unsupported_reason(f).find("head_dim 32, 64 or 128, got 48") != std::string::npos);
  }
  // Without a GPU build the selector says so for every dtype; with one, the CUDA answer is the
  // kernels' own (f16 and f32 run fused, f64 does not).
  p.dtype = DType::f16;
  const fused::Selection gpu = fused::select_backend(p, Device::cuda(0), 0.0);
#ifdef LONGTAPE_WITH_CUDA
  CHECK(gpu.backend == fused::Backend::cuda_fused);
  CHECK(gpu.reason.empty());
  p.dtype = DType::f32;
  CHECK(fused::select_backend(p, Device::cuda(0), 0.0).backend == fused::Backend::cuda_fused);
  p.dtype = DType::f64;
  CHECK(fused::select_backend(p, Device::cuda(0), 0.0).reason.find("bf16, f16 or f32") != std::string::npos);
#else
  CHECK(gpu.backend == fused::Backend::composed);
  CHECK(gpu.reason.find("without CUDA") != std::string::npos);
#endif
  // Dropout goes to the composed path whatever the dtype.
  CHECK(fused::select_backend(p, Device::cuda(0), 0.1).reason.find("dropout") != std::string::npos);
}

// ------------------------------------------------------------------------------------------------
// Dense

TEST_CASE("fused dense attention on the CPU matches the oracle: non-causal, causal, Nq != Nk") {
  LT_FRESH_SEED(seed);
  for (bool causal : {false, true}) {
    const Dims dims{2, 19, 19, 3, 8};
    const AttentionConfig config = core_config(dims.H, dims.D, causal);
    const KeyMasks keys{oracle::repeat_heads(oracle::dense_mask(dims.Nq, causal), dims.H), config.scale(), 1.0};
    const Inputs inputs = random_inputs(dims, seed);
    const std::string what = std::string("dense") + (causal ? " causal" : "");
    const AttendFn composed = through_variant("dense", config, kComposed);
    check_case(what, inputs, keys,
               {{"variant", through_variant("dense", config, kCpuFused)},
                {"op", through_op(CoreKeys{}, config.scale(), causal, kCpuFused)}},
               composed);
  }
  // More queries than keys and the other way round: the fused op and the variant, both non-causal.
  for (const auto& [nq, nk] : {std::pair<int64_t, int64_t>{13, 29}, {29, 13}}) {
    const Dims dims{2, nq, nk, 2, 16};
    AttentionConfig config = core_config(dims.H, dims.D, false);
    config.softmax_scale = 0.35;
    const KeyMasks keys{oracle::repeat_heads(rectangular_dense_mask(nq, nk), dims.H), 0.35, 1.0};
    const Inputs inputs = random_inputs(dims, seed + 100 + static_cast<uint64_t>(nq));
    const std::string what = "dense Nq " + std::to_string(nq) + " Nk " + std::to_string(nk);
    const AttendFn composed = through_variant("dense", config, kComposed);
    check_case(what, inputs, keys,
               {{"op", through_op(CoreKeys{}, 0.35, false, kCpuFused)},
                {"variant", through_variant("dense", config, kCpuFused)}},
               composed);
  }
}

// ------------------------------------------------------------------------------------------------
// Dilated

TEST_CASE("fused dilated attention, lse mixing: ragged segments, w % r != 0, w > N, uncovered rows") {
  LT_FRESH_SEED(seed);
  struct Setup {
    std::vector<int64_t> segments, dilations;
    int64_t n;
  };
  // {8, 16, 64} x {1, 2, 3}: ragged last segments, w > N, 37 % 3 != 0. {5, 7, 20} x {2, 3, 4} leaves
  // some (position, head) pairs in no stream; N = 33 leaves a last segment shorter than a dilation.
  const std::vector<Setup> setups{
      {{8, 16, 64}, {1, 2, 3}, 37}, {{5, 7, 20}, {2, 3, 4}, 37}, {{8, 16, 64}, {1, 2, 3}, 33}};
  bool saw_uncovered = false;
  for (const Setup& setup : setups)
    for (int64_t head_dim : {8, 16})
      for (bool causal : {false, true}) {
        const Dims dims{2, setup.n, setup.n, 5, head_dim};
        const std::vector<DilatedBranch> branches = branches_of(setup.segments, setup.dilations);
        AttentionConfig config = core_config(dims.H, dims.D, causal);
        config.segment_lengths = setup.segments;
        config.dilation_rates = setup.dilations;
        config.mixing = Mixing::lse;
        const KeyMasks keys{oracle::dilated_lse_mask(dims.Nq, dims.H, branches, causal), config.scale(), 1.0};
        saw_uncovered = saw_uncovered || count_empty_rows(keys.masks, dims.Nq) > 0;
        const Inputs inputs = random_inputs(dims, seed + static_cast<uint64_t>(setup.n * 7 + head_dim));
        const std::string what = "dilated lse w " + std::to_string(setup.segments[0]) + ".. N " +
                                 std::to_string(setup.n) + " D " + std::to_string(head_dim) + (causal ? " causal" : "");
        check_dilated_case(what, inputs, keys, config, branches, causal);
      }
  CHECK(saw_uncovered);  // the setups include rows that see no key
}

TEST_CASE("fused dilated attention, head_groups mixing: H % G != 0, empty streams, head slices") {
  LT_FRESH_SEED(seed);
  const std::vector<int64_t> segments{8, 16, 64}, dilations{1, 2, 3};
  const std::vector<DilatedBranch> branches = branches_of(segments, dilations);
  for (int64_t n : {37, 33})
    for (int64_t head_dim : {8, 16})
      for (bool causal : {false, true}) {
        const Dims dims{2, n, n, 5, head_dim};
        AttentionConfig config = core_config(dims.H, dims.D, causal);
        config.segment_lengths = segments;
        config.dilation_rates = dilations;
        config.mixing = Mixing::head_groups;
        const KeyMasks keys{oracle::dilated_head_groups_mask(n, dims.H, branches, causal), config.scale(),
                            oracle::head_groups_out_scale(branches)};
        if (n == 33) CHECK(count_empty_rows(keys.masks, n) > 0);  // offset 1 of the 1-token last segment
        const Inputs inputs = random_inputs(dims, seed + static_cast<uint64_t>(n * 3 + head_dim));
        const std::string what = "dilated head_groups N " + std::to_string(n) + " D " + std::to_string(head_dim) +
                                 (causal ? " causal" : "");
        check_dilated_case(what, inputs, keys, config, branches, causal);
      }

  // Heads [1, 6) of 7: offsets (lse) and groups (head_groups) follow the global head index.
  for (Mixing mixing : {Mixing::lse, Mixing::head_groups})
    for (bool causal : {false, true}) {
      const Dims dims{1, 37, 37, 5, 8};
      const int64_t first = 1, total = 7;
      AttentionConfig config = core_config(dims.H, dims.D, causal);
      config.segment_lengths = segments;
      config.dilation_rates = dilations;
      config.mixing = mixing;
      config.head_offset = first;
      config.total_heads = total;
      const bool groups = mixing == Mixing::head_groups;
      const oracle::HeadMasks all = groups ? oracle::dilated_head_groups_mask(dims.Nq, total, branches, causal)
                                           : oracle::dilated_lse_mask(dims.Nq, total, branches, causal);
      const KeyMasks keys{head_slice(all, first, dims.H), config.scale(),
                          groups ? oracle::head_groups_out_scale(branches) : 1.0};
      const Inputs inputs = random_inputs(dims, seed + 500);
      const std::string what = "dilated " + mixing_name(mixing) + " heads [1, 6) of 7" + (causal ? " causal" : "");
      check_dilated_case(what, inputs, keys, config, branches, causal);
    }
}

// ------------------------------------------------------------------------------------------------
// Block lists

namespace {

// 6 blocks of 8 tokens, the last one 5 tokens (N = 45); a window of one block each side, one global
// block, block distance 2 for `dilated`, 2 random blocks per row.
AttentionConfig block_config(const std::string& pattern, bool causal, uint64_t pattern_seed) {
  return {.num_heads = 3, .head_dim = 8, .dilation_rates = {2}, .causal = causal, .pattern = pattern, .block_size = 8,
          .density = 0.4, .window = 16, .global_blocks = 1, .seed = pattern_seed};
}

// The same pattern options, written out for the oracle.
BlockPatternOptions block_options(bool causal, uint64_t pattern_seed) {
  return {.block_size = 8, .window = 16, .dilation_rates = {2}, .global_blocks = 1, .density = 0.4,
          .seed = pattern_seed, .causal = causal};
}

}  // namespace

TEST_CASE("fused block-sparse attention: every fixed pattern, ragged last block, causal and not") {
  LT_FRESH_SEED(seed);
  const Dims dims{2, 45, 45, 3, 8};
  for (bool causal : {false, true})
    for (BlockPattern pattern : all_block_patterns()) {
      const std::string name(to_string(pattern));
      const AttentionConfig config = block_config(name, causal, seed);
      const BlockPatternOptions options = block_options(causal, seed);
      const KeyMasks keys{oracle::block_pattern_masks(pattern, dims.Nq, dims.H, options), config.scale(), 1.0};
      const Inputs inputs = random_inputs(dims, seed + 31 * static_cast<uint64_t>(pattern));
      const std::string what = "block_sparse " + name + (causal ? " causal" : "");
      // The op with the pattern's per-head lists, as the oracle draws them.
      CoreKeys core;
      core.kind = fused::KeySet::blocks;
      core.block_size = options.block_size;
      const int64_t blocks = num_blocks_for(dims.Nq, options.block_size);
      std::vector<BlockLists> per_head;
        for (int64_t h = 0; h < dims.H; ++h) per_head.push_back(block_pattern(pattern, blocks, options, h));
        core.block_lists = make_block_lists(std::move(per_head));
      const AttendFn composed = through_variant("block_sparse", config, kComposed);
      check_case(what, inputs, keys,
                 {{"variant", through_variant("block_sparse", config, kCpuFused)},
                  {"op", through_op(core, config.scale(), causal, kCpuFused)}},
                 composed);
    }
}

TEST_CASE("fused block-sparse op: shared, per-head and per-(batch, head) lists with a block bias") {
  LT_FRESH_SEED(seed);
  const Dims dims{2, 45, 45, 3, 8};
  const int64_t block_size = 8, blocks = num_blocks_for(dims.Nq, block_size);
  for (bool causal : {false, true})
    for (bool biased : {true, false})
      for (int64_t lists_per : {int64_t{1}, dims.H, dims.B * dims.H}) {
        BlockPatternOptions options = block_options(causal, seed);
        std::vector<BlockLists> lists;
        if (lists_per == 1)
          lists.push_back(block_pattern(BlockPattern::global_local, blocks, options));
        else
          for (int64_t l = 0; l < lists_per; ++l)
            lists.push_back(block_pattern(BlockPattern::random, blocks, options, l));
        oracle::HeadMasks masks = oracle::block_mask(lists, block_size, dims.Nq, causal);
        if (lists_per == 1) masks = oracle::repeat_heads(masks[0], dims.H);
        const double scale = 0.4;
        const KeyMasks keys{masks, scale, 1.0};
        const Inputs inputs = random_inputs(dims, seed + static_cast<uint64_t>(lists_per), biased ? block_size : 0);
        CoreKeys core;
        core.kind = fused::KeySet::blocks;
        core.block_size = block_size;
        core.block_lists = make_block_lists(lists);
        const std::string what = "blocks, " + std::to_string(lists_per) + " lists" + (biased ? ", bias" : "") +
                                 (causal ? ", causal" : "");
        check_case(what, inputs, keys, {{"op", through_op(core, scale, causal, kCpuFused)}},
                   composed_blocks(lists, block_size, scale, causal));
      }
}

TEST_CASE("fused block-sparse op: rows that see no key give out 0, lse -inf and finite gradients") {
  LT_FRESH_SEED(seed);
  // 4 blocks of 5 tokens, the last one 3 tokens (N = 18). Query block 1 has no key block; under
  // causal masking query block 2 only sees a later block, so its rows are empty too.
  const Dims dims{2, 18, 18, 2, 8};
  const int64_t block_size = 5;
  const std::vector<BlockLists> lists{BlockLists{{0}, {}, {3}, {1, 3}}};
  for (bool causal : {false, true})
    for (bool biased : {false, true}) {
      const double scale = 0.5;
      const oracle::MultiplicityMask mask = oracle::block_mask(lists[0], block_size, dims.Nq, causal);
      const KeyMasks keys{oracle::repeat_heads(mask, dims.H), scale, 1.0};
      CHECK(count_empty_rows(keys.masks, dims.Nq) == dims.H * (causal ? 10 : 5));
      const Inputs inputs = random_inputs(dims, seed + (causal ? 1 : 0), biased ? block_size : 0);
      CoreKeys core;
      core.kind = fused::KeySet::blocks;
      core.block_size = block_size;
      core.block_lists = make_block_lists(lists);
      const std::string what = std::string("empty rows") + (biased ? ", bias" : "") + (causal ? ", causal" : "");
      check_case(what, inputs, keys, {{"op", through_op(core, scale, causal, kCpuFused)}},
                 composed_blocks(lists, block_size, scale, causal));

      // Exactly zero output and -inf lse on the empty rows (the oracle comparison allows rounding).
      const Results want = oracle_results(inputs, keys);
      const Results got = run_case(through_op(core, scale, causal, kCpuFused), inputs, want.lse, DType::f64);
      int64_t wrong = 0;
      for (int64_t b = 0; b < dims.B; ++b)
        for (int64_t h = 0; h < dims.H; ++h)
          for (int64_t p = 0; p < dims.Nq; ++p) {
            if (!keys.masks[static_cast<size_t>(h)].row_empty(p)) continue;
            wrong += got.lse[static_cast<size_t>((b * dims.H + h) * dims.Nq + p)] == kNegInf ? 0 : 1;
            for (int64_t e = 0; e < dims.D; ++e) {
              wrong += got.out[at(dims, dims.Nq, b, p, h, e)] == 0.0 ? 0 : 1;
              wrong += got.dq[at(dims, dims.Nq, b, p, h, e)] == 0.0 ? 0 : 1;
            }
          }
      INFO(what);
      CHECK(wrong == 0);
    }
}

TEST_CASE("fused adaptive block-sparse: output, input and scorer gradients match the composed path") {
  LT_FRESH_SEED(seed);
  const Dims dims{2, 45, 45, 3, 8};
  for (DType dtype : {DType::f64, DType::f32})
    for (bool causal : {false, true}) {
      const std::string what = std::string("adaptive ") + dtype_name(dtype) + (causal ? " causal" : "");
      INFO(what);
      AttentionConfig config = block_config("adaptive", causal, seed);
      config.density = 0.5;  // 3 of 6 blocks per row
      auto fused = adaptive_module(config, "fused", seed), composed = adaptive_module(config, "composed", seed);
      fused->to(dtype);
      composed->to(dtype);
      const Inputs inputs = rounded_to(random_inputs(dims, seed + (causal ? 7 : 0)), dtype);
      const Device cpu = Device::cpu();
      // A first forward (no backward) fixes the pattern both implementations select.
      const std::vector<BlockLists> pattern = selected_pattern(*fused, inputs, dtype, cpu);
      const Tensor scorer_q64 = fused->scorer_q().detach().to(DType::f64);
      const Tensor scorer_k64 = fused->scorer_k().detach().to(DType::f64);
      const KeyMasks keys{oracle::block_mask(pattern, config.block_size, dims.Nq, causal), config.scale(), 1.0};
      const Results want_attention =
          oracle_results(with_adaptive_scores(inputs, scorer_q64, scorer_k64, config.block_size), keys);
      // The oracle's lse of the selected pattern masks the loss.
      const std::vector<double>& loss_lse = want_attention.lse;

      // The reference: the composed path in f64 on the same pattern, scores as bias, so that the
      // scorer gradients have a float64 reference too.
      Tensor ref_scorer_q = scorer_q64.detach().requires_grad_(), ref_scorer_k = scorer_k64.detach().requires_grad_();
      const AdaptiveResults want = run_adaptive_case(
          composed_with_scores(pattern, config.block_size, config.scale(), causal, ref_scorer_q, ref_scorer_k),
          inputs, loss_lse, DType::f64, cpu, ref_scorer_q, ref_scorer_k);
      // The reference itself agrees with the oracle where the oracle applies (v has no scorer path).
      check_matches_oracle({want.attention.out, want.attention.lse, {}, {}, want.attention.dv, {}},
                           {want_attention.out, want_attention.lse, {}, {}, want_attention.dv, {}},
                           what + " reference");

      const AdaptiveResults got = run_adaptive_case(through_adaptive(fused, kCpuFused), inputs, loss_lse, dtype, cpu,
                                                    fused->scorer_q(), fused->scorer_k());
      CHECK(fused->last_pattern() == pattern);
      const Results want_all = with_scorer_q_as_dbias(want), got_all = with_scorer_q_as_dbias(got);
      const Deviation scorer_k_dev = deviation(got.dscorer_k, want.dscorer_k);
      if (dtype == DType::f64) {
        check_matches_oracle(got_all, want_all, what + " (dbias = scorer_q)");
        INFO("scorer_k gradient error " << scorer_k_dev.max_error << " for values up to "
                                        << scorer_k_dev.max_magnitude);
        CHECK(scorer_k_dev.max_error <= 1e-10 * scorer_k_dev.max_magnitude + 1e-13);
      } else {
        const AdaptiveResults ref = run_adaptive_case(through_adaptive(composed, kComposed), inputs, loss_lse, dtype,
                                                      cpu, composed->scorer_q(), composed->scorer_k());
        CHECK(composed->last_pattern() == pattern);
        check_no_worse_than_composed(got_all, with_scorer_q_as_dbias(ref), want_all, kF32Bounds,
                                     what + " (dbias = scorer_q)");
        const Deviation ref_k_dev = deviation(ref.dscorer_k, want.dscorer_k);
        INFO("scorer_k gradient: fused error " << scorer_k_dev.max_error << ", composed error " << ref_k_dev.max_error);
        CHECK(scorer_k_dev.broken == 0);
        CHECK(scorer_k_dev.max_error <=
              2.0 * ref_k_dev.max_error + kF32Floor * std::max(1.0, scorer_k_dev.max_magnitude));
      }
    }
}

// ------------------------------------------------------------------------------------------------
// impl and dropout

TEST_CASE("impl = fused with dropout in training mode throws why; auto falls back to composed") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Dims dims{1, 24, 24, 3, 8};
  Tensor q = Tensor::randn(dims.q_shape()), k = Tensor::randn(dims.k_shape()), v = Tensor::randn(dims.k_shape());
  for (const char* variant : {"dense", "dilated", "block_sparse", "block_sparse_adaptive"}) {
    INFO(variant);
    AttentionConfig config = block_config("local_window", false, seed);
    config.segment_lengths = {8, 16};
    config.dilation_rates = {1, 2};
    config.dropout = 0.1;
    config.impl = "fused";
    auto fused = make_attention(variant, config);
    CHECK(fused->is_training());
    CHECK_THROWS_WITH_AS(fused->forward(q, k, v), doctest::Contains("dropout"), Error);
    // Without training dropout does not apply, so the fused kernels can run.
    fused->eval();
    Tensor out = fused->forward(q, k, v);
    CHECK(fused->last_backend() == "fused-cpu");
    CHECK(std::isfinite(sum(out).item()));

    config.impl = "auto";
    auto automatic = make_attention(variant, config);
    automatic->forward(q, k, v);
    CHECK(automatic->last_backend() == "composed");
    automatic->eval();
    automatic->forward(q, k, v);
    CHECK(automatic->last_backend() == "fused-cpu");

    config.dropout = 0.0;
    config.impl = "composed";
    auto composed = make_attention(variant, config);
    composed->forward(q, k, v);
    CHECK(composed->last_backend() == "composed");
  }

  // The selector gives the reason, and the op itself refuses.
  CoreOptions options;
  options.scale = 0.3;
  options.dropout = 0.1;
  options.impl = Impl::fused;
  const fused::Selection selection = select_core(q, k, v, CoreKeys{}, options);
  CHECK_FALSE(selection.fused());
  CHECK(selection.backend == fused::Backend::composed);
  CHECK(selection.reason.find("dropout") != std::string::npos);
  CHECK_THROWS_WITH_AS(fused_attention(q, k, v, CoreKeys{}, options), doctest::Contains("dropout"), Error);
}

// ------------------------------------------------------------------------------------------------
// Long sequences

TEST_CASE("fused dense f32 at N = 4096: no N x N memory, rows agree with the composed path") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t B = 1, N = 4096, H = 2, D = 32;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Tensor q = Tensor::randn({B, N, H, D}).requires_grad_(), k = Tensor::randn({B, N, H, D}).requires_grad_(),
         v = Tensor::randn({B, N, H, D}).requires_grad_();
  Tensor g = Tensor::randn({B, N, H, D}), h = Tensor::randn({B, H, N});
  CoreOptions options;
  options.scale = scale;
  options.impl = Impl::fused;

  const int64_t before = memory_stats(Device::cpu()).allocated_bytes;
  reset_peak_memory(Device::cpu());
  AttentionOutput r = fused_attention(q, k, v, CoreKeys{}, options);
  add(sum(mul(r.out, g)), sum(mul(r.lse, h))).backward();
  const int64_t peak = memory_stats(Device::cpu()).peak_allocated_bytes - before;
  // One f32 score matrix of one head would be N * N * 4 bytes; everything here is O(N).
  INFO("peak tensor memory of forward + backward: " << peak << " bytes");
  CHECK(peak < N * N);

  const std::vector<double> out = r.out.to(DType::f64).to_vector(), lse = r.lse.to(DType::f64).to_vector();
  const std::vector<double> dq = q.grad().to(DType::f64).to_vector(), dk = k.grad().to(DType::f64).to_vector(),
                            dv = v.grad().to(DType::f64).to_vector();
  for (const auto* values : {&out, &lse, &dq, &dk, &dv})
    CHECK(std::all_of(values->begin(), values->end(), [](double x) { return std::isfinite(x); }));

  // A few query rows (queries are independent without causal masking): out, lse and dq of the rows
  // from the composed path on just those rows.
  for (int64_t start : {int64_t{0}, int64_t{2017}, N - 40}) {
    INFO("rows from " << start);
    const int64_t rows = 40;
    Tensor q_rows = q.detach().narrow(1, start, rows).contiguous().to(DType::f64).requires_grad_();
    Tensor k64 = k.detach().to(DType::f64), v64 = v.detach().to(DType::f64);
    StreamOptions stream;
    stream.scale = scale;
    AttentionOutput want = stream_attention(q_rows, k64, v64, stream);
    add(sum(mul(want.out, g.narrow(1, start, rows).to(DType::f64))),
        sum(mul(want.lse, h.narrow(2, start, rows).to(DType::f64))))
        .backward();
    testing::check_close(r.out.detach().narrow(1, start, rows).to(DType::f64), want.out.detach(), 1e-5, 1e-6,
                         "out rows");
    testing::check_close(r.lse.detach().narrow(2, start, rows).to(DType::f64), want.lse.detach(), 1e-5, 1e-6,
                         "lse rows");
    testing::check_close(q.grad().narrow(1, start, rows).to(DType::f64), q_rows.grad(), 1e-4, 1e-6, "dq rows");
  }

  // Column identities of the exact gradients, which involve every query:
  //   sum_j dv[j] = sum_p g[p]  (the rows of P sum to 1), and
  //   sum_j dk[j] = scale * sum_p h[p] q[p]  (the rows of dS sum to h, the weight of lse[p]).
  const std::vector<double> gv = g.to(DType::f64).to_vector(), hv = h.to(DType::f64).to_vector(),
                            qv = q.detach().to(DType::f64).to_vector();
  double worst_dv = 0, worst_dk = 0, size_dv = 0, size_dk = 0;
  for (int64_t head = 0; head < H; ++head)
    for (int64_t e = 0; e < D; ++e) {
      double sum_dv = 0, sum_g = 0, sum_dk = 0, sum_hq = 0;
      for (int64_t n = 0; n < N; ++n) {
        const size_t i = static_cast<size_t>((n * H + head) * D + e);
        sum_dv += dv[i];
        sum_g += gv[i];
        sum_dk += dk[i];
        sum_hq += scale * hv[static_cast<size_t>(head * N + n)] * qv[i];
        size_dv += std::abs(gv[i]);
        size_dk += std::abs(scale * hv[static_cast<size_t>(head * N + n)] * qv[i]);
      }
      worst_dv = std::max(worst_dv, std::abs(sum_dv - sum_g));
      worst_dk = std::max(worst_dk, std::abs(sum_dk - sum_hq));
    }
  INFO("column sums: dv off by " << worst_dv << ", dk off by " << worst_dk);
  CHECK(worst_dv <= 1e-5 * size_dv / (H * D));
  CHECK(worst_dk <= 1e-5 * size_dk / (H * D));
}

TEST_CASE("dilated attention with more branches than the fused kernels take falls back under auto, throws under fused") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  // One branch more than fused::kMaxBranches.
  AttentionConfig config{.num_heads = 2, .head_dim = 4, .segment_lengths = {2, 3, 4, 5, 6, 7, 8, 9, 10},
                         .dilation_rates = {1, 1, 1, 1, 1, 1, 1, 1, 1}};
  const Tensor q = Tensor::randn({1, 12, 2, 4}), k = Tensor::randn({1, 12, 2, 4}), v = Tensor::randn({1, 12, 2, 4});
  auto automatic = make_attention("dilated", config);
  const Tensor out = automatic->forward(q, k, v);
  CHECK(automatic->last_backend() == "composed");
  for (double x : out.to_vector()) CHECK(std::isfinite(x));
  config.impl = "fused";
  auto fused_only = make_attention("dilated", config);
  CHECK_THROWS_WITH_AS(fused_only->forward(q, k, v), doctest::Contains("at most 8 dilated branches"), Error);
}

TEST_CASE("wrapper variants report what ran their core: hilbert and head_parallel their inner's, ring its blocks'") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  AttentionConfig config{
      .num_heads = 4, .head_dim = 8, .segment_lengths = {8, 16}, .dilation_rates = {1, 2}, .grid = "4x4", .ranks = 2};
  const Tensor q = Tensor::randn({1, 16, 4, 8}), k = Tensor::randn({1, 16, 4, 8}), v = Tensor::randn({1, 16, 4, 8});
  for (const auto& [variant, expected] : std::vector<std::pair<std::string, std::string>>{
           {"hilbert", "fused-cpu"}, {"head_parallel", "fused-cpu"}, {"ring", "fused-cpu"}}) {
    INFO(variant);
    auto layer = make_attention(variant, config);
    CHECK(layer->last_backend() == "none");
    layer->forward(q, k, v);
    CHECK(layer->last_backend() == expected);
    CHECK(layer->last_precision() == "f32");
  }
}
