#include "attention/head_parallel_pipeline.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/timer.h"
#endif

namespace longtape::attention {

std::vector<HeadGroup> split_heads(int64_t local_heads, int64_t groups) {
  LT_CHECK(groups >= 1 && groups <= local_heads, "head_parallel: the heads of a rank (", local_heads,
           ") cannot be split into ", groups, " groups: expected 1 to ", local_heads);
  std::vector<HeadGroup> out;
  int64_t first = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t count = local_heads / groups + (g < local_heads % groups ? 1 : 0);
    out.push_back({first, count});
    first += count;
  }
  return out;
}

int64_t automatic_pipeline_groups(int64_t local_heads) {
  constexpr int64_t kMost = 4;
  for (int64_t g = std::min(local_heads, kMost); g >= 2; --g)
    if (local_heads % g == 0) return g;
  return std::max<int64_t>(1, std::min(local_heads, kMost));
}

std::vector<PipelineStep> head_group_steps(const std::vector<HeadGroup>& groups, const std::vector<int64_t>& lengths) {
  std::vector<TokenPiece> all;
  for (size_t r = 0; r < lengths.size(); ++r) all.push_back({static_cast<int64_t>(r), 0, lengths[r]});
  std::vector<PipelineStep> steps;
  for (const HeadGroup& g : groups) steps.push_back({g, std::vector<std::vector<TokenPiece>>(lengths.size(), all)});
  return steps;
}

namespace {

int64_t chunk_length(int64_t length, int64_t chunks) {
  LT_CHECK(chunks >= 1 && length % chunks == 0, "head_parallel: ", length, " tokens per rank cannot be cut into ",
           chunks, " equal token chunks");
  return length / chunks;
}

}  // namespace

std::vector<PipelineStep> every_rank_chunk_steps(int64_t local_heads, int64_t ranks, int64_t length, int64_t chunks) {
  const int64_t c = chunk_length(length, chunks);
  std::vector<PipelineStep> steps;
  for (int64_t g = 0; g < chunks; ++g) {
    std::vector<TokenPiece> of_every_rank;
    for (int64_t r = 0; r < ranks; ++r) of_every_rank.push_back({r, g * c, c});
    steps.push_back({{0, local_heads}, std::vector<std::vector<TokenPiece>>(static_cast<size_t>(ranks), of_every_rank)});
  }
  return steps;
}

std::vector<PipelineStep> one_rank_chunk_steps(int64_t local_heads, int64_t ranks, int64_t length, int64_t chunks,
                                               bool halve_own) {
  const int64_t c = chunk_length(length, chunks);
  LT_CHECK(!halve_own || (chunks == 1 && length % 2 == 0), "head_parallel: only one chunk per rank of an even length "
           "can be taken in two halves by its own rank, got ", chunks, " chunks of ", c, " tokens");
  // Per step: rank t takes [first, first + length) of rank (t + offset) mod P.
  struct Take {
    int64_t offset, first, length;
  };
  std::vector<Take> order{{0, 0, halve_own ? c / 2 : c}};
  for (int64_t j = 0; j < chunks; ++j) {
    for (int64_t d = 1; d < ranks; ++d) order.push_back({d, j * c, c});
    if (j + 1 < chunks - 1) order.push_back({0, (j + 1) * c, c});
  }
  if (halve_own) order.push_back({0, c / 2, c / 2});
  else if (chunks > 1) order.push_back({0, (chunks - 1) * c, c});
  std::vector<PipelineStep> steps;
  for (const Take& take : order) {
    PipelineStep step{{0, local_heads}, {}};
    for (int64_t t = 0; t < ranks; ++t) step.core.push_back({{(t + take.offset) % ranks, take.first, take.length}});
    steps.push_back(step);
  }
  return steps;
}

bool head_parallel_timeline_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LONGTAPE_HEAD_PARALLEL_TIMELINE");
    return v != nullptr && std::string(v) == "1";
  }();
  return enabled;
}

