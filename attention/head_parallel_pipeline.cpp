#include "attention/head_parallel_pipeline.h"

#include <algorithm>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

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

namespace {

using Pending = std::unique_ptr<dist::Communicator::PendingAllToAll>;

// The sizes of one rank's step: P ranks, batch B, this rank's n_r tokens of N, H = P * Hl heads of dim D.
struct Geometry {
  int64_t ranks = 1, rank = 0, batch = 1, local_tokens = 0, tokens = 0, heads = 0, local_heads = 0, dim = 0;
  std::vector<int64_t> lengths, starts;  // per rank; starts has P + 1 entries
  Device device = Device::cpu();
};

// Group g's heads of every rank in a (B, n_r, H, D) shard, as a (P, B, n_r, count, D) view.
Tensor heads_of_every_rank(const Tensor& shard, const Geometry& geo, const HeadGroup& g) {
  return shard.reshape({geo.batch, geo.local_tokens, geo.ranks, geo.local_heads, geo.dim})
      .narrow(3, g.first, g.count)
      .permute({2, 0, 1, 3, 4});
}

// What goes to each rank from a (B, n_r, H, D) shard: group g's heads of rank d, a contiguous copy
// for the others (the transfer reads it) and a view for this rank (copied straight into place).
std::vector<Tensor> pack_heads(const Tensor& shard, const Geometry& geo, const HeadGroup& g) {
  const Tensor every = heads_of_every_rank(shard, geo, g);
  std::vector<Tensor> out;
  for (int64_t d = 0; d < geo.ranks; ++d)
    out.push_back(d == geo.rank ? every.select(0, d) : every.select(0, d).contiguous());
  return out;
}

// What goes to each rank from a full-sequence tensor: its tokens along `dim`. Views where they are
// contiguous (batch 1), else one strided copy (equal lengths) or one copy per rank.
std::vector<Tensor> pack_tokens(const Tensor& full, int64_t dim, const Geometry& geo) {
  std::vector<Tensor> out;
  bool contiguous = true;
  for (int64_t d = 0; d < geo.ranks; ++d) {
    out.push_back(full.narrow(dim, geo.starts[static_cast<size_t>(d)], geo.lengths[static_cast<size_t>(d)]));
    contiguous = contiguous && out.back().is_contiguous();
  }
  if (contiguous) return out;
  const bool equal = std::all_of(geo.lengths.begin(), geo.lengths.end(), [&](int64_t n) { return n == geo.lengths[0]; });
  if (!equal) {
    for (Tensor& piece : out) piece = piece.contiguous();
    return out;
  }
  Shape split = full.shape();
  split[static_cast<size_t>(dim)] = geo.lengths[0];
  split.insert(split.begin() + dim, geo.ranks);
  std::vector<int64_t> order{dim};
  for (int64_t i = 0; i < static_cast<int64_t>(split.size()); ++i)
    if (i != dim) order.push_back(i);
  const Tensor packed = full.reshape(split).permute(order).contiguous();
  for (int64_t d = 0; d < geo.ranks; ++d) out[static_cast<size_t>(d)] = packed.select(0, d);
  return out;
}

// Where each rank's tokens land in a full-sequence tensor (along `dim`).
std::vector<Tensor> token_slots(const Tensor& full, int64_t dim, const Geometry& geo) {
  std::vector<Tensor> out;
  for (int64_t s = 0; s < geo.ranks; ++s)
    out.push_back(full.narrow(dim, geo.starts[static_cast<size_t>(s)], geo.lengths[static_cast<size_t>(s)]));
  return out;
}

// The slots of a (P, ...) tensor, one per rank.
std::vector<Tensor> rank_slots(const Tensor& buffer) {
  std::vector<Tensor> out;
  for (int64_t s = 0; s < buffer.size(0); ++s) out.push_back(buffer.select(0, s));
  return out;
}

// What group g's core left for the backward.
struct GroupGraph {
  std::vector<Tensor> inputs;   // the core's q, k, v (B, N, count, D): leaves of its graph
  AttentionOutput result;       // the core's out and lse, with their graph
  std::vector<Tensor> params;   // the core's trainable parameters
};

struct PipelineState {
  std::shared_ptr<dist::Communicator> comm;
  Geometry geo;
  std::vector<HeadGroup> groups;
  std::vector<GroupGraph> graphs;
  std::vector<DType> input_dtypes;  // of q, k, v
};

// The backward: dO (B, n_r, H, D) and dlse (B, H, n_r) there per group, the core's backward,
// dq, dk, dv back; then the parameters' gradients.
std::vector<Tensor> pipelined_backward(const PipelineState& st, const Tensor& dout, const Tensor& dlse) {
  dist::Communicator& comm = *st.comm;
  const Geometry& geo = st.geo;
  const size_t count = st.groups.size();
  std::vector<std::vector<Tensor>> arrived(count);  // per group: dO (B, N, c, D), dlse (B, c, N)
  std::vector<std::vector<Pending>> there(count), back(count);
  // dq, dk, dv of this rank's tokens: each group's heads arrive straight in place.
  std::vector<Tensor> result;
  {
    NoGradGuard no_grad;
    for (size_t i = 0; i < 3; ++i)
      result.push_back(Tensor::empty({geo.batch, geo.local_tokens, geo.heads, geo.dim}, st.input_dtypes[i], geo.device));
  }

  auto start_there = [&](size_t g) {
    NoGradGuard no_grad;
    const HeadGroup& group = st.groups[g];
    Tensor d_out = Tensor::empty({geo.batch, geo.tokens, group.count, geo.dim}, dout.dtype(), geo.device);
    there[g].push_back(comm.start_all_to_all(pack_heads(dout, geo, group), token_slots(d_out, 1, geo)));
    // dlse (B, H, n_r) viewed as (B, P, Hl, n_r): group g's heads of rank d go to rank d.
    const Tensor d_lse_packed = dlse.reshape({geo.batch, geo.ranks, geo.local_heads, geo.local_tokens})
                                    .narrow(2, group.first, group.count)
                                    .permute({1, 0, 2, 3})
                                    .contiguous();
    Tensor d_lse = Tensor::empty({geo.batch, group.count, geo.tokens}, dlse.dtype(), geo.device);
    there[g].push_back(comm.start_all_to_all(rank_slots(d_lse_packed), token_slots(d_lse, 2, geo)));
    arrived[g] = {d_out, d_lse};
  };

  std::vector<Tensor> param_grads;
  for (size_t g = 0; g < count; ++g) start_there(g);
  for (size_t g = 0; g < count; ++g) {
    for (Pending& p : there[g]) p->wait();
    const GroupGraph& graph = st.graphs[g];
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
    NoGradGuard no_grad;
    for (size_t i = 0; i < 3; ++i) {
      const Tensor& input = graph.inputs[i];
      if (!grads[i].defined()) grads[i] = Tensor::zeros(input.shape(), input.dtype(), input.device());
      if (grads[i].dtype() != result[i].dtype()) grads[i] = grads[i].to(result[i].dtype());
      back[g].push_back(comm.start_all_to_all(pack_tokens(grads[i], 1, geo),
                                              rank_slots(heads_of_every_rank(result[i], geo, st.groups[g]))));
    }
    for (size_t i = 3; i < grads.size(); ++i) param_grads.push_back(grads[i]);
  }

  for (size_t g = 0; g < count; ++g)
    for (Pending& p : back[g]) p->wait();
  result.insert(result.end(), param_grads.begin(), param_grads.end());
  return result;
}

}  // namespace

