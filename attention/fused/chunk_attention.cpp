#include "attention/fused/chunk_attention.h"

#include <algorithm>
#include <limits>

#include "attention/composed.h"
#include "attention/patterns.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/backend_options.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kPosInf = std::numeric_limits<double>::infinity();
// The CUDA kernels take a batch of at most this many streams per launch.
constexpr int64_t kMaxStreamsPerCall = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

Tensor scalar_like(double value, const Tensor& like) { return Tensor::full({}, value, like.dtype(), like.device()); }

void add_into(Tensor view, const Tensor& value) { view.copy_(add(view, value.to(view.dtype()))); }

// The rows of block b in a token-major chunk x (B, n, H, D) that starts at token chunk_start: the
// strided view (B, segments, rows, heads, D). For a (B, H, n) row statistic (lse, delta): the
// view (B, segments, rows, heads). No copy.
Tensor block_rows(const Tensor& x, const StreamTask& task, const StreamBlock& b, bool queries, int64_t chunk_start) {
  const int64_t j0 = queries ? b.jq0 : b.jk0, j1 = queries ? b.jq1 : b.jk1;
  const int64_t row0 = b.t0 * task.w + task.o + task.r * j0 - chunk_start;
  const Shape& st = x.strides();
  if (x.dim() == 4)
    return make_view(x, {x.size(0), b.segments, j1 - j0, task.head_count, x.size(3)},
                     {st[0], st[1] * task.w, st[1] * task.r, st[2] * task.head_step, st[3]},
                     x.offset() + row0 * st[1] + task.head_first * st[2]);
  return make_view(x, {x.size(0), b.segments, j1 - j0, task.head_count},
                   {st[0], st[2] * task.w, st[2] * task.r, st[1] * task.head_step},
                   x.offset() + row0 * st[2] + task.head_first * st[1]);
}

// A (B, S, L, H, D) view as (B * S, L, H, D) without a copy, or undefined when the batch and
// segment strides do not form one arithmetic run.
Tensor fold_streams(const Tensor& x) {
  const Shape& st = x.strides();
  const int64_t B = x.size(0), S = x.size(1);
  if (!(B == 1 || S == 1 || st[0] == S * st[1])) return Tensor();
  return make_view(x, {B * S, x.size(2), x.size(3), x.size(4)}, {S == 1 ? st[0] : st[1], st[2], st[3], st[4]},
                   x.offset());
}

// The dense problem of one folded block: q (B', Lq, H', D), k, v (B', Lk, H', D).
fused::Problem block_problem(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal) {
  CoreOptions options;
  options.scale = scale;
  options.causal = causal;
  return describe_problem(q, k, v, CoreKeys{}, options);
}

bool run_on_cuda(const fused::Problem& p, Device device) {
  const fused::Selection s = fused::select_backend(p, device, 0.0);
  LT_CHECK(s.fused(), "chunk attention: the fused kernels cannot run a block of this chunk pair: ", s.reason);
  return s.backend == fused::Backend::cuda_fused;
}

// The groups of at most `most` segments of block b.
std::vector<StreamBlock> segment_groups(const StreamBlock& b, int64_t most) {
  if (b.segments <= most) return {b};
  std::vector<StreamBlock> out;
  for (int64_t t = 0; t < b.segments; t += most) {
    StreamBlock part = b;
    part.t0 = b.t0 + t;
    part.segments = std::min(most, b.segments - t);
    out.push_back(part);
  }
  return out;
}

// out (B, S, L, H, D) and lse (B, S, L, H) of a block merged into the accumulator views.
void merge_block(Tensor acc_out, Tensor acc_lse, const Tensor& out, const Tensor& lse) {
  const DType dtype = acc_out.dtype();
  const OutLse merged = merge_rows_by_lse({{acc_out, acc_lse}, {out.to(dtype), lse.to(dtype)}});
  acc_out.copy_(merged.out);
  acc_lse.copy_(merged.lse);
}

// ---- fused path ----

// Makes p the backward of a given delta: the kernel's delta is rowsum(dO * O) - dlse, so with O
// one zero row (read with zero strides) and dlse = -delta it is exactly the given delta. Returns
// the zero row, which must outlive the kernel call.
Tensor zero_output(fused::Problem& p, DType dtype, Device device) {
  Tensor zero_row = Tensor::zeros({p.head_dim}, dtype, device);
  p.out = zero_row.raw_data();
  p.out_stride = {0, 0, 0};
  return zero_row;
}

