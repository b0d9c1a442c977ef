#include "attention/ring_attention.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>

#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "attention/patterns.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kPosInf = std::numeric_limits<double>::infinity();

// Point-to-point tags of the ring, per direction (FIFO per tag, so consecutive calls never mix).
struct RingTags {
  int k, v;                  // forward
  int bwd_k, bwd_v, dk, dv;  // backward, around the ring
  int return_dk, return_dv;  // backward, straight to the owner
};
constexpr RingTags kUpTags{1, 2, 3, 4, 5, 6, 7, 8};            // chunks of lower ranks, arriving from r - 1
constexpr RingTags kDownTags{11, 12, 13, 14, 15, 16, 17, 18};  // chunks of higher ranks, arriving from r + 1

// Most score elements one block forms at once (as StreamOptions::max_score_elements).
std::atomic<int64_t> g_score_budget{int64_t{1} << 22};

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

Tensor scalar_like(double value, const Tensor& like) { return Tensor::full({}, value, like.dtype(), like.device()); }

// One (branch, head offset) of the inner variant: segment w (effective), dilation r, offset o, and
// the heads that use it: first, first + step, ... (count of them), as local head indices.
struct Task {
  int64_t w = 1, r = 1, o = 0;
  int64_t head_first = 0, head_step = 1, head_count = 0;
};

// The work of one task for one (query chunk, key chunk) pair: `segments` consecutive segments
// from t0 on, in each the stream indices [jq0, jq1) as queries and [jk0, jk1) as keys (the same
// relative rows in every one of these segments). masked: some key comes after some query (causal).
struct Block {
  size_t task = 0;
  int64_t t0 = 0, segments = 0;
  int64_t jq0 = 0, jq1 = 0, jk0 = 0, jk1 = 0;
  bool masked = false;
};

