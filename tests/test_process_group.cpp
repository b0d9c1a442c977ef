// The multi-process pieces: the TCP store, the TCP process group (ranks as threads of this
// process, each with its own sockets, and as real processes through `longtape launch`), the
// bucketed gradient averaging, the launcher's failure handling and data-parallel training.
#include <doctest/doctest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "attention/head_parallel.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/autograd/node.h"
#include "io/safetensors.h"
#include "io/tensor_io.h"
#include "nn/dist/data_parallel.h"
#include "nn/dist/nccl_communicator.h"
#include "nn/dist/process_group.h"
#include "nn/dist/selftest.h"
#include "nn/dist/shm_mailbox.h"
#include "nn/dist/store.h"
#include "nn/dist/tcp_communicator.h"
#include "nn/layers.h"
#include "support/cli_runner.h"
#include "support/test_utils.h"
#include "support/test_utils.h"
#include "tensor/error.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::dist;
using namespace std::chrono_literals;

namespace {

using Results = std::vector<std::pair<std::string, Tensor>>;

// Runs body(comm) on `size` threads, each rank with its own store client and TCP process group
// (real sockets on the loopback); rethrows the first rank's error after all have stopped.
void run_tcp_ranks(int size, const std::function<void(Communicator&)>& body, std::chrono::milliseconds timeout = 20s) {
  TcpStore server("127.0.0.1", 0, /*serve=*/true, timeout);
  std::vector<std::string> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      try {
        TcpStore store("127.0.0.1", server.port(), false, timeout);
        std::shared_ptr<Communicator> comm = make_tcp_process_group(store, r, size, CommOptions{timeout});
        body(*comm);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < size; ++r)
    if (!errors[static_cast<size_t>(r)].empty()) throw Error("rank " + std::to_string(r) + ": " + errors[static_cast<size_t>(r)]);
}

Results in_process_results(int size, uint64_t seed) {
  std::vector<Results> per_rank(static_cast<size_t>(size));
  run_ranks(size, [&](Communicator& comm) {
    per_rank[static_cast<size_t>(comm.rank())] = check_collectives(comm, Device::cpu(), seed);
  });
  Results all;
  for (int r = 0; r < size; ++r)
    for (auto& [name, t] : per_rank[static_cast<size_t>(r)]) all.emplace_back("rank" + std::to_string(r) + "/" + name, t);
  return all;
}

void check_bitwise_equal(const Tensor& got, const Tensor& want, const std::string& name) {
  INFO(name);
  REQUIRE(got.shape() == want.shape());
  REQUIRE(got.dtype() == want.dtype());
  const auto g = got.to_vector(), w = want.to_vector();
  size_t differing = 0;
  for (size_t i = 0; i < g.size(); ++i) differing += g[i] != w[i];
  CHECK(differing == 0);
}

struct TwoLayers : nn::Module {
  TwoLayers()
      : first(register_module("first", std::make_shared<nn::Linear>(7, 5))),
        second(register_module("second", std::make_shared<nn::Linear>(5, 3))) {}
  Tensor forward(const Tensor& x) { return second->forward(tanh(first->forward(x))); }
  std::string type_name() const override { return "TwoLayers"; }
  std::shared_ptr<nn::Linear> first, second;
};

}  // namespace

TEST_CASE("shared-memory mailbox: posts, stamps, counters and all_gather across 3 ranks; a rank that opts out "
          "leaves every rank on its store; wrong order and silence are errors") {
  TcpStore server("127.0.0.1", 0, true, 5s);
  constexpr int kRanks = 3, kSlots = 4;
  // Each rank (a thread with its own store connection) connects, posts in slot 1 for exchange 5,
  // reads every rank's post, stamps, waits for every stamp, adds to the counter, and gathers
  // three values in a row.
  std::vector<std::string> errors(kRanks);
  std::vector<std::vector<std::string>> posts(kRanks);
  std::vector<std::vector<int64_t>> gathered(kRanks);
  std::vector<int64_t> counts(kRanks);
  std::vector<std::thread> ranks;
  for (int r = 0; r < kRanks; ++r)
    ranks.emplace_back([&, r] {
      try {
        TcpStore store("127.0.0.1", server.port(), false, 5s);
        auto box = ShmMailbox::connect(store, "mb", r, kRanks, kSlots);
        if (!box) throw std::runtime_error("no mailbox");
        box->post(1, r, 5, "rank " + std::to_string(r) + std::string(1000, static_cast<char>('a' + r)));
        for (int p = 0; p < kRanks; ++p) posts[r].push_back(box->read(1, p, 5, 5000ms, "a test post"));
        box->stamp(1, r, 5);
        for (int p = 0; p < kRanks; ++p) box->wait_stamp(1, p, 5, 5000ms, "a test stamp");
        box->add(1, 1);
        for (int64_t call = 0; call < 3; ++call) {
          const std::vector<int64_t> v = box->all_gather(call, 100 * call + r, 5000ms);
          gathered[r].insert(gathered[r].end(), v.begin(), v.end());
        }
        // Everyone has added by now (each rank's gathers need every rank past its add).
        counts[r] = box->count(1);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r);
    CHECK(errors[r].empty());
    REQUIRE(posts[r].size() == kRanks);
    for (int p = 0; p < kRanks; ++p)
      CHECK(posts[r][static_cast<size_t>(p)] ==
            "rank " + std::to_string(p) + std::string(1000, static_cast<char>('a' + p)));
    CHECK(gathered[r] == std::vector<int64_t>{0, 1, 2, 100, 101, 102, 200, 201, 202});
    CHECK(counts[r] == kRanks);
  }

  // One rank opts out: every rank gets nullptr (and nobody waits forever).
  std::vector<int> got(kRanks, -1);
  ranks.clear();
  for (int r = 0; r < kRanks; ++r)
    ranks.emplace_back([&, r] {
      TcpStore store("127.0.0.1", server.port(), false, 5s);
      got[r] = ShmMailbox::connect(store, "mb2", r, kRanks, kSlots, /*wanted=*/r != 1) != nullptr;
    });
  for (auto& t : ranks) t.join();
  CHECK(got == std::vector<int>{0, 0, 0});

  // One rank alone: a later exchange's post where an earlier one is awaited, and a post that
  // never comes, are errors naming what was expected.
  TcpStore store("127.0.0.1", server.port(), false, 5s);
  auto box = ShmMailbox::connect(store, "mb3", 0, 1, kSlots);
  REQUIRE(box != nullptr);
  box->post(2, 0, 7, "x");
  CHECK_THROWS_WITH_AS(box->read(2, 0, 5, 100ms, "a test post"), doctest::Contains("posted exchange 7 where exchange 5"),
                       Error);
  CHECK_THROWS_WITH_AS(box->read(3, 0, 5, 50ms, "a test post"), doctest::Contains("timed out"), Error);
  CHECK_THROWS_WITH_AS(box->post(0, 0, 1, std::string(ShmMailbox::kPostBytes + 1, 'z')),
                       doctest::Contains("at most"), Error);
}

TEST_CASE("TCP store: set, get, add and wait across clients; a missing key times out naming it") {
  TcpStore server("127.0.0.1", 0, true, 5s);
  TcpStore client("127.0.0.1", server.port(), false, 5s);
  std::thread late([&] {
    std::this_thread::sleep_for(50ms);
    TcpStore other("127.0.0.1", server.port(), false, 5s);
    other.set("late", std::string("\0bytes\xff", 7));
  });
  CHECK(client.get("late") == std::string("\0bytes\xff", 7));  // waits for it
  late.join();
  server.set("k", "v1");
  server.set("k", "v2");
  CHECK(client.get("k") == "v2");
  CHECK(client.add("count", 3) == 3);
  CHECK(server.add("count", -5) == -2);
  client.wait({"k", "late", "count"});
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(client.get("never", 200ms), doctest::Contains("\"never\""), Error);
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);
  CHECK_THROWS_WITH_AS(TcpStore("127.0.0.1", 1, false, 200ms), doctest::Contains("could not connect"), Error);
}

