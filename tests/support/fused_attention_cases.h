#pragma once
// Cases for the fused attention tests on the CPU and on CUDA: random inputs rounded to the dtype the
// kernels read, the float64 oracle's output, lse and gradients for a loss that weighs both the output
// and the finite lse entries, running an implementation on leaves of a dtype and device, and the
// comparisons of its results with the oracle's. Header-only; include after <doctest/doctest.h>.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attention/block_sparse.h"
#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "support/attention_oracle.h"
#include "support/test_utils.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"
#ifdef LONGTAPE_WITH_CUDA
#include "attention/fused/cuda/attention_tuning.h"  // the CUDA tests pick kernels and ask which ran
#endif

namespace longtape::testing::fused_cases {

using testing::fresh_seed;

inline constexpr double kNegInf = -std::numeric_limits<double>::infinity();
inline constexpr attention::fused::Backend kComposed = attention::fused::Backend::composed;
// The fused CUDA kernels and the GPU they run on (the CUDA tests).
inline constexpr attention::fused::Backend kCudaFused = attention::fused::Backend::cuda_fused;
inline const Device kGpu = Device::cuda(0);

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

// The values as `dtype` holds them, so that the oracle sees exactly what the kernels see.
inline std::vector<double> round_to(const std::vector<double>& values, DType dtype) {
  if (values.empty() || dtype == DType::f64) return values;
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}).to(dtype).to(DType::f64).to_vector();
}

inline Inputs rounded_to(const Inputs& in, DType dtype) {
  Inputs out = in;
  for (auto* values : {&out.q, &out.k, &out.v, &out.g, &out.h, &out.bias}) *values = round_to(*values, dtype);
  return out;
}

