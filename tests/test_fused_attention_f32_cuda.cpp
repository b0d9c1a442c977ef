// The fused CUDA attention kernels for f32 inputs (exact f32: FFMA on the CUDA cores, no TF32)
// against the float64 oracle on the same f32 values: for the output, the lse and every gradient
// the fused error may be at most twice the error of the composed path on the same f32 inputs on
// the GPU (TF32 off), plus a floor of 1e-6 relative to max(1, |values|). Outputs and gradients
// come from a GPU pool poisoned with NaN first (run_case), so an element a kernel skips fails.
// Dense (N not a multiple of 64, Nq != Nk, head dims 32, 64, 128), dilated (both mixings, ragged
// last segments, w > N, H % G != 0), block lists with a bias and its gradient, rows at unaligned
// strides (the scalar-load path), and both backward modes (deterministic: bitwise repeatable;
// dQ by atomics). Every case is reported as skipped when no GPU is visible (or without CUDA).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/fused/fused_attention.h"
#include "attention/registry.h"
#include "support/attention_oracle.h"
#include "support/fused_attention_cases.h"
#include "support/test_utils.h"
#include "tensor/backend_options.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::fused_cases;

namespace {

// The floor keeps two tiny errors from flaking; a composed error above 1e-3 would make the
// comparison meaningless.
constexpr ErrorBounds kF32Bounds{1e-6, 1e-3};

// Backend switches for the duration of a case: TF32 off (the composed reference multiplies in
// exact f32), and the deterministic switch as asked.
class F32Scope {
 public:
  explicit F32Scope(bool deterministic) : tf32_(allow_tf32()), deterministic_(deterministic_algorithms()) {
    set_allow_tf32(false);
    set_deterministic_algorithms(deterministic);
  }
  ~F32Scope() {
    set_allow_tf32(tf32_);
    set_deterministic_algorithms(deterministic_);
  }

