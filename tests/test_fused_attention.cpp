// The fused CPU attention kernels (dense, dilated with both mixings, block lists with a bias,
// forward and backward) against the float64 oracle. In f64 they must agree to rounding; in f32 their
// error may be at most twice the composed path's error on the same f32 inputs, for the output, the
// lse and every gradient. The variants run through make_attention with impl = "fused", and the
// fused op runs directly on the same key sets. The loss weighs both the output and the finite lse
// entries, so the backward of the lse is exercised too.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "attention/registry.h"
#include "support/attention_oracle.h"
#include "support/test_utils.h"
#include "tensor/allocator.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

using testing::fresh_seed;

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ------------------------------------------------------------------------------------------------
// Inputs and the float64 reference

// q, out (B, Nq, H, D); k, v (B, Nk, H, D); lse (B, H, Nq).
struct Dims {
  int64_t B = 1, Nq = 0, Nk = 0, H = 1, D = 1;
  Shape q_shape() const { return {B, Nq, H, D}; }
  Shape k_shape() const { return {B, Nk, H, D}; }
  Shape lse_shape() const { return {B, H, Nq}; }
};

// The values of one case. The loss is sum(out * g) + sum(lse * h) over the finite lse entries;
// `bias` (B, H, nqb, nkb) is an optional block bias.
struct Inputs {
  Dims dims;
  std::vector<double> q, k, v, g, h, bias;
  int64_t bias_block_size = 0;  // > 0 when `bias` is set
};

int64_t num_values(const Shape& shape) { return shape_numel(shape); }

Inputs random_inputs(const Dims& dims, uint64_t seed, int64_t bias_block_size = 0) {
  Inputs in;
  in.dims = dims;
  in.q = oracle::random_values(num_values(dims.q_shape()), seed + 1, -1.5, 1.5);
  in.k = oracle::random_values(num_values(dims.k_shape()), seed + 2, -1.5, 1.5);
  in.v = oracle::random_values(num_values(dims.k_shape()), seed + 3, -1.0, 1.0);
  in.g = oracle::random_values(num_values(dims.q_shape()), seed + 4, -1.0, 1.0);
  in.h = oracle::random_values(num_values(dims.lse_shape()), seed + 5, -1.0, 1.0);
  if (bias_block_size > 0) {
    LT_CHECK(dims.Nq == dims.Nk, "a block bias needs Nq == Nk in these tests");
    const int64_t nb = num_blocks_for(dims.Nq, bias_block_size);
    in.bias = oracle::random_values(static_cast<size_t>(dims.B * dims.H * nb * nb), seed + 6, -1.0, 1.0);
    in.bias_block_size = bias_block_size;
  }
  return in;
}

// The values as `dtype` holds them, so that the oracle sees exactly what the kernels see.
std::vector<double> round_to(const std::vector<double>& values, DType dtype) {
  if (values.empty() || dtype == DType::f64) return values;
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}).to(dtype).to(DType::f64).to_vector();
}

Inputs rounded_to(const Inputs& in, DType dtype) {
  Inputs out = in;
  for (auto* values : {&out.q, &out.k, &out.v, &out.g, &out.h, &out.bias}) *values = round_to(*values, dtype);
  return out;
}

// The key set for the oracle: masks over max(Nq, Nk) positions, one per head or per (batch, head).
struct KeyMasks {
  oracle::HeadMasks masks;
  double scale = 1.0;
  double out_scale = 1.0;
};

// Forward values and gradients of one run (or of the oracle), as float64 on the host.
struct Results {
  std::vector<double> out, lse, dq, dk, dv, dbias;
};

size_t at(const Dims& d, int64_t rows, int64_t b, int64_t n, int64_t h, int64_t e) {
  return static_cast<size_t>(((b * rows + n) * d.H + h) * d.D + e);
}

// (B, rows, H, D) -> (B, n, H, D) with zero rows appended, and back.
std::vector<double> pad_rows(const Dims& d, const std::vector<double>& x, int64_t rows, int64_t n) {
  std::vector<double> y(static_cast<size_t>(d.B * n * d.H * d.D), 0.0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t e = 0; e < d.D; ++e) y[at(d, n, b, r, h, e)] = x[at(d, rows, b, r, h, e)];
  return y;
}