// The fused backward of p (lse and out set) with dout and dlse: dq, dk and dv.
GradientOutputs run_backward(const fused::Problem& p, const Tensor& dout, const Tensor& dlse, bool on_cuda) {
  fused::BackwardProblem bp;
  bp.forward = p;
  bp.deterministic = deterministic_algorithms();
  bp.dout = dout.raw_data();
  bp.dout_stride = strides_of(dout);
  bp.dlse = dlse.raw_data();
  GradientOutputs grads = attach_gradient_outputs(bp, p.dtype, dout.device());
  if (on_cuda)
    fused::cuda_backward(bp);
  else
    fused::cpu_backward(bp);
  return grads;
}

// Forward of one block on views (B, S, L, H', D) with the fused kernel, merged into acc views.
void fused_block_forward(const Tensor& q5, const Tensor& k5, const Tensor& v5, double scale, bool causal,
                         Tensor acc_out, Tensor acc_lse) {
  const Tensor q = fold_streams(q5), k = fold_streams(k5), v = fold_streams(v5);
  if (!q.defined() || !k.defined() || !v.defined()) {
    for (int64_t b = 0; b < q5.size(0); ++b)
      fused_block_forward(q5.narrow(0, b, 1), k5.narrow(0, b, 1), v5.narrow(0, b, 1), scale, causal,
                          acc_out.narrow(0, b, 1), acc_lse.narrow(0, b, 1));
    return;
  }
  fused::Problem p = block_problem(q, k, v, scale, causal);
  const auto [out, lse] = attach_forward_outputs(p, q.device());
  if (run_on_cuda(p, q.device()))
    fused::cuda_forward(p);
  else
    fused::cpu_forward(p);
  const int64_t B = q5.size(0), S = q5.size(1);
  merge_block(acc_out, acc_lse, out.view({B, S, p.seq_q, p.heads, p.head_dim}),
              lse.view({B, S, p.heads, p.seq_q}).permute({0, 1, 3, 2}));
}

// Backward of one block with the fused kernel. lse5, delta5: (B, S, Lq, H') views of the final
// lse and of delta (see zero_output).
void fused_block_backward(const Tensor& q5, const Tensor& k5, const Tensor& v5, const Tensor& do5,
                          const Tensor& lse5, const Tensor& delta5, double scale, bool causal, Tensor acc_dq,
                          Tensor acc_dk, Tensor acc_dv) {
  const Tensor q = fold_streams(q5), k = fold_streams(k5), v = fold_streams(v5), dout = fold_streams(do5);
  if (!q.defined() || !k.defined() || !v.defined() || !dout.defined()) {
    for (int64_t b = 0; b < q5.size(0); ++b)
      fused_block_backward(q5.narrow(0, b, 1), k5.narrow(0, b, 1), v5.narrow(0, b, 1), do5.narrow(0, b, 1),
                           lse5.narrow(0, b, 1), delta5.narrow(0, b, 1), scale, causal, acc_dq.narrow(0, b, 1),
                           acc_dk.narrow(0, b, 1), acc_dv.narrow(0, b, 1));
    return;
  }
  fused::Problem p = block_problem(q, k, v, scale, causal);
  const int64_t B = q5.size(0), S = q5.size(1);
  const DType stat = fused_lse_dtype(q.dtype());
  // (B, S, L, H') -> contiguous (B', H', L), as the kernels read row statistics.
  auto stats = [&](const Tensor& x) {
    return x.permute({0, 1, 3, 2}).to(stat).contiguous().view({p.batch, p.heads, p.seq_q});
  };
  const Tensor lse = stats(lse5), dlse = stats(neg(delta5));
  const Tensor zero_row = zero_output(p, q.dtype(), q.device());
  p.lse = lse.raw_data();
  const auto [dq, dk, dv] = run_backward(p, dout, dlse, run_on_cuda(p, q.device()));
  add_into(acc_dq, dq.view({B, S, p.seq_q, p.heads, p.head_dim}));
  add_into(acc_dk, dk.view({B, S, p.seq_k, p.heads, p.head_dim}));
  add_into(acc_dv, dv.view({B, S, p.seq_k, p.heads, p.head_dim}));
}

// ---- a chunk against itself as one problem ----