 private:
  bool tf32_, deterministic_;
};

// `attend`, checking afterwards that the f32 kernels ran forward and backward.
AttendFn on_f32_kernels(AttendFn attend) {
  return [attend](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    AttentionOutput r = attend(q, k, v, bias);
#ifdef LONGTAPE_WITH_CUDA
    CHECK(std::string(cuda::attn::last_forward_kernel()) == "f32-simt");
#endif
    return r;
  };
}

// One case: the oracle and the composed path once, then every fused implementation, on f32 values.
void check_case(const std::string& what, const Inputs& inputs, const KeyMasks& keys, const std::vector<Labeled>& fused,
                const AttendFn& composed) {
  const Results want = oracle_results(inputs, keys);
  const Results ref = run_case(composed, inputs, want.lse, DType::f32, kGpu);
  for (const Labeled& impl : fused) {
    const std::string name = what + " (" + impl.label + ", f32)";
    INFO(name);
    const Results got = run_case(on_f32_kernels(impl.attend), inputs, want.lse, DType::f32, kGpu);
#ifdef LONGTAPE_WITH_CUDA
    CHECK(std::string(cuda::attn::last_backward_kernel()) == "f32-simt");
#endif
    check_no_worse_than_composed(got, ref, want, kF32Bounds, name);
  }
}

Inputs f32_inputs(const Dims& dims, uint64_t seed, int64_t bias_block_size = 0) {
  return random_inputs(dims, seed, bias_block_size, DType::f32);
}

// x (B, N, H, D) as a view whose rows start one float into rows of D + 1 floats: no row is 16-byte
// aligned, so the f32 kernels take their scalar loads and stores. Differentiable (cat, narrow).
Tensor unaligned_rows(const Tensor& x) {
  Shape pad = x.shape();
  pad[3] = 1;
  return cat({Tensor::zeros(pad, x.dtype(), x.device()), x}, 3).narrow(3, 1, x.size(3));
}

AttendFn through_unaligned_rows(const CoreKeys& keys, double scale, bool causal) {
  const AttendFn op = through_op(keys, scale, causal, kCudaFused);
  return [op](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    const Tensor qu = unaligned_rows(q), ku = unaligned_rows(k), vu = unaligned_rows(v);
    REQUIRE(qu.strides().back() == 1);  // read in place, not copied
    REQUIRE(qu.strides()[1] % 4 != 0);
    return op(qu, ku, vu, bias);
  };
}

// A dense case: nq queries over nk keys (causal only when nq == nk). unaligned: the op on views
// whose rows are not 16-byte aligned.
struct DenseCase {
  int64_t nq, nk, head_dim;
  bool causal, unaligned;
};

void check_dense(const DenseCase& c, uint64_t seed) {
  const Dims dims{2, c.nq, c.nk, 3, c.head_dim};
  const AttentionConfig config = core_config(dims.H, dims.D, c.causal);
  const oracle::MultiplicityMask mask =
      c.nq == c.nk ? oracle::dense_mask(c.nq, c.causal) : rectangular_dense_mask(c.nq, c.nk);
  std::vector<Labeled> fused;
  if (c.unaligned) {
    fused.push_back({"op, unaligned rows", through_unaligned_rows(CoreKeys{}, config.scale(), c.causal)});
  } else {
    fused.push_back({"op", through_op(CoreKeys{}, config.scale(), c.causal, kCudaFused)});
    if (c.nq == c.nk) fused.push_back({"variant", through_variant("dense", config, kCudaFused)});
  }
  const std::string what = "dense Nq " + std::to_string(c.nq) + " Nk " + std::to_string(c.nk) + " D " +
                           std::to_string(c.head_dim) + (c.causal ? " causal" : "");
  check_case(what, f32_inputs(dims, seed + static_cast<uint64_t>(31 * c.nq + c.nk + c.head_dim)),
             {oracle::repeat_heads(mask, dims.H), config.scale(), 1.0}, fused,
             through_variant("dense", config, kComposed));
}

// A dilated case on N tokens; unaligned as for DenseCase (through the op only).
struct DilatedCase {
  std::vector<int64_t> segments, dilations;
  int64_t n, heads, head_dim;
  Mixing mixing;
  bool causal, unaligned;
};

void check_dilated(const DilatedCase& c, uint64_t seed) {
  const std::vector<DilatedBranch> branches = branches_of(c.segments, c.dilations);
  const Dims dims{c.n > 500 ? 1 : 2, c.n, c.n, c.heads, c.head_dim};
  AttentionConfig config = core_config(dims.H, dims.D, c.causal);
  config.segment_lengths = c.segments;
  config.dilation_rates = c.dilations;
  config.mixing = c.mixing;
  const bool groups = c.mixing == Mixing::head_groups;
  CoreKeys core;
  core.kind = fused::KeySet::dilated;
  core.branches = branches;
  core.mixing = groups ? fused::BranchMixing::head_groups : fused::BranchMixing::lse;
  std::vector<Labeled> fused;
  if (c.unaligned) {
    fused.push_back({"op, unaligned rows", through_unaligned_rows(core, config.scale(), c.causal)});
  } else {
    fused.push_back({"variant", through_variant("dilated", config, kCudaFused)});
    fused.push_back({"op", through_op(core, config.scale(), c.causal, kCudaFused)});
  }
  const KeyMasks keys{groups ? oracle::dilated_head_groups_mask(c.n, dims.H, branches, c.causal)
                             : oracle::dilated_lse_mask(c.n, dims.H, branches, c.causal),
                      config.scale(), groups ? oracle::head_groups_out_scale(branches) : 1.0};
  const std::string what = "dilated " + mixing_name(c.mixing) + " w.." + std::to_string(c.segments.back()) + " r.." +
                           std::to_string(c.dilations.back()) + " N " + std::to_string(c.n) + " H " +
                           std::to_string(c.heads) + " D " + std::to_string(c.head_dim) + (c.causal ? " causal" : "");
  check_case(what, f32_inputs(dims, seed + static_cast<uint64_t>(c.n + 7 * c.heads + c.segments.back())), keys,
             fused, through_variant("dilated", config, kComposed));
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Dense

TEST_CASE("fused CUDA f32 dense attention: N not a multiple of 64, Nq != Nk, head dims 32, 64, 128" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const F32Scope scope(true);
  std::vector<DenseCase> cases{{200, 333, 64, false, false}, {333, 200, 64, false, false}};
  for (int64_t head_dim : {32, 64, 128})
    for (int64_t n : {200, 333}) {
      cases.push_back({n, n, head_dim, false, false});
      cases.push_back({n, n, head_dim, true, false});
    }
  for (const DenseCase& c : cases) check_dense(c, seed);
}

// ------------------------------------------------------------------------------------------------
// Dilated

TEST_CASE("fused CUDA f32 dilated attention: lse and head_groups, ragged segments, w > N, H % G != 0" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const F32Scope scope(true);
  // N = 300: ragged last segments of every branch; {64, 128, 512} x {1, 2, 3}: w > N and w % r != 0;
  // 5 heads over 3 branches: H % G != 0.
  const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> branch_sets{
      {{64, 128, 256}, {1, 2, 4}}, {{64, 128, 512}, {1, 2, 3}}};
  std::vector<DilatedCase> cases;
  for (const auto& [segments, dilations] : branch_sets)
    for (Mixing mixing : {Mixing::lse, Mixing::head_groups})
      for (bool causal : {false, true})
        for (int64_t heads : {6, 5}) cases.push_back({segments, dilations, 300, heads, 64, mixing, causal, false});
  // Head dims 32 and 128 on a longer sequence (many segments, a ragged last one).
  for (int64_t head_dim : {32, 128})
    cases.push_back({{64, 128, 256}, {1, 2, 4}, 1000, 5, head_dim, Mixing::lse, true, false});
  for (const DilatedCase& c : cases) check_dilated(c, seed);
}

// ------------------------------------------------------------------------------------------------
// Block lists

TEST_CASE("fused CUDA f32 block-sparse attention: block sizes 64 and 128, bias and its gradient, empty rows" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const F32Scope scope(true);
  const Dims dims{2, 400, 400, 3, 64};  // 7 blocks of 64 (the last 16 tokens) or 4 of 128
  const double scale = 0.125;
  for (int64_t block_size : {64, 128})
    for (bool causal : {false, true}) {
      const BlockPatternOptions options{
          .block_size = block_size, .window = 256, .global_blocks = 1, .density = 0.4, .seed = seed, .causal = causal};
      const int64_t blocks = num_blocks_for(dims.Nq, block_size);
      std::vector<std::pair<std::string, std::vector<BlockLists>>> arrangements;
      arrangements.push_back({"shared local_window", {block_pattern(BlockPattern::local_window, blocks, options)}});
      std::vector<BlockLists> per_batch_head;
      for (int64_t l = 0; l < dims.B * dims.H; ++l)
        per_batch_head.push_back(block_pattern(BlockPattern::random, blocks, options, l));
      arrangements.push_back({"random per (batch, head)", per_batch_head});
      // Query block 1 sees nothing; under causal masking query block 2 sees only a later block.
      if (block_size == 64) arrangements.push_back({"empty rows", {BlockLists{{0}, {}, {3}, {1, 3}, {4}, {0, 5}, {6}}}});
      for (const auto& [label, lists] : arrangements)
        for (bool biased : {false, true}) {
          if (biased && block_size != 64) continue;  // the kernels take a bias with 64-token blocks
          oracle::HeadMasks masks = oracle::block_mask(lists, block_size, dims.Nq, causal);
          if (lists.size() == 1) masks = oracle::repeat_heads(masks[0], dims.H);
          CoreKeys core;
          core.kind = fused::KeySet::blocks;
          core.block_size = block_size;
          core.block_lists = make_block_lists(lists);
          const std::string what = "blocks " + std::to_string(block_size) + ", " + label + (biased ? ", bias" : "") +
                                   (causal ? ", causal" : "");
          check_case(what, f32_inputs(dims, seed + lists.size() + static_cast<uint64_t>(block_size), biased ? 64 : 0),
                     {masks, scale, 1.0}, {{"op", through_op(core, scale, causal, kCudaFused)}},
                     composed_blocks(lists, block_size, scale, causal));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Unaligned rows and the backward's two modes

TEST_CASE("fused CUDA f32 attention on rows that are not 16-byte aligned (scalar loads)" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const F32Scope scope(true);
  for (int64_t head_dim : {32, 64}) {
    check_dense({200, 200, head_dim, true, true}, seed);
    check_dense({200, 333, head_dim, false, true}, seed);
  }
  check_dilated({{64, 128, 256}, {1, 2, 4}, 300, 5, 64, Mixing::lse, false, true}, seed);
  check_dilated({{64, 128, 256}, {1, 2, 4}, 300, 5, 64, Mixing::head_groups, true, true}, seed);
}

TEST_CASE("fused CUDA f32 backward: dQ by atomics matches the oracle; deterministic mode is bitwise repeatable" *
          doctest::skip(!cuda_available())) {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 333, 333, 4, 64};
  const std::vector<DilatedBranch> branches = branches_of({64, 128, 256}, {1, 2, 4});
  for (bool dilated : {false, true}) {
    AttentionConfig config = core_config(dims.H, dims.D, true);
    CoreKeys core;
    if (dilated) {
      config.segment_lengths = {64, 128, 256};
      config.dilation_rates = {1, 2, 4};
      core.kind = fused::KeySet::dilated;
      core.branches = branches;
    }
    const KeyMasks keys{dilated ? oracle::dilated_lse_mask(dims.Nq, dims.H, branches, true)
                                : oracle::repeat_heads(oracle::dense_mask(dims.Nq, true), dims.H),
                        config.scale(), 1.0};
    const Inputs inputs = f32_inputs(dims, seed + (dilated ? 1 : 0));
    const std::string what = std::string(dilated ? "dilated lse" : "dense") + " causal";
    {
      const F32Scope scope(false);  // dQ gathered with atomics inside the dK/dV kernel
      check_case(what + ", atomic dQ", inputs, keys, {{"op", through_op(core, config.scale(), true, kCudaFused)}},
                 through_variant(dilated ? "dilated" : "dense", config, kComposed));
    }
    const F32Scope scope(true);
    const Results want = oracle_results(inputs, keys);
    const AttendFn op = through_op(core, config.scale(), true, kCudaFused);
    const Results first = run_case(op, inputs, want.lse, DType::f32, kGpu);
    const Results second = run_case(op, inputs, want.lse, DType::f32, kGpu);
    INFO(what << ", deterministic");
    CHECK(first.out == second.out);
    CHECK(first.lse == second.lse);
    CHECK(first.dq == second.dq);
    CHECK(first.dk == second.dk);
    CHECK(first.dv == second.dv);
  }
}