TEST_CASE("TCP process group: every collective equals the in-process group's, bit for bit (2 and 3 ranks)") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  for (int size : {2, 3}) {
    INFO(size << " ranks");
    const Results want = in_process_results(size, seed);
    std::vector<Results> per_rank(static_cast<size_t>(size));
    run_tcp_ranks(size, [&](Communicator& comm) {
      per_rank[static_cast<size_t>(comm.rank())] = check_collectives(comm, Device::cpu(), seed);
    });
    std::map<std::string, Tensor> got;
    for (int r = 0; r < size; ++r)
      for (auto& [name, t] : per_rank[static_cast<size_t>(r)]) got["rank" + std::to_string(r) + "/" + name] = t;
    REQUIRE(got.size() == want.size());
    for (const auto& [name, t] : want) check_bitwise_equal(got.at(name), t, name);
  }
}

TEST_CASE("TCP process group: a peer that goes away or stays silent makes the waiting rank throw, naming it") {
  // Rank 1 closes its connections (its process ended) while rank 0 waits for a message from it.
  std::string closed_error;
  CHECK_THROWS_WITH_AS(run_tcp_ranks(2, [&](Communicator& comm) {
                         if (comm.rank() == 0) comm.recv({3}, DType::f32, Device::cpu(), 1, 0);
                       }),
                       doctest::Contains("closed its connection"), Error);
  // Rank 1 stays connected but sends nothing: rank 0 times out naming it, and its abort reaches rank 1.
  std::string rank1_error;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(run_tcp_ranks(2, [&](Communicator& comm) {
                         if (comm.rank() == 0) {
                           comm.recv({3}, DType::f32, Device::cpu(), 1, 0);
                         } else {
                           try {
                             std::this_thread::sleep_for(200ms);  // its own wait ends after rank 0's
                             comm.recv({3}, DType::f32, Device::cpu(), 0, 5);
                           } catch (const Error& e) {
                             rank1_error = e.what();
                           }
                         }
                       }, 400ms),
                       doctest::Contains("timed out after 0.4"), Error);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  INFO("rank 1: " << rank1_error);
  CHECK(rank1_error.find("rank 0 failed") != std::string::npos);
  // Different collectives at the same position fail on both ranks.
  CHECK_THROWS_WITH_AS(run_tcp_ranks(2, [&](Communicator& comm) {
                         if (comm.rank() == 0) comm.all_reduce(Tensor::randn({4}));
                         else comm.barrier();
                       }, 2s),
                       doctest::Contains("collective mismatch"), Error);
  // Shapes that differ between ranks.
  CHECK_THROWS_WITH_AS(run_tcp_ranks(2, [&](Communicator& comm) {
                         comm.all_reduce(Tensor::randn({comm.rank() == 0 ? 10000 : 10001}));
                       }, 2s),
                       doctest::Contains("same shape"), Error);
}

TEST_CASE("TCP process group of one rank: sends to itself arrive, and every collective equals the in-process group's") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Tensor sent = Tensor::randn({5, 3});
  Results got;
  run_tcp_ranks(1, [&](Communicator& comm) {
    comm.send(sent, 0, 4);
    const Tensor back = comm.recv({5, 3}, DType::f32, Device::cpu(), 0, 4);
    check_bitwise_equal(back, sent, "send to itself");
    got = check_collectives(comm, Device::cpu(), 11);
  }, 5s);
  const Results want = in_process_results(1, 11);
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) check_bitwise_equal(got[i].second, want[i].second, got[i].first);
}

TEST_CASE("TCP process group: a ring of sends before any receive does not deadlock, and abort reaches every rank") {
  run_tcp_ranks(4, [&](Communicator& comm) {
    const int next = (comm.rank() + 1) % comm.size(), previous = (comm.rank() + comm.size() - 1) % comm.size();
    // Large enough that an unbuffered send would block on the socket.
    const Tensor big = Tensor::full({4 << 20}, static_cast<double>(comm.rank()));
    comm.send(big, next, 0);
    const Tensor got = comm.recv({4 << 20}, DType::f32, Device::cpu(), previous, 0);
    CHECK(got.narrow(0, (4 << 20) - 1, 1).item() == previous);
  });
  std::vector<std::string> errors(3);
  CHECK_THROWS_WITH_AS(run_tcp_ranks(3, [&](Communicator& comm) {
                         if (comm.rank() == 2) comm.abort("stopping on purpose");
                         try {
                           comm.barrier();
                         } catch (const Error& e) {
                           errors[static_cast<size_t>(comm.rank())] = e.what();
                           throw;
                         }
                       }, 5s),
                       doctest::Contains("stopping on purpose"), Error);
  for (const std::string& e : errors) CHECK(e.find("rank 2 failed: stopping on purpose") != std::string::npos);
}