namespace {

using Pending = std::unique_ptr<dist::Communicator::PendingAllToAll>;

// LONGTAPE_HEAD_PARALLEL_TIMELINE=1: each rank prints, after its backward, when its compute stream
// passed each point of the step (GPU milliseconds after the forward's start): a point after a
// wait for arrivals that lands later than the point before it is time the stream spent waiting.
class Timeline {
 public:
  explicit Timeline(const Device& device) {
#ifdef LONGTAPE_WITH_CUDA
    if (head_parallel_timeline_enabled() && device.is_cuda())
      line_ = std::make_unique<cuda::DeviceTimeline>(device.index);
#else
    (void)device;
#endif
  }
  void mark(const std::string& name) {
#ifdef LONGTAPE_WITH_CUDA
    if (!line_) return;
    line_->mark(name);
    host_ms_.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host0_).count());
#else
    (void)name;
#endif
  }
  void print(int64_t rank) {
#ifdef LONGTAPE_WITH_CUDA
    if (!line_) return;
    std::string text = "head_parallel timeline, rank " + std::to_string(rank) + " (GPU ms / host ms when queued):";
    const auto times = line_->times();
    for (size_t i = 0; i < times.size(); ++i)
      text += " " + times[i].first + " " + std::to_string(times[i].second).substr(0, 6) + "/" +
              std::to_string(host_ms_[i]).substr(0, 6);
    std::fprintf(stderr, "%s\n", text.c_str());
#else
    (void)rank;
#endif
  }

 private:
#ifdef LONGTAPE_WITH_CUDA
  std::unique_ptr<cuda::DeviceTimeline> line_;
  std::chrono::steady_clock::time_point host0_ = std::chrono::steady_clock::now();
  std::vector<double> host_ms_;
#endif
};

// The sizes of one rank's step: P ranks, batch B, this rank's n_r tokens, H = P * Hl heads of dim D.
struct Geometry {
  int64_t ranks = 1, rank = 0, batch = 1, local_tokens = 0, heads = 0, local_heads = 0, dim = 0;
  Device device = Device::cpu();
};

// A run of tokens: [first, first + length).
struct Span {
  int64_t first = 0;
  int64_t length = 0;
};

// One step as this rank sees it.
struct StepLayout {
  std::vector<Span> from;  // per source rank s: where s's tokens lie in this rank's core sequence
  std::vector<Span> to;    // per rank t: the tokens of this rank's shard that t's core runs on
  int64_t tokens = 0;      // this rank's core sequence
  bool local = true;       // every rank's core runs on its own tokens alone: nothing travels
  HeadGroup heads;
};

StepLayout layout_of(const PipelineStep& step, const Geometry& geo) {
  LT_CHECK(static_cast<int64_t>(step.core.size()) == geo.ranks, "head_parallel: a pipeline step names ",
           step.core.size(), " ranks' cores, the group has ", geo.ranks, " ranks");
  StepLayout s;
  s.heads = step.heads;
  s.from.assign(static_cast<size_t>(geo.ranks), Span{});
  s.to.assign(static_cast<size_t>(geo.ranks), Span{});
  LT_CHECK(s.heads.first >= 0 && s.heads.count >= 1 && s.heads.first + s.heads.count <= geo.local_heads,
           "head_parallel: a pipeline step takes local heads [", s.heads.first, ", ", s.heads.first + s.heads.count,
           ") of ", geo.local_heads, " heads per rank");
  for (int64_t t = 0; t < geo.ranks; ++t) {
    std::vector<bool> seen(static_cast<size_t>(geo.ranks), false);
    for (const TokenPiece& p : step.core[static_cast<size_t>(t)]) {
      LT_CHECK(p.source >= 0 && p.source < geo.ranks && !seen[static_cast<size_t>(p.source)] && p.first >= 0 &&
                   p.length >= 0,
               "head_parallel: rank ", t, "'s core in a pipeline step names source rank ", p.source,
               " twice or out of [0, ", geo.ranks, "), or a negative token range");
      seen[static_cast<size_t>(p.source)] = true;
      if (p.length > 0 && p.source != t) s.local = false;
      if (t == geo.rank) {
        s.from[static_cast<size_t>(p.source)] = {s.tokens, p.length};
        s.tokens += p.length;
      }
      if (p.source == geo.rank) {
        LT_CHECK(p.first + p.length <= geo.local_tokens, "head_parallel: a pipeline step takes tokens [", p.first,
                 ", ", p.first + p.length, ") of a shard of ", geo.local_tokens, " tokens");
        s.to[static_cast<size_t>(t)] = {p.first, p.length};
      }
    }
  }
  return s;
}