std::vector<double> first_rows(const Dims& d, const std::vector<double>& x, int64_t n, int64_t rows) {
  std::vector<double> y(static_cast<size_t>(d.B * rows * d.H * d.D));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t e = 0; e < d.D; ++e) y[at(d, rows, b, r, h, e)] = x[at(d, n, b, r, h, e)];
  return y;
}

// The oracle's results for the loss sum(out * g) + sum(lse * h) (finite lse only). The oracle takes
// one square problem: q is padded to max(Nq, Nk) rows and k, v too; the masks keep padded rows
// empty and padded keys unseen. The lse term adds d lse[p] / d logit[p, j] = P[p, j] to dS.
Results oracle_results(const Inputs& in, const KeyMasks& keys) {
  const Dims& d = in.dims;
  const int64_t n = std::max(d.Nq, d.Nk);
  const std::vector<double> q = pad_rows(d, in.q, d.Nq, n), k = pad_rows(d, in.k, d.Nk, n),
                            v = pad_rows(d, in.v, d.Nk, n), g = pad_rows(d, in.g, d.Nq, n);
  const bool biased = in.bias_block_size > 0;
  const std::vector<double> bias =
      biased ? oracle::expand_block_bias(in.bias, d.B, d.H, n, in.bias_block_size) : std::vector<double>{};
  const oracle::ForwardResult forward =
      biased ? oracle::attention_forward_with_bias(q, k, v, bias, d.B, n, d.H, d.D, keys.masks, keys.scale,
                                                   keys.out_scale)
             : oracle::attention_forward(q, k, v, d.B, n, d.H, d.D, keys.masks, keys.scale, keys.out_scale);
  oracle::Gradients grads =
      biased ? oracle::attention_backward_with_bias(q, k, v, bias, g, d.B, n, d.H, d.D, keys.masks, keys.scale,
                                                    keys.out_scale)
             : oracle::attention_backward(q, k, v, g, d.B, n, d.H, d.D, keys.masks, keys.scale, keys.out_scale);

  const oracle::detail::Dims square{d.B, n, d.H, d.D};
  std::vector<double> prob, row_lse;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      oracle::detail::probabilities(square, q, k, oracle::detail::mask_for(keys.masks, b, h, d.H),
                                    biased ? &bias : nullptr, keys.scale, b, h, prob, row_lse);
      for (int64_t p = 0; p < d.Nq; ++p) {
        if (row_lse[static_cast<size_t>(p)] == kNegInf) continue;
        const double weight_of_lse = in.h[static_cast<size_t>((b * d.H + h) * d.Nq + p)];
        for (int64_t j = 0; j < n; ++j) {
          const double ds = weight_of_lse * prob[static_cast<size_t>(p * n + j)];
          if (ds == 0.0) continue;
          for (int64_t e = 0; e < d.D; ++e) {
            grads.dq[square.index(b, p, h, e)] += ds * k[square.index(b, j, h, e)] * keys.scale;
            grads.dk[square.index(b, j, h, e)] += ds * q[square.index(b, p, h, e)] * keys.scale;
          }
          if (biased) grads.dbias[square.pair(b, h, p, j)] += ds;
        }
      }
    }

  Results r;
  r.out = first_rows(d, forward.out, n, d.Nq);
  r.lse.resize(static_cast<size_t>(d.B * d.H * d.Nq));
  for (int64_t bh = 0; bh < d.B * d.H; ++bh)
    for (int64_t p = 0; p < d.Nq; ++p)
      r.lse[static_cast<size_t>(bh * d.Nq + p)] = forward.lse[static_cast<size_t>(bh * n + p)];
  r.dq = first_rows(d, grads.dq, n, d.Nq);
  r.dk = first_rows(d, grads.dk, n, d.Nk);
  r.dv = first_rows(d, grads.dv, n, d.Nk);
  if (biased) r.dbias = oracle::reduce_to_block_bias(grads.dbias, d.B, d.H, n, in.bias_block_size);
  return r;
}

// A square dense mask for Nq queries over Nk keys (non-causal), padded to max(Nq, Nk).
oracle::MultiplicityMask rectangular_dense_mask(int64_t nq, int64_t nk) {
  oracle::MultiplicityMask mask(std::max(nq, nk));
  for (int64_t p = 0; p < nq; ++p)
    for (int64_t j = 0; j < nk; ++j) mask.at(p, j) = 1;
  return mask;
}