bool one_problem(const ChunkStreams& streams, int64_t query_start, int64_t query_rows, int64_t key_start,
                 int64_t key_rows) {
  return query_start == key_start && query_rows == key_rows && streams.out_scale() == 1.0 &&
         streams.holds_whole_segments(query_start, query_rows);
}

// The key set's problem on the chunk's own tokens (segments from its first token), without outputs.
fused::Problem pair_problem(const ChunkStreams& streams, const Tensor& q, const Tensor& k, const Tensor& v) {
  CoreOptions options;
  options.scale = streams.scale();
  options.causal = streams.causal();
  return describe_problem(q, k, v, streams.keys(), options);
}

// Runs the pair as one fused call merged into the accumulators; false (nothing done) when the
// kernels cannot run it as one problem.
bool fused_pair_forward(const ChunkStreams& streams, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& acc_out, const Tensor& acc_lse) {
  fused::Problem p = pair_problem(streams, q, k, v);
  const auto [out, lse] = attach_forward_outputs(p, q.device());
  const fused::Selection selection = fused::select_backend(p, q.device(), 0.0);
  if (!selection.fused()) return false;
  if (selection.backend == fused::Backend::cuda_fused)
    fused::cuda_forward(p);
  else
    fused::cpu_forward(p);
  // Accumulators and result as (B, n, H, D) rows with (B, n, H) statistics.
  merge_block(acc_out, acc_lse.permute({0, 2, 1}), out, lse.permute({0, 2, 1}));
  return true;
}

// The backward of fused_pair_forward, added into the accumulators; false when it cannot run.
// As for a block, the kernel is given delta through dlse (see zero_output).
bool fused_pair_backward(const ChunkStreams& streams, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& dout, const Tensor& lse, const Tensor& delta, const Tensor& acc_dq,
                         const Tensor& acc_dk, const Tensor& acc_dv) {
  fused::Problem p = pair_problem(streams, q, k, v);
  const Tensor zero_row = zero_output(p, q.dtype(), q.device());
  const fused::Selection selection = fused::select_backend(p, q.device(), 0.0);
  if (!selection.fused() || dout.strides().back() != 1) return false;
  const DType stat = fused_lse_dtype(q.dtype());
  const Tensor lse_rows = lse.to(stat).contiguous(), dlse = neg(delta).to(stat).contiguous();
  p.lse = lse_rows.raw_data();
  const auto [dq, dk, dv] = run_backward(p, dout, dlse, selection.backend == fused::Backend::cuda_fused);
  add_into(acc_dq, dq);
  add_into(acc_dk, dk);
  add_into(acc_dv, dv);
  return true;
}

// ---- composed path ----

// (B, S, L, H', D) -> (B, S, H', L, D): one stream per leading index, as attend_rows takes them.
Tensor streams_major(const Tensor& x5, DType dtype) { return x5.permute({0, 1, 3, 2, 4}).to(dtype); }

// -inf above the diagonal of an L x L block (key index > query index).
Tensor causal_bias(int64_t length, DType dtype, Device device) {
  std::vector<double> bias(static_cast<size_t>(length * length), 0.0);
  for (int64_t i = 0; i < length; ++i)
    for (int64_t c = i + 1; c < length; ++c) bias[static_cast<size_t>(i * length + c)] = kNegInf;
  return Tensor::from_vector(bias, {length, length}).to(dtype).to(device);
}

void composed_block_forward(const Tensor& q5, const Tensor& k5, const Tensor& v5, double scale, bool causal,
                            Tensor acc_out, Tensor acc_lse) {
  const DType work = acc_out.dtype();
  StreamOptions options;
  options.scale = scale;
  options.causal = causal;
  options.max_score_elements = std::numeric_limits<int64_t>::max();  // the caller cut the block already
  const OutLse part = attend_rows(streams_major(q5, work), streams_major(k5, work), streams_major(v5, work), options);
  merge_block(acc_out, acc_lse, part.out.permute({0, 1, 3, 2, 4}), part.lse.permute({0, 1, 3, 2}));
}

