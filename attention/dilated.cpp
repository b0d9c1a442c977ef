#include "attention/dilated.h"

#include <algorithm>
#include <limits>

#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Heads first, first..first + step * (count - 1), of head-major (B, H, L, D) rows.
struct HeadSet {
  int64_t first = 0;
  int64_t step = 1;
  int64_t count = 0;
  Tensor of(const Tensor& x) const {
    if (count == x.size(1)) return x;
    return x.slice(1, first, first + step * (count - 1) + 1, step);
  }
};

// One branch (segment w, dilation r) at one offset for the heads of `heads`, on head-major
// q, k, v (B, H, N, D). Returns out (B, count, N, D) and lse (B, count, N); positions outside the
// streams get out 0 and lse -inf.
OutLse branch_at_offset(const Tensor& qh, const Tensor& kh, const Tensor& vh, const HeadSet& heads,
                        const DilatedBranch& branch, int64_t offset, const StreamOptions& options) {
  const int64_t batch = qh.size(0), n = qh.size(2), dim = qh.size(3);
  const auto streams = dilated_streams(n, branch.segment, branch.dilation, offset);
  std::vector<Tensor> outs, lses;
  std::vector<int64_t> positions;
  for (size_t t = 0; t < streams.size();) {
    // Consecutive segments whose streams have the same length form one batch of streams.
    size_t end = t;
    const size_t length = streams[t].size();
    while (end < streams.size() && streams[end].size() == length) ++end;
    if (length > 0) {
      const int64_t count = static_cast<int64_t>(end - t), len = static_cast<int64_t>(length);
      std::vector<int64_t> rows;
      rows.reserve(static_cast<size_t>(count * len));
      for (size_t s = t; s < end; ++s) rows.insert(rows.end(), streams[s].begin(), streams[s].end());
      auto streams_of = [&](const Tensor& x) {
        return heads.of(gather_rows(x, 2, rows)).reshape({batch, heads.count, count, len, dim});
      };
      OutLse part = attend_rows(streams_of(qh), streams_of(kh), streams_of(vh), options);
      outs.push_back(part.out.reshape({batch, heads.count, count * len, dim}));
      lses.push_back(part.lse.reshape({batch, heads.count, count * len}));
      positions.insert(positions.end(), rows.begin(), rows.end());
    }
    t = end;
  }
  if (outs.empty())  // the offset lies beyond every segment: this branch gives these heads nothing
    return {Tensor::zeros({batch, heads.count, n, dim}, qh.dtype(), qh.device()),
            Tensor::full({batch, heads.count, n}, kNegInf, qh.dtype(), qh.device())};
  return {scatter_rows(outs, 2, positions, n, 0.0), scatter_rows(lses, 2, positions, n, kNegInf)};
}

// Concatenates per-head-set results along the head dim and restores the natural head order.
OutLse assemble_heads(const std::vector<OutLse>& pieces, const std::vector<int64_t>& order) {
  std::vector<Tensor> outs, lses;
  for (const OutLse& p : pieces) {
    outs.push_back(p.out);
    lses.push_back(p.lse);
  }
  OutLse all{outs.size() == 1 ? outs[0] : cat(outs, 1), lses.size() == 1 ? lses[0] : cat(lses, 1)};
  std::vector<int64_t> where(order.size());
  bool identity = true;
  for (size_t j = 0; j < order.size(); ++j) {
    where[static_cast<size_t>(order[j])] = static_cast<int64_t>(j);
    identity = identity && order[j] == static_cast<int64_t>(j);
  }
  if (identity) return all;
  return {gather_rows(all.out, 1, where), gather_rows(all.lse, 1, where)};
}

}  // namespace

DilatedAttention::DilatedAttention(AttentionConfig config) : Attention(std::move(config)) {
  validate_core_config(config_, "dilated");
  LT_CHECK(!config_.segment_lengths.empty(), "attention 'dilated': segment_lengths must hold at least one value");
  LT_CHECK(config_.segment_lengths.size() == config_.dilation_rates.size(),
           "attention 'dilated': segment_lengths and dilation_rates must have the same length, got ",
           config_.segment_lengths.size(), " segment lengths ", shape_str(config_.segment_lengths), " and ",
           config_.dilation_rates.size(), " dilation rates ", shape_str(config_.dilation_rates));
  for (size_t i = 0; i < config_.segment_lengths.size(); ++i)
    branches_.push_back({config_.segment_lengths[i], config_.dilation_rates[i]});
  validate_branches(branches_);
  // Heads may be a slice [head_offset, head_offset + num_heads) of total_heads (head_parallel).
  const int64_t total_heads = config_.total_heads > 0 ? config_.total_heads : config_.num_heads;
  LT_CHECK(config_.head_offset >= 0 && config_.head_offset + config_.num_heads <= total_heads,
           "attention 'dilated': heads [head_offset, head_offset + num_heads) = [", config_.head_offset, ", ",
           config_.head_offset + config_.num_heads, ") must lie within total_heads = ", total_heads);
  if (config_.mixing == Mixing::head_groups)
    LT_CHECK(total_heads >= static_cast<int64_t>(branches_.size()),
             "attention 'dilated': mixing = head_groups needs at least as many heads as branches, got num_heads = ",
             total_heads, " and ", branches_.size(), " branches");
}

