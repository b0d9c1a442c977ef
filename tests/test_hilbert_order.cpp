// Hilbert token ordering (docs/attention.md, Hilbert ordering) around core variants, against the
// float64 oracle run on the permuted tokens.
#include <doctest/doctest.h>

#include <limits>

#include "attention/block_sparse.h"
#include "attention/hilbert.h"
#include "attention/hilbert_order.h"
#include "attention/registry.h"
#include "support/attention_oracle.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing;

namespace {

// lse (B, H, N) computed on permuted tokens, put back: result[b, h, perm[i]] = lse[b, h, i].
std::vector<double> unpermute_lse(const std::vector<double>& lse, int64_t B, int64_t H, int64_t N,
                                  const std::vector<int64_t>& perm) {
  std::vector<double> out(lse.size());
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < N; ++i)
      out[static_cast<size_t>(bh * N + perm[static_cast<size_t>(i)])] = lse[static_cast<size_t>(bh * N + i)];
  return out;
}

// Runs `attention` on p and compares output, lse and the gradients of sum(out * dout) with the
// oracle applied to the Hilbert-permuted tokens with `masks`.
void check_against_permuted_oracle(Attention& attention, Problem& p, const std::vector<int64_t>& perm,
                                   const oracle::HeadMasks& masks) {
  const int64_t B = p.B, N = p.N, H = p.H, D = p.D, inner = H * D;
  const std::vector<int64_t> inverse = inverse_permutation(perm);
  const double scale = attention.config().scale();
  const auto qp = oracle::permute_tokens(p.qv, B, N, inner, perm);
  const auto kp = oracle::permute_tokens(p.kv, B, N, inner, perm);
  const auto vp = oracle::permute_tokens(p.vv, B, N, inner, perm);
  const auto doutp = oracle::permute_tokens(p.doutv, B, N, inner, perm);
  const auto want = oracle::attention_forward(qp, kp, vp, B, N, H, D, masks, scale);
  AttentionOutput got = attention.forward_with_lse(p.q, p.k, p.v);
  CHECK(max_scaled_error(got.out, oracle::permute_tokens(want.out, B, N, inner, inverse), 1e-12) <= 1.0);
  CHECK(max_scaled_error(got.lse, unpermute_lse(want.lse, B, H, N, perm), 1e-12) <= 1.0);
  got.out.backward(p.dout);
  const auto grads = oracle::attention_backward(qp, kp, vp, doutp, B, N, H, D, masks, scale);
  CHECK(max_scaled_error(p.q.grad(), oracle::permute_tokens(grads.dq, B, N, inner, inverse), 1e-11) <= 1.0);
  CHECK(max_scaled_error(p.k.grad(), oracle::permute_tokens(grads.dk, B, N, inner, inverse), 1e-11) <= 1.0);
  CHECK(max_scaled_error(p.v.grad(), oracle::permute_tokens(grads.dv, B, N, inner, inverse), 1e-11) <= 1.0);
}

AttentionConfig base_config() {
  AttentionConfig c;
  c.num_heads = 2;
  c.head_dim = 4;
  return c;
}

}  // namespace

TEST_CASE("hilbert-ordered dense non-causal attention equals dense attention (square and HxW grids)") {
  LT_FRESH_SEED(seed);
  for (const auto& [n, grid] : std::vector<std::pair<int64_t, std::string>>{{16, ""}, {15, "3x5"}, {36, "4x9"}}) {
    INFO("N " << n << " grid '" << grid << "'");
    Problem p = make_problem(2, n, 2, 4, seed + static_cast<uint64_t>(n));
    AttentionConfig config = base_config();
    config.grid = grid;
    auto dense = make_attention("dense", config);
    config.order = "hilbert";
    auto ordered = make_attention("dense", config);  // order = hilbert wraps the variant
    REQUIRE(ordered->variant_name() == "hilbert");
    // The permutation is not the identity, so the equality below is a real check.
    auto* hilbert = dynamic_cast<HilbertOrderAttention*>(ordered.get());
    REQUIRE(hilbert != nullptr);
    CHECK(hilbert->inner().variant_name() == "dense");
    const std::vector<int64_t> perm = hilbert->permutation(n);
    std::vector<int64_t> identity(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) identity[static_cast<size_t>(i)] = i;
    CHECK(perm != identity);

    AttentionOutput a = ordered->forward_with_lse(p.q, p.k, p.v);
    AttentionOutput b = dense->forward_with_lse(p.q.detach(), p.k.detach(), p.v.detach());
    CHECK(max_scaled_error(a.out, b.out.to_vector(), 1e-12) <= 1.0);
    CHECK(max_scaled_error(a.lse, b.lse.to_vector(), 1e-12) <= 1.0);
    a.out.backward(p.dout);
    const auto masks = oracle::repeat_heads(oracle::dense_mask(n, false), 2);
    const auto grads = oracle::attention_backward(p.qv, p.kv, p.vv, p.doutv, 2, n, 2, 4, masks, config.scale());
    CHECK(max_scaled_error(p.q.grad(), grads.dq, 1e-11) <= 1.0);
    CHECK(max_scaled_error(p.k.grad(), grads.dk, 1e-11) <= 1.0);
    CHECK(max_scaled_error(p.v.grad(), grads.dv, 1e-11) <= 1.0);
  }
}

