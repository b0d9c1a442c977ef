// The ring's step through the attention core (attention/fused/chunk_attention.h): fused and
// composed blocks against float64 single-device references with ragged chunks; the zigzag layout;
// K/V transfers through Communicator::exchange; head_parallel's all-to-alls (q, k, v there; out and lse back); and the
// fused CUDA kernels under the ring (skipped without a GPU).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attention/fused/chunk_attention.h"
#include "attention/head_parallel.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/autograd/node.h"
#include "nn/dist/communicator.h"
#include "support/parallel_configs.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;

namespace {

using testing::max_diff;

double max_abs(const Tensor& a) {
  double m = 0;
  for (double x : a.cpu().to_vector())
    if (std::isfinite(x)) m = std::max(m, std::abs(x));
  return m;
}

struct Result {
  Tensor out, lse, dq, dk, dv;
  std::string backend;
};

struct Inputs {
  Tensor q, k, v, dout, dlse;
};

Inputs random_inputs(int64_t b, int64_t n, int64_t h, int64_t d, DType dtype) {
  const DType stat = dtype == DType::f64 ? DType::f64 : DType::f32;
  return {Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, n, h, d}, dtype),
          Tensor::randn({b, n, h, d}, dtype), Tensor::randn({b, h, n}, stat)};
}

Inputs converted(const Inputs& in, DType dtype, Device device) {
  const DType stat = dtype == DType::f64 ? DType::f64 : DType::f32;
  return {in.q.to(dtype).to(device), in.k.to(dtype).to(device), in.v.to(dtype).to(device),
          in.dout.to(dtype).to(device), in.dlse.to(stat).to(device)};
}

Result run(Attention& attention, const Inputs& in) {
  Tensor ql = in.q.detach().clone().requires_grad_(), kl = in.k.detach().clone().requires_grad_(),
         vl = in.v.detach().clone().requires_grad_();
  AttentionOutput res = attention.forward_with_lse(ql, kl, vl);
  autograd::run_backward({res.out, res.lse}, {in.dout, in.dlse}, false);
  return {res.out.detach(), res.lse.detach(), ql.grad(), kl.grad(), vl.grad(), attention.last_backend()};
}

// Every result within tol * (1 + largest |reference|) of the reference.
void check_close(const Result& got, const Result& want, double tol, const std::string& what) {
  INFO(what);
  CHECK(max_diff(got.out, want.out) <= tol * (1 + max_abs(want.out)));
  CHECK(max_diff(got.lse, want.lse) <= tol * (1 + max_abs(want.lse)));
  CHECK(max_diff(got.dq, want.dq) <= tol * (1 + max_abs(want.dq)));
  CHECK(max_diff(got.dk, want.dk) <= tol * (1 + max_abs(want.dk)));
  CHECK(max_diff(got.dv, want.dv) <= tol * (1 + max_abs(want.dv)));
}

using Inner = testing::InnerVariant;

AttentionConfig make_config(const Inner& inner, int64_t heads, int64_t dim, bool causal, int64_t ranks) {
  return testing::parallel_config(inner, heads, dim, causal, ranks);
}

std::string label(const Inner& inner, bool causal, const std::string& more) {
  return inner.name + (inner.mixing == Mixing::head_groups ? " (head_groups)" : "") + (causal ? ", causal" : "") +
         ", " + more;
}