// Rank t's heads of the step in the tokens `span` of a (B, n_r, H, D) tensor: (B, length, count, D).
// A view where the strides allow (always for this pipeline's own contiguous buffers, which it writes
// into), else a copy (a caller's strided input, only read).
Tensor heads_of(const Tensor& shard, int64_t t, Span span, const Geometry& geo, const StepLayout& s) {
  return shard.narrow(1, span.first, span.length)
      .reshape({geo.batch, span.length, geo.ranks, geo.local_heads, geo.dim})
      .select(2, t)
      .narrow(2, s.heads.first, s.heads.count);
}

// What goes to each rank t from a (B, n_r, H, D) shard: t's heads of the tokens its core takes from
// this rank (views: the copy engines read rows at a pitch; NCCL's sends make their own copies).
std::vector<Tensor> pack_heads(const Tensor& shard, const Geometry& geo, const StepLayout& s) {
  std::vector<Tensor> out;
  for (int64_t t = 0; t < geo.ranks; ++t) out.push_back(heads_of(shard, t, s.to[static_cast<size_t>(t)], geo, s));
  return out;
}

// Where the step's rows of a (B, n_r, H, D) tensor of this pipeline receive each rank t's heads.
std::vector<Tensor> head_slots(const Tensor& local, const Geometry& geo, const StepLayout& s) {
  std::vector<Tensor> out;
  for (int64_t t = 0; t < geo.ranks; ++t) {
    const Span span = s.to[static_cast<size_t>(t)];
    out.push_back(local.narrow(1, span.first, span.length)
                      .view({geo.batch, span.length, geo.ranks, geo.local_heads, geo.dim})
                      .select(2, t)
                      .narrow(2, s.heads.first, s.heads.count));
  }
  return out;
}

// Where each source rank's tokens lie in a tensor over this rank's core sequence (along `dim`).
std::vector<Tensor> token_slots(const Tensor& full, int64_t dim, const StepLayout& s) {
  std::vector<Tensor> out;
  for (const Span& span : s.from) out.push_back(full.narrow(dim, span.first, span.length));
  return out;
}

// What goes back to each source rank from a tensor over this rank's core sequence: its tokens
// along `dim`, as views where they are contiguous (batch 1), else as copies.
std::vector<Tensor> pack_tokens(const Tensor& full, int64_t dim, const StepLayout& s) {
  std::vector<Tensor> out = token_slots(full, dim, s);
  for (Tensor& piece : out)
    if (!piece.is_contiguous()) piece = piece.contiguous();
  return out;
}

// Starts the all-to-alls of to_each[i] into into[i] as one call (the copy engines' backend pays its
// store round trips once for all; the backends place this rank's own pieces without delaying the
// transfers: their copies are queued on the compute stream after the point the transfers wait for).
// A step in which nothing travels places this rank's own pieces and starts no collective (every
// rank knows it from the steps, so none waits for the others); it returns null.
Pending start_exchanges(dist::Communicator& comm, const StepLayout& s, int64_t rank,
                        const std::vector<std::vector<Tensor>>& to_each, const std::vector<std::vector<Tensor>>& into) {
  NoGradGuard no_grad;
  if (!s.local) return comm.start_all_to_all_many(to_each, into);
  for (size_t i = 0; i < to_each.size(); ++i) {
    Tensor own = into[i][static_cast<size_t>(rank)];
    if (own.numel() > 0) own.copy_(to_each[i][static_cast<size_t>(rank)]);
  }
  return nullptr;
}

