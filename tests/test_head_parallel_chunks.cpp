// head_parallel's pipeline over token chunks (attention/head_parallel.h): where every segment of
// the dilated pattern stays inside a chunk, each step runs the core on one chunk of one rank
// (one_rank) or chunk g of every rank (every_rank), and the result equals one device bit for bit,
// forward and gradients (out and lse), both mixings, causal or not, batch 1 and 2, 2 and 3 ranks,
// several step counts; the automatic choice; one_rank's fall back to every_rank; the cases that
// must run head groups instead (ragged shards, chunks that cut a segment, dense, dropout in
// training, an explicit head group count); conflicting settings are refused.
#include <doctest/doctest.h>

#include <mutex>
#include <string>
#include <vector>

#include "attention/head_parallel.h"
#include "attention/head_parallel_pipeline.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "nn/dist/communicator.h"
#include "support/head_parallel_ranks.h"
#include "support/parallel_configs.h"
#include "tensor/error.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::parallel_cases;

namespace {

// Every rank ran `chunks` token chunk steps in `layout` (1: head groups, `groups` of them).
void check_ran(const std::vector<HeadParallelRun>& ran, int64_t chunks, int64_t groups, const std::string& what,
               const std::string& layout = "") {
  INFO(what);
  REQUIRE(!ran.empty());
  for (const HeadParallelRun& r : ran) {
    CHECK(r.token_chunks == chunks);
    CHECK(r.groups == (chunks > 1 ? 1 : groups));
    CHECK(r.chunk_layout == (chunks > 1 ? layout : ""));
  }
}

}  // namespace

TEST_CASE("automatic_token_chunks: 4 steps or fewer (one_rank: multiples of the ranks), chunks of at least 2 of the "
          "widest segments, whole segments only") {
  AttentionConfig config;
  config.num_heads = 12;
  config.segment_lengths = {2048, 4096, 8192};
  config.dilation_rates = {1, 2, 4};
  SUBCASE("every_rank: chunk g of every rank per step") {
    config.token_chunk_layout = "every_rank";
    CHECK(automatic_token_chunks(config, 2, 131072) == 4);  // N = 262144 on 2 ranks: chunks of 32768
    CHECK(automatic_token_chunks(config, 4, 65536) == 4);   // on 4 ranks: chunks of 16384
    CHECK(automatic_token_chunks(config, 2, 16384 * 3) == 3);
    CHECK(automatic_token_chunks(config, 2, 32768) == 2);
    CHECK(automatic_token_chunks(config, 2, 16384) == 1);  // one chunk would hold a single widest segment
    CHECK(automatic_token_chunks(config, 2, 16384 + 8192) == 1);
    config.segment_lengths = {2048, 4096, 6144};  // chunks must be multiples of 12288 as well
    CHECK(automatic_token_chunks(config, 2, 4 * 12288) == 4);
    CHECK(automatic_token_chunks(config, 2, 4 * 8192) == 1);
  }
  SUBCASE("one_rank: one chunk of one rank per step, P * chunks steps") {
    CHECK(config.token_chunk_layout == "one_rank");  // the default
    CHECK(automatic_token_chunks(config, 2, 131072) == 4);  // 2 chunks of 65536 per rank
    CHECK(automatic_token_chunks(config, 4, 65536) == 4);  // 1 chunk per rank (own halves only when asked: 5)
    CHECK(automatic_token_chunks(config, 3, 32768) == 3);
    CHECK(automatic_token_chunks(config, 8, 16384) == 8);
    CHECK(automatic_token_chunks(config, 2, 16384 * 3) == 4);
    CHECK(automatic_token_chunks(config, 2, 32768) == 4);
    CHECK(automatic_token_chunks(config, 2, 16384) == 2);        // chunks of 8192 would hold one widest segment
    CHECK(automatic_token_chunks(config, 2, 16384 + 8192) == 2);  // 12288 is no multiple of 8192
    CHECK(automatic_token_chunks(config, 2, 8192) == 1);
    config.segment_lengths = {2048, 4096, 6144};
    CHECK(automatic_token_chunks(config, 2, 4 * 12288) == 4);
    CHECK(automatic_token_chunks(config, 2, 4 * 8192) == 1);
  }
  config.segment_lengths = {2048, 4096, 6144};
  config.dropout = 0.1;
  CHECK(automatic_token_chunks(config, 2, 4 * 12288, /*training=*/false) == 4);
  CHECK(automatic_token_chunks(config, 2, 4 * 12288, /*training=*/true) == 1);  // dropout would draw differently
  config.dropout = 0.0;
  config.inner_variant = "dense";
  CHECK(automatic_token_chunks(config, 2, 4 * 12288) == 1);
}

