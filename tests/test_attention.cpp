// Dense and dilated attention, the composed building blocks, the registry, the multihead layer
// and the `longtape attention` command, checked against the float64 brute-force oracle and
// float64 gradcheck (docs/attention.md, invariants).
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "attention/composed.h"
#include "attention/dense.h"
#include "attention/dilated.h"
#include "attention/multihead.h"
#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/gradcheck.h"
#include "io/npy.h"
#include "io/tensor_io.h"
#include "support/attention_oracle.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

using testing::fresh_seed;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Seeds the default generator with a fresh seed, reported with any failure so it can be replayed.
#define SEED_FRESH()                       \
  const uint64_t test_seed = fresh_seed(); \
  manual_seed(test_seed);                  \
  INFO("seed " << test_seed)

AttentionConfig dilated_config(int64_t heads, int64_t dim, std::vector<int64_t> w, std::vector<int64_t> r,
                               Mixing mixing, bool causal) {
  return {.num_heads = heads, .head_dim = dim, .segment_lengths = std::move(w), .dilation_rates = std::move(r),
          .mixing = mixing, .causal = causal};
}

AttentionConfig dense_config(int64_t heads, int64_t dim, bool causal) {
  return {.num_heads = heads, .head_dim = dim, .causal = causal};
}

std::vector<DilatedBranch> branches_of(const AttentionConfig& c) {
  std::vector<DilatedBranch> b;
  for (size_t i = 0; i < c.segment_lengths.size(); ++i) b.push_back({c.segment_lengths[i], c.dilation_rates[i]});
  return b;
}

Tensor leaf(const Shape& shape, DType dtype = DType::f64) { return Tensor::randn(shape, dtype).requires_grad_(); }

struct Run {
  std::vector<double> out, lse, dq, dk, dv;
};

// Forward and backward of `variant` on (B, N, H, D) f64 inputs with a random output gradient.
Run run_variant(Attention& attn, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout) {
  Tensor ql = q.detach().requires_grad_(), kl = k.detach().requires_grad_(), vl = v.detach().requires_grad_();
  AttentionOutput r = attn.forward_with_lse(ql, kl, vl);
  r.out.backward(dout);
  return {r.out.to_vector(), r.lse.to_vector(), ql.grad().to_vector(), kl.grad().to_vector(), vl.grad().to_vector()};
}

// Compares one variant against the oracle with the given masks, forward (out, lse) and backward.
void check_with_oracle(const std::string& variant, const AttentionConfig& config, int64_t B, int64_t N,
                       const oracle::HeadMasks& masks, double out_scale) {
  const int64_t H = config.num_heads, D = config.head_dim;
  Tensor q = Tensor::randn({B, N, H, D}, DType::f64), k = Tensor::randn({B, N, H, D}, DType::f64);
  Tensor v = Tensor::randn({B, N, H, D}, DType::f64), dout = Tensor::randn({B, N, H, D}, DType::f64);
  auto attn = make_attention(variant, config);
  Run got = run_variant(*attn, q, k, v, dout);
  const double scale = config.scale();
  oracle::ForwardResult ref =
      oracle::attention_forward(q.to_vector(), k.to_vector(), v.to_vector(), B, N, H, D, masks, scale, out_scale);
  oracle::Gradients grads = oracle::attention_backward(q.to_vector(), k.to_vector(), v.to_vector(), dout.to_vector(),
                                                       B, N, H, D, masks, scale, out_scale);
  CHECK(oracle::max_scaled_error(got.out, ref.out, 1e-11, 1e-9) <= 1.0);
  CHECK(oracle::max_scaled_error(got.lse, ref.lse, 1e-11, 1e-9) <= 1.0);
  CHECK(oracle::max_scaled_error(got.dq, grads.dq, 1e-11, 1e-9) <= 1.0);
  CHECK(oracle::max_scaled_error(got.dk, grads.dk, 1e-11, 1e-9) <= 1.0);
  CHECK(oracle::max_scaled_error(got.dv, grads.dv, 1e-11, 1e-9) <= 1.0);
  for (double g : got.dq) REQUIRE_FALSE(std::isnan(g));
}

void check_dilated_with_oracle(const AttentionConfig& c, int64_t B, int64_t N) {
  INFO("N=" << N << " H=" << c.num_heads << " w=" << shape_str(c.segment_lengths) << " r="
            << shape_str(c.dilation_rates) << " mixing=" << mixing_name(c.mixing) << " causal=" << c.causal);
  const auto branches = branches_of(c);
  if (c.mixing == Mixing::lse) {
    check_with_oracle("dilated", c, B, N, oracle::dilated_lse_mask(N, c.num_heads, branches, c.causal), 1.0);
  } else {
    check_with_oracle("dilated", c, B, N, oracle::dilated_head_groups_mask(N, c.num_heads, branches, c.causal),
                      oracle::head_groups_out_scale(branches));
  }
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) && a[i] == b[i]) continue;
    worst = std::max(worst, std::abs(a[i] - b[i]));
  }
  return worst;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Config helpers and the registry

TEST_CASE("config: scale, mixing names and integer lists") {
  AttentionConfig c;
  c.head_dim = 64;
  CHECK(c.scale() == doctest::Approx(0.125));
  c.softmax_scale = 0.3;
  CHECK(c.scale() == 0.3);
  CHECK(parse_mixing("lse") == Mixing::lse);
  CHECK(parse_mixing("head_groups") == Mixing::head_groups);
  CHECK(mixing_name(Mixing::head_groups) == "head_groups");
  CHECK_THROWS_WITH_AS(parse_mixing("groups"), doctest::Contains("lse"), Error);
  CHECK(parse_int_list("2048,4096", "--segments") == std::vector<int64_t>{2048, 4096});
  CHECK(parse_int_list(" 8 , 16,32 ", "--segments") == std::vector<int64_t>{8, 16, 32});
  CHECK(parse_int_list("-3", "--segments") == std::vector<int64_t>{-3});
  for (const char* bad : {"", "8,", ",8", "8,,16", "8;16", "x", "1.5", "99999999999999999999"})
    CHECK_THROWS_WITH_AS(parse_int_list(bad, "--segments"), doctest::Contains("--segments"), Error);
}

