#include "attention/ring_attention.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>

#include "attention/composed.h"
#include "attention/fused/chunk_attention.h"
#include "attention/fused/fused_attention.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Point-to-point tags of the ring, per direction (FIFO per tag, so consecutive calls never mix).
struct RingTags {
  int k, v;                  // forward
  int bwd_k, bwd_v, dk, dv;  // backward, around the ring
  int return_dk, return_dv;  // backward, straight to the owner
};
constexpr RingTags kUpTags{1, 2, 3, 4, 5, 6, 7, 8};            // chunks of lower ranks, arriving from r - 1
constexpr RingTags kDownTags{11, 12, 13, 14, 15, 16, 17, 18};  // chunks of higher ranks, arriving from r + 1

// Most score elements one composed block forms at once (as StreamOptions::max_score_elements).
std::atomic<int64_t> g_score_budget{int64_t{1} << 22};

std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

// Throws unless `config` describes an inner variant the ring supports, for `num_heads` local heads.
void validate_inner(const AttentionConfig& config, int64_t num_heads, const std::string& who) {
  LT_CHECK(config.inner_variant == "dense" || config.inner_variant == "dilated", who,
           ": inner_variant must be \"dense\" or \"dilated\", got \"", config.inner_variant, "\"");
  parse_ring_layout(config.ring_layout);
  const int64_t total = config.total_heads > 0 ? config.total_heads : num_heads;
  LT_CHECK(config.head_offset >= 0 && config.head_offset + num_heads <= total, who, ": heads [",
           config.head_offset, ", ", config.head_offset + num_heads, ") (head_offset, num_heads) must lie within the ",
           total, " heads of total_heads");
  if (config.inner_variant == "dense") return;
  LT_CHECK(!config.segment_lengths.empty(), who, ": segment_lengths must hold at least one value");
  LT_CHECK(config.segment_lengths.size() == config.dilation_rates.size(), who,
           ": segment_lengths and dilation_rates must have the same length, got ", shape_str(config.segment_lengths),
           " and ", shape_str(config.dilation_rates));
  std::vector<DilatedBranch> branches;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i)
    branches.push_back({config.segment_lengths[i], config.dilation_rates[i]});
  validate_branches(branches);
  if (config.mixing == Mixing::head_groups)
    LT_CHECK(total >= static_cast<int64_t>(branches.size()), who,
             ": mixing = head_groups needs at least as many heads as branches, got ", total, " heads and ",
             branches.size(), " branches");
}

}  // namespace

CoreKeys ring_keys(const AttentionConfig& config) {
  CoreKeys keys;
  if (config.inner_variant == "dense") return keys;
  keys.kind = fused::KeySet::dilated;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i)
    keys.branches.push_back({config.segment_lengths[i], config.dilation_rates[i]});
  keys.mixing = config.mixing == Mixing::lse ? fused::BranchMixing::lse : fused::BranchMixing::head_groups;
  keys.head_offset = config.head_offset;
  keys.total_heads = config.total_heads;
  return keys;
}

bool holds_whole_segments(const AttentionConfig& config, int64_t num_heads, int64_t sequence,
                          const std::vector<TokenRange>& ranges) {
  const ChunkStreams streams(ring_keys(config), core_options(config, false), num_heads, sequence);
  for (const TokenRange& range : ranges)
    if (!streams.holds_whole_segments(range.start, range.length)) return false;
  return true;
}

