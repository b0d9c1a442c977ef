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
  std::vector<PipelineStep> steps;
  for (const HeadGroup& g : groups) steps.push_back({g, 0, lengths});
  return steps;
}

std::vector<PipelineStep> token_chunk_steps(int64_t local_heads, int64_t ranks, int64_t length, int64_t chunks) {
  LT_CHECK(chunks >= 1 && length % chunks == 0, "head_parallel: ", length, " tokens per rank cannot be cut into ",
           chunks, " equal token chunks");
  const int64_t c = length / chunks;
  std::vector<PipelineStep> steps;
  for (int64_t g = 0; g < chunks; ++g)
    steps.push_back({{0, local_heads}, g * c, std::vector<int64_t>(static_cast<size_t>(ranks), c)});
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

// Where each rank's piece of a step lies in the core's sequence: starts has P + 1 entries.
struct StepLayout {
  std::vector<int64_t> lengths, starts;
  int64_t tokens = 0;      // the core's sequence
  int64_t first = 0;       // this rank's first token of the step in its shard
  int64_t mine = 0;        // and how many
  HeadGroup heads;
};

StepLayout layout_of(const PipelineStep& step, const Geometry& geo) {
  LT_CHECK(static_cast<int64_t>(step.lengths.size()) == geo.ranks, "head_parallel: a pipeline step names ",
           step.lengths.size(), " ranks' tokens, the group has ", geo.ranks, " ranks");
  StepLayout s;
  s.lengths = step.lengths;
  s.starts = {0};
  for (int64_t n : step.lengths) s.starts.push_back(s.starts.back() + n);
  s.tokens = s.starts.back();
  s.first = step.token_first;
  s.mine = step.lengths[static_cast<size_t>(geo.rank)];
  s.heads = step.heads;
  LT_CHECK(s.first >= 0 && s.first + s.mine <= geo.local_tokens && s.heads.first >= 0 && s.heads.count >= 1 &&
               s.heads.first + s.heads.count <= geo.local_heads,
           "head_parallel: a pipeline step takes tokens [", s.first, ", ", s.first + s.mine, ") and local heads [",
           s.heads.first, ", ", s.heads.first + s.heads.count, ") of a shard of ", geo.local_tokens, " tokens and ",
           geo.local_heads, " heads per rank");
  return s;
}

// The step's heads of every rank in the step's tokens of a (B, n_r, H, D) shard, as a
// (P, B, n, count, D) tensor: a view where the strides allow (always for this pipeline's own
// contiguous buffers, which it writes into), else a copy (a caller's strided input, only read).
Tensor heads_of_every_rank(const Tensor& shard, const Geometry& geo, const StepLayout& s) {
  return shard.narrow(1, s.first, s.mine)
      .reshape({geo.batch, s.mine, geo.ranks, geo.local_heads, geo.dim})
      .narrow(3, s.heads.first, s.heads.count)
      .permute({2, 0, 1, 3, 4});
}

// The slots of a (P, ...) tensor, one per rank.
std::vector<Tensor> rank_slots(const Tensor& buffer) {
  std::vector<Tensor> out;
  for (int64_t r = 0; r < buffer.size(0); ++r) out.push_back(buffer.select(0, r));
  return out;
}

// Where the step's rows of a (B, n_r, H, D) tensor of this pipeline receive each rank's heads.
std::vector<Tensor> head_slots(const Tensor& local, const Geometry& geo, const StepLayout& s) {
  return rank_slots(local.narrow(1, s.first, s.mine)
                        .view({geo.batch, s.mine, geo.ranks, geo.local_heads, geo.dim})
                        .narrow(3, s.heads.first, s.heads.count)
                        .permute({2, 0, 1, 3, 4}));
}

// What goes to each rank from a (B, n_r, H, D) shard: views of the step's heads of rank d (the
// copy engines read rows at a pitch; NCCL's sends make their own contiguous copies).
std::vector<Tensor> pack_heads(const Tensor& shard, const Geometry& geo, const StepLayout& s) {
  return rank_slots(heads_of_every_rank(shard, geo, s));
}

// What goes to each rank from a tensor over the core's sequence: its tokens along `dim`. Views where
// they are contiguous (batch 1), else one strided copy (equal lengths) or one copy per rank.
std::vector<Tensor> pack_tokens(const Tensor& full, int64_t dim, const Geometry& geo, const StepLayout& s) {
  std::vector<Tensor> out;
  bool contiguous = true;
  for (int64_t d = 0; d < geo.ranks; ++d) {
    out.push_back(full.narrow(dim, s.starts[static_cast<size_t>(d)], s.lengths[static_cast<size_t>(d)]));
    contiguous = contiguous && out.back().is_contiguous();
  }
  if (contiguous) return out;
  const bool equal = std::all_of(s.lengths.begin(), s.lengths.end(), [&](int64_t n) { return n == s.lengths[0]; });
  if (!equal) {
    for (Tensor& piece : out) piece = piece.contiguous();
    return out;
  }
  Shape split = full.shape();
  split[static_cast<size_t>(dim)] = s.lengths[0];
  split.insert(split.begin() + dim, geo.ranks);
  std::vector<int64_t> order{dim};
  for (int64_t i = 0; i < static_cast<int64_t>(split.size()); ++i)
    if (i != dim) order.push_back(i);
  const Tensor packed = full.reshape(split).permute(order).contiguous();
  for (int64_t d = 0; d < geo.ranks; ++d) out[static_cast<size_t>(d)] = packed.select(0, d);
  return out;
}

// Where each rank's tokens land in a tensor over the core's sequence (along `dim`).
std::vector<Tensor> token_slots(const Tensor& full, int64_t dim, const Geometry& geo, const StepLayout& s) {
  std::vector<Tensor> out;
  for (int64_t r = 0; r < geo.ranks; ++r)
    out.push_back(full.narrow(dim, s.starts[static_cast<size_t>(r)], s.lengths[static_cast<size_t>(r)]));
  return out;
}

// Starts the all-to-alls of to_each[i] into into[i] as one call (the copy engines' backend pays its
// store round trips once for all; the backends place this rank's own pieces without delaying the
// transfers: their copies are queued on the compute stream after the point the transfers wait for).
Pending start_exchanges(dist::Communicator& comm, const std::vector<std::vector<Tensor>>& to_each,
                        const std::vector<std::vector<Tensor>>& into) {
  NoGradGuard no_grad;
  return comm.start_all_to_all_many(to_each, into);
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
    Tensor d_out = Tensor::empty({geo.batch, s.tokens, s.heads.count, geo.dim}, dout.dtype(), geo.device);
    // The step's rows of dlse (B, H, n_r) viewed as (B, P, Hl, n): its heads of rank d go to rank d.
    const Tensor d_lse_packed = dlse.narrow(2, s.first, s.mine)
                                    .reshape({geo.batch, geo.ranks, geo.local_heads, s.mine})
                                    .narrow(2, s.heads.first, s.heads.count)
                                    .permute({1, 0, 2, 3})
                                    .contiguous();
    Tensor d_lse = Tensor::empty({geo.batch, s.heads.count, s.tokens}, dlse.dtype(), geo.device);
    there[g].push_back(start_exchanges(comm, {pack_heads(dout, geo, s), rank_slots(d_lse_packed)},
                                       {token_slots(d_out, 1, geo, s), token_slots(d_lse, 2, geo, s)}));
    arrived[g] = {d_out, d_lse};
  };

  std::vector<Tensor> param_grads;
  st.timeline->mark("bwd");
  for (size_t g = 0; g < count; ++g) start_there(g);
  for (size_t g = 0; g < count; ++g) {
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
      sent.push_back(pack_tokens(grads[i], 1, geo, st.steps[g]));
      received.push_back(head_slots(result[i], geo, st.steps[g]));
    }
    back[g].push_back(start_exchanges(comm, sent, received));
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
    std::vector<std::vector<Tensor>> sent, received;
    for (const Tensor& x : shards) {
      Tensor full = Tensor::empty({geo.batch, s.tokens, s.heads.count, geo.dim}, x.dtype(), geo.device);
      sent.push_back(pack_heads(x, geo, s));
      received.push_back(token_slots(full, 1, geo, s));
      arrived[g].push_back(full);
    }
    there[g].push_back(start_exchanges(comm, sent, received));
  };

  Tensor out, lse;
  st->graphs.resize(count);
  st->timeline = std::make_shared<Timeline>(geo.device);
  st->timeline->mark("fwd");
  for (size_t g = 0; g < count; ++g) start_there(g);
  for (size_t g = 0; g < count; ++g) {
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
    // out and lse straight into place: rank r's heads of this step are
    // out[:, first : first + mine, r*Hl + heads.first : ...] and lse[:, r*Hl + heads.first : ..., first : ...].
    std::vector<Tensor> lse_slots;
    for (int64_t r = 0; r < geo.ranks; ++r)
      lse_slots.push_back(lse.narrow(2, s.first, s.mine).narrow(1, r * geo.local_heads + s.heads.first, s.heads.count));
    back[g].push_back(start_exchanges(comm, {pack_tokens(step_out, 1, geo, s), pack_tokens(step_lse, 2, geo, s)},
                                      {head_slots(out, geo, s), lse_slots}));
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
