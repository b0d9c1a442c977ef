#pragma once
// Head-parallel attention ("Ulysses"; docs/attention.md, parallel variants): the input is
// sequence-sharded, rank r holding (B, n_r, H, D). All-to-alls turn it into the full sequence for
// H/P heads, (B, N, H/P, D) with rank r holding the global heads [r*H/P, (r+1)*H/P); the inner
// variant (config.inner_variant, default "dilated") runs on them with GLOBAL head indices
// (config.head_offset and config.total_heads = H, so dilation offsets h mod r and head groups are
// those of one device; its attention core runs the fused kernels where they apply); all-to-alls
// bring out and lse back to the sequence sharding. Needs H % P == 0.
//
// The exchanges and the core run as a pipeline (attention/head_parallel_pipeline.h): the
// all-to-alls of one step travel while the core computes another, forward and backward. Its steps
// are either token chunks or head groups (AttentionConfig::token_chunks, pipeline_groups):
//   token chunks  each rank cuts its tokens into K equal chunks; step g runs the core on chunk g of
//                 every rank (P n_r / K tokens, all H/P heads). Only for dilated attention whose
//                 segments never cross a chunk (every segment length divides the chunk, equal
//                 shards, no attention dropout in training), where those tokens alone give exactly
//                 their rows of the full result; automatic where that holds (4 chunks or fewer, of
//                 at least 2 of the widest segments).
//   head groups   step g runs the core on group g of the rank's heads over the whole sequence; any
//                 pattern. Each group's core is told its global heads, so any grouping gives the
//                 one-device result. Inner variants whose result depends on the head index must
//                 honour head_offset and total_heads (dense and dilated do); an inner variant with
//                 parameters runs as one group.
// One step overlaps nothing.
#include <string>

#include "attention/attention.h"
#include "attention/fused/fused_attention.h"
#include "nn/dist/communicator.h"

namespace longtape::attention {

// Rank-local head-parallel attention: q, k, v are this rank's tokens (B, n_r, H, D), the chunks in
// rank order; returns this rank's out (B, n_r, H, D) and lse (B, H, n_r). `training` is passed to
// the inner variant. Every rank must call backward through it (see nn/dist/functional.h). `run`,
// when given, receives what ran the inner variant's core.
AttentionOutput head_parallel_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                                        const Tensor& k, const Tensor& v, bool training = false,
                                        CoreRun* run = nullptr);

// What the last head_parallel call of this process ran: its heads in `groups` pipelined groups,
// or its tokens in `token_chunks` pipelined chunks (then groups = 1); both 1: the all-to-alls do
// not overlap the core.
struct HeadParallelRun {
  int64_t groups = 0;
  int64_t token_chunks = 1;
};
HeadParallelRun last_head_parallel_run();

// The token chunk count that config.token_chunks = 0 picks for `ranks` ranks of `length` tokens
// each: the most chunks up to 4 that are at least 2 of the widest segments long and hold whole
// segments (see above); 1 when none does. `training` as for the call (attention dropout).
int64_t automatic_token_chunks(const AttentionConfig& config, int64_t ranks, int64_t length, bool training = false);

// The registered variant "head_parallel". Inside run_ranks, forward takes this rank's shards and
// uses the rank's communicator. Anywhere else it takes the full (B, N, H, D) tensors and runs
// config.ranks ranks as threads, returning the full result; its backward runs the ranks again,
// recomputing each rank's forward with autograd (so attention dropout, whose draws would differ,
// is refused there in training mode).
class HeadParallelAttention : public Attention {
 public:
  // Throws unless num_heads % ranks == 0 and the inner variant accepts the per-rank config.
  explicit HeadParallelAttention(AttentionConfig config);
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "head_parallel"; }
};

}  // namespace longtape::attention