// ------------------------------------------------------------------------------------------------
// Running an implementation

DType lse_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

// One attention computation: q, k, v and the block bias (undefined when the case has none).
using AttendFn = std::function<AttentionOutput(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias)>;

std::vector<double> gradient_of(const Tensor& leaf, const char* name) {
  INFO("gradient of " << name);
  REQUIRE(leaf.grad().defined());
  return leaf.grad().cpu().to(DType::f64).to_vector();
}

// The loss of Inputs on an output: sum(out * g) + sum(lse * h) over the entries where the oracle's
// lse is finite (the others are masked with where(), so -inf never meets a multiplication).
Tensor weighted_loss(const AttentionOutput& r, const Inputs& in, const std::vector<double>& oracle_lse, Device device) {
  const DType lse_dtype = r.lse.dtype();
  std::vector<double> finite(oracle_lse.size());
  for (size_t i = 0; i < finite.size(); ++i) finite[i] = std::isfinite(oracle_lse[i]) ? 1.0 : 0.0;
  const Shape lse_shape = in.dims.lse_shape();
  auto constant = [&](const std::vector<double>& x, const Shape& shape) {
    return Tensor::from_vector(x, shape).to(lse_dtype).to(device);
  };
  Tensor zeros = Tensor::zeros(lse_shape, lse_dtype, device);
  return add(sum(mul(r.out.to(lse_dtype), constant(in.g, in.dims.q_shape()))),
             sum(mul(where(constant(finite, lse_shape), r.lse, zeros), constant(in.h, lse_shape))));
}

// Runs `attend` on leaves of `dtype` on `device`, checks the output shapes and dtypes, and
// backpropagates the loss of Inputs.
Results run_case(const AttendFn& attend, const Inputs& in, const std::vector<double>& oracle_lse, DType dtype,
                 Device device = Device::cpu()) {
  const Dims& d = in.dims;
  auto leaf = [&](const std::vector<double>& x, const Shape& shape, DType t) {
    return Tensor::from_vector(x, shape).to(t).to(device).detach().requires_grad_();
  };
  Tensor q = leaf(in.q, d.q_shape(), dtype), k = leaf(in.k, d.k_shape(), dtype), v = leaf(in.v, d.k_shape(), dtype);
  Tensor bias;
  if (in.bias_block_size > 0) {
    const int64_t nqb = num_blocks_for(d.Nq, in.bias_block_size), nkb = num_blocks_for(d.Nk, in.bias_block_size);
    bias = leaf(in.bias, {d.B, d.H, nqb, nkb}, lse_dtype_for(dtype));
  }
  AttentionOutput r = attend(q, k, v, bias);
  REQUIRE(r.out.defined());
  REQUIRE(r.lse.defined());
  REQUIRE(r.out.shape() == d.q_shape());
  REQUIRE(r.lse.shape() == d.lse_shape());
  CHECK(r.out.dtype() == dtype);
  CHECK(r.lse.dtype() == lse_dtype_for(dtype));
  CHECK(r.out.device() == device);
  weighted_loss(r, in, oracle_lse, device).backward();
  auto host = [](const Tensor& t) { return t.detach().cpu().to(DType::f64).to_vector(); };
  Results got{host(r.out), host(r.lse), gradient_of(q, "q"), gradient_of(k, "k"), gradient_of(v, "v"), {}};
  if (bias.defined()) got.dbias = gradient_of(bias, "block bias");
  return got;
}

// ------------------------------------------------------------------------------------------------
// Comparisons

// Largest |got - want| where want is finite, the largest |want|, and how many entries break the
// pattern of infinities: got must be finite wherever want is and equal to it wherever it is not.
// Outputs are allocated by the op, so a kernel that skips an element shows up as garbage, NaN or a
// wrong infinity here.
struct Deviation {
  double max_error = 0.0, max_magnitude = 0.0;
  size_t worst = 0;  // index of the largest error
  int64_t broken = 0;
  size_t first_broken = 0;
};

