// head_parallel's pipeline over head groups (attention/head_parallel_pipeline.h): every group count
// gives the one-device result bit for bit, forward and gradients, dense and dilated (both mixings),
// 2 and 3 ranks of the thread group, ragged and equal shards, group counts that do not divide the
// heads; the all-to-alls of the next group start before the current group's are waited for; bad
// group counts are refused.
#include <doctest/doctest.h>

#include <chrono>
#include <mutex>
#include <string>
#include <vector>

#include "attention/head_parallel.h"
#include "attention/head_parallel_pipeline.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/autograd/node.h"
#include "nn/dist/communicator.h"
#include "support/head_parallel_ranks.h"
#include "support/parallel_configs.h"
#include "tensor/error.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing::parallel_cases;

namespace {

// Passes everything to `inner`, writing "S" for each start_all_to_all and "W" for each wait.
class Recording final : public dist::Communicator {
 public:
  explicit Recording(dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const dist::CommOptions& options() const override { return inner_.options(); }
  void send(const Tensor& t, int dst, int tag) override { inner_.send(t, dst, tag); }
  Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag) override {
    return inner_.recv(shape, dtype, device, src, tag);
  }
  std::vector<Tensor> all_gather(const Tensor& t) override { return inner_.all_gather(t); }
  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override {
    log += "A";  // a blocking all-to-all: the pipeline takes none
    return inner_.all_to_all(to_each);
  }
  std::unique_ptr<PendingAllToAll> start_all_to_all(const std::vector<Tensor>& to_each,
                                                    const std::vector<Tensor>& into) override {
    log += "S";
    class Logged final : public PendingAllToAll {
     public:
      Logged(std::unique_ptr<PendingAllToAll> p, std::string& log) : pending_(std::move(p)), log_(log) {}
      void wait() override {
        log_ += "W";
        pending_->wait();
      }

     private:
      std::unique_ptr<PendingAllToAll> pending_;
      std::string& log_;
    };
    return std::make_unique<Logged>(inner_.start_all_to_all(to_each, into), log);
  }
  Tensor all_reduce(const Tensor& t, dist::ReduceOp op) override { return inner_.all_reduce(t, op); }
  Tensor broadcast(const Tensor& t, int root) override { return inner_.broadcast(t, root); }
  void barrier() override { inner_.barrier(); }
  void abort(const std::string& why) override { inner_.abort(why); }
  std::shared_ptr<dist::Communicator> split(int64_t color, int64_t key) override { return inner_.split(color, key); }
  std::string log;

 private:
  dist::Communicator& inner_;
};

// The log the pipeline must write for steps taken in this order, each moving data between ranks
// (remote) or not: every step's transfers there start before the first step's are waited for (so
// step g+1's travel while step g computes), each step's return starts right after its core, and
// the returns are waited for only after the last step's core. A step that moves nothing starts no
// transfer. `there`/`back`: all-to-alls per step each way.
std::string expected_log(const std::vector<bool>& remote, int there, int back) {
  const std::string start_there(static_cast<size_t>(there), 'S'), wait_there(static_cast<size_t>(there), 'W'),
      start_back(static_cast<size_t>(back), 'S'), wait_back(static_cast<size_t>(back), 'W');
  std::string log;
  for (bool r : remote) log += r ? start_there : "";
  for (bool r : remote) log += r ? wait_there + start_back : "";
  for (bool r : remote) log += r ? wait_back : "";
  return log;
}

}  // namespace

TEST_CASE("split_heads and the automatic group count") {
  const std::vector<HeadGroup> five = split_heads(5, 3);
  REQUIRE(five.size() == 3);
  CHECK((five[0].first == 0 && five[0].count == 2 && five[1].first == 2 && five[1].count == 2 && five[2].first == 4 &&
         five[2].count == 1));
  CHECK(split_heads(4, 1).size() == 1);
  CHECK(automatic_pipeline_groups(6) == 3);
  CHECK(automatic_pipeline_groups(8) == 4);
  CHECK(automatic_pipeline_groups(5) == 4);
  CHECK(automatic_pipeline_groups(1) == 1);
  CHECK_THROWS_WITH_AS(split_heads(3, 4), doctest::Contains("cannot be split into 4 groups: expected 1 to 3"), Error);
}

