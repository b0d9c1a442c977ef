// What a registered attention variant declares about itself (attention/registry.h) is what the
// labels, analytic pair counts, token-grid checks and parallel wrappers use. This file registers
// variants of its own, so it runs in its own test binary (other tests compare against the list of
// registered variants).
#include <doctest/doctest.h>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention/config_text.h"
#include "attention/pattern_map.h"
#include "attention/registry.h"
#include "support/test_utils.h"

using namespace longtape;
using namespace longtape::attention;
using longtape::testing::fresh_seed;

namespace {

int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

}  // namespace

TEST_CASE("a variant describes itself: labels, attended pairs, token grid and parallel mode come from its entry") {
  const uint64_t seed = fresh_seed();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  const int64_t declared_pairs = uniform(rng, 1, 1000);
  VariantTraits traits;
  traits.description = "dense attention under another name, declaring its own label and pair count";
  traits.factory = [](const AttentionConfig& c) { return make_attention("dense", c); };
  traits.config_items = [](const AttentionConfig& c) {
    return std::vector<std::string>{"window=" + std::to_string(c.window)};
  };
  traits.attended_pairs = [declared_pairs](const AttentionConfig& c, int64_t n) -> std::optional<int64_t> {
    return declared_pairs * c.num_heads * n;
  };
  traits.uses_token_grid = true;
  register_attention("self_described_dense", traits);
  CHECK_THROWS_WITH_AS(register_attention("self_described_dense", traits), doctest::Contains("already registered"),
                       Error);

  AttentionConfig c;
  c.num_heads = uniform(rng, 1, 8);
  c.window = uniform(rng, 1, 512);
  const int64_t n = uniform(rng, 1, 64);
  CHECK(config_label("self_described_dense", c) == "window=" + std::to_string(c.window));
  CHECK(analytic_attended_pairs("self_described_dense", c, n) == declared_pairs * c.num_heads * n);
  CHECK(uses_token_grid("self_described_dense", c));
  CHECK_FALSE(uses_token_grid("dense", c));
  c.order = "hilbert";
  CHECK(uses_token_grid("dense", c));
  CHECK(config_label("dense", c) == "order=hilbert");
  c.order = "natural";

  // A wrapper labels and counts what its inner variant declares.
  c.inner_variant = "self_described_dense";
  c.ranks = uniform(rng, 2, 8);
  CHECK(config_label("ring", c) ==
        "inner=self_described_dense window=" + std::to_string(c.window) + " P=" + std::to_string(c.ranks));
  CHECK(config_label("hilbert", c) == "inner=self_described_dense window=" + std::to_string(c.window));
  CHECK(analytic_attended_pairs("ring", c, n) == declared_pairs * c.num_heads * n);

  // A variant registered with a description only declares nothing: its label lists every field and
  // its pairs are left to a probe.
  register_attention("undeclared_dense", "dense attention declaring nothing",
                     [](const AttentionConfig& config) { return make_attention("dense", config); });
  c.segment_lengths = {8};
  c.dilation_rates = {1};
  c.causal = true;
  CHECK(config_label("undeclared_dense", c).find("w=8 r=1 lse local_window bs=") == 0);
  CHECK(config_label("undeclared_dense", c).find(" causal") != std::string::npos);
  CHECK_FALSE(analytic_attended_pairs("undeclared_dense", c, n).has_value());

  CHECK(parallel_variant("ring") == "ring");
  CHECK(parallel_variant("head") == "head_parallel");
  CHECK_THROWS_WITH_AS(parallel_variant("none"), doctest::Contains("parallel mode"), Error);
  CHECK(variant_traits("hilbert").wraps_inner_variant);
  CHECK_FALSE(find_variant_traits("no_such_variant").has_value());
  CHECK_THROWS_WITH_AS(variant_traits("no_such_variant"), doctest::Contains("unknown attention variant"), Error);
}

TEST_CASE("built-in variants label the fields they read") {
  AttentionConfig c;
  c.segment_lengths = {16, 64};
  c.dilation_rates = {1, 4};
  c.block_size = 32;
  c.window = 128;
  CHECK(config_label("dense", c) == "-");
  CHECK(config_label("dilated", c) == "w=16,64 r=1,4 lse");
  CHECK(config_label("block_sparse", c) == "local_window bs=32 win=128");
  CHECK(config_label("block_sparse_adaptive", c) == "adaptive bs=32 density=0.25");
  c.inner_variant = "dilated";
  c.ranks = 2;
  c.causal = true;
  c.impl = "composed";
  CHECK(config_label("head_parallel", c) == "inner=dilated w=16,64 r=1,4 lse P=2 causal impl=composed");
  c.inner_variant = "ring";  // a wrapper inside a wrapper: every field it might read
  CHECK(config_label("hilbert", c) ==
        "inner=ring w=16,64 r=1,4 lse local_window bs=32 win=128 causal impl=composed");
}