TEST_CASE("registry: dense and dilated are registered; every variant is constructible and callable alike") {
  SEED_FRESH();
  const auto names = registered_attention_names();
  CHECK(std::find(names.begin(), names.end(), "dense") != names.end());
  CHECK(std::find(names.begin(), names.end(), "dilated") != names.end());
  CHECK(std::is_sorted(names.begin(), names.end()));
  // One config every variant accepts: N = 64 is a square (hilbert) and a multiple of the block size.
  AttentionConfig c = dilated_config(4, 8, {8, 16}, {1, 2}, Mixing::lse, false);
  c.block_size = 8;
  c.window = 16;
  Tensor q = Tensor::randn({2, 64, 4, 8}), k = Tensor::randn({2, 64, 4, 8}), v = Tensor::randn({2, 64, 4, 8});
  for (const auto& name : names) {
    INFO("variant " << name);
    CHECK_FALSE(attention_description(name).empty());
    auto attn = make_attention(name, c);
    REQUIRE(attn != nullptr);
    Tensor o = attn->forward(q, k, v);
    CHECK(o.shape() == q.shape());
    CHECK(o.dtype() == DType::f32);
    AttentionOutput r = attn->forward_with_lse(q, k, v);
    CHECK(r.lse.shape() == Shape{2, 4, 64});
    CHECK(max_abs_diff(r.out.to_vector(), o.to_vector()) == 0.0);
  }
  CHECK(make_attention("dense", c)->variant_name() == "dense");
  CHECK(make_attention("dilated", c)->type_name() == "Attention(dilated)");
  CHECK_THROWS_WITH_AS(make_attention("no_such_variant", c), doctest::Contains("dense, dilated"), Error);
  CHECK_THROWS_WITH_AS(register_attention("dense", "again", [](const AttentionConfig& cc) {
                         return std::make_shared<DenseAttention>(cc);
                       }),
                       doctest::Contains("already registered"), Error);
  CHECK_THROWS_AS(attention_description("no_such_variant"), Error);
  // A user variant registers and is built like the built-ins.
  register_attention("test_causal_dense", "dense, always causal", [](const AttentionConfig& cc) {
    AttentionConfig causal = cc;
    causal.causal = true;
    return std::make_shared<DenseAttention>(causal);
  });
  auto custom = make_attention("test_causal_dense", c);
  c.causal = true;
  CHECK(max_abs_diff(custom->forward(q, k, v).to_vector(), make_attention("dense", c)->forward(q, k, v).to_vector()) ==
        0.0);
}

TEST_CASE("config errors are raised at construction") {
  auto bad = [](AttentionConfig c, const char* what) {
    CHECK_THROWS_WITH_AS(make_attention("dilated", c), doctest::Contains(what), Error);
  };
  bad(dilated_config(4, 8, {8, 16}, {1}, Mixing::lse, false), "same length");
  bad(dilated_config(4, 8, {}, {}, Mixing::lse, false), "at least one");
  bad(dilated_config(4, 8, {8, 0}, {1, 2}, Mixing::lse, false), "segment length of branch 1");
  bad(dilated_config(4, 8, {8, -16}, {1, 2}, Mixing::lse, false), "segment length of branch 1");
  bad(dilated_config(4, 8, {8, 16}, {0, 2}, Mixing::lse, false), "dilation rate of branch 0");
  bad(dilated_config(4, 8, {8, 16}, {1, -2}, Mixing::lse, false), "dilation rate of branch 1");
  bad(dilated_config(2, 8, {8, 16, 32}, {1, 2, 4}, Mixing::head_groups, false), "at least as many heads");
  bad(dilated_config(0, 8, {8}, {1}, Mixing::lse, false), "num_heads");
  bad(dilated_config(4, 0, {8}, {1}, Mixing::lse, false), "head_dim");
  AttentionConfig c = dilated_config(4, 8, {8}, {1}, Mixing::lse, false);
  c.softmax_scale = 0.0;
  bad(c, "scale");
  c.softmax_scale = -1.0;
  bad(c, "scale");
  c.softmax_scale = std::nullopt;
  c.dropout = 1.0;
  bad(c, "dropout");
  c.dropout = -0.1;
  CHECK_THROWS_WITH_AS(make_attention("dense", c), doctest::Contains("dropout"), Error);
  CHECK_THROWS_WITH_AS(make_attention("dense", dense_config(-1, 8, false)), doctest::Contains("num_heads"), Error);
  CHECK_NOTHROW(make_attention("dilated", dilated_config(3, 8, {8, 16, 32}, {1, 2, 4}, Mixing::head_groups, false)));
}