AttentionOutput pipelined_head_parallel(dist::Communicator& comm, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<int64_t>& lengths, const std::vector<HeadGroup>& groups,
                                        const std::vector<std::shared_ptr<Attention>>& cores, CoreRun* run) {
  LT_CHECK(!groups.empty() && groups.size() == cores.size(), "head_parallel: expected one core per head group, got ",
           cores.size(), " cores for ", groups.size(), " groups");
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
  geo.lengths = lengths;
  geo.starts = {0};
  for (int64_t n : lengths) geo.starts.push_back(geo.starts.back() + n);
  geo.tokens = geo.starts.back();
  st->groups = groups;
  st->input_dtypes = {q.dtype(), k.dtype(), v.dtype()};

  std::vector<Tensor> inputs{q, k, v};
  for (const auto& core : cores)
    for (const Tensor& p : core->parameters())
      if (p.requires_grad()) inputs.push_back(p);
  const bool record = autograd::any_requires_grad(inputs);

  const size_t count = groups.size();
  std::vector<std::vector<Tensor>> arrived(count);  // per group: q, k, v (B, N, c, D)
  std::vector<std::vector<Pending>> there(count), back(count);
  const std::vector<Tensor> shards{q.detach(), k.detach(), v.detach()};
  auto start_there = [&](size_t g) {
    NoGradGuard no_grad;
    const HeadGroup& group = groups[g];
    for (const Tensor& x : shards) {
      Tensor full = Tensor::empty({geo.batch, geo.tokens, group.count, geo.dim}, x.dtype(), geo.device);
      there[g].push_back(comm.start_all_to_all(pack_heads(x, geo, group), token_slots(full, 1, geo)));
      arrived[g].push_back(full);
    }
  };

  Tensor out, lse;
  st->graphs.resize(count);
  for (size_t g = 0; g < count; ++g) start_there(g);
  for (size_t g = 0; g < count; ++g) {
    for (Pending& p : there[g]) p->wait();
    GroupGraph& graph = st->graphs[g];
    if (record) {
      for (const Tensor& x : arrived[g]) graph.inputs.push_back(x.detach().requires_grad_());
      for (const Tensor& p : cores[g]->parameters())
        if (p.requires_grad()) graph.params.push_back(p);
    } else {
      graph.inputs = arrived[g];
    }
    arrived[g].clear();
    graph.result = cores[g]->forward_with_lse(graph.inputs[0], graph.inputs[1], graph.inputs[2]);
    if (g == 0 && run) *run = {cores[0]->last_backend(), cores[0]->last_precision()};
    NoGradGuard no_grad;
    const Tensor group_out = graph.result.out.detach(), group_lse = graph.result.lse.detach();
    if (g == 0) {
      out = Tensor::empty({geo.batch, geo.local_tokens, geo.heads, geo.dim}, group_out.dtype(), geo.device);
      lse = Tensor::empty({geo.batch, geo.heads, geo.local_tokens}, group_lse.dtype(), geo.device);
    }
    // out and lse straight into place: rank s's heads of this group are out[:, :, s*Hl + first : ...]
    // and lse[:, s*Hl + first : ..., :].
    back[g].push_back(comm.start_all_to_all(pack_tokens(group_out, 1, geo),
                                            rank_slots(heads_of_every_rank(out, geo, groups[g]))));
    std::vector<Tensor> lse_slots;
    for (int64_t s = 0; s < geo.ranks; ++s)
      lse_slots.push_back(lse.narrow(1, s * geo.local_heads + groups[g].first, groups[g].count));
    back[g].push_back(comm.start_all_to_all(pack_tokens(group_lse, 2, geo), lse_slots));
    if (!record) graph = GroupGraph{};  // nothing to keep for a backward
  }
  {
    NoGradGuard no_grad;
    for (size_t g = 0; g < count; ++g)
      for (Pending& p : back[g]) p->wait();
  }
  if (record) {
    st->comm = dist::keep_alive(comm);
    // The cores' graphs (held by st) save what their backward reads; q, k, v themselves are not read.
    autograd::record("head_parallel_attention", inputs, {out, lse},
                     [st](const std::vector<Tensor>& g) { return pipelined_backward(*st, g[0], g[1]); });
  }
  return {out, lse};
}

}  // namespace longtape::attention