Deviation deviation(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  Deviation dev;
  for (size_t i = 0; i < want.size(); ++i) {
    const bool ok = std::isfinite(want[i]) ? std::isfinite(got[i]) : got[i] == want[i];
    if (!ok) {
      if (dev.broken++ == 0) dev.first_broken = i;
      continue;
    }
    if (!std::isfinite(want[i])) continue;
    if (std::abs(got[i] - want[i]) > dev.max_error) dev.worst = i;
    dev.max_error = std::max(dev.max_error, std::abs(got[i] - want[i]));
    dev.max_magnitude = std::max(dev.max_magnitude, std::abs(want[i]));
  }
  return dev;
}

struct Field {
  const char* name;
  std::vector<double> Results::*values;
};

const Field kFields[] = {{"out", &Results::out}, {"lse", &Results::lse}, {"dq", &Results::dq},
                         {"dk", &Results::dk},   {"dv", &Results::dv},   {"dbias", &Results::dbias}};

void check_pattern(const Deviation& dev, const std::vector<double>& got, const std::vector<double>& want) {
  INFO(dev.broken << " entries break the finite/infinite pattern; first at " << dev.first_broken << ": got "
                  << (dev.broken ? got[dev.first_broken] : 0.0) << ", oracle "
                  << (dev.broken ? want[dev.first_broken] : 0.0));
  CHECK(dev.broken == 0);
}

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

// Lower precision: the fused error against the oracle is at most twice the composed path's error on
// the same inputs, plus a floor (relative to max(1, magnitude)) so that two tiny errors do not flake.
void check_no_worse_than_composed(const Results& fused, const Results& composed, const Results& want, double floor,
                                  const std::string& what) {
  for (const Field& field : kFields) {
    const auto& w = want.*field.values;
    if (w.empty()) continue;
    INFO(what << " " << std::string(field.name));
    const Deviation f = deviation(fused.*field.values, w), c = deviation(composed.*field.values, w);
    check_pattern(f, fused.*field.values, w);
    const double bound = 2.0 * c.max_error + floor * std::max(1.0, f.max_magnitude);
    INFO("fused error " << f.max_error << " at " << f.worst << " (oracle " << w[f.worst] << "), composed error "
                        << c.max_error << ", values up to " << f.max_magnitude);
    CHECK(f.max_error <= bound);
    // The composed error must itself be small, or the comparison above would prove nothing.
    CHECK(c.max_error <= 1e-3 * std::max(1.0, c.max_magnitude));
  }
}

constexpr double kF32Floor = 1e-6;

// An implementation under test and how a failure names it.
struct Labeled {
  std::string label;
  AttendFn attend;
};

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
      check_no_worse_than_composed(run_case(impl.attend, in, want.lse, DType::f32), ref, want, kF32Floor, name);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The implementations under test

AttendFn through_variant(const std::string& name, AttentionConfig config, const std::string& impl) {
  config.impl = impl;
  auto module = make_attention(name, config);
  const std::string expected_backend = impl == "fused" ? "fused-cpu" : "composed";
  return [module, expected_backend](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor&) {
    AttentionOutput r = module->forward_with_lse(q, k, v);
    CHECK(module->last_backend() == expected_backend);
    return r;
  };
}

AttendFn through_op(CoreKeys keys, double scale, bool causal) {
  return [keys, scale, causal](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    CoreKeys with_bias = keys;
    with_bias.block_bias = bias;
    CoreOptions options;
    options.scale = scale;
    options.causal = causal;
    options.impl = Impl::fused;
    const fused::Selection selection = select_core(q, k, v, with_bias, options);
    INFO("selector reason: " << selection.reason);
    CHECK(selection.backend == fused::Backend::cpu_fused);
    return fused_attention(q, k, v, with_bias, options);
  };
}

AttendFn composed_blocks(const std::vector<BlockLists>& lists, int64_t block_size, double scale, bool causal) {
  return [=](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    BlockSparseOptions options;
    options.block_size = block_size;
    options.scale = scale;
    options.causal = causal;
    return block_sparse_attention(q, k, v, lists, options, bias);
  };
}

AttentionConfig core_config(int64_t heads, int64_t head_dim, bool causal) {
  AttentionConfig c;
  c.num_heads = heads;
  c.head_dim = head_dim;
  c.causal = causal;
  return c;
}