// Throws unless `config` describes an inner variant the ring supports, for `num_heads` local heads.
void validate_inner(const AttentionConfig& config, int64_t num_heads, const std::string& who) {
  LT_CHECK(config.inner_variant == "dense" || config.inner_variant == "dilated", who,
           ": inner_variant must be \"dense\" or \"dilated\", got \"", config.inner_variant, "\"");
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

// Everything every rank knows about one ring call: the chunk boundaries and, for every pair of
// chunks, which stream rows meet (plain index arithmetic, the same on every rank).
class RingPlan {
 public:
  RingPlan(const AttentionConfig& config, int64_t num_heads, std::vector<int64_t> starts)
      : starts_(std::move(starts)), causal_(config.causal), scale_(config.scale()) {
    validate_inner(config, num_heads, "attention 'ring'");
    const int64_t n = starts_.back();
    if (config.inner_variant == "dense") {
      tasks_.push_back({n, 1, 0, 0, 1, num_heads});
    } else {
      const int64_t total = config.total_heads > 0 ? config.total_heads : num_heads;
      const int64_t first = config.head_offset;
      const size_t groups = config.segment_lengths.size();
      for (size_t i = 0; i < groups; ++i) {
        const int64_t w = effective_segment(n, config.segment_lengths[i]), r = config.dilation_rates[i];
        if (config.mixing == Mixing::lse) {
          // Local heads h0, h0 + r, ... are global heads first + h0 + j r, with offset (first + h0) mod r.
          for (int64_t h0 = 0; h0 < std::min(r, num_heads); ++h0)
            tasks_.push_back({w, r, (first + h0) % r, h0, r, (num_heads - 1 - h0) / r + 1});
        } else {
          // Group g: global heads [start_g, start_g + size_g), branch g, offset g mod r.
          const int g = static_cast<int>(i);
          const int64_t gs = head_group_start(g, static_cast<int>(total), static_cast<int>(groups));
          const int64_t ge = gs + head_group_sizes(static_cast<int>(total), static_cast<int>(groups))[i];
          const int64_t lo = std::max(gs, first) - first, hi = std::min(ge, first + num_heads) - first;
          if (lo < hi) tasks_.push_back({w, r, g % r, lo, 1, hi - lo});
        }
      }
      if (config.mixing == Mixing::head_groups) out_scale_ = 1.0 / static_cast<double>(groups);
    }
    // At step j of the ring every rank r meets chunk r - j (mod P), at distance j. A distance is
    // needed when some rank has work with the chunk that far away. Chunks travel one way for the
    // distances 1..up and the other way for P-1, ..., P-down, with the fewest steps in all: the
    // classic ring when every distance is needed, only the neighbours when segments barely cross
    // chunk edges, nothing when every segment lies inside a chunk.
    const int64_t p = ranks();
    std::vector<bool> needed(static_cast<size_t>(p), false);
    for (int64_t j = 1; j < p; ++j)
      for (int64_t r = 0; r < p && !needed[static_cast<size_t>(j)]; ++r)
        needed[static_cast<size_t>(j)] = !blocks(r, (r - j + p) % p).empty();
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

  int64_t ranks() const { return static_cast<int64_t>(starts_.size()) - 1; }
  int64_t start(int64_t rank) const { return starts_[static_cast<size_t>(rank)]; }
  int64_t length(int64_t rank) const { return starts_[static_cast<size_t>(rank) + 1] - start(rank); }
  // Steps in which chunks come from lower ranks (distances 1..up) and from higher ranks (P-1, ...).
  int64_t up_steps() const { return up_steps_; }
  int64_t down_steps() const { return down_steps_; }
  double scale() const { return scale_; }
  double out_scale() const { return out_scale_; }
  const Task& task(size_t i) const { return tasks_[i]; }

  std::vector<Block> blocks(int64_t query_rank, int64_t key_rank) const {
    const int64_t n = starts_.back();
    const int64_t qs = start(query_rank), qe = qs + length(query_rank);
    const int64_t ks = start(key_rank), ke = ks + length(key_rank);
    std::vector<Block> out;
    if (causal_ && ks > qe - 1) return out;  // every key comes after every query
    for (size_t ti = 0; ti < tasks_.size(); ++ti) {
      const Task& task = tasks_[ti];
      const int64_t w = task.w, r = task.r, o = task.o;
      const int64_t t_lo = std::max(qs / w, ks / w), t_hi = std::min((qe - 1) / w, (ke - 1) / w);
      for (int64_t t = t_lo; t <= t_hi; ++t) {
        const int64_t a = t * w, len = std::min(w, n - a);
        if (o >= len) continue;
        const int64_t stream = (len - o + r - 1) / r;
        auto index = [&](int64_t position) { return std::clamp<int64_t>(ceil_div(position - a - o, r), 0, stream); };
        Block b{ti, t, 1, index(qs), index(qe), index(ks), index(ke), false};
        if (b.jq0 >= b.jq1 || b.jk0 >= b.jk1) continue;
        if (causal_) {
          b.jk1 = std::min(b.jk1, b.jq1);  // keys after the last query are invisible to all
          if (b.jk0 >= b.jk1) continue;
          b.masked = b.jk1 - 1 > b.jq0;
        }
        if (!out.empty()) {
          Block& prev = out.back();
          if (prev.task == ti && prev.t0 + prev.segments == t && prev.jq0 == b.jq0 && prev.jq1 == b.jq1 &&
              prev.jk0 == b.jk0 && prev.jk1 == b.jk1 && prev.masked == b.masked) {
            ++prev.segments;
            continue;
          }
        }
        out.push_back(b);
      }
    }
    return out;
  }

  // Block b cut into pieces of at most `budget` score elements for a batch of `batch`: whole
  // segments first, then runs of queries (with a causal block's key range and mask following the
  // queries), so the transient scores stay bounded however long the chunks are.
  std::vector<Block> pieces(const Block& b, int64_t batch, int64_t budget) const {
    const Task& task = tasks_[b.task];
    const int64_t lk = b.jk1 - b.jk0;
    const int64_t per_segment = batch * task.head_count * (b.jq1 - b.jq0) * lk;
    if (per_segment * b.segments <= budget) return {b};
    std::vector<Block> out;
    const int64_t group = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_segment));
    const int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, batch * task.head_count * lk));
    for (int64_t t = 0; t < b.segments; t += group) {
      Block part = b;
      part.t0 = b.t0 + t;
      part.segments = std::min(group, b.segments - t);
      if (per_segment <= budget) {
        out.push_back(part);
        continue;
      }
      for (int64_t a = b.jq0; a < b.jq1; a += rows) {
        Block run = part;
        run.jq0 = a;
        run.jq1 = std::min(a + rows, b.jq1);
        if (causal_) {
          run.jk1 = std::min(b.jk1, run.jq1);
          if (run.jk0 >= run.jk1) continue;
          run.masked = run.jk1 - 1 > run.jq0;
        }
        out.push_back(run);
      }
    }
    return out;
  }

  // The rows of block b in a head-major tensor x (B, H, n, D) or (B, H, n) holding the chunk that
  // starts at `chunk_start`: a strided view (B, heads, segments, j1 - j0[, D]), no copy.
  Tensor view(const Tensor& x, const Block& b, bool queries, int64_t chunk_start) const {
    const Task& task = tasks_[b.task];
    const int64_t j0 = queries ? b.jq0 : b.jk0, j1 = queries ? b.jq1 : b.jk1;
    const int64_t row0 = b.t0 * task.w + task.o + task.r * j0 - chunk_start;
    const Shape& st = x.strides();
    Shape shape{x.size(0), task.head_count, b.segments, j1 - j0};
    Shape strides{st[0], st[1] * task.head_step, st[2] * task.w, st[2] * task.r};
    if (x.dim() == 4) {
      shape.push_back(x.size(3));
      strides.push_back(st[3]);
    }
    return make_view(x, shape, strides, x.offset() + task.head_first * st[1] + row0 * st[2]);
  }

  // Additive causal mask of a masked block: -inf where the key's stream index exceeds the query's.
  Tensor causal_bias(const Block& b, DType dtype, Device device) const {
    const int64_t lq = b.jq1 - b.jq0, lk = b.jk1 - b.jk0;
    std::vector<double> bias(static_cast<size_t>(lq * lk), 0.0);
    for (int64_t i = 0; i < lq; ++i)
      for (int64_t c = 0; c < lk; ++c)
        if (b.jk0 + c > b.jq0 + i) bias[static_cast<size_t>(i * lk + c)] = kNegInf;
    return Tensor::from_vector(bias, {lq, lk}).to(dtype).to(device);
  }

 private:
  std::vector<int64_t> starts_;
  bool causal_;
  double scale_;
  double out_scale_ = 1.0;
  std::vector<Task> tasks_;
  int64_t up_steps_ = 0, down_steps_ = 0;
};