// The ring module run rank-locally with the given tokens per rank (ranks in order, contiguous).
Result run_ragged(const AttentionConfig& config, const Inputs& in, const std::vector<int64_t>& lengths) {
  const int p = static_cast<int>(lengths.size());
  std::vector<int64_t> starts{0};
  for (int64_t n : lengths) starts.push_back(starts.back() + n);
  REQUIRE(starts.back() == in.q.size(1));
  std::vector<Result> parts(static_cast<size_t>(p));
  dist::CommOptions options;
  options.timeout = std::chrono::milliseconds(20000);
  dist::run_ranks(p, [&](dist::Communicator& comm) {
    const size_t r = static_cast<size_t>(comm.rank());
    auto chunk = [&](const Tensor& x, int64_t dim) { return x.narrow(dim, starts[r], lengths[r]).contiguous(); };
    auto ring = make_attention("ring", config);
    parts[r] = run(*ring, {chunk(in.q, 1), chunk(in.k, 1), chunk(in.v, 1), chunk(in.dout, 1), chunk(in.dlse, 2)});
  }, options);
  auto join = [&](Tensor Result::*field, int64_t dim) {
    std::vector<Tensor> pieces;
    for (const Result& part : parts) pieces.push_back(part.*field);
    return pieces.size() == 1 ? pieces[0] : cat(pieces, dim);
  };
  for (const Result& part : parts) CHECK(part.backend == parts[0].backend);
  return {join(&Result::out, 1), join(&Result::lse, 2), join(&Result::dq, 1), join(&Result::dk, 1),
          join(&Result::dv, 1), parts[0].backend};
}

// The ring module run rank-locally on shards of `layout` (ring_shard), joined by ring_unshard.
Result run_layout(const AttentionConfig& config, const Inputs& in, int p, RingLayout layout) {
  std::vector<Result> parts(static_cast<size_t>(p));
  dist::run_ranks(p, [&](dist::Communicator& comm) {
    const int64_t r = comm.rank();
    auto shard = [&](const Tensor& x, int64_t dim) { return ring_shard(x, dim, p, r, layout); };
    auto ring = make_attention("ring", config);
    parts[static_cast<size_t>(r)] =
        run(*ring, {shard(in.q, 1), shard(in.k, 1), shard(in.v, 1), shard(in.dout, 1), shard(in.dlse, 2)});
  });
  auto join = [&](Tensor Result::*field, int64_t dim) {
    std::vector<Tensor> pieces;
    for (const Result& part : parts) pieces.push_back(part.*field);
    return ring_unshard(pieces, dim, layout);
  };
  return {join(&Result::out, 1), join(&Result::lse, 2), join(&Result::dq, 1), join(&Result::dk, 1),
          join(&Result::dv, 1), parts[0].backend};
}

const std::vector<Inner>& ring_inners() {
  static const std::vector<Inner> inners = {
      {"dense", Mixing::lse, {}, {}},
      // Segments shorter than, about as long as and longer than the chunks.
      {"dilated", Mixing::lse, {3, 5, 16}, {1, 2, 4}},
      {"dilated", Mixing::head_groups, {4, 7, 32}, {2, 1, 3}},
  };
  return inners;
}

}  // namespace

TEST_CASE("ring blocks: fused and composed both equal the f64 single-device result, ragged chunks") {
  const std::vector<std::vector<int64_t>> raggeds = {{5, 1, 9, 8}, {10, 2, 11}};
  int seed = 7100;
  for (const auto& lengths : raggeds) {
    for (const bool causal : {false, true}) {
      for (const Inner& inner : ring_inners()) {
        manual_seed(seed++);
        const Inputs in64 = random_inputs(2, 23, 4, 6, DType::f64);
        AttentionConfig config = make_config(inner, 4, 6, causal, static_cast<int64_t>(lengths.size()));
        auto reference = make_attention(inner.name, config);
        const Result want = run(*reference, in64);
        const std::string where = "P = " + std::to_string(lengths.size());
        std::vector<Result> f32;
        for (const std::string impl : {"fused", "composed"}) {
          config.impl = impl;
          const Result got = run_ragged(config, in64, lengths);
          CHECK(got.backend == (impl == "fused" ? "fused-cpu" : "composed"));
          check_close(got, want, 1e-12, label(inner, causal, where + ", f64, impl " + impl));
          // f32 inputs against the same f64 reference.
          f32.push_back(run_ragged(config, converted(in64, DType::f32, Device::cpu()), lengths));
          check_close(f32.back(), want, 5e-5, label(inner, causal, where + ", f32, impl " + impl));
        }
        check_close(f32[0], f32[1], 5e-5, label(inner, causal, where + ", f32 fused vs composed"));
      }
    }
  }
}