TEST_CASE("token chunks: head_parallel equals one device bit for bit for every step count and layout, both mixings, "
          "causal or not, P = 2 and 3") {
  // Segments 4, 8, 2: a chunk must be a multiple of 8 tokens. P = 2: 32 tokens per rank, batch 2;
  // P = 3: 16 per rank, batch 1. 0 = automatic (chunks of at least 16 tokens). one_rank needs a
  // multiple of P steps or P + 1 (own halves), else every_rank runs.
  struct Run {
    int64_t asked, runs;
    std::string layout;  // what runs
  };
  struct Case {
    int p;
    int64_t heads, tokens, batch;
    std::string layout;  // asked
    std::vector<Run> runs;
  };
  const std::vector<Case> cases{
      {2, 6, 64, 2, "every_rank", {{2, 2, "every_rank"}, {4, 4, "every_rank"}, {0, 2, "every_rank"}}},
      {3, 6, 48, 1, "every_rank", {{2, 2, "every_rank"}, {0, 1, ""}}},
      {2, 6, 64, 2, "one_rank", {{2, 2, "one_rank"}, {3, 3, "one_rank"}, {4, 4, "one_rank"}, {0, 4, "one_rank"}}},
      {3, 6, 48, 1, "one_rank",
       {{3, 3, "one_rank"}, {4, 4, "one_rank"}, {2, 2, "every_rank"}, {6, 6, "one_rank"}, {0, 3, "one_rank"}}}};
  for (const Case& c : cases)
    for (const Mixing mixing : {Mixing::lse, Mixing::head_groups})
      for (const bool causal : {false, true}) {
        const testing::InnerVariant inner{"dilated", mixing, {4, 8, 2}, {2, 4, 1}};
        manual_seed(8300 + static_cast<uint64_t>(c.p) * 4 + (causal ? 2 : 0) + (mixing == Mixing::lse ? 1 : 0));
        const AttentionInputs in = random_attention_inputs(c.batch, c.tokens, c.heads, 4);
        AttentionConfig config = testing::parallel_config(inner, c.heads, 4, causal, c.p);
        auto reference = make_attention("dilated", config);
        const AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
        config.token_chunk_layout = c.layout;
        for (const Run& run : c.runs) {
          config.token_chunks = run.asked;
          const std::string what = std::string(mixing == Mixing::lse ? "lse" : "head_groups") +
                                   (causal ? ", causal" : "") + ", P = " + std::to_string(c.p) +
                                   ", token_chunks = " + std::to_string(run.asked) + " " + c.layout;
          std::vector<HeadParallelRun> ran;
          check_results(run_head_parallel_ranks(config, in, c.p, &ran), want, 0.0, "rank-local " + what);
          check_ran(ran, run.runs, automatic_pipeline_groups(c.heads / c.p), what, run.layout);
          // The registered module outside a rank runs the ranks as threads, through the same pipeline.
          auto simulated = make_attention("head_parallel", config);
          check_results(run_with_gradients(*simulated, in.q, in.k, in.v, in.dout, in.dlse), want, 0.0,
                        "simulated " + what);
          CHECK(last_head_parallel_run().token_chunks == run.runs);
        }
      }
}