// Random values for every input, rounded to `values_dtype` (f64 keeps them as drawn).
inline Inputs random_inputs(const Dims& dims, uint64_t seed, int64_t bias_block_size = 0,
                            DType values_dtype = DType::f64) {
  auto draw = [&](const Shape& shape, uint64_t stream, double lo, double hi) {
    return round_to(oracle::random_values(static_cast<size_t>(shape_numel(shape)), seed + stream, lo, hi),
                    values_dtype);
  };
  Inputs in;
  in.dims = dims;
  in.q = draw(dims.q_shape(), 1, -1.5, 1.5);
  in.k = draw(dims.k_shape(), 2, -1.5, 1.5);
  in.v = draw(dims.k_shape(), 3, -1.0, 1.0);
  in.g = draw(dims.q_shape(), 4, -1.0, 1.0);
  in.h = draw(dims.lse_shape(), 5, -1.0, 1.0);
  if (bias_block_size > 0) {
    LT_CHECK(dims.Nq == dims.Nk, "a block bias needs Nq == Nk in these tests");
    const int64_t nb = attention::num_blocks_for(dims.Nq, bias_block_size);
    in.bias = draw({dims.B, dims.H, nb, nb}, 6, -1.0, 1.0);
    in.bias_block_size = bias_block_size;
  }
  return in;
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

inline size_t at(const Dims& d, int64_t rows, int64_t b, int64_t n, int64_t h, int64_t e) {
  return static_cast<size_t>(((b * rows + n) * d.H + h) * d.D + e);
}

// (B, rows, H, D) -> (B, n, H, D) with zero rows appended, and back.
inline std::vector<double> pad_rows(const Dims& d, const std::vector<double>& x, int64_t rows, int64_t n) {
  std::vector<double> y(static_cast<size_t>(d.B * n * d.H * d.D), 0.0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t e = 0; e < d.D; ++e) y[at(d, n, b, r, h, e)] = x[at(d, rows, b, r, h, e)];
  return y;
}

inline std::vector<double> first_rows(const Dims& d, const std::vector<double>& x, int64_t n, int64_t rows) {
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
inline Results oracle_results(const Inputs& in, const KeyMasks& keys) {
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
inline oracle::MultiplicityMask rectangular_dense_mask(int64_t nq, int64_t nk) {
  oracle::MultiplicityMask mask(std::max(nq, nk));
  for (int64_t p = 0; p < nq; ++p)
    for (int64_t j = 0; j < nk; ++j) mask.at(p, j) = 1;
  return mask;
}

// ------------------------------------------------------------------------------------------------
// Running an implementation

inline DType lse_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

// One attention computation: q, k, v and the block bias (undefined when the case has none).
using AttendFn =
    std::function<attention::AttentionOutput(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias)>;

inline std::vector<double> gradient_of(const Tensor& leaf, const char* name) {
  INFO("gradient of " << name);
  REQUIRE(leaf.grad().defined());
  return leaf.grad().cpu().to(DType::f64).to_vector();
}

inline std::vector<double> host_values(const Tensor& t) { return t.detach().cpu().to(DType::f64).to_vector(); }

inline Tensor leaf_on(const std::vector<double>& x, const Shape& shape, DType dtype, Device device) {
  return Tensor::from_vector(x, shape).to(dtype).to(device).detach().requires_grad_();
}

// The loss of Inputs on an output: sum(out * g) + sum(lse * h) over the entries where the oracle's
// lse is finite (the others are masked with where(), so -inf never meets a multiplication). Computed
// in the lse dtype (f32 for bf16 and f32 runs): g holds values of the run's dtype, so the gradient
// reaching out is exactly g.
inline Tensor weighted_loss(const attention::AttentionOutput& r, const Inputs& in,
                            const std::vector<double>& oracle_lse) {
  const DType lse_dtype = r.lse.dtype();
  const Device device = r.lse.device();
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

// Fills the caching pool of `device` with NaN blocks of many sizes and frees them, so that an output
// element a kernel forgets to write reads as NaN instead of passing with stale or zero memory.
inline void poison_gpu_pool(Device device) {
  std::vector<Tensor> blocks;
  for (int64_t n : {64, 4000, 64000, 400000, 2000000})
    for (int copies = 0; copies < 3; ++copies)
      blocks.push_back(Tensor::full({n}, std::numeric_limits<double>::quiet_NaN(), DType::f32, device));
}

// Runs `attend` on leaves of `dtype` on `device`, checks the output shapes, dtypes and device, and
// backpropagates the loss of Inputs. Only the CUDA allocator caches freed blocks, so only there can
// stale memory hide an unwritten element, and only there could the lse be left on another device.
inline Results run_case(const AttendFn& attend, const Inputs& in, const std::vector<double>& oracle_lse, DType dtype,
                        Device device = Device::cpu()) {
  const Dims& d = in.dims;
  Tensor q = leaf_on(in.q, d.q_shape(), dtype, device), k = leaf_on(in.k, d.k_shape(), dtype, device),
         v = leaf_on(in.v, d.k_shape(), dtype, device);
  Tensor bias;
  if (in.bias_block_size > 0) {
    const int64_t nqb = attention::num_blocks_for(d.Nq, in.bias_block_size),
                  nkb = attention::num_blocks_for(d.Nk, in.bias_block_size);
    bias = leaf_on(in.bias, {d.B, d.H, nqb, nkb}, lse_dtype_for(dtype), device);
  }
  if (device.is_cuda()) poison_gpu_pool(device);
  attention::AttentionOutput r = attend(q, k, v, bias);
  REQUIRE(r.out.defined());
  REQUIRE(r.lse.defined());
  REQUIRE(r.out.shape() == d.q_shape());
  REQUIRE(r.lse.shape() == d.lse_shape());
  CHECK(r.out.dtype() == dtype);
  CHECK(r.lse.dtype() == lse_dtype_for(dtype));
  CHECK(r.out.device() == device);
  if (device.is_cuda()) CHECK(r.lse.device() == device);
  Tensor loss = weighted_loss(r, in, oracle_lse);
  if (device.is_cuda()) poison_gpu_pool(device);  // for the gradients too
  loss.backward();
  Results got{host_values(r.out), host_values(r.lse), gradient_of(q, "q"), gradient_of(k, "k"), gradient_of(v, "v"),
              {}};
  if (bias.defined()) got.dbias = gradient_of(bias, "block bias");
  return got;
}

// ------------------------------------------------------------------------------------------------
// Comparisons

// Largest |got - want| where want is finite, the largest |want|, and how many entries break the
// pattern of infinities: got must be finite wherever want is and equal to it wherever it is not.
// Outputs are allocated by the op (on the GPU from a pool poisoned with NaN), so an element a kernel
// skips shows up here as garbage, NaN or a wrong infinity.
struct Deviation {
  double max_error = 0.0, max_magnitude = 0.0;
  size_t worst = 0;  // index of the largest error
  int64_t broken = 0;
  size_t first_broken = 0;
};

inline Deviation deviation(const std::vector<double>& got, const std::vector<double>& want) {
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

inline const Field kFields[] = {{"out", &Results::out}, {"lse", &Results::lse}, {"dq", &Results::dq},
                                {"dk", &Results::dk},   {"dv", &Results::dv},   {"dbias", &Results::dbias}};

inline void check_pattern(const Deviation& dev, const std::vector<double>& got, const std::vector<double>& want) {
  INFO(dev.broken << " entries break the finite/infinite pattern; first at " << dev.first_broken << ": got "
                  << (dev.broken ? got[dev.first_broken] : 0.0) << ", oracle "
                  << (dev.broken ? want[dev.first_broken] : 0.0));
  CHECK(dev.broken == 0);
}

// How close a fused result must stay to the composed one, both relative to max(1, magnitude):
// `floor` is the error below which two errors are not told apart (so that two tiny errors do not
// flake), `composed_limit` the largest composed error for which the comparison still proves something.
struct ErrorBounds {
  double floor;
  double composed_limit;
};

// The fused error against the oracle is at most twice the composed path's error on the same inputs,
// plus the floor.
inline void check_no_worse_than_composed(const Results& fused, const Results& composed, const Results& want,
                                         const ErrorBounds& bounds, const std::string& what) {
  for (const Field& field : kFields) {
    const auto& w = want.*field.values;
    if (w.empty()) continue;
    INFO(what << " " << std::string(field.name));
    const Deviation f = deviation(fused.*field.values, w), c = deviation(composed.*field.values, w);
    check_pattern(f, fused.*field.values, w);
    const double bound = 2.0 * c.max_error + bounds.floor * std::max(1.0, f.max_magnitude);
    INFO("fused error " << f.max_error << " at " << f.worst << " (oracle " << w[f.worst] << "), composed error "
                        << c.max_error << ", values up to " << f.max_magnitude);
    CHECK(f.max_error <= bound);
    // The composed error must itself be small, or the comparison above would prove nothing.
    CHECK(c.max_error <= bounds.composed_limit * std::max(1.0, c.max_magnitude));
  }
}

// ------------------------------------------------------------------------------------------------
// The implementations under test

// An implementation under test and how a failure names it.
struct Labeled {
  std::string label;
  AttendFn attend;
};

// A variant through make_attention with impl = "composed" when `backend` is the composed path and
// impl = "fused" otherwise; every run must report `backend`.
inline AttendFn through_variant(const std::string& name, attention::AttentionConfig config,
                                attention::fused::Backend backend) {
  config.impl = backend == attention::fused::Backend::composed ? "composed" : "fused";
  auto module = attention::make_attention(name, config);
  const std::string expected_backend = attention::fused::backend_name(backend);
  return [module, expected_backend](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor&) {
    attention::AttentionOutput r = module->forward_with_lse(q, k, v);
    CHECK(module->last_backend() == expected_backend);
    return r;
  };
}

// fused_attention itself on `keys` with the block bias of the case; the selector must pick `backend`.
inline AttendFn through_op(attention::CoreKeys keys, double scale, bool causal, attention::fused::Backend backend) {
  return [keys, scale, causal, backend](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    attention::CoreKeys with_bias = keys;
    with_bias.block_bias = bias;
    attention::CoreOptions options;
    options.scale = scale;
    options.causal = causal;
    options.impl = attention::Impl::fused;
    const attention::fused::Selection selection = attention::select_core(q, k, v, with_bias, options);
    INFO("selector reason: " << selection.reason);
    CHECK(selection.backend == backend);
    return attention::fused_attention(q, k, v, with_bias, options);
  };
}

inline AttendFn composed_blocks(const std::vector<attention::BlockLists>& lists, int64_t block_size, double scale,
                                bool causal) {
  return [=](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias) {
    attention::BlockSparseOptions options;
    options.block_size = block_size;
    options.scale = scale;
    options.causal = causal;
    return attention::block_sparse_attention(q, k, v, lists, options, bias);
  };
}

inline attention::AttentionConfig core_config(int64_t heads, int64_t head_dim, bool causal) {
  attention::AttentionConfig c;
  c.num_heads = heads;
  c.head_dim = head_dim;
  c.causal = causal;
  return c;
}

inline std::vector<attention::DilatedBranch> branches_of(const std::vector<int64_t>& segments,
                                                         const std::vector<int64_t>& dilations) {
  std::vector<attention::DilatedBranch> branches;
  for (size_t i = 0; i < segments.size(); ++i) branches.push_back({segments[i], dilations[i]});
  return branches;
}

// ------------------------------------------------------------------------------------------------
// The adaptive block-sparse variant, whose scorer weights have gradients too

// The adaptive variant with impl = `impl`. Its scorer draws its weights after manual_seed(seed), so
// that modules built with the same seed select the same blocks.
inline std::shared_ptr<attention::AdaptiveBlockSparseAttention> adaptive_module(attention::AttentionConfig config,
                                                                               const std::string& impl,
                                                                               uint64_t seed) {
  config.impl = impl;
  manual_seed(seed);
  auto module = std::dynamic_pointer_cast<attention::AdaptiveBlockSparseAttention>(
      attention::make_attention("block_sparse_adaptive", config));
  REQUIRE(module != nullptr);
  return module;
}

// The pattern `module` selects for the inputs as `dtype` on `device`, one list per (batch, head),
// found by a forward without backward.
inline std::vector<attention::BlockLists> selected_pattern(attention::AdaptiveBlockSparseAttention& module,
                                                           const Inputs& in, DType dtype, Device device) {
  {
    NoGradGuard no_grad;
    module.forward_with_lse(leaf_on(in.q, in.dims.q_shape(), dtype, device),
                            leaf_on(in.k, in.dims.k_shape(), dtype, device),
                            leaf_on(in.v, in.dims.k_shape(), dtype, device));
  }
  std::vector<attention::BlockLists> pattern = module.last_pattern();
  REQUIRE(pattern.size() == static_cast<size_t>(in.dims.B * in.dims.H));
  return pattern;
}

// Output, lse and gradients of q, k, v, scorer_q and scorer_k for the loss of Inputs.
struct AdaptiveResults {
  Results attention;
  std::vector<double> dscorer_q, dscorer_k;
};

// dbias stands for the scorer_q gradient, so that it is compared with the attention fields.
inline Results with_scorer_q_as_dbias(const AdaptiveResults& r) {
  return Results{r.attention.out, r.attention.lse, r.attention.dq, r.attention.dk, r.attention.dv, r.dscorer_q};
}

using AdaptiveAttendFn = std::function<attention::AttentionOutput(const Tensor& q, const Tensor& k, const Tensor& v)>;

// Runs `attend` on leaves of `dtype` on `device` and backpropagates the loss of Inputs, masked where
// `oracle_lse` is -inf; `scorer_q` and `scorer_k` are the scorer weights `attend` uses.
inline AdaptiveResults run_adaptive_case(const AdaptiveAttendFn& attend, const Inputs& in,
                                         const std::vector<double>& oracle_lse, DType dtype, Device device,
                                         const Tensor& scorer_q, const Tensor& scorer_k) {
  const Dims& d = in.dims;
  Tensor q = leaf_on(in.q, d.q_shape(), dtype, device), k = leaf_on(in.k, d.k_shape(), dtype, device),
         v = leaf_on(in.v, d.k_shape(), dtype, device);
  attention::AttentionOutput r = attend(q, k, v);
  weighted_loss(r, in, oracle_lse).backward();
  return AdaptiveResults{
      {host_values(r.out), host_values(r.lse), gradient_of(q, "q"), gradient_of(k, "k"), gradient_of(v, "v"), {}},
      gradient_of(scorer_q, "scorer_q"),
      gradient_of(scorer_k, "scorer_k")};
}

// The module's forward, which must run on `backend`.
inline AdaptiveAttendFn through_adaptive(const std::shared_ptr<attention::AdaptiveBlockSparseAttention>& module,
                                         attention::fused::Backend backend) {
  const std::string expected_backend = attention::fused::backend_name(backend);
  return [module, expected_backend](const Tensor& q, const Tensor& k, const Tensor& v) {
    attention::AttentionOutput r = module->forward_with_lse(q, k, v);
    CHECK(module->last_backend() == expected_backend);
    return r;
  };
}

// The composed path on a fixed `pattern` with the adaptive scores of `scorer_q` and `scorer_k` as the
// block bias: in f64 it gives the scorer gradients a float64 reference.
inline AdaptiveAttendFn composed_with_scores(const std::vector<attention::BlockLists>& pattern, int64_t block_size,
                                             double scale, bool causal, const Tensor& scorer_q,
                                             const Tensor& scorer_k) {
  return [=](const Tensor& q, const Tensor& k, const Tensor& v) {
    attention::BlockSparseOptions options;
    options.block_size = block_size;
    options.scale = scale;
    options.causal = causal;
    return attention::block_sparse_attention(
        q, k, v, pattern, options, attention::adaptive_block_scores(q, k, scorer_q, scorer_k, block_size));
  };
}

// Inputs with the adaptive scores of f64 `scorer_q` and `scorer_k`, computed in f64 on the CPU, as
// their block bias: the oracle's view of the adaptive variant on a fixed pattern.
inline Inputs with_adaptive_scores(const Inputs& in, const Tensor& scorer_q, const Tensor& scorer_k,
                                   int64_t block_size) {
  Tensor scores;
  {
    NoGradGuard no_grad;
    scores = attention::adaptive_block_scores(leaf_on(in.q, in.dims.q_shape(), DType::f64, Device::cpu()),
                                              leaf_on(in.k, in.dims.k_shape(), DType::f64, Device::cpu()), scorer_q,
                                              scorer_k, block_size);
  }
  Inputs biased = in;
  biased.bias = scores.to_vector();
  biased.bias_block_size = block_size;
  return biased;
}

}  // namespace longtape::testing::fused_cases