// Rank t's heads of the lse (B, H, n_r) rows this rank's shard gives t's core: (B, count, length).
Tensor lse_heads_of(const Tensor& lse, int64_t t, const Geometry& geo, const StepLayout& s) {
  const Span span = s.to[static_cast<size_t>(t)];
  return lse.narrow(2, span.first, span.length).narrow(1, t * geo.local_heads + s.heads.first, s.heads.count);
}

// What step g's core left for the backward.
struct StepGraph {
  std::vector<Tensor> inputs;   // the core's q, k, v (B, T, count, D): leaves of its graph
  AttentionOutput result;       // the core's out and lse, with their graph
  std::vector<Tensor> params;   // the core's trainable parameters
};

struct PipelineState {
  std::shared_ptr<dist::Communicator> comm;
  std::shared_ptr<Timeline> timeline;
  Geometry geo;
  std::vector<StepLayout> steps;
  std::vector<StepGraph> graphs;
  std::vector<DType> input_dtypes;  // of q, k, v
};

// The backward: dO (B, n_r, H, D) and dlse (B, H, n_r) there per step, the core's backward,
// dq, dk, dv back; then the parameters' gradients.
std::vector<Tensor> pipelined_backward(const PipelineState& st, const Tensor& dout, const Tensor& dlse) {
  dist::Communicator& comm = *st.comm;
  const Geometry& geo = st.geo;
  const size_t count = st.steps.size();
  std::vector<std::vector<Tensor>> arrived(count);  // per step: dO (B, T, c, D), dlse (B, c, T)
  std::vector<std::vector<Pending>> there(count), back(count);
  // dq, dk, dv of this rank's tokens: each step's heads arrive straight in place.
  std::vector<Tensor> result;
  {
    NoGradGuard no_grad;
    for (size_t i = 0; i < 3; ++i)
      result.push_back(Tensor::empty({geo.batch, geo.local_tokens, geo.heads, geo.dim}, st.input_dtypes[i], geo.device));
  }

  auto start_there = [&](size_t g) {
    NoGradGuard no_grad;
    const StepLayout& s = st.steps[g];
    if (s.local) {  // the core's backward reads this rank's own rows in place
      const Span mine = s.to[static_cast<size_t>(geo.rank)];
      arrived[g] = {heads_of(dout, geo.rank, mine, geo, s), lse_heads_of(dlse, geo.rank, geo, s)};
      return;
    }
    Tensor d_out = Tensor::empty({geo.batch, s.tokens, s.heads.count, geo.dim}, dout.dtype(), geo.device);
    Tensor d_lse = Tensor::empty({geo.batch, s.heads.count, s.tokens}, dlse.dtype(), geo.device);
    std::vector<Tensor> d_lse_sent;
    for (int64_t t = 0; t < geo.ranks; ++t) d_lse_sent.push_back(lse_heads_of(dlse, t, geo, s).contiguous());
    Pending p = start_exchanges(comm, s, geo.rank, {pack_heads(dout, geo, s), d_lse_sent},
                                {token_slots(d_out, 1, s), token_slots(d_lse, 2, s)});
    if (p) there[g].push_back(std::move(p));
    arrived[g] = {d_out, d_lse};
  };

  std::vector<Tensor> param_grads;
  st.timeline->mark("bwd");
  // In reverse: the forward's last step (for one-rank chunks, this rank's own) first.
  for (size_t g = count; g-- > 0;) start_there(g);
  for (size_t g = count; g-- > 0;) {
    for (Pending& p : there[g]) p->wait();
    st.timeline->mark("dO" + std::to_string(g));
    const StepGraph& graph = st.graphs[g];
    std::vector<Tensor> roots, root_grads;
    if (graph.result.out.requires_grad()) {
      roots.push_back(graph.result.out);
      root_grads.push_back(arrived[g][0]);
    }
    if (graph.result.lse.requires_grad()) {
      roots.push_back(graph.result.lse);
      root_grads.push_back(arrived[g][1]);
    }
    arrived[g].clear();
    std::vector<Tensor> wrt = graph.inputs;
    wrt.insert(wrt.end(), graph.params.begin(), graph.params.end());
    std::vector<Tensor> grads(wrt.size());
    // retain_graph: the graph lives as long as this node, so a retained outer graph can run again.
    if (!roots.empty()) grads = autograd::grad(roots, wrt, root_grads, /*retain_graph=*/true);
    st.timeline->mark("core" + std::to_string(g));
    NoGradGuard no_grad;
    std::vector<std::vector<Tensor>> sent, received;
    for (size_t i = 0; i < 3; ++i) {
      const Tensor& input = graph.inputs[i];
      // Only a core that ignores an input (none of the registered variants) leaves its gradient undefined.
      if (!grads[i].defined()) grads[i] = Tensor::zeros(input.shape(), input.dtype(), input.device());
      if (grads[i].dtype() != result[i].dtype()) grads[i] = grads[i].to(result[i].dtype());
      sent.push_back(pack_tokens(grads[i], 1, st.steps[g]));
      received.push_back(head_slots(result[i], geo, st.steps[g]));
    }
    Pending p = start_exchanges(comm, st.steps[g], geo.rank, sent, received);
    if (p) back[g].push_back(std::move(p));
    st.timeline->mark("sent" + std::to_string(g));
    for (size_t i = 3; i < grads.size(); ++i) param_grads.push_back(grads[i]);
  }

  for (size_t g = 0; g < count; ++g)
    for (Pending& p : back[g]) p->wait();
  st.timeline->mark("back");
  st.timeline->print(geo.rank);
  result.insert(result.end(), param_grads.begin(), param_grads.end());
  return result;
}

}  // namespace