namespace {

// A range of the sequence held by a rank: tokens [start, start + length) at row `local` of its tensors.
struct Piece {
  int64_t start = 0, length = 0, local = 0;
};

std::vector<Piece> pieces_of(const std::vector<TokenRange>& ranges) {
  std::vector<Piece> out;
  int64_t local = 0;
  for (const TokenRange& range : ranges) {
    out.push_back({range.start, range.length, local});
    local += range.length;
  }
  return out;
}

// Everything every rank knows about one ring call: which tokens each rank holds and, for every
// pair of ranks, whether their chunks meet (plain index arithmetic, the same on every rank).
class RingPlan {
 public:
  RingPlan(const AttentionConfig& config, int64_t num_heads, int64_t n, std::vector<std::vector<Piece>> pieces)
      : pieces_(std::move(pieces)),
        streams_((validate_inner(config, num_heads, "attention 'ring'"), ring_keys(config)),
                 core_options(config, false), num_heads, n) {
    // At step j of the ring every rank r meets chunk r - j (mod P), at distance j. A distance is
    // needed when some rank has work with the chunk that far away. Chunks travel one way for the
    // distances 1..up and the other way for P-1, ..., P-down, with the fewest steps in all.
    const int64_t p = ranks();
    std::vector<bool> needed(static_cast<size_t>(p), false);
    for (int64_t j = 1; j < p; ++j)
      for (int64_t r = 0; r < p && !needed[static_cast<size_t>(j)]; ++r)
        needed[static_cast<size_t>(j)] = meets(r, (r - j + p) % p);
    int64_t best = p;
    for (int64_t up = p - 1; up >= 0; --up) {
      int64_t down = 0;
      for (int64_t j = up + 1; j < p; ++j)
        if (needed[static_cast<size_t>(j)]) down = std::max(down, p - j);
      if (up + down < best) {
        best = up + down;
        up_steps_ = up;
        down_steps_ = down;
      }
    }
  }

  int64_t ranks() const { return static_cast<int64_t>(pieces_.size()); }
  const std::vector<Piece>& pieces(int64_t rank) const { return pieces_[static_cast<size_t>(rank)]; }
  int64_t length(int64_t rank) const {
    int64_t n = 0;
    for (const Piece& piece : pieces(rank)) n += piece.length;
    return n;
  }
  // Steps in which chunks come from lower ranks (distances 1..up) and from higher ranks (P-1, ...).
  int64_t up_steps() const { return up_steps_; }
  int64_t down_steps() const { return down_steps_; }
  const ChunkStreams& streams() const { return streams_; }

  // Whether some query of rank q_rank sees some key of rank k_rank.
  bool meets(int64_t q_rank, int64_t k_rank) const {
    for (const Piece& qp : pieces(q_rank))
      for (const Piece& kp : pieces(k_rank))
        if (!streams_.blocks(qp.start, qp.length, kp.start, kp.length).empty()) return true;
    return false;
  }