// x (B, n, H, D) -> detached (B, H, n, D) in dtype, contiguous.
Tensor head_major(const Tensor& x, DType dtype) {
  NoGradGuard no_grad;
  return x.detach().to(dtype).permute({0, 2, 1, 3}).contiguous();
}

Tensor token_major(const Tensor& x) {
  NoGradGuard no_grad;
  return x.permute({0, 2, 1, 3}).contiguous();
}

void add_into(Tensor view, const Tensor& value) { view.copy_(add(view, value)); }

// Scores of a block: (B, heads, segments, Lq, Lk), causal bias added where needed.
Tensor block_scores(const RingPlan& plan, const Block& b, const Tensor& q, const Tensor& k) {
  Tensor s = mul(matmul(q, k.transpose(-1, -2)), plan.scale());
  if (b.masked) s = add(s, plan.causal_bias(b, s.dtype(), s.device()));
  return s;
}

// The partial result of one block merged by lse into the running (u, lse) of the query chunk.
void forward_block(const RingPlan& plan, const Block& b, const Tensor& qh, int64_t qs, const Tensor& kc,
                   const Tensor& vc, int64_t ks, Tensor& u, Tensor& lse) {
  Tensor q = plan.view(qh, b, true, qs), k = plan.view(kc, b, false, ks), v = plan.view(vc, b, false, ks);
  Tensor s = block_scores(plan, b, q, k);
  Tensor m = amax(s, {-1}, true);
  Tensor m_safe = where(eq(m, scalar_like(kNegInf, m)), scalar_like(0.0, m), m);
  Tensor p = exp(sub(s, m_safe));
  Tensor l = sum(p, {-1}, true);
  Tensor empty = eq(l, scalar_like(0.0, l));
  Tensor part_out = div(matmul(p, v), where(empty, scalar_like(1.0, l), l));
  Tensor part_lse = where(empty, scalar_like(kNegInf, l), add(m_safe, log(l))).squeeze(-1);

  Tensor cur_out = plan.view(u, b, true, qs), cur_lse = plan.view(lse, b, true, qs);
  Tensor top = maximum(cur_lse, part_lse);
  Tensor top_safe = where(eq(top, scalar_like(kNegInf, top)), scalar_like(0.0, top), top);
  Tensor wa = exp(sub(cur_lse, top_safe)), wb = exp(sub(part_lse, top_safe));
  Tensor total = add(wa, wb);
  Tensor none = eq(total, scalar_like(0.0, total));
  Tensor norm = where(none, scalar_like(1.0, total), total);
  Tensor merged = div(add(mul(wa.unsqueeze(-1), cur_out), mul(wb.unsqueeze(-1), part_out)), norm.unsqueeze(-1));
  Tensor merged_lse = where(none, scalar_like(kNegInf, total), add(top_safe, log(norm)));
  cur_out.copy_(merged);
  cur_lse.copy_(merged_lse);
}