TEST_CASE("ring zigzag layout equals the single-device variant: causal dense and causal dilated, P = 2..4") {
  int seed = 7200;
  for (int p = 2; p <= 4; ++p) {
    const int64_t n = 4 * p + 3;  // 2P chunks of unequal length
    for (const Inner& inner : ring_inners()) {
      for (const bool causal : {true, false}) {
        if (!causal && inner.name == "dense" && p != 3) continue;  // non-causal: one sanity case
        manual_seed(seed++);
        const Inputs in = random_inputs(2, n, 4, 5, DType::f64);
        AttentionConfig config = make_config(inner, 4, 5, causal, p);
        auto reference = make_attention(inner.name, config);
        const Result want = run(*reference, in);
        config.ring_layout = "zigzag";
        for (const std::string impl : {"auto", "composed"}) {
          config.impl = impl;
          auto ring = make_attention("ring", config);  // simulated ranks on the full tensors
          check_close(run(*ring, in), want, 1e-12,
                      label(inner, causal, "zigzag, simulated, P = " + std::to_string(p) + ", impl " + impl));
          check_close(run_layout(config, in, p, RingLayout::zigzag), want, 1e-12,
                      label(inner, causal, "zigzag, rank-local, P = " + std::to_string(p) + ", impl " + impl));
        }
      }
    }
  }
}