 private:
  std::vector<std::vector<Piece>> pieces_;
  ChunkStreams streams_;
  int64_t up_steps_ = 0, down_steps_ = 0;
};

// The rank-local tensors of one ring call, token-major (B, n, H, D): in the input dtype for the
// fused kernels, in the compute dtype for the composed path.
struct Chunk {
  Tensor q, k, v;
};

struct Partial {
  Tensor u;    // (B, n, H, D) attention output before the head_groups 1/G scale, compute dtype
  Tensor lse;  // (B, H, n), compute dtype
};

struct Grads {
  Tensor dq, dk, dv;  // (B, n, H, D), compute dtype
};

Shape chunk_shape(const Tensor& like, int64_t length) { return {like.size(0), length, like.size(2), like.size(3)}; }

// The two passes of the ring: chunks of lower ranks arrive from r - 1 (direction +1), those of
// higher ranks from r + 1 (direction -1). Step j of a pass brings chunk r - direction * j (mod P).
struct RingPass {
  int64_t direction;
  int64_t steps;
  const RingTags* tags;
};

std::vector<RingPass> ring_passes(const RingPlan& plan) {
  return {{+1, plan.up_steps(), &kUpTags}, {-1, plan.down_steps(), &kDownTags}};
}

int64_t ring_peer(int64_t rank, int64_t offset, int64_t p) { return ((rank + offset) % p + p) % p; }

using Pending = std::unique_ptr<dist::Communicator::PendingRecv>;

// Sends `tensor` one step along the pass and starts receiving chunk `arriving`'s tensor of the same kind.
Pending pass_on(dist::Communicator& comm, const RingPlan& plan, const RingPass& pass, const Tensor& tensor,
                int64_t arriving, int tag) {
  const int64_t p = comm.size(), r = comm.rank();
  return comm.exchange(tensor, static_cast<int>(ring_peer(r, pass.direction, p)),
                       chunk_shape(tensor, plan.length(arriving)), tensor.dtype(), tensor.device(),
                       static_cast<int>(ring_peer(r, -pass.direction, p)), tag);
}

// This rank's queries against rank s's chunk (k, v), every pair of pieces.
template <typename PairFn>
void for_each_pair(const RingPlan& plan, int64_t r, int64_t s, PairFn fn) {
  for (const Piece& qp : plan.pieces(r))
    for (const Piece& kp : plan.pieces(s)) fn(qp, kp);
}

// This rank's forward: K/V travel the ring, partial results merge by lse. Runs without grad.
Partial ring_forward(dist::Communicator& comm, const RingPlan& plan, const Chunk& x, const ChunkCompute& compute) {
  NoGradGuard no_grad;
  const int64_t p = comm.size(), r = comm.rank();
  LT_ASSERT(p == plan.ranks(), "communicator size ", p, " vs plan ", plan.ranks());
  const DType work = compute_dtype(x.q.dtype());
  const Tensor& q = x.q;
  Partial out{Tensor::zeros(q.shape(), work, q.device()),
              Tensor::full({q.size(0), q.size(2), q.size(1)}, kNegInf, work, q.device())};
  auto attend = [&](int64_t s, const Tensor& kc, const Tensor& vc) {
    for_each_pair(plan, r, s, [&](const Piece& qp, const Piece& kp) {
      chunk_attention_forward(plan.streams(), qp.start, kp.start, q.narrow(1, qp.local, qp.length),
                              kc.narrow(1, kp.local, kp.length), vc.narrow(1, kp.local, kp.length), compute,
                              out.u.narrow(1, qp.local, qp.length), out.lse.narrow(2, qp.local, qp.length));
    });
  };
  // The first chunk of each pass is on its way while this rank attends to its own.
  const std::vector<RingPass> passes = ring_passes(plan);
  std::vector<std::pair<Pending, Pending>> next(passes.size());
  for (size_t i = 0; i < passes.size(); ++i) {
    if (passes[i].steps == 0) continue;
    const int64_t s = ring_peer(r, -passes[i].direction, p);
    next[i] = {pass_on(comm, plan, passes[i], x.k, s, passes[i].tags->k),
               pass_on(comm, plan, passes[i], x.v, s, passes[i].tags->v)};
  }
  attend(r, x.k, x.v);
  for (size_t i = 0; i < passes.size(); ++i) {
    const RingPass& pass = passes[i];
    for (int64_t j = 1; j <= pass.steps; ++j) {
      const int64_t s = ring_peer(r, -pass.direction * j, p);
      const Tensor kc = next[i].first->wait(), vc = next[i].second->wait();
      if (j < pass.steps) {
        const int64_t after = ring_peer(r, -pass.direction * (j + 1), p);
        next[i] = {pass_on(comm, plan, pass, kc, after, pass.tags->k), pass_on(comm, plan, pass, vc, after, pass.tags->v)};
      }
      attend(s, kc, vc);
    }
  }
  return out;
}

// This rank's backward: K/V travel the ring again, ahead of dK/dV buffers that each rank adds its
// share to and passes on; at the end of each pass the buffers go straight back to their owner.
// du is the gradient of u (the 1/G scale already applied; in the chunk dtype), delta =
// rowsum(du * u) - dlse.
Grads ring_backward(dist::Communicator& comm, const RingPlan& plan, const Chunk& x, const Tensor& du,
                    const Tensor& lse, const Tensor& delta, const ChunkCompute& compute) {
  NoGradGuard no_grad;
  const int64_t p = comm.size(), r = comm.rank();
  LT_ASSERT(p == plan.ranks(), "communicator size ", p, " vs plan ", plan.ranks());
  const DType work = compute_dtype(x.q.dtype());
  const Device device = x.q.device();
  Grads grads{Tensor::zeros(x.q.shape(), work, device), Tensor::zeros(x.k.shape(), work, device),
              Tensor::zeros(x.v.shape(), work, device)};
  auto attend = [&](int64_t s, const Tensor& kc, const Tensor& vc, const Tensor& dkc, const Tensor& dvc) {
    for_each_pair(plan, r, s, [&](const Piece& qp, const Piece& kp) {
      chunk_attention_backward(plan.streams(), qp.start, kp.start, x.q.narrow(1, qp.local, qp.length),
                               kc.narrow(1, kp.local, kp.length), vc.narrow(1, kp.local, kp.length),
                               du.narrow(1, qp.local, qp.length), lse.narrow(2, qp.local, qp.length),
                               delta.narrow(2, qp.local, qp.length), compute, grads.dq.narrow(1, qp.local, qp.length),
                               dkc.narrow(1, kp.local, kp.length), dvc.narrow(1, kp.local, kp.length));
    });
  };
  const std::vector<RingPass> passes = ring_passes(plan);
  std::vector<std::pair<Pending, Pending>> next(passes.size());
  for (size_t i = 0; i < passes.size(); ++i) {
    if (passes[i].steps == 0) continue;
    const int64_t s = ring_peer(r, -passes[i].direction, p);
    next[i] = {pass_on(comm, plan, passes[i], x.k, s, passes[i].tags->bwd_k),
               pass_on(comm, plan, passes[i], x.v, s, passes[i].tags->bwd_v)};
  }
  attend(r, x.k, x.v, grads.dk, grads.dv);
  for (size_t i = 0; i < passes.size(); ++i) {
    const RingPass& pass = passes[i];
    if (pass.steps == 0) continue;
    Tensor dkc, dvc;
    std::pair<Pending, Pending> next_grads;
    for (int64_t j = 1; j <= pass.steps; ++j) {
      const int64_t s = ring_peer(r, -pass.direction * j, p);
      const Tensor kc = next[i].first->wait(), vc = next[i].second->wait();
      if (j < pass.steps) {
        const int64_t after = ring_peer(r, -pass.direction * (j + 1), p);
        next[i] = {pass_on(comm, plan, pass, kc, after, pass.tags->bwd_k),
                   pass_on(comm, plan, pass, vc, after, pass.tags->bwd_v)};
      }
      // The first rank to meet a chunk starts its buffers; later ones receive them.
      if (j == 1) {
        dkc = Tensor::zeros(chunk_shape(grads.dk, plan.length(s)), work, device);
        dvc = Tensor::zeros(chunk_shape(grads.dv, plan.length(s)), work, device);
      } else {
        dkc = next_grads.first->wait();
        dvc = next_grads.second->wait();
      }
      attend(s, kc, vc, dkc, dvc);
      if (j < pass.steps) {
        const int64_t after = ring_peer(r, -pass.direction * (j + 1), p);
        next_grads = {pass_on(comm, plan, pass, dkc, after, pass.tags->dk),
                      pass_on(comm, plan, pass, dvc, after, pass.tags->dv)};
      }
    }
    // This rank holds the buffers of chunk r - direction * steps; its own are `steps` ranks ahead.
    const int owner = static_cast<int>(ring_peer(r, -pass.direction * pass.steps, p));
    const int holder = static_cast<int>(ring_peer(r, pass.direction * pass.steps, p));
    Pending back_k = comm.exchange(dkc, owner, grads.dk.shape(), work, device, holder, pass.tags->return_dk);
    Pending back_v = comm.exchange(dvc, owner, grads.dv.shape(), work, device, holder, pass.tags->return_dv);
    grads.dk = add(grads.dk, back_k->wait());
    grads.dv = add(grads.dv, back_v->wait());
  }
  return grads;
}

void check_ring_inputs(const AttentionConfig& config, const Tensor& q, const Tensor& k, const Tensor& v,
                       const char* who) {
  check_qkv_shards(q, k, v, who);
  LT_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(), who,
           ": q, k and v must share one floating dtype, got q ", describe(q), ", k ", describe(k), ", v ",
           describe(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(), who, ": q, k and v must be on one device, got q ",
           describe(q), ", k ", describe(k), ", v ", describe(v));
  LT_CHECK(q.size(2) == config.num_heads && q.size(3) == config.head_dim, who, ": expected ", config.num_heads,
           " heads of dim ", config.head_dim, " (config), got q ", describe(q));
  LT_CHECK(q.size(0) > 0 && q.size(1) > 0, who, ": batch and sequence must be non-empty, got q ", describe(q));
}

// How this call computes its blocks: config.impl through the one selector, asked about q.
ChunkCompute chunk_compute(const AttentionConfig& config, const Tensor& q, fused::Selection* selection = nullptr) {
  const fused::Selection s = select_chunk_core(q, core_options(config, false));
  if (selection) *selection = s;
  return {s.fused(), g_score_budget.load()};
}

// The rank-local tensors the blocks read: detached, token-major, contiguous; the compute dtype on
// the composed path.
Tensor chunk_input(const Tensor& x, const ChunkCompute& compute) {
  NoGradGuard no_grad;
  Tensor d = x.detach();
  return (compute.fused ? d : d.to(compute_dtype(x.dtype()))).contiguous();
}

// out = u * out_scale in the input dtype.
Tensor output_of(const RingPlan& plan, const Tensor& u, DType dtype) {
  NoGradGuard no_grad;
  const double scale = plan.streams().out_scale();
  return (scale == 1.0 ? u : mul(u, scale)).to(dtype);
}

// The backward inputs from the gradients of out and lse: du (times out_scale, in the chunks'
// dtype) and delta = rowsum(du * u) - dlse (compute dtype, (B, H, n)).
std::pair<Tensor, Tensor> backward_inputs(const RingPlan& plan, const Tensor& u, const Tensor& dout,
                                          const Tensor& dlse, DType chunk_dtype) {
  NoGradGuard no_grad;
  const DType work = u.dtype();
  const double scale = plan.streams().out_scale();
  Tensor du = dout.defined() ? dout.to(work) : Tensor::zeros(u.shape(), work, u.device());
  if (scale != 1.0) du = mul(du, scale);
  Tensor delta = sum(mul(du, u), {-1}).permute({0, 2, 1});
  if (dlse.defined()) delta = sub(delta, dlse.to(work));
  return {du.to(chunk_dtype).contiguous(), delta.contiguous()};
}

// The pieces of every rank for a sequence of n tokens.
std::vector<std::vector<Piece>> layout_pieces(int64_t n, int64_t ranks, RingLayout layout) {
  std::vector<std::vector<Piece>> out;
  for (int64_t r = 0; r < ranks; ++r) out.push_back(pieces_of(ring_token_ranges(n, ranks, r, layout)));
  return out;
}

// ---- the local path ----

std::mutex g_last_run_mutex;
RingRun g_last_run;

// Records what a ring call ran: the key set of its one fused call per piece on the local path;
// dense problems over stream blocks otherwise.
void note_run(const RingPlan& plan, const AttentionConfig& config, bool local) {
  std::lock_guard<std::mutex> lock(g_last_run_mutex);
  g_last_run = {local, local ? ring_keys(config).kind : fused::KeySet::dense, plan.up_steps(), plan.down_steps()};
}

// Whether no query meets a key of another piece: no chunk travels, and every piece of every rank
// holds whole segments, so each piece is exactly the key set's problem on its own tokens.
bool local_only(const RingPlan& plan) {
  if (plan.up_steps() != 0 || plan.down_steps() != 0) return false;
  for (int64_t r = 0; r < plan.ranks(); ++r)
    for (const Piece& piece : plan.pieces(r))
      if (!plan.streams().holds_whole_segments(piece.start, piece.length)) return false;
  return true;
}

// The attention core once on this rank's tensors q, k, v with the sequence's key set, or nothing
// when that is not this rank's share or the selector refuses it. With every piece holding whole
// segments, the pieces one after another (as the tensors hold them) are whole segments from the
// first row when each piece but the last has a length that every segment divides; the key set on
// the tensors is then exactly the union of the pieces' problems. Differentiable through the
// core's own node: out in the input dtype, no accumulators, no conversions.
std::optional<AttentionOutput> local_attention(const RingPlan& plan, const AttentionConfig& config,
                                               const std::vector<Piece>& pieces, const Tensor& q, const Tensor& k,
                                               const Tensor& v) {
  for (size_t i = 0; i + 1 < pieces.size(); ++i)
    if (!plan.streams().holds_whole_segments(0, pieces[i].length)) return std::nullopt;
  const CoreKeys keys = ring_keys(config);
  const CoreOptions options = core_options(config, false);
  if (!select_core(q, k, v, keys, options).fused()) return std::nullopt;
  return fused_attention(q, k, v, keys, options);
}

}  // namespace

