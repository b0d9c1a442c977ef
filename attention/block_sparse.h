#pragma once
// Block-sparse attention (docs/attention.md, block-sparse) on the composed path. The sequence is
// cut into blocks of `block_size` tokens (the last one may be shorter); a pattern lists, for every
// query block I, the key blocks J it attends to. Each query row takes ONE softmax over all keys of
// all its active blocks (joint normalisation), causal masking works by position inside blocks, and
// a row that sees no key gives O = 0 and lse = -inf with no NaN in the forward or the backward.
//
// How it is computed: query blocks are grouped by their number of active key blocks c. For a chunk
// of R query blocks with c key blocks each, the c key (and value) blocks of every query block are
// gathered with one index_select into (R, c * block_size, D), and one batched matmul gives the
// (R, block_size, c * block_size) scores. Memory therefore grows with the number of active block
// pairs (about pairs * block_size * (2 * block_size + 2 * D) values kept for backward), not N^2,
// and no padding slots are formed.
//
// schedule = hilbert: the block pairs are ranked along hilbert_block_schedule, and query blocks are
// processed in the order of the mean rank of their pairs (so one chunk covers a compact stretch of
// the curve over the (I, J) grid and neighbouring chunks share key blocks). The joint softmax needs
// all key blocks of a query block at once, so the unit of work stays the query block: the schedule
// decides which query blocks are computed together and in which order. Inside a query block the key blocks are
// always in ascending order, and every chunk has the same shape under both schedules, so each row
// is computed by exactly the same arithmetic: the output and lse are bitwise identical to the
// natural schedule (on the CPU every batch entry of a GEMM and every softmax row is computed
// independently of its neighbours). Gradients of k and v are sums over chunks whose order differs,
// so they agree to float rounding, not bit for bit. Dropout (training only) draws per chunk, so
// with dropout > 0 the two schedules differ.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/config.h"
#include "attention/patterns.h"
#include "tensor/tensor.h"

namespace longtape::attention {

struct BlockSparseOptions {
  int64_t block_size = 64;
  double scale = 1.0;
  bool causal = false;           // key position <= query position, applied inside blocks
  bool hilbert_schedule = false;  // process query blocks in Hilbert order (same output)
  double dropout = 0.0;          // probability dropout on P (0 = none)
  // Upper bound on the score elements formed by one batched matmul; chunks of query blocks stay
  // below it (one query block is the minimum).
  int64_t max_score_elements = int64_t{1} << 22;
};

// Block-sparse softmax attention of q, k, v (B, N, H, D) (k and v may have another length Nk when
// not causal; the key blocks then index blocks of k). `patterns` holds the key-block lists of one
// shared pattern (size 1), one per head (size H) or one per (batch, head) (size B * H, index
// b * H + h); each list must have num_blocks_for(N, block_size) query blocks and key blocks in
// [0, num_blocks_for(Nk, block_size)); duplicates in a list are not allowed.
// `block_bias`, when defined, is (B, H, nq_blocks, nk_blocks) and block_bias[b, h, I, J] is added
// to the logits of every key of block J for the queries of block I (differentiable); it is only read
// at the active pairs. Returns out (B, N, H, D) in q's dtype and lse (B, H, N) (f64 for f64 inputs,
// f32 otherwise).
AttentionOutput block_sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::vector<BlockLists>& patterns,
                                       const BlockSparseOptions& options, const Tensor& block_bias = Tensor());

// The order in which query blocks are processed: 0, 1, 2, ... for the natural schedule; for the
// Hilbert schedule ascending mean rank of the block's pairs in hilbert_block_schedule(pattern)
// (ties in natural order), followed by the query blocks that have no key block. A permutation of
// 0..pattern.size()-1 either way.
std::vector<int64_t> query_block_order(const BlockLists& pattern, bool hilbert_schedule);

// The BlockPatternOptions a config describes for the fixed patterns: block_size, window,
// global_blocks, density, seed and causal copied; dilation_rates of the config are used directly as
// the block distances of the `dilated` pattern (J in {I} and I +- r for r in config.dilation_rates),
// as docs/attention.md defines it (the token-level dilated variant reads the same field as token
// strides).
BlockPatternOptions block_pattern_options(const AttentionConfig& config);