TEST_CASE("ring with every segment inside the chunks: one dilated core call per piece, equal to one device") {
  struct Case {
    Inner inner;
    int64_t n;
    std::vector<int64_t> lengths;  // contiguous chunks, or empty for the zigzag layout of `p` ranks
    int p;
    bool local;                    // whether every piece holds whole segments
  };
  const Inner lse{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  const Inner groups{"dilated", Mixing::head_groups, {8, 4}, {2, 1}};
  const std::vector<Case> cases = {
      {lse, 32, {16, 16}, 2, true},
      {lse, 32, {8, 8, 8, 8}, 4, true},
      {lse, 20, {8, 12}, 2, true},   // the last chunk ends in a partial segment of the sequence
      {groups, 32, {}, 2, true},     // zigzag: 4 chunks of 8
      {lse, 32, {12, 20}, 2, false}, // a segment of 8 crosses the chunk edge at 12
      {lse, 32, {8, 12, 12}, 3, false},  // the ring, with rank 0's chunk against itself as one problem
  };
  int seed = 7700;
  for (const Case& c : cases) {
    for (const bool causal : {false, true}) {
      manual_seed(seed++);
      const Inputs in64 = random_inputs(2, c.n, 4, 6, DType::f64);
      AttentionConfig config = make_config(c.inner, 4, 6, causal, c.p);
      auto reference = make_attention(c.inner.name, config);
      const Result want = run(*reference, in64);
      const bool zigzag = c.lengths.empty();
      config.ring_layout = zigzag ? "zigzag" : "contiguous";
      const std::string what = label(c.inner, causal, "N = " + std::to_string(c.n) + ", P = " + std::to_string(c.p) +
                                                          (zigzag ? ", zigzag" : ", contiguous"));
      INFO(what);
      for (const std::string impl : {"auto", "composed"}) {
        INFO("impl " << impl);
        config.impl = impl;
        const bool local = c.local && impl != "composed";
        for (const DType dtype : {DType::f64, DType::f32}) {
          INFO(dtype_name(dtype));
          const Inputs in = converted(in64, dtype, Device::cpu());
          const double tol = dtype == DType::f64 ? 1e-12 : 5e-5;
          const Result rank_local =
              zigzag ? run_layout(config, in, c.p, RingLayout::zigzag) : run_ragged(config, in, c.lengths);
          const RingRun ran = last_ring_run();
          CHECK(ran.local == local);
          CHECK(ran.key_set == (local ? fused::KeySet::dilated : fused::KeySet::dense));
          if (local) CHECK(ran.up_steps + ran.down_steps == 0);
          CHECK(rank_local.out.dtype() == dtype);
          check_close(rank_local, want, tol, "rank-local");
          if (!zigzag && c.lengths.size() > 1 && c.lengths[0] != c.lengths[1]) continue;  // equal chunks only below
          auto simulated = make_attention("ring", config);  // ranks as threads on the full tensors
          check_close(run(*simulated, in), want, tol, "simulated ranks");
          CHECK(last_ring_run().local == local);
        }
      }
    }
  }
}

TEST_CASE("zigzag layout: token ranges, shard and unshard, balanced causal work, clear errors") {
  // sequence_chunk_starts(10, 4) = {0, 2, 5, 7, 10}: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  CHECK(ring_token_ranges(10, 2, 0, RingLayout::zigzag) == std::vector<TokenRange>{{0, 2}, {7, 3}});
  CHECK(ring_token_ranges(10, 2, 1, RingLayout::zigzag) == std::vector<TokenRange>{{2, 3}, {5, 2}});
  CHECK(ring_token_ranges(10, 4, 3, RingLayout::contiguous) == std::vector<TokenRange>{{7, 3}});
  CHECK(parse_ring_layout("zigzag") == RingLayout::zigzag);
  CHECK_THROWS_WITH_AS(parse_ring_layout("spiral"), doctest::Contains("contiguous or zigzag"), Error);
  CHECK_THROWS_WITH_AS(ring_token_ranges(5, 3, 0, RingLayout::zigzag), doctest::Contains("at least 6 tokens"),
                       Error);

  manual_seed(7300);
  const Tensor x = Tensor::randn({2, 17, 3});
  for (const RingLayout layout : {RingLayout::contiguous, RingLayout::zigzag}) {
    std::vector<Tensor> shards;
    for (int64_t r = 0; r < 3; ++r) shards.push_back(ring_shard(x, 1, 3, r, layout));
    CHECK(max_diff(ring_unshard(shards, 1, layout), x) == 0.0);
  }
  const Tensor first = ring_shard(x, 1, 3, 0, RingLayout::zigzag);  // chunks 0 and 5 of 6: tokens 0-1, 14-16
  CHECK(max_diff(first.narrow(1, 0, 2), x.narrow(1, 0, 2)) == 0.0);
  CHECK(max_diff(first.narrow(1, 2, 3), x.narrow(1, 14, 3)) == 0.0);

  // Causal dense, N = 64 on P = 4: score pairs per rank. Contiguous: 136 on the first rank, 904
  // on the last; zigzag: a quarter of all on every rank.
  CoreOptions options;
  options.causal = true;
  const ChunkStreams streams(CoreKeys{}, options, 1, 64);
  auto work = [&](RingLayout layout, int64_t rank) {
    int64_t pairs = 0;
    for (const TokenRange& q : ring_token_ranges(64, 4, rank, layout))
      for (int64_t s = 0; s < 4; ++s)
        for (const TokenRange& k : ring_token_ranges(64, 4, s, layout))
          for (const StreamBlock& b : streams.blocks(q.start, q.length, k.start, k.length)) {
            const int64_t lq = b.jq1 - b.jq0, lk = b.jk1 - b.jk0;
            pairs += b.segments * (b.masked ? lq * (lq + 1) / 2 : lq * lk);
          }
    return pairs;
  };
  int64_t total = 0;
  for (int64_t r = 0; r < 4; ++r) {
    CHECK(work(RingLayout::zigzag, r) == work(RingLayout::zigzag, 0));
    total += work(RingLayout::contiguous, r);
  }
  CHECK(total == 64 * 65 / 2);
  CHECK(work(RingLayout::contiguous, 0) == 136);
  CHECK(work(RingLayout::contiguous, 3) == 904);
  CHECK(work(RingLayout::zigzag, 0) * 4 == total);

  // Rank-local zigzag with shards of the wrong length: every rank fails with the reason.
  AttentionConfig c;
  c.num_heads = 2;
  c.head_dim = 4;
  c.inner_variant = "dense";
  c.causal = true;
  c.ring_layout = "zigzag";
  dist::CommOptions comm_options;
  comm_options.timeout = std::chrono::milliseconds(5000);
  CHECK_THROWS_WITH_AS(dist::run_ranks(2, [&](dist::Communicator& comm) {
    Tensor t = Tensor::randn({1, comm.rank() == 0 ? 3 : 5, 2, 4});
    ring_attention(comm, c, t, t, t);
  }, comm_options), doctest::Contains("chunks r and 2P-1-r"), Error);
  c.ring_layout = "spiral";
  CHECK_THROWS_WITH_AS(make_attention("ring", c), doctest::Contains("ring_layout must be contiguous or zigzag"), Error);
}

namespace {

// Passes every call to the rank's communicator, except plain send and recv, which throw: all the
// ring's point-to-point traffic must go through exchange. Counts exchanges and all-to-alls.
class ExchangeOnly : public dist::Communicator {
 public:
  explicit ExchangeOnly(dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const dist::CommOptions& options() const override { return inner_.options(); }
  void send(const Tensor&, int, int) override { LT_CHECK(false, "plain send used"); }
  Tensor recv(const Shape&, DType, Device, int, int) override {
    LT_CHECK(false, "plain recv used");
    return Tensor();
  }
  std::unique_ptr<PendingRecv> exchange(const Tensor& tensor, int dst, const Shape& shape, DType dtype, Device device,
                                        int src, int tag) override {
    ++exchanges;
    return inner_.exchange(tensor, dst, shape, dtype, device, src, tag);
  }
  std::vector<Tensor> all_gather(const Tensor& t) override { return inner_.all_gather(t); }
  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override {
    ++all_to_alls;
    return inner_.all_to_all(to_each);
  }
  Tensor all_reduce(const Tensor& t, dist::ReduceOp op) override { return inner_.all_reduce(t, op); }
  Tensor broadcast(const Tensor& t, int root) override { return inner_.broadcast(t, root); }
  void barrier() override { inner_.barrier(); }
  void abort(const std::string& why) override { inner_.abort(why); }
  std::shared_ptr<dist::Communicator> split(int64_t color, int64_t key) override { return inner_.split(color, key); }
  int exchanges = 0;
  int all_to_alls = 0;

 private:
  dist::Communicator& inner_;
};

}  // namespace

TEST_CASE("ring moves K/V and dK/dV only through Communicator::exchange, both layouts") {
  for (const RingLayout layout : {RingLayout::contiguous, RingLayout::zigzag}) {
    const Inner inner{"dense", Mixing::lse, {}, {}};
    manual_seed(layout == RingLayout::zigzag ? 7401 : 7400);
    const Inputs in = random_inputs(1, 14, 2, 4, DType::f64);
    AttentionConfig config = make_config(inner, 2, 4, true, 3);
    config.ring_layout = ring_layout_name(layout);
    auto reference = make_attention("dense", config);
    const Result want = run(*reference, in);
    std::vector<Result> parts(3);
    std::vector<int> exchanges(3);
    dist::run_ranks(3, [&](dist::Communicator& comm) {
      const int64_t r = comm.rank();
      auto only = std::make_shared<ExchangeOnly>(comm);
      auto shard = [&](const Tensor& x, int64_t dim) { return ring_shard(x, dim, 3, r, layout).detach(); };
      Tensor q = shard(in.q, 1).requires_grad_(), k = shard(in.k, 1).requires_grad_(), v = shard(in.v, 1).requires_grad_();
      AttentionOutput res = ring_attention(*only, config, q, k, v);
      autograd::run_backward({res.out, res.lse}, {shard(in.dout, 1), shard(in.dlse, 2)}, false);
      parts[static_cast<size_t>(r)] = {res.out.detach(), res.lse.detach(), q.grad(), k.grad(), v.grad(), ""};
      exchanges[static_cast<size_t>(r)] = only->exchanges;
    });
    auto join = [&](Tensor Result::*field, int64_t dim) {
      std::vector<Tensor> pieces;
      for (const Result& part : parts) pieces.push_back(part.*field);
      return ring_unshard(pieces, dim, layout);
    };
    check_close({join(&Result::out, 1), join(&Result::lse, 2), join(&Result::dq, 1), join(&Result::dk, 1),
                 join(&Result::dv, 1), ""},
                want, 1e-12, "exchange-only ring, " + ring_layout_name(layout));
    // Causal contiguous: 2 steps one way. Zigzag: every rank has keys before and after its queries,
    // still 2 steps (one way) in all. Forward K, V per step; backward K, V per step, dK, dV from
    // the second step on, then dK, dV home: 2 * 2 + 2 * 2 + 2 + 2 = 12.
    for (int e : exchanges) CHECK(e == 12);
  }
}

TEST_CASE("head_parallel takes five all-to-alls per head group each way and runs its heads through the fused core") {
  const Inner inner{"dilated", Mixing::lse, {4, 8}, {1, 2}};
  manual_seed(7500);
  const Inputs in = random_inputs(2, 12, 4, 3, DType::f64);
  AttentionConfig config = make_config(inner, 4, 3, true, 2);
  auto reference = make_attention("dilated", config);
  const Result want = run(*reference, in);
  for (const int64_t groups : {1, 2}) {
    config.pipeline_groups = groups;
    std::vector<Result> parts(2);
    std::vector<int> forward_calls(2), total_calls(2);
    std::vector<std::string> backends(2);
    const std::vector<int64_t> starts = sequence_chunk_starts(12, 2);
    dist::run_ranks(2, [&](dist::Communicator& comm) {
      const size_t r = static_cast<size_t>(comm.rank());
      auto counting = std::make_shared<ExchangeOnly>(comm);
      auto chunk = [&](const Tensor& x, int64_t dim) {
        return x.narrow(dim, starts[r], starts[r + 1] - starts[r]).contiguous().detach();
      };
      Tensor q = chunk(in.q, 1).requires_grad_(), k = chunk(in.k, 1).requires_grad_(),
             v = chunk(in.v, 1).requires_grad_();
      CoreRun core;
      AttentionOutput res = head_parallel_attention(*counting, config, q, k, v, false, &core);
      forward_calls[r] = counting->all_to_alls;
      autograd::run_backward({res.out, res.lse}, {chunk(in.dout, 1), chunk(in.dlse, 2)}, false);
      total_calls[r] = counting->all_to_alls;
      backends[r] = core.backend;
      parts[r] = {res.out.detach(), res.lse.detach(), q.grad(), k.grad(), v.grad(), ""};
    });
    // Per head group, forward: q, k, v there; out (in its own dtype) and lse back. Backward: dO and
    // the lse gradient there; dq, dk, dv back.
    for (size_t r = 0; r < 2; ++r) {
      CHECK(forward_calls[r] == 5 * groups);
      CHECK(total_calls[r] == 10 * groups);
      CHECK(backends[r] == "fused-cpu");
    }
    check_close({cat({parts[0].out, parts[1].out}, 1), cat({parts[0].lse, parts[1].lse}, 2),
                 cat({parts[0].dq, parts[1].dq}, 1), cat({parts[0].dk, parts[1].dk}, 1),
                 cat({parts[0].dv, parts[1].dv}, 1), ""},
                want, 1e-12, "rank-local head_parallel, counted all-to-alls, " + std::to_string(groups) + " groups");
  }
}

TEST_CASE("ring and head_parallel on CUDA in bf16 run the fused kernels and match the f64 reference") {
  if (!cuda_available()) {
    MESSAGE("skipped: no CUDA device available (or built without CUDA)");
    return;
  }
  const Device cuda = Device::cuda();
  struct Case {
    Inner inner;
    int64_t n;
    int p;
    std::string layout;
  };
  const std::vector<Case> cases = {
      {{"dense", Mixing::lse, {}, {}}, 512, 4, "contiguous"},
      {{"dense", Mixing::lse, {}, {}}, 512, 4, "zigzag"},
      {{"dense", Mixing::lse, {}, {}}, 300, 3, "contiguous"},  // chunks of 100: partial tiles
      {{"dilated", Mixing::lse, {64, 256, 512}, {1, 2, 4}}, 512, 4, "contiguous"},
      {{"dilated", Mixing::lse, {64, 256, 512}, {1, 2, 4}}, 512, 4, "zigzag"},
      {{"dilated", Mixing::head_groups, {96, 200}, {1, 2}}, 400, 3, "zigzag"},
      // Segments inside the chunks: every rank runs its pieces as one dilated core call each.
      {{"dilated", Mixing::lse, {64, 128}, {1, 2}}, 512, 2, "contiguous"},
      {{"dilated", Mixing::lse, {64, 128}, {1, 2}}, 512, 2, "zigzag"},
  };
  int seed = 7600;
  for (const Case& c : cases) {
    for (const bool causal : {true, false}) {
      manual_seed(seed++);
      const Inputs in64 = random_inputs(2, c.n, 4, 64, DType::f64);
      AttentionConfig config = make_config(c.inner, 4, 64, causal, c.p);
      auto reference = make_attention(c.inner.name, config);
      const Result want = run(*reference, in64);
      const Inputs in = converted(in64, DType::bf16, cuda);
      auto single = make_attention(c.inner.name, config);
      const Result one_device = run(*single, in);
      config.ring_layout = c.layout;
      config.impl = "fused";
      auto ring = make_attention("ring", config);
      const Result got = run(*ring, in);
      const std::string what = label(c.inner, causal, c.layout + ", N = " + std::to_string(c.n) + ", P = " +
                                                          std::to_string(c.p) + ", bf16 on CUDA");
      INFO(what);
      CHECK(got.backend == "fused-cuda");
      CHECK(one_device.backend == "fused-cuda");
      CHECK(got.out.device() == cuda);
      const bool inside = c.inner.name == "dilated" &&
                          c.n / (c.layout == "zigzag" ? 2 * c.p : c.p) % c.inner.segments.back() == 0;
      CHECK(last_ring_run().local == inside);
      if (inside) CHECK(got.out.dtype() == DType::bf16);
      check_close(got, want, 3e-2, what + " vs f64");
      check_close(one_device, want, 3e-2, what + " (one device) vs f64");
      // The ring is about as far from the reference as one device is (its blocks round to bf16
      // once more before they merge in f32).
      CHECK(max_diff(got.out, want.out) <= 3 * max_diff(one_device.out, want.out) + 1e-3);
    }
  }
  // head_parallel: each rank's heads through the fused CUDA core, all-to-alls both ways.
  manual_seed(seed++);
  const Inner inner{"dilated", Mixing::lse, {64, 256}, {1, 2}};
  const Inputs in64 = random_inputs(1, 256, 8, 64, DType::f64);
  AttentionConfig config = make_config(inner, 8, 64, true, 4);
  auto reference = make_attention("dilated", config);
  const Result want = run(*reference, in64);
  auto parallel = make_attention("head_parallel", config);
  const Result got = run(*parallel, converted(in64, DType::bf16, cuda));
  CHECK(got.backend == "fused-cuda");
  check_close(got, want, 3e-2, "head_parallel bf16 on CUDA vs f64");
}