TEST_CASE("ring and head_parallel run unchanged over the TCP group and match the in-process group") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  manual_seed(seed);
  constexpr int kRanks = 2;
  const int64_t n = 16;
  const Tensor q = Tensor::randn({1, n, 2, 4}, DType::f64), k = Tensor::randn({1, n, 2, 4}, DType::f64),
               v = Tensor::randn({1, n, 2, 4}, DType::f64), dout = Tensor::randn({1, n, 2, 4}, DType::f64);
  for (const std::string variant : {"ring", "head_parallel"}) {
    INFO(variant);
    attention::AttentionConfig config;
    config.num_heads = 2;
    config.head_dim = 4;
    config.causal = true;
    config.segment_lengths = {4, 8};
    config.dilation_rates = {1, 2};
    config.inner_variant = "dilated";
    config.ranks = kRanks;
    // Each rank: its token chunk through the module (which finds the current communicator), then backward.
    auto rank_body = [&](Communicator& comm, std::vector<std::vector<Tensor>>& out) {
      const int64_t chunk = n / kRanks, at = chunk * comm.rank();
      auto mine = [&](const Tensor& x) { return x.narrow(1, at, chunk).contiguous().detach().requires_grad_(); };
      Tensor ql = mine(q), kl = mine(k), vl = mine(v);
      auto module = attention::make_attention(variant, config);
      Tensor o = module->forward(ql, kl, vl);
      autograd::run_backward({o}, {dout.narrow(1, at, chunk).contiguous()}, false);
      out[static_cast<size_t>(comm.rank())] = {o.detach(), ql.grad(), kl.grad(), vl.grad()};
    };
    std::vector<std::vector<Tensor>> in_process(kRanks), over_tcp(kRanks);
    run_ranks(kRanks, [&](Communicator& comm) { rank_body(comm, in_process); });
    run_tcp_ranks(kRanks, [&](Communicator& comm) {
      CommunicatorScope scope(comm);
      rank_body(comm, over_tcp);
    });
    for (int r = 0; r < kRanks; ++r)
      for (size_t i = 0; i < 4; ++i)
        check_bitwise_equal(over_tcp[static_cast<size_t>(r)][i], in_process[static_cast<size_t>(r)][i],
                            "rank " + std::to_string(r) + " result " + std::to_string(i));
  }
}

TEST_CASE("head_parallel's pipelined all-to-alls over the TCP group (2 and 3 ranks) equal the in-process group and one "
          "device") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  manual_seed(seed);
  const int64_t n = 14, heads = 6;  // 2 ranks: 7 + 7 tokens, 3 heads each; 3 ranks: 5 + 5 + 4 tokens, 2 heads each
  const Tensor q = Tensor::randn({1, n, heads, 4}, DType::f64), k = Tensor::randn({1, n, heads, 4}, DType::f64),
               v = Tensor::randn({1, n, heads, 4}, DType::f64), dout = Tensor::randn({1, n, heads, 4}, DType::f64);
  struct Inner {
    std::string name;
    attention::Mixing mixing;
  };
  const std::vector<Inner> inners{{"dense", attention::Mixing::lse},
                                  {"dilated", attention::Mixing::lse},
                                  {"dilated", attention::Mixing::head_groups}};
  auto config_of = [&](const Inner& inner, int64_t ranks, int64_t groups) {
    attention::AttentionConfig config;
    config.num_heads = heads;
    config.head_dim = 4;
    config.causal = inner.mixing == attention::Mixing::lse;
    config.segment_lengths = {4, 8, 6};
    config.dilation_rates = {1, 2, 3};
    config.mixing = inner.mixing;
    config.inner_variant = inner.name;
    config.ranks = ranks;
    config.pipeline_groups = groups;
    return config;
  };
  for (const int ranks : {2, 3}) {
    INFO(ranks << " ranks");
    const std::vector<int64_t> starts = attention::sequence_chunk_starts(n, ranks);
    std::vector<int64_t> group_counts;
    for (int64_t g = 1; g <= heads / ranks; ++g) group_counts.push_back(g);
    // Every rank: its tokens through head_parallel for every inner variant and group count, then backward.
    auto rank_body = [&](Communicator& comm, std::vector<std::vector<Tensor>>& out) {
      const size_t r = static_cast<size_t>(comm.rank());
      for (const Inner& inner : inners)
        for (int64_t groups : group_counts) {
          auto mine = [&](const Tensor& x) { return x.narrow(1, starts[r], starts[r + 1] - starts[r]).contiguous(); };
          Tensor ql = mine(q).requires_grad_(), kl = mine(k).requires_grad_(), vl = mine(v).requires_grad_();
          auto module = attention::make_attention("head_parallel", config_of(inner, ranks, groups));
          Tensor o = module->forward(ql, kl, vl);
          autograd::run_backward({o}, {mine(dout)}, false);
          for (const Tensor& t : {o.detach(), ql.grad(), kl.grad(), vl.grad()}) out[r].push_back(t);
        }
    };
    std::vector<std::vector<Tensor>> in_process(static_cast<size_t>(ranks)), over_tcp(static_cast<size_t>(ranks));
    run_ranks(ranks, [&](Communicator& comm) { rank_body(comm, in_process); });
    run_tcp_ranks(ranks, [&](Communicator& comm) {
      CommunicatorScope scope(comm);
      rank_body(comm, over_tcp);
    });
    size_t at = 0;
    for (const Inner& inner : inners) {
      // One device: the whole sequence through the inner variant.
      auto single = attention::make_attention(inner.name, config_of(inner, 1, 0));
      Tensor ql = q.detach().requires_grad_(), kl = k.detach().requires_grad_(), vl = v.detach().requires_grad_();
      Tensor o = single->forward(ql, kl, vl);
      autograd::run_backward({o}, {dout}, false);
      const std::vector<Tensor> want{o.detach(), ql.grad(), kl.grad(), vl.grad()};
      for (int64_t groups : group_counts) {
        for (size_t i = 0; i < 4; ++i, ++at) {
          const std::string name = inner.name + " groups " + std::to_string(groups) + " result " + std::to_string(i);
          std::vector<Tensor> pieces;
          for (int r = 0; r < ranks; ++r) {
            check_bitwise_equal(over_tcp[static_cast<size_t>(r)][at], in_process[static_cast<size_t>(r)][at],
                                "rank " + std::to_string(r) + " " + name);
            pieces.push_back(over_tcp[static_cast<size_t>(r)][at]);
          }
          check_bitwise_equal(cat(pieces, 1), want[i], "one device, " + name);
        }
      }
    }
  }
}