// Gradients of one block with the final lse (docs/attention.md, brute-force oracle), accumulated
// into dq (query chunk) and dk, dv (key chunk). lse_safe has +inf where the final lse is -inf, so
// such rows get P = 0.
void backward_block(const RingPlan& plan, const Block& b, const Tensor& qh, const Tensor& du, const Tensor& lse_safe,
                    const Tensor& delta, int64_t qs, const Tensor& kc, const Tensor& vc, int64_t ks, Tensor& dq,
                    Tensor& dk, Tensor& dv) {
  Tensor q = plan.view(qh, b, true, qs), k = plan.view(kc, b, false, ks), v = plan.view(vc, b, false, ks);
  Tensor g = plan.view(du, b, true, qs);
  Tensor s = block_scores(plan, b, q, k);
  Tensor p = exp(sub(s, plan.view(lse_safe, b, true, qs).unsqueeze(-1)));
  add_into(plan.view(dv, b, false, ks), matmul(p.transpose(-1, -2), g));
  Tensor dp = matmul(g, v.transpose(-1, -2));
  Tensor ds = mul(p, sub(dp, plan.view(delta, b, true, qs).unsqueeze(-1)));
  add_into(plan.view(dq, b, true, qs), mul(matmul(ds, k), plan.scale()));
  add_into(plan.view(dk, b, false, ks), mul(matmul(ds.transpose(-1, -2), q), plan.scale()));
}

struct Partial {
  Tensor u;    // (B, H, n, D) attention output before the head_groups 1/G scale
  Tensor lse;  // (B, H, n)
};

struct Grads {
  Tensor dq, dk, dv;  // (B, H, n, D)
};

Shape chunk_shape(const Tensor& like, int64_t length) { return {like.size(0), like.size(1), length, like.size(3)}; }

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

// This rank's forward: K/V travel the ring, partial results merge by lse. Runs without grad.
Partial ring_forward(dist::Communicator& comm, const RingPlan& plan, const Tensor& qh, const Tensor& kh,
                     const Tensor& vh) {
  NoGradGuard no_grad;
  const int64_t p = comm.size(), r = comm.rank();
  LT_ASSERT(p == plan.ranks(), "communicator size ", p, " vs plan ", plan.ranks());
  const int64_t budget = g_score_budget.load();
  Partial out{Tensor::zeros(qh.shape(), qh.dtype(), qh.device()),
              Tensor::full({qh.size(0), qh.size(1), qh.size(2)}, kNegInf, qh.dtype(), qh.device())};
  auto attend = [&](int64_t s, const Tensor& kc, const Tensor& vc) {
    for (const Block& block : plan.blocks(r, s))
      for (const Block& b : plan.pieces(block, qh.size(0), budget))
        forward_block(plan, b, qh, plan.start(r), kc, vc, plan.start(s), out.u, out.lse);
  };
  attend(r, kh, vh);
  for (const RingPass& pass : ring_passes(plan)) {
    const int next = static_cast<int>(ring_peer(r, pass.direction, p));
    const int prev = static_cast<int>(ring_peer(r, -pass.direction, p));
    Tensor kc = kh, vc = vh;
    for (int64_t j = 1; j <= pass.steps; ++j) {
      const int64_t s = ring_peer(r, -pass.direction * j, p);
      comm.send(kc, next, pass.tags->k);
      comm.send(vc, next, pass.tags->v);
      kc = comm.recv(chunk_shape(kh, plan.length(s)), kh.dtype(), kh.device(), prev, pass.tags->k);
      vc = comm.recv(chunk_shape(vh, plan.length(s)), vh.dtype(), vh.device(), prev, pass.tags->v);
      attend(s, kc, vc);
    }
  }
  return out;
}

