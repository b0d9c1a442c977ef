// Ring and head-parallel attention over a real process group against one device (cli/dist_attention.h).
#include "cli/dist_attention.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attention/head_parallel.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/timer.h"
#endif

namespace longtape::cli {

namespace {

// |a - b| / |b| over all elements (Frobenius norms, in f32).
double relative_error(const Tensor& a, const Tensor& b) {
  const Tensor af = a.to(DType::f32), bf = b.to(DType::f32);
  const Tensor d = sub(af, bf);
  const double num = std::sqrt(sum(mul(d, d)).item()), den = std::sqrt(sum(mul(bf, bf)).item());
  return den > 0 ? num / den : num;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds of `step` (forward + backward, ending in a device read), median of `repeats` after two
// warm-ups; the group's ranks start each repetition together.
template <class Step>
double time_step(dist::Communicator* comm, int repeats, const Step& step) {
  std::vector<double> t;
  for (int i = 0; i < repeats + 2; ++i) {
    if (comm) comm->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    step();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 2) t.push_back(s);
  }
  return median(t);
}

struct Grads {
  Tensor out, dq, dk, dv;
};

struct HeadParallelParts {
  double core_s = 0, exchange_s = 0, both_s = 0;
  double core_enqueue_s = 0;  // host time to queue the core's step (up to its final wait)
  double core_alone_s = 0;    // the core on rank 0 while the other ranks wait (their GPUs idle)
  double both_core_end_ms = 0, both_all_end_ms = 0;  // both at once: when the core ended, when all had
  int64_t chunks = 1;       // the automatic token chunk count (1: the pattern allows none)
  double chunk_core_s = 0;  // the core on one token chunk step (N / chunks tokens), times `chunks`
};

// This rank's slice of the heads (as head_parallel's core sees them) and a step of the core on its
// first `tokens` tokens, forward + backward, ending in a device read; `enqueue_s` collects the
// host time to queue each step.
struct HeadParallelCore {
  HeadParallelCore(dist::Communicator& comm, const attention::AttentionConfig& config, const Tensor& q,
                   const Tensor& k, const Tensor& v, const Tensor& dout) {
    const int ranks = comm.size(), rank = comm.rank();
    heads = q.size(2) / ranks;
    attention::AttentionConfig local = config;
    local.num_heads = heads;
    local.total_heads = q.size(2);
    local.head_offset = rank * heads;
    core = attention::make_attention(config.inner_variant, local);
    auto mine = [&](const Tensor& x) { return x.narrow(2, rank * heads, heads).contiguous(); };
    qh = mine(q), kh = mine(k), vh = mine(v), gh = mine(dout);
  }
  // sync = false leaves the final device read out (the step only queues its work).
  std::function<void()> step(int64_t tokens, bool sync = true) {
    return [this, tokens, sync] {
      const auto t0 = std::chrono::steady_clock::now();
      auto rows = [&](const Tensor& x) { return x.narrow(1, 0, tokens).detach(); };
      Tensor ql = rows(qh).requires_grad_(), kl = rows(kh).requires_grad_(), vl = rows(vh).requires_grad_();
      core->forward(ql, kl, vl).backward(rows(gh));
      const Tensor last = sum(vl.grad().narrow(1, 0, 1));
      enqueue_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (sync) (void)last.item();
    };
  }
  int64_t heads = 0;
  std::shared_ptr<attention::Attention> core;
  Tensor qh, kh, vh, gh;
  std::vector<double> enqueue_s;
};

// Where a head-parallel step's time goes: this rank's core alone (its H/P heads over the whole
// sequence, forward + backward), the exchanges alone (what the forward and backward send: q, k,
// v and dO to the head layout, out and dq, dk, dv back) and, where the pattern allows token
// chunks, the core on one chunk's N/K tokens times K, each timed like the whole step.
HeadParallelParts time_head_parallel_parts(dist::Communicator& comm, const attention::AttentionConfig& config,
                                           const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                                           int repeats) {
  const int ranks = comm.size(), rank = comm.rank();
  const int64_t n = q.size(1), n_r = n / ranks;
  HeadParallelCore hc(comm, config, q, k, v, dout);
  const int64_t heads = hc.heads;
  auto core_step = [&](int64_t tokens) { return hc.step(tokens); };
  HeadParallelParts parts;
  parts.core_s = time_step(&comm, repeats, core_step(n));
  hc.enqueue_s.erase(hc.enqueue_s.begin(), hc.enqueue_s.begin() + std::min<size_t>(2, hc.enqueue_s.size()));
  parts.core_enqueue_s = hc.enqueue_s.empty() ? 0 : median(hc.enqueue_s);
  // Rank 0's core with the other GPUs idle: whether the ranks' concurrent work slows each other.
  comm.barrier();
  if (rank == 0) parts.core_alone_s = time_step(nullptr, repeats, core_step(n));
  comm.barrier();
  parts.chunks = attention::automatic_token_chunks(config, ranks, n_r);
  if (parts.chunks > 1) parts.chunk_core_s = parts.chunks * time_step(&comm, repeats, core_step(n / parts.chunks));
  // One exchange: every rank sends (B, n/P, H/P, D) pieces to every rank.
  const Shape piece{q.size(0), n_r, heads, q.size(3)};
  std::vector<Tensor> to_each, into;
  for (int p = 0; p < ranks; ++p) {
    to_each.push_back(Tensor::randn(piece, DType::f32, q.device()).to(q.dtype()));
    into.push_back(Tensor::empty(piece, q.dtype(), q.device()));
  }
  // With the core beside them, GPU events on the compute stream say when the core ended and when
  // the last exchange had landed, both from the step's start: which of the two the other slowed.
#ifdef LONGTAPE_WITH_CUDA
  std::unique_ptr<cuda::DeviceTimer> until_core, until_all;
  if (q.device().is_cuda()) {
    until_core = std::make_unique<cuda::DeviceTimer>(q.device().index);
    until_all = std::make_unique<cuda::DeviceTimer>(q.device().index);
  }
#endif
  std::vector<double> core_end_ms, all_end_ms;
  auto exchanges = [&](bool with_core) {
    return [&, with_core] {
#ifdef LONGTAPE_WITH_CUDA
      const bool timed = with_core && until_core;
      if (timed) until_core->start(), until_all->start();
#endif
      std::vector<std::unique_ptr<dist::Communicator::PendingAllToAll>> pending;
      for (int i = 0; i < 8; ++i) pending.push_back(comm.start_all_to_all(to_each, into));  // q k v out dO dq dk dv
      // The core only queued, as in the pipeline: with a device read here the host would sit in
      // it while the copy engines' helper thread has copies to queue, and they would land after it.
      if (with_core) hc.step(n, false)();
#ifdef LONGTAPE_WITH_CUDA
      if (timed) until_core->stop();
#endif
      for (auto& p : pending) p->wait();
#ifdef LONGTAPE_WITH_CUDA
      if (timed) until_all->stop();
#endif
      (void)sum(into[0].narrow(1, 0, 1)).item();
#ifdef LONGTAPE_WITH_CUDA
      if (timed) core_end_ms.push_back(until_core->elapsed_ms()), all_end_ms.push_back(until_all->elapsed_ms());
#endif
    };
  };
  parts.exchange_s = time_step(&comm, repeats, exchanges(false));
  // The same exchanges with the core queued beside them (nothing waits for them): how much each
  // slows the other.
  parts.both_s = time_step(&comm, repeats, exchanges(true));
  if (core_end_ms.size() > 2) {
    core_end_ms.erase(core_end_ms.begin(), core_end_ms.begin() + 2);
    all_end_ms.erase(all_end_ms.begin(), all_end_ms.begin() + 2);
    parts.both_core_end_ms = median(core_end_ms);
    parts.both_all_end_ms = median(all_end_ms);
  }
  return parts;
}

}  // namespace

void check_parallel_attention(dist::ProcessGroup& group, int64_t n, uint64_t seed, int repeats, double tolerance,
                              const std::vector<int64_t>& head_groups, const std::vector<std::string>& cores,
                              const std::vector<int64_t>& token_chunks,
                              const std::vector<std::string>& chunk_layouts) {
  LT_CHECK(!cores.empty(), "dist-check: --attention-cores needs at least one of dense, dilated");
  for (const std::string& core : cores)
    LT_CHECK(core == "dense" || core == "dilated", "dist-check: --attention-cores takes dense and dilated, got \"",
             core, "\"");
  using attention::AttentionConfig;
  using attention::RingLayout;
  for (int64_t groups : head_groups)
    LT_CHECK(groups >= 0, "dist-check: --head-groups takes group counts >= 0 (0 = automatic), got ", groups);
  for (int64_t chunks : token_chunks)
    LT_CHECK(chunks >= 0, "dist-check: --token-chunks takes chunk counts >= 0 (0 = automatic), got ", chunks);
  for (const std::string& layout : chunk_layouts)
    LT_CHECK(layout == "one_rank" || layout == "every_rank",
             "dist-check: --chunk-layouts takes one_rank and every_rank, got \"", layout, "\"");
  dist::Communicator& comm = group.comm();
  const Device device = group.device();
  const int ranks = comm.size(), rank = comm.rank();
  const DType dtype = device.is_cuda() ? DType::bf16 : DType::f32;
  // 12 heads (the benchmark's), or the next multiple of the rank count so that head_parallel runs
  // on any number of ranks (16 on 8).
  const int64_t heads = 12 % ranks == 0 ? 12 : ranks * ((12 + ranks - 1) / ranks);
  const Shape shape{1, n, heads, 64};
  manual_seed(seed);  // the same inputs on every rank
  auto input = [&] { return Tensor::randn(shape, DType::f32, device).to(dtype).detach(); };
  const Tensor q = input(), k = input(), v = input(), dout = input();

  for (const std::string& inner : cores) {
    AttentionConfig config;
    config.num_heads = heads;
    config.head_dim = 64;
    config.inner_variant = inner;
    if (inner == "dilated") {
      config.segment_lengths.clear();
      for (int64_t w : {2048, 4096, 8192}) config.segment_lengths.push_back(std::min(w, n));
      config.dilation_rates = {1, 2, 4};
      config.mixing = attention::Mixing::lse;
    }
    // One device: the whole sequence.
    auto single = attention::make_attention(inner, config);
    Grads want;
    auto run_single = [&] {
      Tensor ql = q.detach().requires_grad_(), kl = k.detach().requires_grad_(), vl = v.detach().requires_grad_();
      want.out = single->forward(ql, kl, vl);
      want.out.backward(dout);
      want.dq = ql.grad();
      want.dk = kl.grad();
      want.dv = vl.grad();
      (void)sum(want.dv.narrow(1, 0, 1)).item();  // waits for the device
    };
    const double single_s = time_step(&comm, repeats, run_single);
    // head_parallel's core on this rank's heads before any exchange has run in this process.
    double core_first_s = 0;
    if (ranks > 1) {
      HeadParallelCore hc(comm, config, q, k, v, dout);
      core_first_s = time_step(&comm, repeats, hc.step(n));
    }

    // Ring in both layouts, then head_parallel once per head group count asked for (never token
    // chunks) and once per token chunk count (head groups where the pattern allows none).
    struct Case {
      std::string kind;
      int64_t groups = 0, chunks = 1;
      std::string layout = "one_rank";
    };
    std::vector<Case> cases{{"ring"}, {"ring zigzag"}};
    for (int64_t groups : head_groups) cases.push_back({"head_parallel", groups, 1});
    for (int64_t chunks : token_chunks)
      for (const std::string& layout : chunk_layouts) cases.push_back({"head_parallel", 0, chunks, layout});
    for (const Case& c : cases) {
      const std::string& kind = c.kind;
      const RingLayout layout = kind == "ring zigzag" ? RingLayout::zigzag : RingLayout::contiguous;
      AttentionConfig cfg = config;
      cfg.ring_layout = attention::ring_layout_name(layout);
      cfg.pipeline_groups = c.groups;
      cfg.token_chunks = c.chunks;
      cfg.token_chunk_layout = c.layout;
      auto shard = [&](const Tensor& x) { return attention::ring_shard(x, 1, ranks, rank, layout); };
      const Tensor qs = shard(q), ks = shard(k), vs = shard(v), gs = shard(dout);
      Grads got;
      std::vector<double> enqueue_s;  // host time of each step up to its final wait
      auto run_parallel = [&] {
        const auto t0 = std::chrono::steady_clock::now();
        Tensor ql = qs.detach().requires_grad_(), kl = ks.detach().requires_grad_(), vl = vs.detach().requires_grad_();
        got.out = kind == "head_parallel" ? attention::head_parallel_attention(comm, cfg, ql, kl, vl).out
                                          : attention::ring_attention(comm, cfg, ql, kl, vl).out;
        got.out.backward(gs);
        got.dq = ql.grad();
        got.dk = kl.grad();
        got.dv = vl.grad();
        enqueue_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        (void)sum(got.dv.narrow(1, 0, 1)).item();
      };
      const double parallel_s = time_step(&comm, repeats, run_parallel);
      enqueue_s.erase(enqueue_s.begin(), enqueue_s.begin() + std::min<size_t>(2, enqueue_s.size()));
      const double errors[4] = {relative_error(got.out, shard(want.out)), relative_error(got.dq, shard(want.dq)),
                                relative_error(got.dk, shard(want.dk)), relative_error(got.dv, shard(want.dv))};
      const double worst = *std::max_element(std::begin(errors), std::end(errors));
      std::string path;
      if (kind == "head_parallel") {
        const attention::HeadParallelRun ran = attention::last_head_parallel_run();
        const std::string asked = " (asked: " + (c.chunks == 1 ? "head groups " + std::to_string(c.groups)
                                                              : "token chunks " + std::to_string(c.chunks) + " " +
                                                                    c.layout) +
                                  ", 0 = automatic)";
        if (ran.token_chunks > 1)
          path = " [pipelined: " + std::to_string(ran.token_chunks) + " " + ran.chunk_layout +
                 " token chunk steps of " + std::to_string(n / ran.token_chunks) +
                 " tokens, all-to-alls overlap the core]";
        else if (ran.groups > 1)
          path = " [pipelined: " + std::to_string(ran.groups) + " head groups, all-to-alls overlap the core]";
        else
          path = " [not overlapped: 1 head group]";
        path += asked;
        if (!enqueue_s.empty())
          path += " [host: " + std::to_string(median(enqueue_s) * 1e3).substr(0, 5) + " ms to queue the step]";
      } else {
        const attention::RingRun run = attention::last_ring_run();
        path = run.local ? " [local: one core call on each rank's tokens]"
                         : " [ring: " + std::to_string(run.up_steps) + " up, " + std::to_string(run.down_steps) +
                               " down steps]";
      }
      if (rank == 0) {
        std::printf("%-13s %-7s N=%lld %d ranks %s: rel. error out %.2e dq %.2e dk %.2e dv %.2e; f+b one device "
                    "%.2f ms, %d ranks %.2f ms (%.2fx)%s\n",
                    kind.c_str(), inner.c_str(), static_cast<long long>(n), ranks, dtype_name(dtype), errors[0],
                    errors[1], errors[2], errors[3], single_s * 1e3, ranks, parallel_s * 1e3, parallel_s / single_s,
                    path.c_str());
        std::fflush(stdout);
      }
      LT_CHECK(worst <= tolerance, "dist-check: ", kind, " ", inner, " attention on rank ", rank,
               " differs from one device by ", worst, " (relative), more than ", tolerance);
    }
    if (ranks > 1) {
      const HeadParallelParts parts = time_head_parallel_parts(comm, config, q, k, v, dout, repeats);
      if (rank == 0) {
        std::string chunked;
        if (parts.chunks > 1)
          chunked = "; core on " + std::to_string(n / parts.chunks) + " tokens (one token chunk step) x " +
                    std::to_string(parts.chunks) + " f+b " + std::to_string(parts.chunk_core_s * 1e3) + " ms";
        std::printf("head_parallel %-7s N=%lld %d ranks, its parts alone: core on %d heads f+b %.2f ms (%.2fx one "
                    "device; %.2f ms to queue it; %.2f ms on rank 0 with the other GPUs idle; %.2f ms before the "
                    "first exchange), the all-to-alls of a forward and backward %.2f ms, both at once %.2f ms (GPU "
                    "events: the core ended at %.2f ms, the last exchange had landed at %.2f ms)%s\n",
                    inner.c_str(), static_cast<long long>(n), ranks, static_cast<int>(heads / ranks), parts.core_s * 1e3,
                    parts.core_s / single_s, parts.core_enqueue_s * 1e3, parts.core_alone_s * 1e3, core_first_s * 1e3,
                    parts.exchange_s * 1e3, parts.both_s * 1e3, parts.both_core_end_ms, parts.both_all_end_ms,
                    chunked.c_str());
        std::fflush(stdout);
      }
    }
  }
}

}  // namespace longtape::cli