TEST_CASE("pipelined head_parallel equals one device bit for bit for every group count, P = 2 and 3") {
  const std::vector<testing::InnerVariant> inners = {
      {"dense", Mixing::lse, {}, {}},
      {"dilated", Mixing::lse, {4, 8, 6}, {1, 2, 3}},
      {"dilated", Mixing::head_groups, {4, 8, 6}, {1, 3, 2}},
  };
  // P = 2: 10 heads (5 per rank), 11 tokens (ragged shards 6 + 5), batch 1. P = 3: 9 heads (3 per
  // rank), 12 tokens (equal shards), batch 2. Group counts 2 and 3 do not divide 5, 2 not 3.
  struct Case {
    int p;
    int64_t heads, tokens, batch;
    std::vector<int64_t> groups;
  };
  for (const Case& c : {Case{2, 10, 11, 1, {1, 2, 3, 5, 0}}, Case{3, 9, 12, 2, {1, 2, 3, 0}}}) {
    for (const testing::InnerVariant& inner : inners) {
      const bool causal = inner.mixing == Mixing::lse;
      manual_seed(8100 + static_cast<uint64_t>(c.p));
      const AttentionInputs in = random_attention_inputs(c.batch, c.tokens, c.heads, 4);
      AttentionConfig config = testing::parallel_config(inner, c.heads, 4, causal, c.p);
      auto reference = make_attention(inner.name, config);
      const AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
      for (int64_t groups : c.groups) {
        config.pipeline_groups = groups;
        const std::string what = inner.name + (inner.mixing == Mixing::head_groups ? " (head_groups)" : "") +
                                 ", P = " + std::to_string(c.p) + ", pipeline_groups = " + std::to_string(groups);
        std::vector<HeadParallelRun> ran;
        check_results(run_head_parallel_ranks(config, in, c.p, &ran), want, 0.0, "rank-local " + what);
        const int64_t local = c.heads / c.p;
        for (const HeadParallelRun& run : ran) CHECK(run.groups == (groups > 0 ? groups : automatic_pipeline_groups(local)));
        // The registered module outside a rank runs the ranks as threads, through the same pipeline.
        auto simulated = make_attention("head_parallel", config);
        check_results(run_with_gradients(*simulated, in.q, in.k, in.v, in.dout, in.dlse), want, 0.0,
                      "simulated " + what);
      }
    }
  }
}