// This rank's backward: K/V travel the ring again with dK/dV buffers, which at the end of each pass
// go straight back to their owner. du is the gradient of u (the 1/G scale already applied), dlse
// that of lse.
Grads ring_backward(dist::Communicator& comm, const RingPlan& plan, const Tensor& qh, const Tensor& kh,
                    const Tensor& vh, const Tensor& u, const Tensor& lse, const Tensor& du, const Tensor& dlse) {
  NoGradGuard no_grad;
  const int64_t p = comm.size(), r = comm.rank();
  LT_ASSERT(p == plan.ranks(), "communicator size ", p, " vs plan ", plan.ranks());
  const int64_t budget = g_score_budget.load();
  // delta = rowsum(dO * O) - dlse: the lse gradient enters dS = P * (dP - delta) as + P * dlse.
  Tensor delta = sub(sum(mul(du, u), {-1}), dlse);
  Tensor lse_safe = where(eq(lse, scalar_like(kNegInf, lse)), scalar_like(kPosInf, lse), lse);
  Grads grads{Tensor::zeros(qh.shape(), qh.dtype(), qh.device()), Tensor::zeros(kh.shape(), kh.dtype(), kh.device()),
              Tensor::zeros(vh.shape(), vh.dtype(), vh.device())};
  auto attend = [&](int64_t s, const Tensor& kc, const Tensor& vc, Tensor& dkc, Tensor& dvc) {
    for (const Block& block : plan.blocks(r, s))
      for (const Block& b : plan.pieces(block, qh.size(0), budget))
        backward_block(plan, b, qh, du, lse_safe, delta, plan.start(r), kc, vc, plan.start(s), grads.dq, dkc, dvc);
  };
  attend(r, kh, vh, grads.dk, grads.dv);
  for (const RingPass& pass : ring_passes(plan)) {
    if (pass.steps == 0) continue;
    const int next = static_cast<int>(ring_peer(r, pass.direction, p));
    const int prev = static_cast<int>(ring_peer(r, -pass.direction, p));
    Tensor kc = kh, vc = vh;
    Tensor dkc = Tensor::zeros(kh.shape(), kh.dtype(), kh.device());
    Tensor dvc = Tensor::zeros(vh.shape(), vh.dtype(), vh.device());
    for (int64_t j = 1; j <= pass.steps; ++j) {
      const int64_t s = ring_peer(r, -pass.direction * j, p);
      comm.send(kc, next, pass.tags->bwd_k);
      comm.send(vc, next, pass.tags->bwd_v);
      comm.send(dkc, next, pass.tags->dk);
      comm.send(dvc, next, pass.tags->dv);
      const Shape shape = chunk_shape(kh, plan.length(s));
      kc = comm.recv(shape, kh.dtype(), kh.device(), prev, pass.tags->bwd_k);
      vc = comm.recv(shape, vh.dtype(), vh.device(), prev, pass.tags->bwd_v);
      dkc = comm.recv(shape, kh.dtype(), kh.device(), prev, pass.tags->dk);
      dvc = comm.recv(shape, vh.dtype(), vh.device(), prev, pass.tags->dv);
      attend(s, kc, vc, dkc, dvc);
    }
    // This rank holds the buffers of chunk r - direction * steps; its own are `steps` ranks ahead.
    const int owner = static_cast<int>(ring_peer(r, -pass.direction * pass.steps, p));
    const int holder = static_cast<int>(ring_peer(r, pass.direction * pass.steps, p));
    comm.send(dkc, owner, pass.tags->return_dk);
    comm.send(dvc, owner, pass.tags->return_dv);
    grads.dk = add(grads.dk, comm.recv(kh.shape(), kh.dtype(), kh.device(), holder, pass.tags->return_dk));
    grads.dv = add(grads.dv, comm.recv(vh.shape(), vh.dtype(), vh.device(), holder, pass.tags->return_dv));
  }
  return grads;
}