// The flash backward of one block written with tensor ops: P = exp(S - lse) with the final lse,
// dS = P * (dP - delta).
void composed_block_backward(const Tensor& q5, const Tensor& k5, const Tensor& v5, const Tensor& do5,
                             const Tensor& lse5, const Tensor& delta5, double scale, bool causal, Tensor acc_dq,
                             Tensor acc_dk, Tensor acc_dv) {
  const DType work = acc_dq.dtype();
  const Tensor q = streams_major(q5, work), k = streams_major(k5, work), v = streams_major(v5, work);
  const Tensor g = streams_major(do5, work);
  const Tensor lse = lse5.permute({0, 1, 3, 2}).to(work), delta = delta5.permute({0, 1, 3, 2}).to(work);
  Tensor s = mul(matmul(q, k.transpose(-1, -2)), scale);
  if (causal) s = add(s, causal_bias(q.size(3), work, q.device()));
  // Rows that saw no key (final lse -inf) get P = 0.
  const Tensor lse_safe = where(eq(lse, scalar_like(kNegInf, lse)), scalar_like(kPosInf, lse), lse);
  const Tensor p = exp(sub(s, lse_safe.unsqueeze(-1)));
  const Tensor dp = matmul(g, v.transpose(-1, -2));
  const Tensor ds = mul(p, sub(dp, delta.unsqueeze(-1)));
  add_into(acc_dv.permute({0, 1, 3, 2, 4}), matmul(p.transpose(-1, -2), g));
  add_into(acc_dq.permute({0, 1, 3, 2, 4}), mul(matmul(ds, k), scale));
  add_into(acc_dk.permute({0, 1, 3, 2, 4}), mul(matmul(ds.transpose(-1, -2), q), scale));
}

void check_chunks(const ChunkStreams& streams, const Tensor& q, const Tensor& k, const Tensor& v,
                  int64_t query_start, int64_t key_start, const char* who) {
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who,
           ": q, k, v must be defined (B, n, H, D) chunks");
  LT_CHECK(k.shape() == v.shape() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) &&
               q.size(2) == streams.heads(),
           who, ": q (B, nq, H, D) and k, v (B, nk, H, D) with H = ", streams.heads(), " must agree, got q ",
           shape_str(q.shape()), ", k ", shape_str(k.shape()), ", v ", shape_str(v.shape()));
  LT_CHECK(query_start >= 0 && key_start >= 0 && query_start + q.size(1) <= streams.sequence() &&
               key_start + k.size(1) <= streams.sequence(),
           who, ": the chunks [", query_start, ", ", query_start + q.size(1), ") and [", key_start, ", ",
           key_start + k.size(1), ") must lie in the sequence of ", streams.sequence(), " tokens");
}

}  // namespace

ChunkStreams::ChunkStreams(const CoreKeys& keys, const CoreOptions& options, int64_t heads, int64_t sequence)
    : keys_(keys), n_(sequence), heads_(heads), scale_(options.scale), causal_(options.causal) {
  LT_CHECK(keys.kind == fused::KeySet::dense || keys.kind == fused::KeySet::dilated,
           "chunk attention: the key set must be dense or dilated (block lists do not split into chunks)");
  LT_CHECK(heads >= 1 && sequence >= 1, "chunk attention: expected at least one head and one token, got ", heads,
           " heads and ", sequence, " tokens");
  if (keys.kind == fused::KeySet::dense) {
    tasks_.push_back({n_, 1, 0, 0, 1, heads});
    return;
  }
  validate_branches(keys.branches);
  const int64_t total = keys.total_heads > 0 ? keys.total_heads : heads;
  const int64_t first = keys.head_offset;
  LT_CHECK(first >= 0 && first + heads <= total, "chunk attention: heads [", first, ", ", first + heads,
           ") must lie within the ", total, " heads of total_heads");
  const size_t groups = keys.branches.size();
  for (size_t i = 0; i < groups; ++i) {
    const int64_t w = effective_segment(n_, keys.branches[i].segment), r = keys.branches[i].dilation;
    if (keys.mixing == fused::BranchMixing::lse) {
      // Local heads h0, h0 + r, ... are global heads first + h0 + j r, with offset (first + h0) mod r.
      for (int64_t h0 = 0; h0 < std::min(r, heads); ++h0)
        tasks_.push_back({w, r, (first + h0) % r, h0, r, (heads - 1 - h0) / r + 1});
    } else {
      LT_CHECK(total >= static_cast<int64_t>(groups), "chunk attention: head_groups mixing needs at least as many "
               "heads as branches, got ", total, " heads and ", groups, " branches");
      // Group g: global heads [start_g, start_g + size_g), branch g, offset g mod r.
      const int g = static_cast<int>(i);
      const int64_t gs = head_group_start(g, static_cast<int>(total), static_cast<int>(groups));
      const int64_t ge = gs + head_group_sizes(static_cast<int>(total), static_cast<int>(groups))[i];
      const int64_t lo = std::max(gs, first) - first, hi = std::min(ge, first + heads) - first;
      if (lo < hi) tasks_.push_back({w, r, g % r, lo, 1, hi - lo});
    }
  }
  if (keys.mixing == fused::BranchMixing::head_groups) out_scale_ = 1.0 / static_cast<double>(groups);
}

