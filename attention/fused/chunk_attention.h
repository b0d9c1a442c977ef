#pragma once
// Attention of one (query chunk, key chunk) pair of a sequence split into chunks, the step of
// sequence-parallel attention (attention/ring_attention.h). The queries are the tokens
// [query_start, query_start + nq) of a sequence of N tokens, the keys [key_start, key_start + nk);
// the key set (dense, or dilated with either mixing) is that of the whole sequence: segments start
// at multiples of their length from token 0, and causal compares global positions.
//
// A pair is cut into stream blocks: for one (branch, head offset), consecutive segments in which
// the same stream rows are queries and keys. Every block is ordinary attention on strided views
// of the chunks (row step = dilation, no gather), either unmasked or causal on a square diagonal
// (equal query and key rows), so the fused kernels run it as a dense problem (the CUDA kernels
// need equal lengths only when causal). The block results merge into running (out, lse)
// accumulators through merge_rows_by_lse, the lse merge of dilated lse mixing; the backward takes
// the FINAL lse and delta = rowsum(dO * O) - dlse, which is all a flash backward needs of the
// other blocks.
#include <cstdint>
#include <vector>

#include "attention/fused/fused_attention.h"
#include "tensor/tensor.h"

namespace longtape::attention {

// One (branch, head offset) of the key set: segment w (effective), dilation r, stream offset o,
// and the local heads that use it: head_first, head_first + head_step, ... (head_count of them).
struct StreamTask {
  int64_t w = 1, r = 1, o = 0;
  int64_t head_first = 0, head_step = 1, head_count = 0;
};

// The work of one task for a chunk pair: `segments` consecutive segments from t0 on, in each the
// stream indices [jq0, jq1) as queries and [jk0, jk1) as keys. masked: causal on a square
// diagonal (then jq0 == jk0 and jq1 == jk1); otherwise every query sees every key.
struct StreamBlock {
  size_t task = 0;
  int64_t t0 = 0, segments = 0;
  int64_t jq0 = 0, jq1 = 0, jk0 = 0, jk1 = 0;
  bool masked = false;
};

// The stream geometry of a key set over a sequence of N tokens, for `heads` local heads.
class ChunkStreams {
 public:
  // keys.kind is dense or dilated (blocks are refused); options gives scale and causal.
  ChunkStreams(const CoreKeys& keys, const CoreOptions& options, int64_t heads, int64_t sequence);

  // The blocks of queries [qs, qs + nq) against keys [ks, ks + nk).
  std::vector<StreamBlock> blocks(int64_t qs, int64_t nq, int64_t ks, int64_t nk) const;
  // Block b cut into pieces of at most `budget` score elements for a batch of `batch` (whole
  // segments, then query runs), each again unmasked or a square diagonal.
  std::vector<StreamBlock> pieces(const StreamBlock& b, int64_t batch, int64_t budget) const;

  // Whether tokens [start, start + length) are whole segments of every branch (segments never cross
  // its edges): then it meets no token outside itself, and the key set run on those tokens alone
  // (segments from its first token) is exactly its share of the sequence's.
  bool holds_whole_segments(int64_t start, int64_t length) const;

  // The key set the streams were made of.
  const CoreKeys& keys() const { return keys_; }
  const StreamTask& task(size_t i) const { return tasks_[i]; }
  int64_t sequence() const { return n_; }
  int64_t heads() const { return heads_; }
  double scale() const { return scale_; }
  bool causal() const { return causal_; }
  // The factor of the merged result: 1/G for head_groups mixing (each head runs one branch), else 1.
  double out_scale() const { return out_scale_; }

 private:
  void add_block(std::vector<StreamBlock>& out, size_t task, int64_t t, int64_t jq0, int64_t jq1, int64_t jk0,
                 int64_t jk1) const;

  CoreKeys keys_;
  int64_t n_ = 0, heads_ = 0;
  double scale_ = 1.0;
  bool causal_ = false;
  double out_scale_ = 1.0;
  std::vector<StreamTask> tasks_;
};

// How the blocks of a pair are computed: the fused kernels, or the composed reference in pieces of
// at most score_budget score elements.
struct ChunkCompute {
  bool fused = false;
  int64_t score_budget = int64_t{1} << 22;
};

// Which path runs the blocks of these chunk tensors (q of a chunk, (B, n, H, D)) under
// options.impl: the selector of attention_core asked about a dense block of this dtype, head dim
// and device. impl = fused on a problem the kernels cannot run throws the selector's reason.
fused::Selection select_chunk_core(const Tensor& q, const CoreOptions& options);

// A chunk against itself that holds whole segments (ChunkStreams::holds_whole_segments) is the key
// set's own problem on that chunk: the fused path runs it as one call with the dilated (or dense)
// key set instead of one call per stream block (lse mixing; with head_groups the kernels would
// scale the output and its gradient by 1/G, so those pairs run as stream blocks).
//
// Forward of one chunk pair, merged into the accumulators out (B, nq, H, D) and lse (B, H, nq)
// in place (compute dtype: f64 for f64 inputs, else f32; start from out = 0, lse = -inf).
// q (B, nq, H, D), k, v (B, nk, H, D) are views of the chunks (any strides, last dim contiguous);
// the fused path takes them in their dtype, the composed one in the accumulators' dtype. No
// autograd.
void chunk_attention_forward(const ChunkStreams& streams, int64_t query_start, int64_t key_start,
                             const Tensor& q, const Tensor& k, const Tensor& v, const ChunkCompute& compute,
                             const Tensor& out, const Tensor& lse);

// Backward of one chunk pair: with the final lse (B, H, nq), delta = rowsum(dO * O) - dlse
// (B, H, nq) and dout (B, nq, H, D) (the gradient of the merged result before out_scale times
// out_scale; in q's dtype on the fused path), ADDS the pair's share into dq (B, nq, H, D) and dk,
// dv (B, nk, H, D) (compute dtype). No autograd.
void chunk_attention_backward(const ChunkStreams& streams, int64_t query_start, int64_t key_start,
                              const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                              const Tensor& lse, const Tensor& delta, const ChunkCompute& compute,
                              const Tensor& dq, const Tensor& dk, const Tensor& dv);

}  // namespace longtape::attention