// Masks of heads [offset, offset + count) of a list of per-head masks.
oracle::HeadMasks head_slice(const oracle::HeadMasks& all, int64_t offset, int64_t count) {
  return {all.begin() + offset, all.begin() + offset + count};
}

std::vector<DilatedBranch> branches_of(const std::vector<int64_t>& segments, const std::vector<int64_t>& dilations) {
  std::vector<DilatedBranch> branches;
  for (size_t i = 0; i < segments.size(); ++i) branches.push_back({segments[i], dilations[i]});
  return branches;
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
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
    key_sets[2].block_lists = {BlockLists{{0}, {0, 1}, {1, 2}}};
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

// ------------------------------------------------------------------------------------------------
// Dense

TEST_CASE("fused dense attention on the CPU matches the oracle: non-causal, causal, Nq != Nk") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  for (bool causal : {false, true}) {
    const Dims dims{2, 19, 19, 3, 8};
    const AttentionConfig config = core_config(dims.H, dims.D, causal);
    const KeyMasks keys{oracle::repeat_heads(oracle::dense_mask(dims.Nq, causal), dims.H), config.scale(), 1.0};
    const Inputs inputs = random_inputs(dims, seed);
    const std::string what = std::string("dense") + (causal ? " causal" : "");
    const AttendFn composed = through_variant("dense", config, "composed");
    check_case(what, inputs, keys,
               {{"variant", through_variant("dense", config, "fused")},
                {"op", through_op(CoreKeys{}, config.scale(), causal)}},
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
    const AttendFn composed = through_variant("dense", config, "composed");
    check_case(what, inputs, keys,
               {{"op", through_op(CoreKeys{}, 0.35, false)},
                {"variant", through_variant("dense", config, "fused")}},
               composed);
  }
}

// ------------------------------------------------------------------------------------------------
// Dilated

TEST_CASE("fused dilated attention, lse mixing: ragged segments, w % r != 0, w > N, uncovered rows") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
        CoreKeys core;
        core.kind = fused::KeySet::dilated;
        core.branches = branches;
        core.mixing = fused::BranchMixing::lse;
        const AttendFn composed = through_variant("dilated", config, "composed");
        check_case(what, inputs, keys,
                   {{"variant", through_variant("dilated", config, "fused")},
                    {"op", through_op(core, config.scale(), causal)}},
                   composed);
      }
  CHECK(saw_uncovered);  // the setups include rows that see no key
}

TEST_CASE("fused dilated attention, head_groups mixing: H % G != 0, empty streams, head slices") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
        CoreKeys core;
        core.kind = fused::KeySet::dilated;
        core.branches = branches;
        core.mixing = fused::BranchMixing::head_groups;
        const AttendFn composed = through_variant("dilated", config, "composed");
        check_case(what, inputs, keys,
                   {{"variant", through_variant("dilated", config, "fused")},
                    {"op", through_op(core, config.scale(), causal)}},
                   composed);
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
      CoreKeys core;
      core.kind = fused::KeySet::dilated;
      core.branches = branches;
      core.mixing = groups ? fused::BranchMixing::head_groups : fused::BranchMixing::lse;
      core.head_offset = first;
      core.total_heads = total;
      const AttendFn composed = through_variant("dilated", config, "composed");
      check_case(what, inputs, keys,
                 {{"variant", through_variant("dilated", config, "fused")},
                  {"op", through_op(core, config.scale(), causal)}},
                 composed);
    }
}

// ------------------------------------------------------------------------------------------------
// Block lists

namespace {

// 6 blocks of 8 tokens, the last one 5 tokens (N = 45); a window of one block each side, one global
// block, block distance 2 for `dilated`, 2 random blocks per row.
AttentionConfig block_config(const std::string& pattern, bool causal, uint64_t pattern_seed) {
  AttentionConfig c = core_config(3, 8, causal);
  c.block_size = 8;
  c.window = 16;
  c.global_blocks = 1;
  c.density = 0.4;
  c.seed = pattern_seed;
  c.dilation_rates = {2};
  c.pattern = pattern;
  return c;
}

// The same pattern options, written out for the oracle.
BlockPatternOptions block_options(bool causal, uint64_t pattern_seed) {
  BlockPatternOptions o;
  o.block_size = 8;
  o.window = 16;
  o.global_blocks = 1;
  o.density = 0.4;
  o.seed = pattern_seed;
  o.dilation_rates = {2};
  o.causal = causal;
  return o;
}

}  // namespace

