#include "attention/ring_attention.h"

#include <algorithm>
#include <utility>

#include "tensor/error.h"
#include "tensor/ops.h"

// The token layouts of the ring (attention/ring_attention.h): which tokens each rank holds, and
// the shard / unshard of whole tensors along the sequence.

namespace longtape::attention {

RingLayout parse_ring_layout(const std::string& text) {
  if (text == "contiguous") return RingLayout::contiguous;
  if (text == "zigzag") return RingLayout::zigzag;
  LT_CHECK(false, "ring_layout must be contiguous or zigzag, got \"", text, "\"");
  return RingLayout::contiguous;
}

std::string ring_layout_name(RingLayout layout) { return layout == RingLayout::zigzag ? "zigzag" : "contiguous"; }

std::vector<int64_t> sequence_chunk_starts(int64_t n, int64_t ranks) {
  LT_CHECK(ranks >= 1, "sequence parallel: expected at least 1 rank, got ", ranks);
  LT_CHECK(n >= ranks, "sequence parallel: ", ranks, " ranks need at least one token each, got a sequence of ", n);
  std::vector<int64_t> starts;
  for (int64_t r = 0; r <= ranks; ++r) starts.push_back(r * n / ranks);
  return starts;
}

std::vector<TokenRange> ring_token_ranges(int64_t n, int64_t ranks, int64_t rank, RingLayout layout) {
  LT_CHECK(rank >= 0 && rank < ranks, "ring layout: rank ", rank, " is outside [0, ", ranks, ")");
  if (layout == RingLayout::contiguous) {
    const std::vector<int64_t> starts = sequence_chunk_starts(n, ranks);
    const size_t r = static_cast<size_t>(rank);
    return {{starts[r], starts[r + 1] - starts[r]}};
  }
  LT_CHECK(n >= 2 * ranks, "ring layout zigzag: ", ranks, " ranks hold 2 chunks each and need at least ",
           2 * ranks, " tokens, got a sequence of ", n);
  const std::vector<int64_t> starts = sequence_chunk_starts(n, 2 * ranks);
  auto chunk = [&](int64_t c) {
    const size_t i = static_cast<size_t>(c);
    return TokenRange{starts[i], starts[i + 1] - starts[i]};
  };
  return {chunk(rank), chunk(2 * ranks - 1 - rank)};
}

Tensor ring_shard(const Tensor& x, int64_t dim, int64_t ranks, int64_t rank, RingLayout layout) {
  LT_CHECK(x.defined(), "ring_shard: expected a tensor, got an undefined one");
  const int64_t d = normalize_dim(dim, x.dim(), "ring_shard");
  std::vector<Tensor> parts;
  for (const TokenRange& range : ring_token_ranges(x.size(d), ranks, rank, layout))
    parts.push_back(x.narrow(d, range.start, range.length));
  return parts.size() == 1 ? parts[0].contiguous() : cat(parts, d);
}

Tensor ring_unshard(const std::vector<Tensor>& shards, int64_t dim, RingLayout layout) {
  LT_CHECK(!shards.empty() && shards[0].defined(), "ring_unshard: expected one shard per rank, got none");
  const int64_t d = normalize_dim(dim, shards[0].dim(), "ring_unshard");
  const int64_t ranks = static_cast<int64_t>(shards.size());
  int64_t n = 0;
  for (const Tensor& s : shards) {
    LT_CHECK(s.defined() && s.dim() == shards[0].dim(), "ring_unshard: every shard must be defined with ",
             shards[0].dim(), " dims, got ", describe_tensor(s));
    n += s.size(d);
  }
  std::vector<std::pair<int64_t, Tensor>> pieces;  // (first token, rows)
  for (int64_t r = 0; r < ranks; ++r) {
    const Tensor& shard = shards[static_cast<size_t>(r)];
    const std::vector<TokenRange> ranges = ring_token_ranges(n, ranks, r, layout);
    int64_t expected = 0;
    for (const TokenRange& range : ranges) expected += range.length;
    LT_CHECK(shard.size(d) == expected, "ring_unshard: rank ", r, " of ", ranks, " should hold ", expected,
             " tokens of ", n, " (", ring_layout_name(layout), " layout), got ", shard.size(d));
    int64_t local = 0;
    for (const TokenRange& range : ranges) {
      pieces.emplace_back(range.start, shard.narrow(d, local, range.length));
      local += range.length;
    }
  }
  std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Tensor> ordered;
  for (auto& [start, rows] : pieces) ordered.push_back(rows);
  return ordered.size() == 1 ? ordered[0].contiguous() : cat(ordered, d);
}

}  // namespace longtape::attention