void check_qkv_shards(const Tensor& q, const Tensor& k, const Tensor& v, const char* who) {
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4, who,
           ": q, k and v must be defined 4-d (batch, sequence, heads, head_dim) tensors, got q ", describe(q), ", k ",
           describe(k), ", v ", describe(v));
  LT_CHECK(k.shape() == q.shape() && v.shape() == q.shape(), who,
           ": q, k and v must have one shape (self-attention over one sharded sequence), got q ", describe(q), ", k ",
           describe(k), ", v ", describe(v));
}

RingRun last_ring_run() {
  std::lock_guard<std::mutex> lock(g_last_run_mutex);
  return g_last_run;
}

int64_t set_ring_score_budget(int64_t elements) {
  LT_CHECK(elements >= 1, "set_ring_score_budget: expected at least 1 element, got ", elements);
  return g_score_budget.exchange(elements);
}

AttentionOutput ring_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                               const Tensor& k, const Tensor& v) {
  check_ring_inputs(config, q, k, v, "ring_attention");
  const RingLayout layout = parse_ring_layout(config.ring_layout);
  // Every rank learns every rank's length, so all of them agree on the plan.
  std::vector<int64_t> lengths;
  int64_t n = 0;
  for (const int64_t len : comm.all_gather_sizes(q.size(1))) {
    LT_CHECK(len >= 1, "ring_attention: every rank needs at least one token");
    lengths.push_back(len);
    n += len;
  }
  std::vector<std::vector<Piece>> pieces;
  if (layout == RingLayout::contiguous) {
    int64_t start = 0;
    for (int64_t len : lengths) {
      pieces.push_back({{start, len, 0}});
      start += len;
    }
  } else {
    pieces = layout_pieces(n, comm.size(), layout);
    for (int64_t r = 0; r < comm.size(); ++r) {
      int64_t expected = 0;
      for (const Piece& piece : pieces[static_cast<size_t>(r)]) expected += piece.length;
      LT_CHECK(lengths[static_cast<size_t>(r)] == expected, "ring_attention (zigzag layout): rank ", r, " holds ",
               lengths[static_cast<size_t>(r)], " tokens, expected ", expected,
               " (chunks r and 2P-1-r of 2P of the ", n, "-token sequence; see ring_shard)");
    }
  }
  auto plan = std::make_shared<const RingPlan>(config, q.size(2), n, std::move(pieces));
  if (local_only(*plan)) {
    if (std::optional<AttentionOutput> local = local_attention(*plan, config, plan->pieces(comm.rank()), q, k, v)) {
      note_run(*plan, config, true);
      return *local;
    }
  }
  note_run(*plan, config, false);
  const ChunkCompute compute = chunk_compute(config, q);
  const DType in_dtype = q.dtype();
  const Chunk x{chunk_input(q, compute), chunk_input(k, compute), chunk_input(v, compute)};
  Partial fwd = ring_forward(comm, *plan, x, compute);
  Tensor out = output_of(*plan, fwd.u, in_dtype);
  Tensor lse = fwd.lse.detach();
  if (autograd::any_requires_grad({q, k, v})) {
    std::shared_ptr<dist::Communicator> keep = dist::keep_alive(comm);
    const Tensor u = fwd.u, lse_saved = fwd.lse;
    autograd::record("ring_attention", {q, k, v}, {out, lse},
                     [keep, plan, x, u, lse_saved, compute, in_dtype](const std::vector<Tensor>& g) {
                       auto [du, delta] = backward_inputs(*plan, u, g[0], g[1], x.q.dtype());
                       Grads d = ring_backward(*keep, *plan, x, du, lse_saved, delta, compute);
                       return std::vector<Tensor>{d.dq.to(in_dtype), d.dk.to(in_dtype), d.dv.to(in_dtype)};
                     });
  }
  return {out, lse};
}