AttentionOutput DilatedAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(k.size(1) == q.size(1), "attention 'dilated': q, k, v must have the same sequence length, got q ",
           shape_str(q.shape()), ", k ", shape_str(k.shape()));
  CoreKeys keys;
  keys.kind = fused::KeySet::dilated;
  keys.branches = branches_;
  keys.mixing = config_.mixing == Mixing::lse ? fused::BranchMixing::lse : fused::BranchMixing::head_groups;
  keys.head_offset = config_.head_offset;
  keys.total_heads = config_.total_heads;
  CoreRun run;
  AttentionOutput result = attention_core(q, k, v, keys, core_options(config_, is_training()),
                                          [&] { return composed_forward(q, k, v); }, run);
  note_backend(run.backend, run.precision);
  return result;
}

AttentionOutput DilatedAttention::composed_forward(const Tensor& q, const Tensor& k, const Tensor& v) {
  const DType work = compute_dtype(q.dtype());
  const int64_t num_heads = q.size(2);
  // Head-major copies, made once: every branch gathers its stream rows from them.
  auto head_major = [&](const Tensor& x) { return x.to(work).permute({0, 2, 1, 3}).contiguous(); };
  const Tensor qh = head_major(q), kh = head_major(k), vh = head_major(v);

  StreamOptions options;
  options.scale = config_.scale();
  options.causal = config_.causal;
  options.dropout = is_training() ? config_.dropout : 0.0;

  OutLse result;
  if (config_.mixing == Mixing::lse) {
    std::vector<OutLse> per_branch;
    for (const DilatedBranch& branch : branches_) {
      std::vector<OutLse> pieces;
      std::vector<int64_t> order;
      // Local heads first, first + r, ... are global heads head_offset + first + j r: one offset,
      // (head_offset + first) mod r. At most min(r, H) such sets, however large r is.
      for (int64_t first = 0; first < std::min(branch.dilation, num_heads); ++first) {
        const int64_t offset = lse_head_offset(config_.head_offset + first, branch.dilation);
        HeadSet heads{first, branch.dilation, (num_heads - first + branch.dilation - 1) / branch.dilation};
        pieces.push_back(branch_at_offset(qh, kh, vh, heads, branch, offset, options));
        for (int64_t h = first; h < num_heads; h += branch.dilation) order.push_back(h);
      }
      per_branch.push_back(assemble_heads(pieces, order));
    }
    result = merge_rows_by_lse(per_branch);
  } else {
    const int groups = static_cast<int>(branches_.size());
    // Groups are those of all total_heads heads; this module computes its slice of them.
    const int total_heads = static_cast<int>(config_.total_heads > 0 ? config_.total_heads : num_heads);
    const std::vector<int> sizes = head_group_sizes(total_heads, groups);
    std::vector<OutLse> pieces;
    std::vector<int64_t> order;
    for (int g = 0; g < groups; ++g) {
      const DilatedBranch& branch = branches_[static_cast<size_t>(g)];
      const int64_t global_first = head_group_start(g, total_heads, groups);
      const int64_t lo = std::max<int64_t>(global_first, config_.head_offset) - config_.head_offset;
      const int64_t hi = std::min<int64_t>(global_first + sizes[static_cast<size_t>(g)],
                                           config_.head_offset + num_heads) - config_.head_offset;
      if (lo >= hi) continue;
      HeadSet heads{lo, 1, hi - lo};
      OutLse piece = branch_at_offset(qh, kh, vh, heads, branch, g % branch.dilation, options);
      pieces.push_back({mul(piece.out, 1.0 / groups), piece.lse});
      for (int64_t h = heads.first; h < heads.first + heads.count; ++h) order.push_back(h);
    }
    result = assemble_heads(pieces, order);
  }
  return {result.out.permute({0, 2, 1, 3}).contiguous().to(q.dtype()), result.lse.contiguous()};
}

}  // namespace longtape::attention