TEST_CASE("head_parallel's token chunks over the TCP group equal the in-process group and one device") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  manual_seed(seed);
  const int64_t n = 32, heads = 4, half = n / 2;  // 2 ranks of 16 tokens: 2 chunks of 8, segments 4 and 8
  auto input = [&] { return Tensor::randn({2, n, heads, 4}, DType::f64); };
  const Tensor q = input(), k = input(), v = input(), dout = input();
  attention::AttentionConfig config;
  config.num_heads = heads;
  config.head_dim = 4;
  config.causal = true;
  config.segment_lengths = {4, 8};
  config.dilation_rates = {1, 2};
  config.ranks = 2;
  config.token_chunks = 2;
  std::vector<int64_t> chunks_ran(2);
  auto rank_body = [&](Communicator& comm, std::vector<std::vector<Tensor>>& out) {
    const size_t r = static_cast<size_t>(comm.rank());
    auto mine = [&](const Tensor& x) { return x.narrow(1, half * comm.rank(), half).contiguous(); };
    Tensor ql = mine(q).requires_grad_(), kl = mine(k).requires_grad_(), vl = mine(v).requires_grad_();
    Tensor o = attention::make_attention("head_parallel", config)->forward(ql, kl, vl);
    chunks_ran[r] = attention::last_head_parallel_run().token_chunks;
    autograd::run_backward({o}, {mine(dout)}, false);
    out[r] = {o.detach(), ql.grad(), kl.grad(), vl.grad()};
  };
  std::vector<std::vector<Tensor>> in_process(2), over_tcp(2);
  run_ranks(2, [&](Communicator& comm) { rank_body(comm, in_process); });
  run_tcp_ranks(2, [&](Communicator& comm) {
    CommunicatorScope scope(comm);
    rank_body(comm, over_tcp);
  });
  CHECK(chunks_ran == std::vector<int64_t>{2, 2});
  Tensor ql = q.detach().requires_grad_(), kl = k.detach().requires_grad_(), vl = v.detach().requires_grad_();
  Tensor o = attention::make_attention("dilated", config)->forward(ql, kl, vl);
  autograd::run_backward({o}, {dout}, false);
  const std::vector<Tensor> want{o.detach(), ql.grad(), kl.grad(), vl.grad()};
  for (size_t i = 0; i < 4; ++i) {
    for (size_t r = 0; r < 2; ++r)
      check_bitwise_equal(over_tcp[r][i], in_process[r][i], "rank " + std::to_string(r) + " result " + std::to_string(i));
    check_bitwise_equal(cat({over_tcp[0][i], over_tcp[1][i]}, 1), want[i], "one device, result " + std::to_string(i));
  }
}

TEST_CASE("set_process_communicator: current for every thread without one of its own, until cleared") {
  CHECK(current_communicator() == nullptr);
  run_tcp_ranks(1, [&](Communicator& comm) {
    set_process_communicator(keep_alive(comm));
    Communicator* seen_elsewhere = nullptr;
    std::thread other([&] { seen_elsewhere = current_communicator(); });
    other.join();
    CHECK(seen_elsewhere == &comm);
    CHECK(current_communicator() == &comm);
    run_ranks(2, [&](Communicator& rank_comm) { CHECK(current_communicator() == &rank_comm); });
    {
      CommunicatorScope scope(comm);
      CHECK(current_communicator() == &comm);
    }
    set_process_communicator(nullptr);
    CHECK(current_communicator() == nullptr);
  });
}

TEST_CASE("launch_environment: reads the torchrun variables and names the one that is wrong") {
  const char* names[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "LONGTAPE_DIST_TIMEOUT"};
  for (const char* name : names) unsetenv(name);
  LaunchEnvironment alone = launch_environment();
  CHECK(!alone.launched);
  CHECK(alone.world_size == 1);
  setenv("WORLD_SIZE", "4", 1);
  setenv("RANK", "3", 1);
  setenv("LOCAL_WORLD_SIZE", "2", 1);
  setenv("LOCAL_RANK", "1", 1);
  setenv("MASTER_ADDR", "10.1.2.3", 1);
  setenv("MASTER_PORT", "29511", 1);
  setenv("LONGTAPE_DIST_TIMEOUT", "2.5", 1);
  const LaunchEnvironment env = launch_environment();
  CHECK(env.launched);
  CHECK(env.rank == 3);
  CHECK(env.world_size == 4);
  CHECK(env.local_rank == 1);
  CHECK(env.local_world_size == 2);
  CHECK(env.master_addr == "10.1.2.3");
  CHECK(env.master_port == 29511);
  CHECK(env.timeout == std::chrono::milliseconds(2500));
  setenv("RANK", "4", 1);
  CHECK_THROWS_WITH_AS(launch_environment(), doctest::Contains("RANK must be an integer in [0, 3], got \"4\""), Error);
  setenv("RANK", "0", 1);
  setenv("LONGTAPE_DIST_TIMEOUT", "soon", 1);
  CHECK_THROWS_WITH_AS(launch_environment(), doctest::Contains("LONGTAPE_DIST_TIMEOUT"), Error);
  unsetenv("LONGTAPE_DIST_TIMEOUT");
  unsetenv("MASTER_PORT");
  CHECK_THROWS_WITH_AS(launch_environment(), doctest::Contains("MASTER_PORT is not set"), Error);
  for (const char* name : names) unsetenv(name);
}