void check_ring_inputs(const AttentionConfig& config, const Tensor& q, const Tensor& k, const Tensor& v,
                       const char* who) {
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4, who,
           ": q, k and v must be defined 4-d (batch, sequence, heads, head_dim) tensors, got q ", describe(q), ", k ",
           describe(k), ", v ", describe(v));
  LT_CHECK(k.shape() == q.shape() && v.shape() == q.shape(), who,
           ": q, k and v must have one shape (self-attention over one sharded sequence), got q ", describe(q), ", k ",
           describe(k), ", v ", describe(v));
  LT_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(), who,
           ": q, k and v must share one floating dtype, got q ", describe(q), ", k ", describe(k), ", v ",
           describe(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(), who, ": q, k and v must be on one device, got q ",
           describe(q), ", k ", describe(k), ", v ", describe(v));
  LT_CHECK(q.size(2) == config.num_heads && q.size(3) == config.head_dim, who, ": expected ", config.num_heads,
           " heads of dim ", config.head_dim, " (config), got q ", describe(q));
  LT_CHECK(q.size(0) > 0 && q.size(1) > 0, who, ": batch and sequence must be non-empty, got q ", describe(q));
}

// out = token-major u * out_scale in the input dtype.
Tensor output_of(const RingPlan& plan, const Tensor& u, DType dtype) {
  NoGradGuard no_grad;
  Tensor scaled = plan.out_scale() == 1.0 ? u : mul(u, plan.out_scale());
  return token_major(scaled).to(dtype);
}

// du from the gradient of out (token-major, input dtype): head-major, compute dtype, times out_scale.
Tensor grad_of_u(const RingPlan& plan, const Tensor& dout, DType work) {
  Tensor du = head_major(dout, work);
  return plan.out_scale() == 1.0 ? du : mul(du, plan.out_scale());
}

}  // namespace

int64_t set_ring_score_budget(int64_t elements) {
  LT_CHECK(elements >= 1, "set_ring_score_budget: expected at least 1 element, got ", elements);
  return g_score_budget.exchange(elements);
}

std::vector<int64_t> sequence_chunk_starts(int64_t n, int64_t ranks) {
  LT_CHECK(ranks >= 1, "sequence parallel: expected at least 1 rank, got ", ranks);
  LT_CHECK(n >= ranks, "sequence parallel: ", ranks, " ranks need at least one token each, got a sequence of ", n);
  std::vector<int64_t> starts;
  for (int64_t r = 0; r <= ranks; ++r) starts.push_back(r * n / ranks);
  return starts;
}

AttentionOutput ring_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                               const Tensor& k, const Tensor& v) {
  check_ring_inputs(config, q, k, v, "ring_attention");
  // Every rank learns every chunk's length, so all of them agree on the plan.
  std::vector<int64_t> starts{0};
  for (const Tensor& n : comm.all_gather(Tensor::from_vector(std::vector<int64_t>{q.size(1)}, {1}))) {
    LT_CHECK(n.item() >= 1, "ring_attention: every rank needs at least one token");
    starts.push_back(starts.back() + static_cast<int64_t>(n.item()));
  }
  auto plan = std::make_shared<const RingPlan>(config, q.size(2), starts);
  const DType work = compute_dtype(q.dtype()), in_dtype = q.dtype();
  const Tensor qh = head_major(q, work), kh = head_major(k, work), vh = head_major(v, work);
  Partial fwd = ring_forward(comm, *plan, qh, kh, vh);
  Tensor out = output_of(*plan, fwd.u, in_dtype);
  Tensor lse = fwd.lse.detach();
  if (autograd::any_requires_grad({q, k, v})) {
    std::shared_ptr<dist::Communicator> keep = dist::keep_alive(comm);
    const Tensor u = fwd.u, lse_saved = fwd.lse;
    autograd::record("ring_attention", {q, k, v}, {out, lse},
                     [keep, plan, qh, kh, vh, u, lse_saved, work, in_dtype](const std::vector<Tensor>& g) {
                       Grads d = ring_backward(*keep, *plan, qh, kh, vh, u, lse_saved, grad_of_u(*plan, g[0], work),
                                               g[1].to(work));
                       return std::vector<Tensor>{token_major(d.dq).to(in_dtype), token_major(d.dk).to(in_dtype),
                                                  token_major(d.dv).to(in_dtype)};
                     });
  }
  return {out, lse};
}