TEST_CASE("the pipeline starts every step's all-to-alls before waiting for step 0's, forward and backward; steps "
          "that move nothing start none") {
  const testing::InnerVariant inner{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  // Head groups on 12 tokens (6 per rank); token chunks on 32 (16 per rank). One-rank chunks: each
  // rank's own chunks first and last, where nothing moves; the backward runs the steps in reverse.
  struct Case {
    int64_t tokens, pipeline_groups, token_chunks;
    std::string layout;
    std::vector<bool> remote;  // per step, in the forward's order
  };
  const std::vector<Case> cases{{12, 1, 0, "one_rank", {true}},
                                {12, 2, 0, "one_rank", {true, true}},
                                {12, 3, 0, "one_rank", {true, true, true}},
                                {32, 0, 2, "every_rank", {true, true}},
                                {32, 0, 2, "one_rank", {false, true}},
                                {32, 0, 4, "one_rank", {false, true, true, false}},
                                {32, 0, 3, "one_rank", {false, true, false}}};
  for (const Case& c : cases) {
    manual_seed(8200);
    const AttentionInputs in = random_attention_inputs(1, c.tokens, 6, 4);
    AttentionConfig config = testing::parallel_config(inner, 6, 4, true, 2);
    auto reference = make_attention("dilated", config);
    const AttentionResults want = run_with_gradients(*reference, in.q, in.k, in.v, in.dout, in.dlse);
    config.pipeline_groups = c.pipeline_groups;
    config.token_chunks = c.token_chunks;
    config.token_chunk_layout = c.layout;
    const int64_t half = c.tokens / 2;
    std::vector<std::string> forward_logs(2), backward_logs(2);
    std::vector<AttentionResults> parts(2);
    std::vector<HeadParallelRun> ran(2);
    dist::run_ranks(2, [&](dist::Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      auto recording = std::make_shared<Recording>(comm);
      auto chunk = [&](const Tensor& x, int64_t dim) {
        return x.narrow(dim, half * static_cast<int64_t>(r), half).contiguous();
      };
      Tensor q = chunk(in.q, 1).requires_grad_(), k = chunk(in.k, 1).requires_grad_(), v = chunk(in.v, 1).requires_grad_();
      AttentionOutput res = head_parallel_attention(*recording, config, q, k, v);
      ran[r] = last_head_parallel_run();
      forward_logs[r] = recording->log;
      recording->log.clear();
      autograd::run_backward({res.out, res.lse}, {chunk(in.dout, 1), chunk(in.dlse, 2)}, false);
      backward_logs[r] = recording->log;
      parts[r] = {res.out.detach(), res.lse.detach(), q.grad(), k.grad(), v.grad()};
    });
    INFO("pipeline_groups = " << c.pipeline_groups << ", token_chunks = " << c.token_chunks << " " << c.layout);
    const std::vector<bool> reversed(c.remote.rbegin(), c.remote.rend());
    for (size_t r = 0; r < 2; ++r) {
      CHECK(ran[r].groups * ran[r].token_chunks == static_cast<int64_t>(c.remote.size()));
      CHECK(ran[r].token_chunks == (c.token_chunks > 1 ? c.token_chunks : 1));
      CHECK(ran[r].chunk_layout == (c.token_chunks > 1 ? c.layout : ""));
      // Forward: q, k, v there, out and lse back. Backward: dO and the lse gradient there, dq, dk, dv back.
      CHECK(forward_logs[r] == expected_log(c.remote, 3, 2));
      CHECK(backward_logs[r] == expected_log(reversed, 2, 3));
    }
    check_results(join_rank_chunks(parts), want, 0.0, "recorded pipeline");
  }
}

TEST_CASE("one_rank_chunk_steps: own chunks first and last, one sender and one receiver per rank and step") {
  for (const int64_t ranks : {1, 2, 3, 4})
    for (const int64_t chunks : {1, 2, 3}) {
      INFO(ranks << " ranks, " << chunks << " chunks");
      const int64_t length = 6 * chunks;
      const std::vector<PipelineStep> steps = one_rank_chunk_steps(5, ranks, length, chunks);
      REQUIRE(static_cast<int64_t>(steps.size()) == ranks * chunks);
      // covered[s][j]: how many ranks' cores took chunk j of rank s (each of the other ranks' heads once).
      std::vector<std::vector<int64_t>> covered(static_cast<size_t>(ranks), std::vector<int64_t>(static_cast<size_t>(chunks), 0));
      for (size_t g = 0; g < steps.size(); ++g) {
        const PipelineStep& step = steps[g];
        CHECK((step.heads.first == 0 && step.heads.count == 5));
        REQUIRE(static_cast<int64_t>(step.core.size()) == ranks);
        std::vector<int64_t> receivers(static_cast<size_t>(ranks), 0);
        for (int64_t t = 0; t < ranks; ++t) {
          REQUIRE(step.core[static_cast<size_t>(t)].size() == 1);
          const TokenPiece p = step.core[static_cast<size_t>(t)][0];
          CHECK(p.length == 6);
          CHECK(p.first % 6 == 0);
          ++covered[static_cast<size_t>(p.source)][static_cast<size_t>(p.first / 6)];
          ++receivers[static_cast<size_t>(p.source)];
          if (g == 0 || g + 1 == steps.size())
            CHECK((p.source == t || (g + 1 == steps.size() && chunks == 1)));
        }
        for (int64_t n : receivers) CHECK(n == 1);  // each rank's tokens go to one core per step
      }
      for (const auto& row : covered)
        for (int64_t n : row) CHECK(n == ranks);  // every rank's heads of every chunk once
    }
}

TEST_CASE("one_rank_chunk_steps with own halves: rank t takes its chunk's first half first and its second half last") {
  for (const int64_t ranks : {2, 3, 4}) {
    INFO(ranks << " ranks");
    const std::vector<PipelineStep> steps = one_rank_chunk_steps(2, ranks, 12, 1, /*halve_own=*/true);
    REQUIRE(static_cast<int64_t>(steps.size()) == ranks + 1);
    std::vector<std::vector<int64_t>> tokens(static_cast<size_t>(ranks), std::vector<int64_t>(12, 0));
    for (size_t g = 0; g < steps.size(); ++g) {
      std::vector<int64_t> receivers(static_cast<size_t>(ranks), 0);
      for (int64_t t = 0; t < ranks; ++t) {
        REQUIRE(steps[g].core[static_cast<size_t>(t)].size() == 1);
        const TokenPiece p = steps[g].core[static_cast<size_t>(t)][0];
        ++receivers[static_cast<size_t>(p.source)];
        for (int64_t i = p.first; i < p.first + p.length; ++i) ++tokens[static_cast<size_t>(p.source)][static_cast<size_t>(i)];
        if (g == 0) CHECK((p.source == t && p.first == 0 && p.length == 6));
        else if (g + 1 == steps.size()) CHECK((p.source == t && p.first == 6 && p.length == 6));
        else CHECK((p.source != t && p.first == 0 && p.length == 12));
      }
      for (int64_t n : receivers) CHECK(n == 1);
    }
    for (const auto& row : tokens)
      for (int64_t n : row) CHECK(n == ranks);  // every token of every rank reaches every rank's core once
  }
  CHECK_THROWS_WITH_AS(one_rank_chunk_steps(2, 2, 12, 2, true), doctest::Contains("only one chunk per rank"), Error);
}

TEST_CASE("pipeline_groups: out-of-range counts and several groups over an inner variant with parameters are refused") {
  AttentionConfig config;
  config.num_heads = 4;
  config.head_dim = 4;
  config.inner_variant = "dense";
  config.ranks = 2;
  config.pipeline_groups = 3;  // 2 heads per rank
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", config),
                       doctest::Contains("pipeline_groups must be 0 (automatic) or 1 to the heads per rank (2), got 3"),
                       Error);
  config.pipeline_groups = -1;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", config), doctest::Contains("got -1"), Error);
  config.pipeline_groups = 2;
  const Tensor x = Tensor::randn({1, 4, 4, 4});
  CHECK_THROWS_WITH_AS(dist::run_ranks(1, [&](dist::Communicator& comm) {
    AttentionConfig wide = config;
    wide.pipeline_groups = 5;
    head_parallel_attention(comm, wide, x, x, x);
  }), doctest::Contains("heads per rank (4), got 5"), Error);

  AttentionConfig adaptive = config;
  adaptive.inner_variant = "block_sparse_adaptive";
  adaptive.block_size = 2;
  adaptive.density = 0.5;
  CHECK_THROWS_WITH_AS(make_attention("head_parallel", adaptive)->forward(x, x, x),
                       doctest::Contains("has parameters (held per rank for all of its heads), so its heads run as "
                                         "one group; got pipeline_groups = 2"),
                       Error);
  adaptive.pipeline_groups = 0;  // automatic: one group
  CHECK(make_attention("head_parallel", adaptive)->forward(x, x, x).shape() == x.shape());
  CHECK(last_head_parallel_run().groups == 1);
}