// Queries [jq0, jq1) against keys [jk0, jk1) of one segment group: unmasked rectangles and, when
// causal, the square diagonal where the two ranges overlap (keys after every query are dropped).
void ChunkStreams::add_block(std::vector<StreamBlock>& out, size_t task, int64_t t, int64_t jq0, int64_t jq1,
                             int64_t jk0, int64_t jk1) const {
  auto push = [&](int64_t q0, int64_t q1, int64_t k0, int64_t k1, bool masked) {
    if (q0 >= q1 || k0 >= k1) return;
    if (!out.empty()) {
      StreamBlock& prev = out.back();
      if (prev.task == task && prev.t0 + prev.segments == t && prev.jq0 == q0 && prev.jq1 == q1 && prev.jk0 == k0 &&
          prev.jk1 == k1 && prev.masked == masked) {
        ++prev.segments;
        return;
      }
    }
    out.push_back({task, t, 1, q0, q1, k0, k1, masked});
  };
  if (!causal_) return push(jq0, jq1, jk0, jk1, false);
  push(jq0, jq1, jk0, std::min(jk1, jq0), false);  // keys before every query
  const int64_t lo = std::max(jq0, jk0), hi = std::min(jq1, jk1);
  push(lo, hi, lo, hi, true);                       // the diagonal
  push(hi, jq1, lo, hi, false);                     // queries after the last of those keys
}

std::vector<StreamBlock> ChunkStreams::blocks(int64_t qs, int64_t nq, int64_t ks, int64_t nk) const {
  const int64_t qe = qs + nq, ke = ks + nk;
  std::vector<StreamBlock> out;
  if (nq <= 0 || nk <= 0 || (causal_ && ks > qe - 1)) return out;  // causal: every key after every query
  for (size_t ti = 0; ti < tasks_.size(); ++ti) {
    const StreamTask& task = tasks_[ti];
    const int64_t w = task.w, r = task.r, o = task.o;
    const int64_t t_lo = std::max(qs / w, ks / w), t_hi = std::min((qe - 1) / w, (ke - 1) / w);
    for (int64_t t = t_lo; t <= t_hi; ++t) {
      const int64_t a = t * w, len = std::min(w, n_ - a);
      if (o >= len) continue;
      const int64_t stream = (len - o + r - 1) / r;
      auto index = [&](int64_t position) { return std::clamp<int64_t>(ceil_div(position - a - o, r), 0, stream); };
      add_block(out, ti, t, index(qs), index(qe), index(ks), index(ke));
    }
  }
  return out;
}

bool ChunkStreams::holds_whole_segments(int64_t start, int64_t length) const {
  const int64_t end = start + length;
  if (start < 0 || length < 1 || end > n_) return false;
  for (const StreamTask& task : tasks_)
    if (start % task.w != 0 || (end % task.w != 0 && end != n_)) return false;
  return true;
}

std::vector<StreamBlock> ChunkStreams::pieces(const StreamBlock& b, int64_t batch, int64_t budget) const {
  const StreamTask& task = tasks_[b.task];
  const int64_t lk = b.jk1 - b.jk0;
  const int64_t per_segment = batch * task.head_count * (b.jq1 - b.jq0) * lk;
  if (per_segment * b.segments <= budget) return {b};
  const int64_t group = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_segment));
  std::vector<StreamBlock> out;
  for (const StreamBlock& part : segment_groups(b, group)) {
    if (per_segment <= budget) {
      out.push_back(part);
      continue;
    }
    // Runs of queries; a diagonal's run sees the keys before it unmasked and its own square.
    const int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, batch * task.head_count * lk));
    for (int64_t a = b.jq0; a < b.jq1; a += rows) {
      const int64_t a1 = std::min(a + rows, b.jq1);
      std::vector<StreamBlock> run;
      if (b.masked) {
        add_block(run, b.task, part.t0, a, a1, b.jk0, b.jk1);
      } else {
        run.push_back({b.task, part.t0, 1, a, a1, b.jk0, b.jk1, false});
      }
      for (StreamBlock& piece : run) {
        piece.segments = part.segments;
        out.push_back(piece);
      }
    }
  }
  return out;
}