TEST_CASE("hilbert-ordered causal dense attention is a different function (causal on the curve order)") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(1, 16, 2, 4, seed);
  AttentionConfig config = base_config();
  config.causal = true;
  config.inner_variant = "dense";
  auto ordered = make_attention("hilbert", config);
  auto* hilbert = dynamic_cast<HilbertOrderAttention*>(ordered.get());
  REQUIRE(hilbert != nullptr);
  const auto masks = oracle::repeat_heads(oracle::dense_mask(16, true), 2);
  check_against_permuted_oracle(*ordered, p, hilbert->permutation(16), masks);
  auto plain = make_attention("dense", config);
  CHECK(oracle::max_scaled_error(ordered->forward(p.q, p.k, p.v).to_vector(),
                                 plain->forward(p.q, p.k, p.v).to_vector(), 1e-6, 1e-6) > 1.0);
}

TEST_CASE("hilbert-ordered dilated attention equals the oracle on permuted tokens") {
  LT_FRESH_SEED(seed);
  for (bool causal : {false, true}) {
    for (const std::string grid : {"", "2x8"}) {
      INFO("causal " << causal << " grid '" << grid << "'");
      Problem p = make_problem(2, 16, 2, 4, seed);
      AttentionConfig config = base_config();
      config.segment_lengths = {4, 8};
      config.dilation_rates = {1, 2};
      config.causal = causal;
      config.grid = grid;
      config.order = "hilbert";
      auto ordered = make_attention("dilated", config);
      auto* hilbert = dynamic_cast<HilbertOrderAttention*>(ordered.get());
      REQUIRE(hilbert != nullptr);
      const std::vector<int64_t> perm = hilbert->permutation(16);
      CHECK(perm == (grid.empty() ? hilbert_permutation(4, 4) : hilbert_permutation(2, 8)));
      const auto masks = oracle::dilated_lse_mask(16, 2, {{4, 1}, {8, 2}}, causal);
      check_against_permuted_oracle(*ordered, p, perm, masks);
    }
  }
}

TEST_CASE("hilbert-ordered block-sparse attention equals the oracle on permuted tokens; inner parameters are visible") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(1, 36, 2, 4, seed);
  AttentionConfig config = base_config();
  config.pattern = "local_window";
  config.block_size = 4;
  config.window = 8;
  config.causal = true;
  config.order = "hilbert";
  auto ordered = make_attention("block_sparse", config);
  auto* hilbert = dynamic_cast<HilbertOrderAttention*>(ordered.get());
  REQUIRE(hilbert != nullptr);
  BlockPatternOptions options;
  options.block_size = 4;
  options.window = 8;
  options.causal = true;
  const auto masks = oracle::block_pattern_masks(BlockPattern::local_window, 36, 2, options);
  check_against_permuted_oracle(*ordered, p, hilbert->permutation(36), masks);

  config.pattern = "adaptive";
  auto adaptive = make_attention("block_sparse", config);
  const auto params = adaptive->named_parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].first == "inner.scorer_q");
  CHECK(params[1].first == "inner.scorer_k");
}

TEST_CASE("hilbert ordering errors are clear") {
  Problem p = make_problem(1, 15, 2, 4, 3);
  AttentionConfig config = base_config();
  config.inner_variant = "dense";
  auto square_only = make_attention("hilbert", config);
  CHECK_THROWS_WITH_AS(square_only->forward(p.q, p.k, p.v), doctest::Contains("config.grid"), Error);
  config.grid = "4x4";
  auto wrong_grid = make_attention("hilbert", config);
  CHECK_THROWS_WITH_AS(wrong_grid->forward(p.q, p.k, p.v), doctest::Contains("H * W = 15"), Error);
  config.grid = "4by4";
  CHECK_THROWS_AS(make_attention("hilbert", config), Error);
  config.grid = "";
  config.inner_variant = "hilbert";
  CHECK_THROWS_WITH_AS(make_attention("hilbert", config), doctest::Contains("inner_variant"), Error);
  config.inner_variant = "no_such_variant";
  CHECK_THROWS_WITH_AS(make_attention("hilbert", config), doctest::Contains("unknown attention variant"), Error);
  config.inner_variant = "dense";
  config.order = "zigzag";
  CHECK_THROWS_WITH_AS(make_attention("dense", config), doctest::Contains("order must be"), Error);
  config.order = "natural";
  config.grid = "3x5";
  auto ok = make_attention("hilbert", config);
  Tensor short_k = p.k.detach().narrow(1, 0, 9).contiguous();
  CHECK_THROWS_WITH_AS(ok->forward(p.q, short_k, short_k), doctest::Contains("same length"), Error);
  CHECK(ok->forward(p.q, p.k, p.v).shape() == Shape({1, 15, 2, 4}));
}