TEST_CASE("GradientReducer: bucketed averages equal the float64 mean of every rank's gradients") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  constexpr int kRanks = 3;
  std::vector<std::vector<Tensor>> grads(kRanks), averaged(kRanks);
  std::vector<size_t> buckets(kRanks);
  manual_seed(seed);
  run_ranks(kRanks, [&](Communicator& comm) {
    manual_seed(seed);  // the same model on every rank
    TwoLayers model;
    manual_seed(seed + 1 + static_cast<uint64_t>(comm.rank()));  // each rank's own data
    Tensor loss = sum(mul(model.forward(Tensor::randn({4, 7})), Tensor::randn({4, 3})));
    loss.backward();
    for (const Tensor& p : model.parameters()) grads[static_cast<size_t>(comm.rank())].push_back(p.grad().clone());
    GradientReducer reducer(comm, model, /*bucket_bytes=*/64);  // several buckets
    buckets[static_cast<size_t>(comm.rank())] = reducer.bucket_count();
    reducer.average();
    for (const Tensor& p : model.parameters()) averaged[static_cast<size_t>(comm.rank())].push_back(p.grad().clone());
  });
  CHECK(buckets[0] >= 3);
  for (size_t i = 0; i < grads[0].size(); ++i) {
    Tensor want = Tensor::zeros(grads[0][i].shape(), DType::f64);
    for (int r = 0; r < kRanks; ++r) want = add(want, grads[static_cast<size_t>(r)][i].to(DType::f64));
    want = mul(want, 1.0 / kRanks);
    for (int r = 0; r < kRanks; ++r) {
      const Tensor diff = sub(averaged[static_cast<size_t>(r)][i].to(DType::f64), want);
      CHECK(amax(maximum(diff, neg(diff))).item() < 1e-6);
      check_bitwise_equal(averaged[static_cast<size_t>(r)][i], averaged[0][i], "same bits on every rank");
    }
  }
  // A model that differs between ranks fails on every rank.
  CHECK_THROWS_WITH_AS(run_ranks(2, [&](Communicator& comm) {
                         nn::Linear layer(3, comm.rank() == 0 ? 2 : 4);
                         GradientReducer reducer(comm, layer);
                       }),
                       doctest::Contains("different parameter shapes"), Error);
}

TEST_CASE("GradientReducer: buckets started by backward's gradient hooks give the gradients of one exchange after it") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  for (const int ranks : {2, 3}) {
    INFO(ranks << " ranks");
    // Per rank and step: the reducer's gradients (buckets started during backward) and those of
    // average_gradients after backward (one flat exchange) on an identical replica.
    const size_t count = static_cast<size_t>(ranks);
    std::vector<std::vector<std::vector<Tensor>>> overlapped(count), after(count);
    std::vector<std::vector<size_t>> started(count);
    std::vector<size_t> buckets(count);
    run_ranks(ranks, [&](Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      manual_seed(seed);
      TwoLayers model;
      manual_seed(seed);
      TwoLayers replica;
      GradientReducer reducer(comm, model, /*bucket_bytes=*/64);  // several buckets
      buckets[r] = reducer.bucket_count();
      manual_seed(seed + 1 + r);  // each rank's own data
      // Step 0: one backward. Step 1: two backwards before average() (accumulation). Step 2: rank 1's
      // second layer gets no gradient (its bucket is then started by average(), in bucket order).
      for (int step = 0; step < 3; ++step) {
        for (TwoLayers* m : {&model, &replica})
          for (Tensor p : m->parameters()) p.zero_grad_();
        const int backwards = step == 1 ? 2 : 1;
        for (int i = 0; i < backwards; ++i) {
          const Tensor x = Tensor::randn({4, 7}), y = Tensor::randn({4, 3});
          const bool skip_second = step == 2 && r == 1;
          for (TwoLayers* m : {&model, &replica}) {
            const Tensor h = tanh(m->first->forward(x));
            (skip_second ? sum(mul(h, 0.5)) : sum(mul(m->second->forward(h), y))).backward();
          }
        }
        reducer.average();
        started[r].push_back(reducer.buckets_started_in_backward());
        average_gradients(comm, replica);
        std::vector<Tensor> got, want;
        const auto replica_params = replica.parameters();
        const auto params = model.parameters();
        for (size_t i = 0; i < params.size(); ++i) {
          got.push_back(params[i].grad().clone());
          const Tensor g = replica_params[i].grad();
          want.push_back(g.defined() ? g.clone() : Tensor::zeros(params[i].shape()));
        }
        overlapped[r].push_back(got);
        after[r].push_back(want);
      }
    });
    CHECK(buckets[0] >= 3);
    CHECK(started[0][0] == buckets[0]);  // every bucket left during the backward
    CHECK(started[0][1] == 0);           // two backwards: all reduced again from the totals
    CHECK(started[1][2] < buckets[0]);   // rank 1's unused layer held its buckets back
    for (size_t r = 0; r < count; ++r)
      for (size_t step = 0; step < 3; ++step)
        for (size_t i = 0; i < overlapped[r][step].size(); ++i) {
          INFO("rank " << r << " step " << step << " parameter " << i);
          check_bitwise_equal(overlapped[r][step][i], after[r][step][i], "reducer vs one exchange after backward");
          check_bitwise_equal(overlapped[r][step][i], overlapped[0][step][i], "same bits on every rank");
        }
    // Real gradients were compared, not empty ones.
    CHECK(amax(maximum(overlapped[0][0][0], neg(overlapped[0][0][0]))).item() > 0.0);
  }
}

TEST_CASE("GradientReducer: the first bucket has its own size, and its buckets average like one exchange") {
  const uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  // Backward order: second.bias (12 bytes), second.weight (60), first.bias (20), first.weight (140).
  std::vector<size_t> counts(2), defaults(2), capped(2), started(2);
  std::vector<std::vector<Tensor>> got(2), want(2);
  run_ranks(2, [&](Communicator& comm) {
    const size_t r = static_cast<size_t>(comm.rank());
    manual_seed(seed);
    TwoLayers model;
    manual_seed(seed);
    TwoLayers replica;
    defaults[r] = GradientReducer(comm, model).bucket_count();  // 232 bytes: under the 1 MiB first bucket
    // The first bucket is never larger than the others.
    capped[r] = GradientReducer(comm, model, /*bucket_bytes=*/64, /*first_bucket_bytes=*/size_t{1} << 20).bucket_count();
    GradientReducer reducer(comm, model, /*bucket_bytes=*/size_t{1} << 20, /*first_bucket_bytes=*/12);
    counts[r] = reducer.bucket_count();
    manual_seed(seed + 1 + r);
    const Tensor x = Tensor::randn({4, 7}), y = Tensor::randn({4, 3});
    for (TwoLayers* m : {&model, &replica}) sum(mul(m->forward(x), y)).backward();
    reducer.average();
    started[r] = reducer.buckets_started_in_backward();
    average_gradients(comm, replica);
    for (const Tensor& p : model.parameters()) got[r].push_back(p.grad().clone());
    for (const Tensor& p : replica.parameters()) want[r].push_back(p.grad().clone());
  });
  CHECK(defaults[0] == 1);
  CHECK(capped[0] == 4);  // 64-byte buckets throughout, as without a first size
  CHECK(counts[0] == 2);  // second.bias alone, then the rest
  CHECK(started[0] == 2);
  for (size_t r = 0; r < 2; ++r)
    for (size_t i = 0; i < got[r].size(); ++i) {
      INFO("rank " << r << " parameter " << i);
      check_bitwise_equal(got[r][i], want[r][i], "two buckets vs one exchange after backward");
    }
  CHECK(amax(maximum(got[0][0], neg(got[0][0]))).item() > 0.0);
  CHECK_THROWS_WITH_AS(run_ranks(1, [&](Communicator& comm) {
                         TwoLayers model;
                         GradientReducer reducer(comm, model, size_t{1} << 20, 0);
                       }),
                       doctest::Contains("bucket sizes must be > 0 bytes, got 1048576 (first bucket 0)"), Error);
}