fused::Selection select_chunk_core(const Tensor& q, const CoreOptions& options) {
  CoreOptions dense = options;
  dense.causal = false;
  const fused::Selection selection = select_core(q, q, q, CoreKeys{}, dense);
  LT_CHECK(selection.fused() || options.impl != Impl::fused, "attention impl = fused cannot run this problem: ",
           selection.reason);
  return selection;
}

namespace {

// Calls part(task, b) for every piece that one call computes of every stream block that the
// (query chunk, key chunk) pair holds: whole segment groups for the fused kernels, pieces within
// the score budget for the composed path.
template <class Part>
void for_each_block_part(const ChunkStreams& streams, int64_t query_start, int64_t query_rows, int64_t key_start,
                         int64_t key_rows, int64_t batch, const ChunkCompute& compute, const Part& part) {
  for (const StreamBlock& block : streams.blocks(query_start, query_rows, key_start, key_rows)) {
    const StreamTask& task = streams.task(block.task);
    const std::vector<StreamBlock> parts = compute.fused
                                               ? segment_groups(block, std::max<int64_t>(1, kMaxStreamsPerCall / batch))
                                               : streams.pieces(block, batch, compute.score_budget);
    for (const StreamBlock& b : parts) part(task, b);
  }
}

}  // namespace

void chunk_attention_forward(const ChunkStreams& streams, int64_t query_start, int64_t key_start, const Tensor& q,
                             const Tensor& k, const Tensor& v, const ChunkCompute& compute, const Tensor& out,
                             const Tensor& lse) {
  check_chunks(streams, q, k, v, query_start, key_start, "chunk_attention_forward");
  NoGradGuard no_grad;
  if (compute.fused && one_problem(streams, query_start, q.size(1), key_start, k.size(1)) &&
      fused_pair_forward(streams, q, k, v, out, lse))
    return;
  for_each_block_part(streams, query_start, q.size(1), key_start, k.size(1), q.size(0), compute,
                      [&](const StreamTask& task, const StreamBlock& b) {
                        const Tensor q5 = block_rows(q, task, b, true, query_start),
                                     k5 = block_rows(k, task, b, false, key_start),
                                     v5 = block_rows(v, task, b, false, key_start);
                        Tensor acc_out = block_rows(out, task, b, true, query_start),
                               acc_lse = block_rows(lse, task, b, true, query_start);
                        if (compute.fused)
                          fused_block_forward(q5, k5, v5, streams.scale(), b.masked, acc_out, acc_lse);
                        else
                          composed_block_forward(q5, k5, v5, streams.scale(), b.masked, acc_out, acc_lse);
                      });
}

void chunk_attention_backward(const ChunkStreams& streams, int64_t query_start, int64_t key_start, const Tensor& q,
                              const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& lse,
                              const Tensor& delta, const ChunkCompute& compute, const Tensor& dq, const Tensor& dk,
                              const Tensor& dv) {
  check_chunks(streams, q, k, v, query_start, key_start, "chunk_attention_backward");
  NoGradGuard no_grad;
  if (compute.fused && one_problem(streams, query_start, q.size(1), key_start, k.size(1)) &&
      fused_pair_backward(streams, q, k, v, dout, lse, delta, dq, dk, dv))
    return;
  for_each_block_part(
      streams, query_start, q.size(1), key_start, k.size(1), q.size(0), compute,
      [&](const StreamTask& task, const StreamBlock& b) {
        const Tensor q5 = block_rows(q, task, b, true, query_start), k5 = block_rows(k, task, b, false, key_start),
                     v5 = block_rows(v, task, b, false, key_start), do5 = block_rows(dout, task, b, true, query_start);
        const Tensor lse5 = block_rows(lse, task, b, true, query_start),
                     delta5 = block_rows(delta, task, b, true, query_start);
        Tensor dq5 = block_rows(dq, task, b, true, query_start), dk5 = block_rows(dk, task, b, false, key_start),
               dv5 = block_rows(dv, task, b, false, key_start);
        if (compute.fused)
          fused_block_backward(q5, k5, v5, do5, lse5, delta5, streams.scale(), b.masked, dq5, dk5, dv5);
        else
          composed_block_backward(q5, k5, v5, do5, lse5, delta5, streams.scale(), b.masked, dq5, dk5, dv5);
      });
}

}  // namespace longtape::attention