TEST_CASE("input errors name what was expected and what was given") {
  SEED_FRESH();
  auto dil = make_attention("dilated", dilated_config(4, 8, {8}, {2}, Mixing::lse, false));
  auto dense = make_attention("dense", dense_config(4, 8, true));
  Tensor x = Tensor::randn({2, 16, 4, 8});
  CHECK_THROWS_WITH_AS(dil->forward(Tensor::randn({16, 4, 8}), x, x), doctest::Contains("4-d"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(Tensor::randn({2, 16, 3, 8}), x, x), doctest::Contains("4 heads"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(Tensor::randn({2, 16, 4, 6}), Tensor::randn({2, 16, 4, 6}),
                                    Tensor::randn({2, 16, 4, 6})),
                       doctest::Contains("head_dim 8"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(x, x, Tensor::randn({2, 16, 4, 8}, DType::f64)), doctest::Contains("dtype"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(x, x, Tensor::randn({2, 12, 4, 8})), doctest::Contains("same shape"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(x, Tensor::randn({3, 16, 4, 8}), Tensor::randn({3, 16, 4, 8})),
                       doctest::Contains("batch"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(x, Tensor::randn({2, 12, 4, 8}), Tensor::randn({2, 12, 4, 8})),
                       doctest::Contains("same sequence length"), Error);
  CHECK_THROWS_WITH_AS(dense->forward(x, Tensor::randn({2, 12, 4, 8}), Tensor::randn({2, 12, 4, 8})),
                       doctest::Contains("causal"), Error);
  CHECK_THROWS_WITH_AS(dil->forward(Tensor(), x, x), doctest::Contains("undefined"), Error);
  CHECK_THROWS_AS(dil->forward(Tensor::from_vector(std::vector<int64_t>(2 * 16 * 4 * 8, 1), {2, 16, 4, 8}), x, x),
                  Error);
  // Non-causal dense accepts a different number of keys (cross-attention).
  auto cross = make_attention("dense", dense_config(4, 8, false));
  CHECK(cross->forward(x, Tensor::randn({2, 5, 4, 8}), Tensor::randn({2, 5, 4, 8})).shape() == x.shape());
}

// ------------------------------------------------------------------------------------------------
// Against the float64 oracle

TEST_CASE("dense matches the oracle, causal and not, forward, lse and gradients") {
  SEED_FRESH();
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    const int64_t N = 19;
    check_with_oracle("dense", dense_config(3, 5, causal), 2, N,
                      oracle::repeat_heads(oracle::dense_mask(N, causal), 3), 1.0);
    AttentionConfig scaled = dense_config(2, 4, causal);
    scaled.softmax_scale = 0.7;
    check_with_oracle("dense", scaled, 1, 7, oracle::repeat_heads(oracle::dense_mask(7, causal), 2), 1.0);
  }
}

TEST_CASE("dilated mixing = lse matches the oracle (ragged segments, w % r != 0, w > N, uncovered rows)") {
  SEED_FRESH();
  for (bool causal : {false, true}) {
    // ragged last segments (37 = 4 * 8 + 5), w % r != 0 (6 % 4, 10 % 3), H % r != 0
    check_dilated_with_oracle(dilated_config(5, 4, {8, 6, 10}, {1, 4, 3}, Mixing::lse, causal), 2, 37);
    // w > N for one branch; a key reached by two branches counts twice
    check_dilated_with_oracle(dilated_config(3, 4, {8, 64}, {1, 2}, Mixing::lse, causal), 1, 21);
    // a single dilated branch: rows off the stream are covered by no branch (O = 0, lse = -inf)
    check_dilated_with_oracle(dilated_config(3, 4, {8}, {2}, Mixing::lse, causal), 2, 13);
    // r > w and r > H: some offsets lie beyond every segment
    check_dilated_with_oracle(dilated_config(2, 3, {3, 12}, {5, 2}, Mixing::lse, causal), 1, 17);
  }
}

TEST_CASE("dilated mixing = head_groups matches the oracle (H % G != 0, ragged, w % r != 0)") {
  SEED_FRESH();
  for (bool causal : {false, true}) {
    check_dilated_with_oracle(dilated_config(5, 4, {8, 6, 10}, {1, 4, 3}, Mixing::head_groups, causal), 2, 37);
    check_dilated_with_oracle(dilated_config(7, 3, {4, 8}, {1, 2}, Mixing::head_groups, causal), 1, 18);
    check_dilated_with_oracle(dilated_config(3, 4, {64, 5, 7}, {2, 3, 1}, Mixing::head_groups, causal), 2, 23);
  }
}

TEST_CASE("uncovered rows: O = 0, lse = -inf and zero gradient, without NaN") {
  SEED_FRESH();
  // One branch with r = 2 and one head: odd positions are covered by nothing.
  auto attn = make_attention("dilated", dilated_config(1, 4, {6}, {2}, Mixing::lse, false));
  Tensor q = leaf({1, 12, 1, 4}), k = leaf({1, 12, 1, 4}), v = leaf({1, 12, 1, 4});
  AttentionOutput r = attn->forward_with_lse(q, k, v);
  sum(mul(r.out, Tensor::randn({1, 12, 1, 4}, DType::f64))).backward();
  auto out = r.out.to_vector(), lse = r.lse.to_vector(), dq = q.grad().to_vector();
  for (int64_t p = 0; p < 12; ++p) {
    const bool covered = p % 2 == 0;
    CHECK(std::isinf(lse[p]) == !covered);
    for (int64_t d = 0; d < 4; ++d) {
      CHECK(std::isfinite(dq[p * 4 + d]));
      if (!covered) {
        CHECK(out[p * 4 + d] == 0.0);
        CHECK(dq[p * 4 + d] == 0.0);
      }
    }
  }
}

TEST_CASE("w = [N], r = [1] equals dense in both mixing modes, causal and not") {
  SEED_FRESH();
  const int64_t N = 24;
  Tensor q = Tensor::randn({2, N, 3, 8}, DType::f64), k = Tensor::randn({2, N, 3, 8}, DType::f64);
  Tensor v = Tensor::randn({2, N, 3, 8}, DType::f64), dout = Tensor::randn({2, N, 3, 8}, DType::f64);
  for (bool causal : {false, true})
    for (Mixing mixing : {Mixing::lse, Mixing::head_groups})
      for (int64_t w : {N, 4 * N}) {  // w > N means w = N
        INFO("causal " << causal << " mixing " << mixing_name(mixing) << " w " << w);
        auto dilated = make_attention("dilated", dilated_config(3, 8, {w}, {1}, mixing, causal));
        auto dense = make_attention("dense", dense_config(3, 8, causal));
        Run a = run_variant(*dilated, q, k, v, dout), b = run_variant(*dense, q, k, v, dout);
        CHECK(max_abs_diff(a.out, b.out) <= 1e-13);
        CHECK(max_abs_diff(a.lse, b.lse) <= 1e-13);
        CHECK(max_abs_diff(a.dq, b.dq) <= 1e-13);
        CHECK(max_abs_diff(a.dk, b.dk) <= 1e-13);
        CHECK(max_abs_diff(a.dv, b.dv) <= 1e-13);
      }
}

TEST_CASE("causal leak test: changing K, V after p leaves O[<= p] and lse[<= p] bitwise unchanged") {
  SEED_FRESH();
  const int64_t B = 2, N = 29, H = 4, D = 8;
  std::vector<std::pair<std::string, AttentionConfig>> cases{
      {"dense", dense_config(H, D, true)},
      {"dilated", dilated_config(H, D, {8, 12, 32}, {1, 3, 4}, Mixing::lse, true)},
      {"dilated", dilated_config(H, D, {8, 12, 32}, {1, 3, 4}, Mixing::head_groups, true)},
  };
  for (auto& [name, config] : cases) {
    INFO(name << " mixing " << mixing_name(config.mixing));
    auto attn = make_attention(name, config);
    Tensor q = Tensor::randn({B, N, H, D}), k = Tensor::randn({B, N, H, D}), v = Tensor::randn({B, N, H, D});
    AttentionOutput base = attn->forward_with_lse(q, k, v);
    for (int64_t p : {0, 5, 13, 27}) {
      Tensor k2 = k.clone(), v2 = v.clone();
      k2.narrow(1, p + 1, N - p - 1).copy_(Tensor::randn({B, N - p - 1, H, D}));
      v2.narrow(1, p + 1, N - p - 1).copy_(Tensor::randn({B, N - p - 1, H, D}));
      AttentionOutput changed = attn->forward_with_lse(q, k2, v2);
      auto before = base.out.narrow(1, 0, p + 1).contiguous().to_vector_as<float>();
      auto after = changed.out.narrow(1, 0, p + 1).contiguous().to_vector_as<float>();
      CHECK(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0);
      auto lse_before = base.lse.narrow(2, 0, p + 1).contiguous().to_vector_as<float>();
      auto lse_after = changed.lse.narrow(2, 0, p + 1).contiguous().to_vector_as<float>();
      CHECK(std::memcmp(lse_before.data(), lse_after.data(), lse_before.size() * sizeof(float)) == 0);
      // and the later rows did see the change
      CHECK(max_abs_diff(base.out.narrow(1, p + 1, N - p - 1).contiguous().to_vector(),
                         changed.out.narrow(1, p + 1, N - p - 1).contiguous().to_vector()) > 0.0);
    }
  }
}

TEST_CASE("dilated on a slice of the heads (head_offset, total_heads) equals that slice of the full result") {
  SEED_FRESH();
  const int64_t B = 2, N = 26, T = 7, D = 4;
  Tensor q = Tensor::randn({B, N, T, D}, DType::f64), k = Tensor::randn({B, N, T, D}, DType::f64);
  Tensor v = Tensor::randn({B, N, T, D}, DType::f64);
  for (Mixing mixing : {Mixing::lse, Mixing::head_groups})
    for (bool causal : {false, true}) {
      INFO(mixing_name(mixing) << " causal " << causal);
      AttentionConfig full = dilated_config(T, D, {8, 12, 10}, {1, 3, 4}, mixing, causal);
      AttentionOutput whole = make_attention("dilated", full)->forward_with_lse(q, k, v);
      for (auto [first, count] : {std::pair<int64_t, int64_t>{0, 3}, {2, 3}, {5, 2}, {3, 1}}) {
        INFO("heads [" << first << ", " << first + count << ")");
        AttentionConfig part = full;
        part.num_heads = count;
        part.head_offset = first;
        part.total_heads = T;
        AttentionOutput slice = make_attention("dilated", part)
                                    ->forward_with_lse(q.narrow(2, first, count), k.narrow(2, first, count),
                                                       v.narrow(2, first, count));
        CHECK(max_abs_diff(slice.out.to_vector(), whole.out.narrow(2, first, count).contiguous().to_vector()) <=
              1e-14);
        CHECK(max_abs_diff(slice.lse.to_vector(), whole.lse.narrow(1, first, count).contiguous().to_vector()) <=
              1e-14);
      }
    }
  AttentionConfig bad = dilated_config(3, D, {8}, {2}, Mixing::lse, false);
  bad.head_offset = 5;
  bad.total_heads = 7;
  CHECK_THROWS_WITH_AS(make_attention("dilated", bad), doctest::Contains("total_heads"), Error);
}

TEST_CASE("float64 gradcheck of out and lse: dense and dilated in both modes") {
  SEED_FRESH();
  std::vector<std::pair<std::string, AttentionConfig>> cases{
      {"dense", dense_config(2, 3, false)},
      {"dense", dense_config(2, 3, true)},
      {"dilated", dilated_config(3, 3, {4, 6}, {1, 4}, Mixing::lse, false)},
      {"dilated", dilated_config(3, 3, {4, 6}, {1, 4}, Mixing::lse, true)},
      {"dilated", dilated_config(3, 3, {4, 5}, {2, 3}, Mixing::head_groups, false)},
      {"dilated", dilated_config(3, 3, {4, 5}, {2, 3}, Mixing::head_groups, true)},
  };
  for (auto& [name, config] : cases) {
    INFO(name << " mixing " << mixing_name(config.mixing) << " causal " << config.causal);
    auto attn = make_attention(name, config);
    const int64_t H = config.num_heads, D = config.head_dim;
    auto fn = [&](const std::vector<Tensor>& in) {
      AttentionOutput r = attn->forward_with_lse(in[0], in[1], in[2]);
      // rows without keys have lse = -inf; check the finite ones
      Tensor lse = where(eq(r.lse, Tensor::scalar(-kInf, DType::f64)), Tensor::scalar(0.0, DType::f64), r.lse);
      return cat({r.out.flatten(), lse.flatten()}, 0);
    };
    autograd::GradcheckResult g = autograd::gradcheck(fn, {leaf({2, 11, H, D}), leaf({2, 11, H, D}), leaf({2, 11, H, D})});
    INFO(g.message);
    CHECK(g.passed);
    CHECK(g.checked_elements == 3 * 2 * 11 * H * D);
  }
}

TEST_CASE("f32 results agree with the f64 oracle") {
  SEED_FRESH();
  const int64_t B = 2, N = 40, H = 4, D = 16;
  AttentionConfig c = dilated_config(H, D, {16, 32}, {1, 2}, Mixing::lse, true);
  auto attn = make_attention("dilated", c);
  Tensor q = Tensor::randn({B, N, H, D}), k = Tensor::randn({B, N, H, D}), v = Tensor::randn({B, N, H, D});
  AttentionOutput r = attn->forward_with_lse(q, k, v);
  CHECK(r.out.dtype() == DType::f32);
  CHECK(r.lse.dtype() == DType::f32);
  auto ref = oracle::attention_forward(q.to_vector(), k.to_vector(), v.to_vector(), B, N, H, D,
                                       oracle::dilated_lse_mask(N, H, branches_of(c), true), c.scale());
  CHECK(oracle::max_scaled_error(r.out.to_vector(), ref.out, 1e-5, 1e-4) <= 1.0);
  CHECK(oracle::max_scaled_error(r.lse.to_vector(), ref.lse, 1e-5, 1e-5) <= 1.0);
}

// ------------------------------------------------------------------------------------------------
// Building blocks

TEST_CASE("attend_rows: chunked queries and streams give the unchunked result and gradients") {
  SEED_FRESH();
  for (bool causal : {false, true}) {
    Tensor q = leaf({3, 2, 23, 5}), k = leaf({3, 2, 23, 5}), v = leaf({3, 2, 23, 6});
    Tensor dout = Tensor::randn({3, 2, 23, 6}, DType::f64);
    std::vector<std::vector<double>> results;
    for (int64_t budget : {int64_t{1} << 20, int64_t{60}, int64_t{1}}) {
      StreamOptions o;
      o.scale = 0.4;
      o.causal = causal;
      o.max_score_elements = budget;
      OutLse r = attend_rows(q, k, v, o);
      CHECK(r.out.shape() == Shape{3, 2, 23, 6});
      CHECK(r.lse.shape() == Shape{3, 2, 23});
      r.out.backward(dout);
      std::vector<double> all = r.out.to_vector();
      for (const Tensor& t : {r.lse, q.grad(), k.grad(), v.grad()}) {
        auto x = t.to_vector();
        all.insert(all.end(), x.begin(), x.end());
      }
      results.push_back(all);
      q.zero_grad_();
      k.zero_grad_();
      v.zero_grad_();
    }
    CHECK(max_abs_diff(results[0], results[1]) <= 1e-12);
    CHECK(max_abs_diff(results[0], results[2]) <= 1e-12);
  }
  // lse is the row logsumexp of the scaled scores, even when one score dominates by far.
  Tensor q = Tensor::randn({1, 4, 3}, DType::f64) * 30.0, k = Tensor::randn({1, 6, 3}, DType::f64) * 30.0;
  OutLse r = attend_rows(q, k, Tensor::randn({1, 6, 2}, DType::f64), StreamOptions{});
  auto s = matmul(q, k.transpose(1, 2)).to_vector();
  auto lse = r.lse.to_vector();
  for (int i = 0; i < 4; ++i) {
    double m = -kInf, total = 0;
    for (int j = 0; j < 6; ++j) m = std::max(m, s[i * 6 + j]);
    for (int j = 0; j < 6; ++j) total += std::exp(s[i * 6 + j] - m);
    CHECK(lse[i] == doctest::Approx(m + std::log(total)).epsilon(1e-13));
  }
}

TEST_CASE("gather_rows and scatter_rows: inverse of each other, differentiable") {
  SEED_FRESH();
  Tensor x = leaf({2, 10, 3});
  const std::vector<int64_t> positions{7, 1, 4, 9};
  Tensor rows = gather_rows(x, 1, positions);
  CHECK(rows.shape() == Shape{2, 4, 3});
  auto xv = x.to_vector(), rv = rows.to_vector();
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < 3; ++c) CHECK(rv[(b * 4 + i) * 3 + c] == xv[(b * 10 + positions[i]) * 3 + c]);
  // contiguous runs are views
  CHECK(gather_rows(x, 1, {3, 4, 5}).storage() == x.storage());
  // scatter back from two pieces, fill elsewhere
  Tensor back = scatter_rows({rows.narrow(1, 0, 1), rows.narrow(1, 1, 3)}, 1, positions, 10, -kInf);
  auto bv = back.to_vector();
  for (int b = 0; b < 2; ++b)
    for (int p = 0; p < 10; ++p)
      for (int c = 0; c < 3; ++c) {
        const bool kept = std::find(positions.begin(), positions.end(), p) != positions.end();
        if (kept) CHECK(bv[(b * 10 + p) * 3 + c] == xv[(b * 10 + p) * 3 + c]);
        else CHECK(bv[(b * 10 + p) * 3 + c] == -kInf);
      }
  Tensor zeros_fill = scatter_rows({rows}, 1, positions, 10, 0.0);
  Tensor w = Tensor::randn({2, 10, 3}, DType::f64);
  sum(mul(zeros_fill, w)).backward();
  auto g = x.grad().to_vector(), wv = w.to_vector();
  for (int b = 0; b < 2; ++b)
    for (int p = 0; p < 10; ++p)
      for (int c = 0; c < 3; ++c) {
        const bool kept = std::find(positions.begin(), positions.end(), p) != positions.end();
        CHECK(g[(b * 10 + p) * 3 + c] == (kept ? wv[(b * 10 + p) * 3 + c] : 0.0));
      }
  CHECK_THROWS_WITH_AS(scatter_rows({rows}, 1, {1, 1, 2, 3}, 10, 0.0), doctest::Contains("twice"), Error);
  CHECK_THROWS_WITH_AS(scatter_rows({rows}, 1, {1, 2, 3}, 10, 0.0), doctest::Contains("positions"), Error);
  CHECK_THROWS_WITH_AS(scatter_rows({rows}, 1, {1, 2, 3, 10}, 10, 0.0), doctest::Contains("outside"), Error);
}

TEST_CASE("merge_by_lse: two key halves merge into attention over all keys; empty rows stay NaN-free") {
  SEED_FRESH();
  const int64_t B = 2, N = 9, H = 3, D = 4;
  Tensor q = leaf({B, N, H, D}), k = leaf({B, N, H, D}), v = leaf({B, N, H, D});
  StreamOptions o;
  o.scale = 0.5;
  AttentionOutput left = stream_attention(q, k.narrow(1, 0, 4), v.narrow(1, 0, 4), o);
  AttentionOutput right = stream_attention(q, k.narrow(1, 4, 5), v.narrow(1, 4, 5), o);
  AttentionOutput merged = merge_by_lse({left, right});
  AttentionOutput whole = stream_attention(q, k, v, o);
  CHECK(max_abs_diff(merged.out.to_vector(), whole.out.to_vector()) <= 1e-14);
  CHECK(max_abs_diff(merged.lse.to_vector(), whole.lse.to_vector()) <= 1e-14);
  // gradients through the merge are exact (not detached weights)
  Tensor dout = Tensor::randn({B, N, H, D}, DType::f64);
  merged.out.backward(dout);
  auto dq_merged = q.grad().to_vector(), dk_merged = k.grad().to_vector();
  q.zero_grad_();
  k.zero_grad_();
  whole.out.backward(dout);
  CHECK(max_abs_diff(dq_merged, q.grad().to_vector()) <= 1e-13);
  CHECK(max_abs_diff(dk_merged, k.grad().to_vector()) <= 1e-13);

  // rows where every part is -inf, rows where one part is -inf
  Tensor o1 = leaf({2, 3, 4}), o2 = leaf({2, 3, 4}), l1 = leaf({2, 3}), l2 = leaf({2, 3});
  Tensor mask1 = Tensor::from_vector(std::vector<double>{1, 0, 1, 0, 0, 0}, {2, 3});
  Tensor mask2 = Tensor::from_vector(std::vector<double>{1, 1, 0, 0, 0, 1}, {2, 3});
  Tensor ninf = Tensor::scalar(-kInf, DType::f64);
  OutLse m = merge_rows_by_lse({{o1, where(mask1, l1, ninf)}, {o2, where(mask2, l2, ninf)}});
  sum(mul(m.out, Tensor::randn({2, 3, 4}, DType::f64))).backward(Tensor(), false);
  auto out = m.out.to_vector(), lse = m.lse.to_vector();
  auto o1v = o1.to_vector(), o2v = o2.to_vector();
  for (int r = 0; r < 6; ++r) {
    const bool has1 = r == 0 || r == 2, has2 = r == 0 || r == 1 || r == 5;
    if (!has1 && !has2) {
      CHECK(lse[r] == -kInf);
      for (int d = 0; d < 4; ++d) CHECK(out[r * 4 + d] == 0.0);
    } else if (has1 != has2) {
      for (int d = 0; d < 4; ++d) CHECK(out[r * 4 + d] == doctest::Approx(has1 ? o1v[r * 4 + d] : o2v[r * 4 + d]));
    }
  }
  for (const Tensor& t : {o1, o2, l1, l2})
    for (double g : t.grad().to_vector()) CHECK(std::isfinite(g));
  auto g1 = o1.grad().to_vector();
  for (int d = 0; d < 4; ++d) CHECK(g1[3 * 4 + d] == 0.0);  // row 3: empty
  CHECK_THROWS_AS(merge_rows_by_lse({}), Error);
  CHECK_THROWS_AS(merge_rows_by_lse({{o1, l1}, {o1.narrow(0, 0, 1), l1.narrow(0, 0, 1)}}), Error);
}

TEST_CASE("dropout acts in training mode only") {
  SEED_FRESH();
  AttentionConfig c = dilated_config(2, 4, {8}, {1}, Mixing::lse, false);
  auto plain = make_attention("dilated", c);
  c.dropout = 0.5;
  auto dropped = make_attention("dilated", c);
  Tensor q = Tensor::randn({1, 16, 2, 4}), k = Tensor::randn({1, 16, 2, 4}), v = Tensor::randn({1, 16, 2, 4});
  auto reference = plain->forward(q, k, v).to_vector();
  CHECK(max_abs_diff(dropped->forward(q, k, v).to_vector(), reference) > 1e-3);
  dropped->eval();
  CHECK(max_abs_diff(dropped->forward(q, k, v).to_vector(), reference) == 0.0);
}

TEST_CASE("dilated memory grows linearly with N") {
  // Peak host memory of forward + backward at N and 2N: the ratio must be close to 2, far from
  // the 4 of anything that forms N x N scores.
  SEED_FRESH();
  auto attn = make_attention("dilated", dilated_config(4, 16, {64, 128}, {1, 2}, Mixing::lse, false));
  std::vector<double> peaks;
  for (int64_t n : {2048, 4096}) {
    Tensor q = leaf({1, n, 4, 16}, DType::f32), k = leaf({1, n, 4, 16}, DType::f32), v = leaf({1, n, 4, 16}, DType::f32);
    const int64_t before = memory_stats(Device::cpu()).allocated_bytes;
    reset_peak_memory(Device::cpu());
    attn->forward(q, k, v).backward(Tensor::randn({1, n, 4, 16}));
    peaks.push_back(static_cast<double>(memory_stats(Device::cpu()).peak_allocated_bytes - before));
  }
  MESSAGE("peak bytes at N = 2048: " << peaks[0] << ", at N = 4096: " << peaks[1]);
  CHECK(peaks[1] / peaks[0] > 1.6);
  CHECK(peaks[1] / peaks[0] < 2.4);
}

// ------------------------------------------------------------------------------------------------
// Multihead layer

TEST_CASE("multihead: equals the composition it describes, self- and cross-attention, fused or not") {
  SEED_FRESH();
  const int64_t B = 2, N = 12, E = 12, H = 3;
  for (bool fused : {false, true})
    for (bool norm : {false, true}) {
      INFO("fused " << fused << " sub_layernorm " << norm);
      MultiheadAttentionOptions o;
      o.embed_dim = E;
      o.num_heads = H;
      o.variant = "dilated";
      o.attention = dilated_config(99, 99, {4, 8}, {1, 2}, Mixing::lse, true);  // heads / dim are overridden
      o.fused_qkv = fused;
      o.sub_layernorm = norm;
      o.dtype = DType::f64;
      MultiheadAttention mha(o);
      CHECK(mha.core().config().num_heads == H);
      CHECK(mha.core().config().head_dim == E / H);
      // non-zero biases so that their use is checked too
      {
        NoGradGuard g;
        for (auto& [name, p] : mha.named_parameters())
          if (name.find("bias") != std::string::npos) p.copy_(Tensor::randn(p.shape(), DType::f64));
      }
      Tensor x = Tensor::randn({B, N, E}, DType::f64);
      Tensor y = mha.forward(x);
      CHECK(y.shape() == Shape{B, N, E});
      // by hand
      Tensor wq = fused ? mha.w_qkv.narrow(1, 0, E) : mha.w_q, wk = fused ? mha.w_qkv.narrow(1, E, E) : mha.w_k;
      Tensor wv = fused ? mha.w_qkv.narrow(1, 2 * E, E) : mha.w_v;
      Tensor bq = fused ? mha.b_qkv.narrow(0, 0, E) : mha.b_q, bk = fused ? mha.b_qkv.narrow(0, E, E) : mha.b_k;
      Tensor bv = fused ? mha.b_qkv.narrow(0, 2 * E, E) : mha.b_v;
      auto split = [&](const Tensor& t) { return t.reshape({B, N, H, E / H}); };
      auto core = make_attention("dilated", mha.core().config());
      Tensor merged = core->forward(split(add(matmul(x, wq), bq)), split(add(matmul(x, wk), bk)),
                                    split(add(matmul(x, wv), bv)))
                          .reshape({B, N, E});
      if (norm) merged = layer_norm(merged, mha.ln_weight, mha.ln_bias, 1e-5);
      Tensor expected = add(matmul(merged, mha.w_out), mha.b_out);
      CHECK(max_abs_diff(y.to_vector(), expected.to_vector()) <= 1e-12);
      // cross-attention with three different inputs (dense core accepts other key lengths)
      Tensor kv_in = Tensor::randn({B, N, E}, DType::f64);
      Tensor cross = mha.forward(x, kv_in, kv_in);
      CHECK(cross.shape() == Shape{B, N, E});
      CHECK(max_abs_diff(cross.to_vector(), y.to_vector()) > 1e-6);
      CHECK(max_abs_diff(mha.forward(x, x, x).to_vector(), y.to_vector()) <= 1e-12);
    }
  MultiheadAttention dense_cross(12, 4, "dense", AttentionConfig{}, false, true, 1.0, true);
  Tensor out = dense_cross.forward(Tensor::randn({2, 5, 12}), Tensor::randn({2, 9, 12}), Tensor::randn({2, 9, 12}));
  CHECK(out.shape() == Shape{2, 5, 12});
}

TEST_CASE("multihead: every parameter gets a gradient, for any registered core") {
  SEED_FRESH();
  for (const auto& variant : {std::string("dense"), std::string("dilated")})
    for (bool fused : {false, true}) {
      INFO(variant << " fused " << fused);
      AttentionConfig c = dilated_config(1, 1, {8, 16}, {1, 2}, Mixing::lse, false);
      MultiheadAttention mha(16, 4, variant, c, fused, true, 1.0, true);
      Tensor x = Tensor::randn({2, 16, 16});
      sum(mul(mha.forward(x), Tensor::randn({2, 16, 16}))).backward();
      for (auto& [name, p] : mha.named_parameters()) {
        INFO(name);
        REQUIRE(p.grad().defined());
        double norm = 0;
        for (double g : p.grad().to_vector()) norm += g * g;
        // The key bias shifts every score of a row equally, so softmax ignores it: zero gradient.
        if (name == "k_bias") CHECK(norm < 1e-8);
        else CHECK(norm > 1e-10);
      }
    }
}

TEST_CASE("multihead: MAGNETO init statistics and argument errors") {
  SEED_FRESH();
  const int64_t E = 256;
  for (bool fused : {false, true}) {
    MultiheadAttention mha(E, 8, "dense", AttentionConfig{}, fused, true, 2.5, true);
    auto stddev = [](const Tensor& w) {
      auto v = w.to_vector();
      double m = 0, s = 0;
      for (double x : v) m += x;
      m /= v.size();
      for (double x : v) s += (x - m) * (x - m);
      return std::sqrt(s / v.size());
    };
    const double unit = std::sqrt(2.0 / (E + E));  // xavier-normal, gain 1, (E, E)
    Tensor wq = fused ? mha.w_qkv.narrow(1, 0, E) : mha.w_q, wk = fused ? mha.w_qkv.narrow(1, E, E) : mha.w_k;
    Tensor wv = fused ? mha.w_qkv.narrow(1, 2 * E, E) : mha.w_v;
    CHECK(stddev(wq.contiguous()) == doctest::Approx(unit).epsilon(0.03));
    CHECK(stddev(wk.contiguous()) == doctest::Approx(unit).epsilon(0.03));
    CHECK(stddev(wv.contiguous()) == doctest::Approx(2.5 * unit).epsilon(0.03));
    CHECK(stddev(mha.w_out) == doctest::Approx(2.5 * unit).epsilon(0.03));
    for (auto& [name, p] : mha.named_parameters())
      if (name.find("bias") != std::string::npos)
        for (double b : p.to_vector()) CHECK(b == 0.0);
    for (double g : mha.ln_weight.to_vector()) CHECK(g == 1.0);
    CHECK(mha.named_parameters().size() == (fused ? 6u : 10u));
  }
  MultiheadAttention no_extras(8, 2, "dense", AttentionConfig{}, false, false, 1.0, false);
  CHECK(no_extras.named_parameters().size() == 4u);
  CHECK_THROWS_WITH_AS(MultiheadAttention(10, 3, "dense"), doctest::Contains("divisible"), Error);
  CHECK_THROWS_WITH_AS(MultiheadAttention(0, 1, "dense"), doctest::Contains("embed_dim"), Error);
  CHECK_THROWS_WITH_AS(MultiheadAttention(8, 2, "dense", AttentionConfig{}, false, true, 0.0), doctest::Contains("gamma"),
                       Error);
  CHECK_THROWS_WITH_AS(MultiheadAttention(8, 2, "nope"), doctest::Contains("unknown attention variant"), Error);
  CHECK_THROWS_WITH_AS(MultiheadAttention(8, 4, "dilated", dilated_config(1, 1, {4, 8, 16, 32, 64}, {1, 1, 1, 1, 1},
                                                                         Mixing::head_groups, false)),
                       doctest::Contains("as many heads"), Error);
  MultiheadAttention ok(8, 2, "dense");
  CHECK_THROWS_WITH_AS(ok.forward(Tensor::randn({2, 5, 6})), doctest::Contains("embed_dim = 8"), Error);
  CHECK_THROWS_WITH_AS(ok.forward(Tensor::randn({5, 8})), doctest::Contains("(batch, sequence"), Error);
  CHECK_THROWS_WITH_AS(ok.forward(Tensor::randn({2, 5, 8}), Tensor::randn({2, 4, 8}), Tensor::randn({2, 3, 8})),
                       doctest::Contains("same shape"), Error);
}

// ------------------------------------------------------------------------------------------------
// Command line

namespace {

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("longtape_attention_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// Path of the built `longtape` executable, from LONGTAPE_BIN (set by ctest); empty when unknown.
std::string longtape_binary() {
  const char* dir = std::getenv("LONGTAPE_BIN");
  if (!dir) return "";
  std::string path = std::string(dir) + "/longtape";
  return std::filesystem::exists(path) ? path : "";
}

// Runs the command line, returning its exit status; its output goes to `log`.
int run_command(const std::string& command_line, const std::string& log) {
  const int status = std::system((command_line + " > " + log + " 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("command line: `longtape attention` round-trips .npy files and matches the library") {
  const std::string bin = longtape_binary();
  if (bin.empty()) {
    MESSAGE("skipped: LONGTAPE_BIN does not point at a built longtape executable (run through ctest)");
    return;
  }
  SEED_FRESH();
  TempDir dir;
  const int64_t B = 2, N = 21, H = 3, D = 4;
  Tensor q = Tensor::randn({B, N, H, D}, DType::f64), k = Tensor::randn({B, N, H, D}, DType::f64);
  Tensor v = Tensor::randn({B, N, H, D}, DType::f64), dout = Tensor::randn({B, N, H, D}, DType::f64);
  io::write_npy(dir / "q.npy", io::raw_from_tensor(q));
  io::write_npy(dir / "k.npy", io::raw_from_tensor(k));
  io::write_npy(dir / "v.npy", io::raw_from_tensor(v));
  io::write_npy(dir / "dout.npy", io::raw_from_tensor(dout));
  const std::string inputs = " --q " + (dir / "q.npy") + " --k " + (dir / "k.npy") + " --v " + (dir / "v.npy");

  struct Case {
    std::string flags;
    std::string variant;
    AttentionConfig config;
  };
  AttentionConfig hg = dilated_config(H, D, {8, 16}, {1, 3}, Mixing::head_groups, true);
  hg.softmax_scale = 0.3;
  std::vector<Case> cases{
      {"--variant dilated --segments 8,16 --dilations 1,2", "dilated",
       dilated_config(H, D, {8, 16}, {1, 2}, Mixing::lse, false)},
      {"--variant dilated --segments 8,16 --dilations 1,3 --mixing head_groups --causal --scale 0.3", "dilated", hg},
      {"--variant dense --causal", "dense", dense_config(H, D, true)},
  };
  for (const Case& c : cases) {
    INFO(c.flags);
    const std::string out_dir = dir / ("out_" + c.variant + std::to_string(c.config.mixing == Mixing::lse));
    const int rc = run_command(bin + " attention " + c.flags + inputs + " --dout " + (dir / "dout.npy") +
                                   " --dtype f64 --out-dir " + out_dir,
                               dir / "log.txt");
    INFO(read_text(dir / "log.txt"));
    REQUIRE(rc == 0);
    auto attn = make_attention(c.variant, c.config);
    Run expected = run_variant(*attn, q, k, v, dout);
    Tensor o = io::load_npy(out_dir + "/o.npy");
    CHECK(o.dtype() == DType::f64);
    CHECK(o.shape() == q.shape());
    CHECK(max_abs_diff(o.to_vector(), expected.out) <= 1e-12);
    CHECK(max_abs_diff(io::load_npy(out_dir + "/lse.npy").to_vector(), expected.lse) <= 1e-12);
    CHECK(max_abs_diff(io::load_npy(out_dir + "/dq.npy").to_vector(), expected.dq) <= 1e-12);
    CHECK(max_abs_diff(io::load_npy(out_dir + "/dk.npy").to_vector(), expected.dk) <= 1e-12);
    CHECK(max_abs_diff(io::load_npy(out_dir + "/dv.npy").to_vector(), expected.dv) <= 1e-12);
  }

  // f32 by default for f32 inputs; no gradients without --dout
  io::write_npy(dir / "q32.npy", io::raw_from_tensor(q.to(DType::f32)));
  io::write_npy(dir / "k32.npy", io::raw_from_tensor(k.to(DType::f32)));
  io::write_npy(dir / "v32.npy", io::raw_from_tensor(v.to(DType::f32)));
  const std::string out32 = dir / "out32";
  REQUIRE(run_command(bin + " attention --variant dilated --segments 8 --dilations 2 --q " + (dir / "q32.npy") +
                          " --k " + (dir / "k32.npy") + " --v " + (dir / "v32.npy") + " --out-dir " + out32,
                      dir / "log.txt") == 0);
  Tensor o32 = io::load_npy(out32 + "/o.npy");
  CHECK(o32.dtype() == DType::f32);
  auto expected32 = make_attention("dilated", dilated_config(H, D, {8}, {2}, Mixing::lse, false))
                        ->forward(q.to(DType::f32), k.to(DType::f32), v.to(DType::f32));
  CHECK(max_abs_diff(o32.to_vector(), expected32.to_vector()) <= 1e-6);
  CHECK_FALSE(std::filesystem::exists(out32 + "/dq.npy"));

  // errors: malformed .npy, wrong rank, invalid config, unknown variant, wrong --dout shape
  {
    std::ofstream bad(dir / "bad.npy", std::ios::binary);
    bad << "\x93NUMPY\x01\x00garbage that is not a header";
  }
  auto fails_with = [&](const std::string& args, const std::string& text) {
    INFO(args);
    const int rc = run_command(bin + " attention " + args + " --out-dir " + (dir / "err"), dir / "err.txt");
    const std::string log = read_text(dir / "err.txt");
    INFO(log);
    CHECK(rc != 0);
    CHECK(log.find(text) != std::string::npos);
  };
  fails_with("--variant dense --q " + (dir / "bad.npy") + " --k " + (dir / "k.npy") + " --v " + (dir / "v.npy"),
             "bad.npy");
  io::write_npy(dir / "rank3.npy", io::raw_from_tensor(Tensor::randn({2, 3, 4})));
  fails_with("--variant dense --q " + (dir / "rank3.npy") + " --k " + (dir / "k.npy") + " --v " + (dir / "v.npy"),
             "4-d");
  io::write_npy(dir / "ints.npy", io::raw_from_tensor(Tensor::from_vector(std::vector<int64_t>(24, 1), {1, 2, 3, 4})));
  fails_with("--variant dense --q " + (dir / "ints.npy") + " --k " + (dir / "k.npy") + " --v " + (dir / "v.npy"),
             "float32 or float64");
  fails_with("--variant dilated --segments 8,16 --dilations 1" + inputs, "same length");
  fails_with("--variant dilated --segments 8,x" + inputs, "--segments");
  fails_with("--variant dilated --segments 8 --mixing nope" + inputs, "head_groups");
  fails_with("--variant nope" + inputs, "unknown attention variant");
  fails_with("--variant dense --dout " + (dir / "rank3.npy") + inputs, "expected shape");
  fails_with("--variant dense --device cuda:7 --dtype f32" + inputs, "cuda");
  CHECK_THROWS_WITH_AS(io::load_npy(dir / "bad.npy"), doctest::Contains("bad.npy"), Error);
}

TEST_CASE("tensor_io: raw arrays and tensors convert both ways") {
  SEED_FRESH();
  Tensor t = Tensor::randn({2, 3, 4}, DType::f64).permute({2, 0, 1});  // non-contiguous on purpose
  io::RawArray raw = io::raw_from_tensor(t);
  CHECK(raw.dtype == DType::f64);
  CHECK(raw.shape == Shape{4, 2, 3});
  Tensor back = io::tensor_from_raw(raw);
  CHECK(max_abs_diff(back.to_vector(), t.to_vector()) == 0.0);
  TempDir dir;
  Tensor ints = Tensor::from_vector(std::vector<int32_t>{3, -1, 7}, {3});
  io::save_npy(dir / "i.npy", ints);
  CHECK(io::load_npy(dir / "i.npy").to_vector() == ints.to_vector());
  CHECK_THROWS_WITH_AS(io::save_npy(dir / "b.npy", t.to(DType::bf16)), doctest::Contains("bfloat16"), Error);
  io::RawArray short_raw{DType::f32, {2, 2}, std::vector<uint8_t>(12)};
  CHECK_THROWS_AS(io::tensor_from_raw(short_raw), Error);
}