TEST_CASE("token chunks: where a segment would cross a chunk or the shards differ, head groups run instead, with the "
          "one-device result") {
  const testing::InnerVariant dilated{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  struct Case {
    std::string what;
    testing::InnerVariant inner;
    int64_t tokens;
    int64_t token_chunks, pipeline_groups, groups_run;
    std::string layout = "one_rank";
  };
  const std::vector<Case> cases{
      {"ragged shards (17 + 16 tokens)", dilated, 33, 0, 0, 2},
      {"2 chunks of 12 tokens cut segments of 8", dilated, 48, 2, 0, 2, "every_rank"},
      {"4 one-rank steps: chunks of 12 tokens cut segments of 8 (every_rank's chunks of 6 as well)", dilated, 48, 4,
       0, 2},
      {"3 chunks of 8 tokens hold whole segments, but 5 chunks do not divide 24", dilated, 48, 5, 0, 2},
      {"dense attention has one segment: the sequence", {"dense", Mixing::lse, {}, {}}, 48, 0, 0, 2},
      {"an explicit head group count with token_chunks automatic", dilated, 48, 0, 1, 1},
      {"token_chunks = 1", dilated, 48, 1, 0, 2},
  };
  for (const Case& c : cases) {
    manual_seed(8400);
    const AttentionInputs in = random_attention_inputs(2, c.tokens, 4, 4);
    AttentionConfig config = testing::parallel_config(c.inner, 4, 4, true, 2);
    auto reference = make_attention(c.inner.name, config);
    const AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
    config.token_chunks = c.token_chunks;
    config.pipeline_groups = c.pipeline_groups;
    config.token_chunk_layout = c.layout;
    std::vector<HeadParallelRun> ran;
    check_results(run_head_parallel_ranks(config, in, 2, &ran), want, 0.0, c.what);
    check_ran(ran, 1, c.groups_run, c.what);
  }
  // 3 chunks of 8 tokens do hold whole segments of 4 and 8 (every_rank: 3 is no multiple of 2 ranks).
  manual_seed(8401);
  const AttentionInputs in = random_attention_inputs(1, 48, 4, 4);
  AttentionConfig config = testing::parallel_config(dilated, 4, 4, true, 2);
  const AttentionResults want = run_with_gradients(*make_attention("dilated", config), in.q, in.k, in.v, in.dout, in.dlse);
  config.token_chunks = 3;
  std::vector<HeadParallelRun> ran;
  check_results(run_head_parallel_ranks(config, in, 2, &ran), want, 0.0, "3 chunks of 8 tokens");
  check_ran(ran, 3, 1, "3 chunks of 8 tokens", "every_rank");
  // Attention dropout in training draws per call: head groups, whatever token_chunks says.
  config.dropout = 0.25;
  ran.clear();
  run_head_parallel_ranks(config, in, 2, &ran, /*training=*/true);
  check_ran(ran, 1, 2, "dropout in training");
}

TEST_CASE("token_chunks: negative counts, both pipeline axes at once and unknown layouts are refused") {
  AttentionConfig config;
  config.num_heads = 4;
  config.head_dim = 4;
  config.segment_lengths = {4};
  config.dilation_rates = {1};
  config.ranks = 2;
  config.token_chunks = -1;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", config),
                       doctest::Contains("token_chunks must be 0 (automatic), 1 (none) or a chunk count >= 2, got -1"),
                       Error);
  config.token_chunks = 2;
  config.pipeline_groups = 2;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", config),
                       doctest::Contains("over head groups or over token chunks, not both; got pipeline_groups = 2 "
                                         "and token_chunks = 2"),
                       Error);
  const Tensor x = Tensor::randn({1, 8, 4, 4});
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [&](dist::Communicator& comm) {
    head_parallel_attention(comm, config, x, x, x);
  }), doctest::Contains("not both"), Error);
  config.pipeline_groups = 0;
  config.token_chunk_layout = "zigzag";
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", config),
                       doctest::Contains("token_chunk_layout must be one_rank or every_rank, got \"zigzag\""), Error);
}