// variant "block_sparse": a fixed pattern (config.pattern = all | local_window | dilated |
// global_local | random). Reads num_heads, head_dim, causal, softmax_scale, dropout, block_size,
// window, global_blocks, density, seed, dilation_rates (for `dilated`) and schedule.
class BlockSparseAttention : public Attention {
 public:
  explicit BlockSparseAttention(AttentionConfig config);
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "block_sparse"; }
  BlockPattern pattern() const { return pattern_; }
  // The key-block lists for a sequence of n tokens: one list shared by every head (size 1), or one
  // per head (size H) for `random`, where each head draws its own blocks (head h of this module
  // draws as global head config.head_offset + h).
  std::vector<BlockLists> head_patterns(int64_t n) const;

 private:
  BlockPattern pattern_;
  std::shared_ptr<const std::vector<BlockLists>> cached_patterns_;  // head_patterns(cached_length_)
  int64_t cached_length_ = -1;
};

// Block scores of the adaptive pattern: q and k (B, N, H, D) are mean-pooled over every block
// (the last, shorter block over its real tokens), projected by scorer_q and scorer_k (D, r), and
// score[b, h, I, J] = (pooled_q W_q)[I] . (pooled_k W_k)[J] / sqrt(r). Returns (B, H, nq, nk), f64
// for f64 inputs and f32 otherwise (differentiable in q, k and both weights).
Tensor adaptive_block_scores(const Tensor& q, const Tensor& k, const Tensor& scorer_q, const Tensor& scorer_k,
                             int64_t block_size);

// Top-k selection per query block from scores (B, H, nq, nk) (read on the host, not differentiable):
// the diagonal block J = I (when it exists) is always kept, then the highest-scoring other blocks
// (ties: smaller J first) until `keep` blocks are kept; causal allows only J <= I. Returns one sorted
// list per (b, h), index b * H + h.
std::vector<BlockLists> select_top_blocks(const Tensor& scores, int64_t keep, bool causal);

// variant "block_sparse_adaptive" (also "block_sparse" with pattern = adaptive): a learned scorer
// (parameters "scorer_q" and "scorer_k", (head_dim, scorer_dim), shared by all heads) scores every
// block pair; each query block keeps its top random_blocks_per_row(num_blocks, density) blocks
// (diagonal always kept), and the kept block's score is added to the logits of its keys, so the task
// loss trains the scorer through the bias (the top-k choice itself has no gradient).
// config.pattern is ignored (the variant is the adaptive pattern); density, block_size, causal and
// schedule are read as for "block_sparse".
class AdaptiveBlockSparseAttention : public Attention {
 public:
  static constexpr int64_t kDefaultScorerDim = 16;
  explicit AdaptiveBlockSparseAttention(AttentionConfig config, int64_t scorer_dim = kDefaultScorerDim);
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "block_sparse_adaptive"; }

  // The scores (B, H, nq, nk) of q and k with the current weights, and the pattern they select.
  Tensor block_scores(const Tensor& q, const Tensor& k) const;
  std::vector<BlockLists> select(const Tensor& scores) const;
  // Blocks kept per query block for a key sequence of nk tokens.
  int64_t blocks_kept(int64_t nk) const;
  // The pattern selected by the last forward (one list per (b, h)); empty before any forward.
  const std::vector<BlockLists>& last_pattern() const { return last_pattern_; }
  const Tensor& scorer_q() const { return scorer_q_; }
  const Tensor& scorer_k() const { return scorer_k_; }

 private:
  Tensor scorer_q_, scorer_k_;
  std::vector<BlockLists> last_pattern_;
};

// The factory behind "block_sparse": the adaptive variant when config.pattern == "adaptive",
// the fixed-pattern one otherwise.
std::shared_ptr<Attention> make_block_sparse(const AttentionConfig& config);

}  // namespace longtape::attention