RingAttention::RingAttention(AttentionConfig config) : Attention(std::move(config)) {
  validate_core_config(config_, "ring");
  LT_CHECK(config_.ranks >= 1, "attention 'ring': ranks must be >= 1, got ", config_.ranks);
  validate_inner(config_, config_.num_heads, "attention 'ring'");
  parse_impl(config_.impl);
}

AttentionOutput RingAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(!(is_training() && config_.dropout > 0.0), "attention 'ring': attention dropout is not supported (dropout = ",
           config_.dropout, "); set it to 0 or use eval mode");
  if (dist::Communicator* comm = dist::current_communicator()) {
    check_ring_inputs(config_, q, k, v, "attention 'ring'");
    fused::Selection selection;
    chunk_compute(config_, q, &selection);
    note_backend(fused::backend_name(selection.backend), compute_precision(selection.backend, q.dtype()));
    return ring_attention(*comm, config_, q, k, v);
  }

  // Outside a rank: run config.ranks ranks as threads on the full tensors.
  check_ring_inputs(config_, q, k, v, "attention 'ring'");
  const int64_t ranks = config_.ranks;
  const RingLayout layout = parse_ring_layout(config_.ring_layout);
  auto plan = std::make_shared<const RingPlan>(config_, q.size(2), q.size(1), layout_pieces(q.size(1), ranks, layout));
  fused::Selection selection;
  const ChunkCompute compute = chunk_compute(config_, q, &selection);
  note_backend(fused::backend_name(selection.backend), compute_precision(selection.backend, q.dtype()));
  if (local_only(*plan)) {
    // Every rank's share at once: the full tensors are the pieces in token order.
    const std::vector<Piece> everything{Piece{0, q.size(1), 0}};
    if (std::optional<AttentionOutput> local = local_attention(*plan, config_, everything, q, k, v)) {
      note_run(*plan, config_, true);
      return *local;
    }
  }
  note_run(*plan, config_, false);
  const DType in_dtype = q.dtype();
  const Tensor qc = chunk_input(q, compute), kc = chunk_input(k, compute), vc = chunk_input(v, compute);
  auto shard = [ranks, layout](const Tensor& x, int64_t r, int64_t dim) { return ring_shard(x, dim, ranks, r, layout); };
  std::vector<Partial> parts(static_cast<size_t>(ranks));
  dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
    const int64_t r = comm.rank();
    parts[static_cast<size_t>(r)] = ring_forward(comm, *plan, {shard(qc, r, 1), shard(kc, r, 1), shard(vc, r, 1)}, compute);
  });
  Tensor u, lse;
  {
    NoGradGuard no_grad;
    u = ring_unshard(each_rank(parts, &Partial::u), 1, layout);
    lse = ring_unshard(each_rank(parts, &Partial::lse), 2, layout);
  }
  Tensor out = output_of(*plan, u, in_dtype);
  Tensor lse_out = lse.detach();
  if (autograd::any_requires_grad({q, k, v})) {
    autograd::record(
        "ring_attention", {q, k, v}, {out, lse_out},
        [plan, qc, kc, vc, u, lse, compute, in_dtype, ranks, shard, layout](const std::vector<Tensor>& g) {
          auto [du, delta] = backward_inputs(*plan, u, g[0], g[1], qc.dtype());
          std::vector<Grads> grads(static_cast<size_t>(ranks));
          dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
            const int64_t r = comm.rank();
            grads[static_cast<size_t>(r)] =
                ring_backward(comm, *plan, {shard(qc, r, 1), shard(kc, r, 1), shard(vc, r, 1)}, shard(du, r, 1),
                              shard(lse, r, 2), shard(delta, r, 2), compute);
          });
          auto join = [&](Tensor Grads::*field) {
            return ring_unshard(each_rank(grads, field), 1, layout).to(in_dtype);
          };
          return std::vector<Tensor>{join(&Grads::dq), join(&Grads::dk), join(&Grads::dv)};
        });
  }
  return {out, lse_out};
}

}  // namespace longtape::attention