TEST_CASE("fused block-sparse attention: every fixed pattern, ragged last block, causal and not") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
      for (int64_t h = 0; h < dims.H; ++h) core.block_lists.push_back(block_pattern(pattern, blocks, options, h));
      const AttendFn composed = through_variant("block_sparse", config, "composed");
      check_case(what, inputs, keys,
                 {{"variant", through_variant("block_sparse", config, "fused")},
                  {"op", through_op(core, config.scale(), causal)}},
                 composed);
    }
}

TEST_CASE("fused block-sparse op: shared, per-head and per-(batch, head) lists with a block bias") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
        core.block_lists = lists;
        const std::string what = "blocks, " + std::to_string(lists_per) + " lists" + (biased ? ", bias" : "") +
                                 (causal ? ", causal" : "");
        check_case(what, inputs, keys, {{"op", through_op(core, scale, causal)}},
                   composed_blocks(lists, block_size, scale, causal));
      }
}

TEST_CASE("fused block-sparse op: rows that see no key give out 0, lse -inf and finite gradients") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
      core.block_lists = lists;
      const std::string what = std::string("empty rows") + (biased ? ", bias" : "") + (causal ? ", causal" : "");
      check_case(what, inputs, keys, {{"op", through_op(core, scale, causal)}},
                 composed_blocks(lists, block_size, scale, causal));

      // Exactly zero output and -inf lse on the empty rows (the oracle comparison allows rounding).
      const Results want = oracle_results(inputs, keys);
      const Results got = run_case(through_op(core, scale, causal), inputs, want.lse, DType::f64);
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
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  const Dims dims{2, 45, 45, 3, 8};
  for (DType dtype : {DType::f64, DType::f32})
    for (bool causal : {false, true}) {
      const std::string what = std::string("adaptive ") + dtype_name(dtype) + (causal ? " causal" : "");
      INFO(what);
      AttentionConfig config = block_config("adaptive", causal, seed);
      config.density = 0.5;  // 3 of 6 blocks per row
      auto make = [&](const std::string& impl) {
        config.impl = impl;
        manual_seed(seed);  // the scorer draws its weights: the same for both implementations
        auto module =
            std::dynamic_pointer_cast<AdaptiveBlockSparseAttention>(make_attention("block_sparse_adaptive", config));
        REQUIRE(module != nullptr);
        module->to(dtype);
        return module;
      };
      auto fused = make("fused"), composed = make("composed");
      const Inputs inputs = rounded_to(random_inputs(dims, seed + (causal ? 7 : 0)), dtype);

      // Output, lse and gradients of q, k, v, scorer_q, scorer_k for the loss of Inputs.
      struct AdaptiveResults {
        Results attention;
        std::vector<double> dscorer_q, dscorer_k;
      };
      auto leaf = [&](const std::vector<double>& x, const Shape& shape, DType t) {
        return Tensor::from_vector(x, shape).to(t).detach().requires_grad_();
      };
      // The oracle's lse of the pattern the first run selects (for the loss mask); set below.
      std::vector<double> loss_lse;
      auto run = [&](const std::function<AttentionOutput(const Tensor&, const Tensor&, const Tensor&)>& attend,
                     DType t, const Tensor& scorer_q, const Tensor& scorer_k) {
        Tensor q = leaf(inputs.q, dims.q_shape(), t), k = leaf(inputs.k, dims.k_shape(), t),
               v = leaf(inputs.v, dims.k_shape(), t);
        AttentionOutput r = attend(q, k, v);
        weighted_loss(r, inputs, loss_lse, Device::cpu()).backward();
        auto host = [](const Tensor& x) { return x.detach().to(DType::f64).to_vector(); };
        return AdaptiveResults{{host(r.out), host(r.lse), gradient_of(q, "q"), gradient_of(k, "k"),
                                gradient_of(v, "v"), {}},
                               gradient_of(scorer_q, "scorer_q"), gradient_of(scorer_k, "scorer_k")};
      };

      // A first forward (no backward) fixes the pattern both implementations select.
      {
        NoGradGuard no_grad;
        fused->forward_with_lse(leaf(inputs.q, dims.q_shape(), dtype), leaf(inputs.k, dims.k_shape(), dtype),
                                leaf(inputs.v, dims.k_shape(), dtype));
      }
      const std::vector<BlockLists> pattern = fused->last_pattern();
      REQUIRE(pattern.size() == static_cast<size_t>(dims.B * dims.H));
      Tensor scores_f64;
      {
        NoGradGuard no_grad;
        scores_f64 = adaptive_block_scores(leaf(inputs.q, dims.q_shape(), DType::f64),
                                           leaf(inputs.k, dims.k_shape(), DType::f64),
                                           fused->scorer_q().detach().to(DType::f64),
                                           fused->scorer_k().detach().to(DType::f64), config.block_size);
      }
      Inputs biased = inputs;
      biased.bias = scores_f64.to_vector();
      biased.bias_block_size = config.block_size;
      const KeyMasks keys{oracle::block_mask(pattern, config.block_size, dims.Nq, causal), config.scale(), 1.0};
      const Results want_attention = oracle_results(biased, keys);
      loss_lse = want_attention.lse;

      // The reference: the composed path in f64 on the same pattern, scores as bias, so that the
      // scorer gradients have a float64 reference too.
      Tensor ref_scorer_q = fused->scorer_q().detach().to(DType::f64).requires_grad_();
      Tensor ref_scorer_k = fused->scorer_k().detach().to(DType::f64).requires_grad_();
      const AdaptiveResults want = run(
          [&](const Tensor& q, const Tensor& k, const Tensor& v) {
            BlockSparseOptions options;
            options.block_size = config.block_size;
            options.scale = config.scale();
            options.causal = causal;
            return block_sparse_attention(q, k, v, pattern, options,
                                          adaptive_block_scores(q, k, ref_scorer_q, ref_scorer_k, config.block_size));
          },
          DType::f64, ref_scorer_q, ref_scorer_k);
      // The reference itself agrees with the oracle where the oracle applies (v has no scorer path).
      check_matches_oracle({want.attention.out, want.attention.lse, {}, {}, want.attention.dv, {}},
                           {want_attention.out, want_attention.lse, {}, {}, want_attention.dv, {}},
                           what + " reference");

      auto through = [&](const std::shared_ptr<AdaptiveBlockSparseAttention>& module, const std::string& backend) {
        return [module, backend](const Tensor& q, const Tensor& k, const Tensor& v) {
          AttentionOutput r = module->forward_with_lse(q, k, v);
          CHECK(module->last_backend() == backend);
          return r;
        };
      };
      const AdaptiveResults got = run(through(fused, "fused-cpu"), dtype, fused->scorer_q(), fused->scorer_k());
      CHECK(fused->last_pattern() == pattern);
      const Results want_all{want.attention.out, want.attention.lse, want.attention.dq, want.attention.dk,
                             want.attention.dv,  want.dscorer_q};
      const Results got_all{got.attention.out, got.attention.lse, got.attention.dq, got.attention.dk,
                            got.attention.dv,  got.dscorer_q};
      const Deviation scorer_k_dev = deviation(got.dscorer_k, want.dscorer_k);
      if (dtype == DType::f64) {
        check_matches_oracle(got_all, want_all, what + " (dbias = scorer_q)");
        INFO("scorer_k gradient error " << scorer_k_dev.max_error << " for values up to "
                                        << scorer_k_dev.max_magnitude);
        CHECK(scorer_k_dev.max_error <= 1e-10 * scorer_k_dev.max_magnitude + 1e-13);
      } else {
        const AdaptiveResults ref =
            run(through(composed, "composed"), dtype, composed->scorer_q(), composed->scorer_k());
        CHECK(composed->last_pattern() == pattern);
        const Results ref_all{ref.attention.out, ref.attention.lse, ref.attention.dq, ref.attention.dk,
                              ref.attention.dv,  ref.dscorer_q};
        check_no_worse_than_composed(got_all, ref_all, want_all, kF32Floor, what + " (dbias = scorer_q)");
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
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
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