TEST_CASE("NCCL process group: the factory says clearly when the build has none" * doctest::skip(nccl_built())) {
  TcpStore store("127.0.0.1", 0, true, 2s);
  CHECK_THROWS_WITH_AS(make_nccl_process_group(store, 0, 1, 0, CommOptions{}), doctest::Contains("no NCCL"), Error);
}

// ---- real processes through `longtape launch` ----

namespace {

std::string bin() { return testing::longtape_binary().string(); }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs `prefix longtape train <model> <flags>` in `dir` (log `name`.log) and returns its metrics.
nlohmann::json train_metrics(const std::filesystem::path& dir, const std::string& prefix, const std::string& model,
                             const std::string& flags, const std::string& name) {
  const auto r = testing::run_command(prefix + bin() + " train" + model + flags + " --metrics " +
                                          (dir / (name + ".json")).string(),
                                      dir / (name + ".log"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  std::ifstream in(dir / (name + ".json"));
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("longtape launch: every process gets the torchrun environment" *
          doctest::skip(testing::longtape_binary_missing())) {
  const auto dir = testing::fresh_dir("launch_env");
  const auto r = testing::run_command(
      bin() + " launch --nproc 3 --timeout 7 -- sh -c 'echo \"env $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE "
              "$MASTER_ADDR $NCCL_NVLS_ENABLE $LONGTAPE_DIST_TIMEOUT port=$MASTER_PORT\" > " +
          (dir / "rank").string() + "$RANK'",
      dir / "log");
  INFO(r.output);
  REQUIRE(r.code == 0);
  std::string port;
  for (int rank = 0; rank < 3; ++rank) {
    std::ifstream in(dir / ("rank" + std::to_string(rank)));
    std::string line;
    std::getline(in, line);
    const std::string want = "env " + std::to_string(rank) + " 3 " + std::to_string(rank) + " 3 127.0.0.1 0 7.";
    CHECK(line.rfind(want, 0) == 0);
    const std::string this_port = line.substr(line.find("port=") + 5);
    CHECK(std::stoi(this_port) > 0);
    if (rank > 0) CHECK(this_port == port);
    port = this_port;
  }
  // Bad usage is refused before anything starts.
  CHECK(testing::run_command(bin() + " launch --nproc 2", dir / "no_command").code != 0);
  CHECK(testing::run_command(bin() + " launch --nproc 2 --nnodes 2 -- true", dir / "no_port").output.find(
            "--master-port") != std::string::npos);
}

TEST_CASE("longtape launch: 2 processes over TCP give the in-process group's results bit for bit" *
          doctest::skip(testing::longtape_binary_missing())) {
  const uint64_t seed = testing::fresh_seed() % 1000000;
  INFO("seed " << seed);
  const auto dir = testing::fresh_dir("launch_check");
  const auto r = testing::run_command(bin() + " launch --nproc 2 --timeout 30 -- longtape dist-check --backend tcp "
                                                "--device cpu --seed " + std::to_string(seed) + " --out " +
                                          (dir / "out").string(),
                                      dir / "log");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("match their float64 references (backend tcp") != std::string::npos);
  const Results want = in_process_results(2, seed);
  std::map<std::string, Tensor> got;
  for (int rank = 0; rank < 2; ++rank) {
    const io::SafetensorsFile file = io::read_safetensors((dir / "out" / ("rank" + std::to_string(rank) + ".safetensors")).string());
    CHECK(file.metadata.at("world_size") == "2");
    for (const auto& [name, raw] : file.tensors) got["rank" + std::to_string(rank) + "/" + name] = io::tensor_from_raw(raw);
  }
  REQUIRE(got.size() == want.size());
  for (const auto& [name, t] : want) check_bitwise_equal(got.at(name), t, name);
}

TEST_CASE("longtape launch: ring and head_parallel attention over 2 TCP processes equal one process" *
          doctest::skip(testing::longtape_binary_missing())) {
  const uint64_t seed = testing::fresh_seed() % 1000000;
  INFO("seed " << seed);
  const auto dir = testing::fresh_dir("launch_attention");
  // N = 300: ragged chunks (and zigzag chunks of 75); dilated segments capped at N. head_parallel
  // without overlap, pipelined in the automatic 3 groups of 2 heads, and in 4 groups of 6 heads;
  // automatic token chunks find none (a segment is the whole sequence) and run 3 head groups.
  const auto r = testing::run_command(bin() + " launch --nproc 2 --timeout 60 -- longtape dist-check --backend tcp "
                                                "--device cpu --attention 300 --repeats 1 --head-groups 1,0,4 "
                                                "--token-chunks 0 --seed " +
                                          std::to_string(seed),
                                      dir / "log");
  INFO(r.output);
  REQUIRE(r.code == 0);
  for (const char* line : {"ring          dense", "ring zigzag   dense", "head_parallel dense", "ring          dilated",
                           "ring zigzag   dilated", "head_parallel dilated"})
    CHECK(r.output.find(line) != std::string::npos);
  auto count = [&](const std::string& text) {
    size_t n = 0;
    for (size_t at = r.output.find(text); at != std::string::npos; at = r.output.find(text, at + 1)) ++n;
    return n;
  };
  // Each twice: dense and dilated.
  CHECK(count("[not overlapped: 1 head group] (asked: head groups 1") == 2);
  CHECK(count("[pipelined: 3 head groups, all-to-alls overlap the core] (asked: head groups 0") == 2);
  CHECK(count("[pipelined: 4 head groups, all-to-alls overlap the core] (asked: head groups 4") == 2);
  CHECK(count("[pipelined: 3 head groups, all-to-alls overlap the core] (asked: token chunks 0") == 2);
}

TEST_CASE("longtape launch: a rank that dies, fails or hangs ends the job with an error naming it, never a hang" *
          doctest::skip(testing::longtape_binary_missing())) {
  const auto dir = testing::fresh_dir("launch_fail");
  const std::string check = " -- longtape dist-check --backend tcp --device cpu --fail-rank 1 --fail-how ";
  {
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = testing::run_command(bin() + " launch --nproc 2 --timeout 30 --grace 2" + check + "kill", dir / "kill");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find("rank 1 (pid") != std::string::npos);
    CHECK(r.output.find("SIGKILL") != std::string::npos);
    CHECK(seconds_since(t0) < 20);  // well within the 30 s timeout: the launcher saw the death
  }
  {
    const auto r = testing::run_command(bin() + " launch --nproc 2 --timeout 30 --grace 2" + check + "exit", dir / "exit");
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(r.output.find("rank 1 (pid") != std::string::npos);
    CHECK(r.output.find("exited with status 1") != std::string::npos);
    CHECK(r.output.find("failed on purpose") != std::string::npos);
  }
  {
    // Rank 1 hangs without dying: rank 0 times out waiting for it, and the launcher stops rank 1.
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = testing::run_command(bin() + " launch --nproc 2 --timeout 1.5 --grace 1" + check + "hang", dir / "hang");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find("timed out after 1.5") != std::string::npos);
    CHECK(r.output.find("from rank 1") != std::string::npos);
    CHECK(r.output.find("rank 0 (pid") != std::string::npos);
    CHECK(seconds_since(t0) < 15);
  }
}

TEST_CASE("train --parallel data: 2 ranks at batch B train exactly like 1 process at batch 2B, and resume" *
          doctest::skip(testing::longtape_binary_missing())) {
  const auto dir = testing::fresh_dir("train_dp");
  const std::string model = " --device cpu --layers 1 --width 16 --heads 2 --seq-len 32 --segments 16,32 "
                            "--dilations 1,2 --eval-every 2 --eval-batches 1 --warmup 1 --lr 1e-2 --seed 7";
  auto train = [&](const std::string& prefix, const std::string& flags, const std::string& name) {
    return train_metrics(dir, prefix, model, flags, name);
  };
  const std::string launch2 = bin() + " launch --nproc 2 --timeout 60 -- ";
  const auto single = train("", " --steps 4 --batch 4 --checkpoint " + (dir / "single.safetensors").string(), "single");
  const auto data2 = train(launch2, " --steps 4 --batch 2 --parallel data --checkpoint " + (dir / "dp.safetensors").string() +
                                        " --checkpoint-every 2",
                           "data2");
  CHECK(data2["parallel"]["ranks"] == 2);
  REQUIRE(single["rows"].size() == 4);
  REQUIRE(data2["rows"].size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    INFO("step " << i + 1);
    const double a = single["rows"][i]["loss"], b = data2["rows"][i]["loss"];
    CHECK(std::abs(a - b) <= 1e-5 * std::abs(a));
    const double ga = single["rows"][i]["grad_norm"], gb = data2["rows"][i]["grad_norm"];
    CHECK(std::abs(ga - gb) <= 1e-4 * std::abs(ga));
  }
  const double eval_single = single["final"]["eval_loss"], eval_data2 = data2["final"]["eval_loss"];
  CHECK(std::abs(eval_single - eval_data2) <= 1e-5 * std::abs(eval_single));
  CHECK(std::filesystem::exists(dir / "dp.safetensors"));

  // Resuming the 2-rank checkpoint (written by rank 0 alone) on 2 ranks continues like the
  // 1-process run resumed from its own; on 1 rank it is refused.
  const auto resumed = train(launch2, " --steps 6 --batch 2 --parallel data --resume " + (dir / "dp.safetensors").string(),
                             "resumed");
  const auto longer = train("", " --steps 6 --batch 4 --resume " + (dir / "single.safetensors").string(), "longer");
  REQUIRE(resumed["rows"].size() == 2);
  REQUIRE(longer["rows"].size() == 2);
  for (size_t i = 0; i < 2; ++i) {
    const double a = longer["rows"][i]["loss"], b = resumed["rows"][i]["loss"];
    CHECK(std::abs(a - b) <= 1e-4 * std::abs(a));
  }
  const auto refused = testing::run_command(bin() + " train" + model + " --steps 6 --batch 4 --resume " +
                                                (dir / "dp.safetensors").string(),
                                            dir / "refused.log");
  CHECK(refused.code != 0);
  CHECK(refused.output.find("same number of ranks") != std::string::npos);
}

// Eight-GPU code paths on the CPU: every rank count the launcher, the groups and the parallel
// variants take must work, eight included (the largest host the GPU runs target).
TEST_CASE("longtape launch: 8 processes over TCP: collectives bit for bit, ring and head_parallel attention, "
          "data parallel" * doctest::skip(testing::longtape_binary_missing())) {
  const uint64_t seed = testing::fresh_seed() % 1000000;
  INFO("seed " << seed);
  const auto dir = testing::fresh_dir("launch8");
  const std::string launch8 = bin() + " launch --nproc 8 --timeout 120 -- ";
  const auto check = testing::run_command(launch8 + "longtape dist-check --backend tcp --device cpu --seed " +
                                              std::to_string(seed) + " --out " + (dir / "out").string(),
                                          dir / "check.log");
  INFO(check.output);
  REQUIRE(check.code == 0);
  const Results want = in_process_results(8, seed);
  size_t compared = 0;
  for (int rank = 0; rank < 8; ++rank) {
    const io::SafetensorsFile file =
        io::read_safetensors((dir / "out" / ("rank" + std::to_string(rank) + ".safetensors")).string());
    CHECK(file.metadata.at("world_size") == "8");
    for (const auto& [name, t] : want) {
      const std::string prefix = "rank" + std::to_string(rank) + "/";
      if (name.rfind(prefix, 0) != 0) continue;
      check_bitwise_equal(io::tensor_from_raw(file.at(name.substr(prefix.size()))), t, name);
      ++compared;
    }
  }
  CHECK(compared == want.size());

  // N = 512 on 8 ranks (64 tokens each, 16 heads: 2 per rank); the dilated segments span every
  // rank, so the ring passes K/V around. Every result is checked against one process inside
  // dist-check (float64 reference, relative tolerance).
  const auto attention = testing::run_command(launch8 + "longtape dist-check --backend tcp --device cpu "
                                                        "--attention 512 --repeats 1 --head-groups 1,2 "
                                                        "--token-chunks 0 --seed " + std::to_string(seed),
                                              dir / "attention.log");
  INFO(attention.output);
  REQUIRE(attention.code == 0);
  for (const char* line : {"ring          dense   N=512 8 ranks", "ring zigzag   dense   N=512 8 ranks",
                           "head_parallel dense   N=512 8 ranks", "ring          dilated N=512 8 ranks",
                           "ring zigzag   dilated N=512 8 ranks", "head_parallel dilated N=512 8 ranks"})
    CHECK(attention.output.find(line) != std::string::npos);
  CHECK(attention.output.find("[pipelined: 2 head groups") != std::string::npos);

  // Data parallel: 8 ranks at batch 1 train like 1 process at batch 8.
  const std::string model = " --device cpu --layers 1 --width 16 --heads 2 --seq-len 32 --segments 16,32 "
                            "--dilations 1,2 --eval-every 0 --eval-batches 1 --warmup 1 --lr 1e-2 --seed 11 --steps 3";
  const auto single = train_metrics(dir, "", model, " --batch 8", "single");
  const auto data8 = train_metrics(dir, launch8, model, " --batch 1 --parallel data", "data8");
  CHECK(data8["parallel"]["ranks"] == 8);
  REQUIRE(single["rows"].size() == 3);
  REQUIRE(data8["rows"].size() == 3);
  for (size_t i = 0; i < 3; ++i) {
    INFO("step " << i + 1);
    const double a = single["rows"][i]["loss"], b = data8["rows"][i]["loss"];
    CHECK(std::abs(a - b) <= 1e-5 * std::abs(a));
    const double ga = single["rows"][i]["grad_norm"], gb = data8["rows"][i]["grad_norm"];
    CHECK(std::abs(ga - gb) <= 1e-4 * std::abs(ga));
  }
}

// ---- GPUs: skipped unless this machine has two ----

TEST_CASE("NCCL: collectives, data parallel equivalence and a hung rank on 2 GPUs" *
          doctest::skip(testing::longtape_binary_missing() || !nccl_built() || cuda_device_count() < 2)) {
  const auto dir = testing::fresh_dir("nccl");
  const uint64_t seed = testing::fresh_seed() % 1000000;
  INFO("seed " << seed);
  const std::string launch2 = bin() + " launch --nproc 2 --timeout 60 -- ";
  const auto check = testing::run_command(launch2 + "longtape dist-check --backend nccl --device cuda --seed " +
                                              std::to_string(seed) + " --out " + (dir / "out").string(),
                                          dir / "check.log");
  INFO(check.output);
  REQUIRE(check.code == 0);
  CHECK(check.output.find("(backend nccl, cuda:0") != std::string::npos);
  // On one host start_all_to_all moves its data on the copy engines; LONGTAPE_PEER_COPY=0 keeps NCCL.
  CHECK(check.output.find("start_all_to_all over copy engines") != std::string::npos);
  const auto check_nccl = testing::run_command("LONGTAPE_PEER_COPY=0 " + launch2 +
                                                   "longtape dist-check --backend nccl --device cuda --seed " +
                                                   std::to_string(seed) + " --out " + (dir / "out_nccl").string(),
                                               dir / "check_nccl.log");
  INFO(check_nccl.output);
  REQUIRE(check_nccl.code == 0);
  CHECK(check_nccl.output.find("start_all_to_all over NCCL send/recv") != std::string::npos);
  // Two ranks: a + b = b + a, so even the sums equal the in-process group's bits.
  const Results want = in_process_results(2, seed);
  for (const char* out : {"out", "out_nccl"})
    for (int rank = 0; rank < 2; ++rank) {
      const io::SafetensorsFile file =
          io::read_safetensors((dir / out / ("rank" + std::to_string(rank) + ".safetensors")).string());
      for (const auto& [name, t] : want) {
        const std::string prefix = "rank" + std::to_string(rank) + "/";
        if (name.rfind(prefix, 0) != 0) continue;
        check_bitwise_equal(io::tensor_from_raw(file.at(name.substr(prefix.size()))), t, std::string(out) + " " + name);
      }
    }

  const std::string model = " --device cuda --layers 2 --width 64 --heads 4 --seq-len 1024 --segments 256,1024 "
                            "--dilations 1,2 --eval-every 0 --eval-batches 2 --steps 4 --warmup 1 --seed 3";
  auto train = [&](const std::string& prefix, const std::string& flags, const std::string& name) {
    return train_metrics(dir, prefix, model, flags, name);
  };
  const auto single = train("", " --batch 4", "single");
  const auto data2 = train(launch2, " --batch 2 --parallel data", "data2");
  CHECK(data2["parallel"]["backend"] == "nccl");
  // The same weights and rows: step 1 agrees to float rounding (the GEMMs see other batch sizes;
  // bf16 attention rounds what differs in the last bits), later steps closely. Without the
  // gradient average, the first step's gradient norm (of half the batch) would be far off.
  const double norm_single = single["rows"][0]["grad_norm"], norm_data2 = data2["rows"][0]["grad_norm"];
  CHECK(std::abs(norm_single - norm_data2) <= 1e-3 * norm_single);
  for (size_t i = 0; i < 4; ++i) {
    INFO("step " << i + 1);
    const double a = single["rows"][i]["loss"], b = data2["rows"][i]["loss"];
    CHECK(std::abs(a - b) <= (i == 0 ? 1e-4 : 2e-3) * std::abs(a));
  }

  // A rank that hangs: the other's NCCL transfer times out, the communicator is aborted, the job ends.
  const auto t0 = std::chrono::steady_clock::now();
  const auto hang = testing::run_command(bin() + " launch --nproc 2 --timeout 5 --grace 2 -- longtape dist-check "
                                                 "--backend nccl --device cuda --fail-rank 1 --fail-how hang",
                                         dir / "hang.log");
  INFO(hang.output);
  CHECK(hang.code != 0);
  CHECK(hang.output.find("rank 0 (pid") != std::string::npos);
  CHECK(seconds_since(t0) < 60);
}