AttentionOutput pipelined_head_parallel(dist::Communicator& comm, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<PipelineStep>& steps,
                                        const std::vector<std::shared_ptr<Attention>>& cores, CoreRun* run) {
  LT_CHECK(!steps.empty() && steps.size() == cores.size(), "head_parallel: expected one core per pipeline step, got ",
           cores.size(), " cores for ", steps.size(), " steps");
  auto st = std::make_shared<PipelineState>();
  Geometry& geo = st->geo;
  geo.ranks = comm.size();
  geo.rank = comm.rank();
  geo.batch = q.size(0);
  geo.local_tokens = q.size(1);
  geo.heads = q.size(2);
  geo.local_heads = geo.heads / geo.ranks;
  geo.dim = q.size(3);
  geo.device = q.device();
  for (const PipelineStep& step : steps) st->steps.push_back(layout_of(step, geo));
  st->input_dtypes = {q.dtype(), k.dtype(), v.dtype()};

  std::vector<Tensor> inputs{q, k, v};
  for (const auto& core : cores)
    for (const Tensor& p : core->parameters())
      if (p.requires_grad()) inputs.push_back(p);
  const bool record = autograd::any_requires_grad(inputs);

  const size_t count = steps.size();
  std::vector<std::vector<Tensor>> arrived(count);  // per step: q, k, v (B, T, c, D)
  std::vector<std::vector<Pending>> there(count), back(count);
  const std::vector<Tensor> shards{q.detach(), k.detach(), v.detach()};
  auto start_there = [&](size_t g) {
    NoGradGuard no_grad;
    const StepLayout& s = st->steps[g];
    if (s.local) {  // the core reads this rank's own rows in place (the kernels take rows at a pitch)
      for (const Tensor& x : shards) arrived[g].push_back(heads_of(x, geo.rank, s.to[static_cast<size_t>(geo.rank)], geo, s));
      return;
    }
    std::vector<std::vector<Tensor>> sent, received;
    for (const Tensor& x : shards) {
      Tensor full = Tensor::empty({geo.batch, s.tokens, s.heads.count, geo.dim}, x.dtype(), geo.device);
      sent.push_back(pack_heads(x, geo, s));
      received.push_back(token_slots(full, 1, s));
      arrived[g].push_back(full);
    }
    Pending p = start_exchanges(comm, s, geo.rank, sent, received);
    if (p) there[g].push_back(std::move(p));
  };

  Tensor out, lse;
  st->graphs.resize(count);
  st->timeline = std::make_shared<Timeline>(geo.device);
  st->timeline->mark("fwd");
  // A first step on this rank's own rows is queued once the next step's transfers have started;
  // the host's time to start every step's would delay it. The later steps' transfers start after
  // it is queued (so they follow it on the device, well before their cores need them).
  size_t started = 0;
  auto start_through = [&](size_t last) {
    for (; started <= last && started < count; ++started) start_there(started);
  };
  start_through(st->steps[0].local ? 1 : count - 1);
  for (size_t g = 0; g < count; ++g) {
    start_through(g);
    for (Pending& p : there[g]) p->wait();
    st->timeline->mark("in" + std::to_string(g));
    StepGraph& graph = st->graphs[g];
    if (record) {
      for (const Tensor& x : arrived[g]) graph.inputs.push_back(x.detach().requires_grad_());
      for (const Tensor& p : cores[g]->parameters())
        if (p.requires_grad()) graph.params.push_back(p);
    } else {
      graph.inputs = arrived[g];
    }
    arrived[g].clear();
    graph.result = cores[g]->forward_with_lse(graph.inputs[0], graph.inputs[1], graph.inputs[2]);
    st->timeline->mark("core" + std::to_string(g));
    if (g == 0 && run) *run = {cores[0]->last_backend(), cores[0]->last_precision()};
    NoGradGuard no_grad;
    const StepLayout& s = st->steps[g];
    const Tensor step_out = graph.result.out.detach(), step_lse = graph.result.lse.detach();
    if (g == 0) {
      out = Tensor::empty({geo.batch, geo.local_tokens, geo.heads, geo.dim}, step_out.dtype(), geo.device);
      lse = Tensor::empty({geo.batch, geo.heads, geo.local_tokens}, step_lse.dtype(), geo.device);
    }
    // out and lse straight into place: what this rank's core computed for source s's tokens goes
    // back to s, into its heads of those rows (head_slots and lse_heads_of on s's side).
    std::vector<Tensor> lse_slots;
    for (int64_t t = 0; t < geo.ranks; ++t) lse_slots.push_back(lse_heads_of(lse, t, geo, s));
    Pending p = start_exchanges(comm, s, geo.rank, {pack_tokens(step_out, 1, s), pack_tokens(step_lse, 2, s)},
                                {head_slots(out, geo, s), lse_slots});
    if (p) back[g].push_back(std::move(p));
    st->timeline->mark("sent" + std::to_string(g));
    if (g == 0) start_through(count - 1);
    if (!record) graph = StepGraph{};  // nothing to keep for a backward
  }
  {
    NoGradGuard no_grad;
    for (size_t g = 0; g < count; ++g)
      for (Pending& p : back[g]) p->wait();
  }
  st->timeline->mark("out");
  if (record) {
    st->comm = dist::keep_alive(comm);
    // The cores' graphs (held by st) save what their backward reads; q, k, v themselves are not read.
    autograd::record("head_parallel_attention", inputs, {out, lse},
                     [st](const std::vector<Tensor>& g) { return pipelined_backward(*st, g[0], g[1]); });
  }
  return {out, lse};
}

}  // namespace longtape::attention
