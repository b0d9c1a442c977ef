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
//   token chunks  K steps, each running the core on N / K tokens with all H/P heads, in one of two
//                 layouts (AttentionConfig::token_chunk_layout):
//                   one_rank    each rank cuts its tokens into K / P chunks; every step runs each
//                               rank's core on one chunk of one rank, its own chunks first and
//                               last (the first core waits for no transfer and reads its rows in
//                               place, the last sends nothing back); K a multiple of P, or P + 1:
//                               one chunk per rank, its own rank taking it in two halves (N / 2P
//                               tokens), first and last;
//                   every_rank  each rank cuts its tokens into K chunks; step g runs the core on
//                               chunk g of every rank.
//                 Only for dilated attention whose segments never cross a chunk (every segment
//                 length divides the chunk, equal shards, no attention dropout in training), where
//                 those tokens alone give exactly their rows of the full result; automatic where
//                 that holds (every_rank: 4 steps or fewer; one_rank: P m steps with the most
//                 chunks per rank m <= max(1, 4 / P); every run of one rank's tokens at least 2 of
//                 the widest segments); one_rank falls back to every_rank where it does not hold.
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
  int64_t token_chunks = 1;     // the pipeline's steps over token chunks
  std::string chunk_layout;     // theirs: one_rank or every_rank (empty without token chunks)
};
HeadParallelRun last_head_parallel_run();

// The token chunk steps that config.token_chunks = 0 picks in config.token_chunk_layout for `ranks`
// ranks of `length` tokens each: the most steps up to 4 (for one_rank: the most multiples of the
// ranks up to max(4, ranks)) whose chunks are at least 2 of the widest segments long and hold
// whole segments (see above); 1 when none does. `training` as for the call.
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