RingAttention::RingAttention(AttentionConfig config) : Attention(std::move(config)) {
  validate_core_config(config_, "ring");
  LT_CHECK(config_.ranks >= 1, "attention 'ring': ranks must be >= 1, got ", config_.ranks);
  validate_inner(config_, config_.num_heads, "attention 'ring'");
}

AttentionOutput RingAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(!(is_training() && config_.dropout > 0.0), "attention 'ring': attention dropout is not supported (dropout = ",
           config_.dropout, "); set it to 0 or use eval mode");
  if (dist::Communicator* comm = dist::current_communicator()) return ring_attention(*comm, config_, q, k, v);

  // Outside a rank: run config.ranks ranks as threads on the full tensors.
  check_ring_inputs(config_, q, k, v, "attention 'ring'");
  // The ring step still runs its own composed block core (the fused core takes whole streams).
  note_backend("composed", compute_precision(fused::Backend::composed, q.dtype()));
  const int64_t ranks = config_.ranks;
  const std::vector<int64_t> starts = sequence_chunk_starts(q.size(1), ranks);
  auto plan = std::make_shared<const RingPlan>(config_, q.size(2), starts);
  const DType work = compute_dtype(q.dtype()), in_dtype = q.dtype();
  const Tensor qh = head_major(q, work), kh = head_major(k, work), vh = head_major(v, work);
  auto chunk = [starts](const Tensor& x, int64_t r) {
    return x.narrow(2, starts[static_cast<size_t>(r)], starts[static_cast<size_t>(r) + 1] - starts[static_cast<size_t>(r)])
        .contiguous();
  };
  std::vector<Partial> parts(static_cast<size_t>(ranks));
  dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
    const int64_t r = comm.rank();
    parts[static_cast<size_t>(r)] = ring_forward(comm, *plan, chunk(qh, r), chunk(kh, r), chunk(vh, r));
  });
  Tensor u, lse;
  {
    NoGradGuard no_grad;
    std::vector<Tensor> us, lses;
    for (const Partial& part : parts) {
      us.push_back(part.u);
      lses.push_back(part.lse);
    }
    u = ranks == 1 ? us[0] : cat(us, 2);
    lse = ranks == 1 ? lses[0] : cat(lses, 2);
  }
  Tensor out = output_of(*plan, u, in_dtype);
  Tensor lse_out = lse.detach();
  if (autograd::any_requires_grad({q, k, v})) {
    autograd::record(
        "ring_attention", {q, k, v}, {out, lse_out},
        [plan, qh, kh, vh, u, lse, work, in_dtype, ranks, chunk](const std::vector<Tensor>& g) {
          const Tensor du = grad_of_u(*plan, g[0], work), dlse = g[1].to(work);
          std::vector<Grads> grads(static_cast<size_t>(ranks));
          dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
            const int64_t r = comm.rank();
            // chunk() narrows dim 2: the tokens of (B, H, N, D) and of (B, H, N) alike.
            grads[static_cast<size_t>(r)] = ring_backward(comm, *plan, chunk(qh, r), chunk(kh, r), chunk(vh, r),
                                                          chunk(u, r), chunk(lse, r), chunk(du, r), chunk(dlse, r));
          });
          std::vector<Tensor> dq, dk, dv;
          for (const Grads& d : grads) {
            dq.push_back(d.dq);
            dk.push_back(d.dk);
            dv.push_back(d.dv);
          }
          auto join = [&](const std::vector<Tensor>& parts) {
            return token_major(parts.size() == 1 ? parts[0] : cat(parts, 2)).to(in_dtype);
          };
          return std::vector<Tensor>{join(dq), join(dk), join(dv)};
        });
  }
  return {out, lse_out};
}

}  // namespace longtape::attention
