#pragma once
// Head-parallel attention ("Ulysses"; docs/attention.md, parallel variants): the input is
// sequence-sharded, rank r holding (B, n_r, H, D). All-to-alls turn it into the full sequence for
// H/P heads, (B, N, H/P, D) with rank r holding the global heads [r*H/P, (r+1)*H/P); the inner
// variant (config.inner_variant, default "dilated") runs on them with GLOBAL head indices
// (config.head_offset and config.total_heads = H, so dilation offsets h mod r and head groups are
// those of one device; its attention core runs the fused kernels where they apply); all-to-alls
// bring out and lse back to the sequence sharding. Needs H % P == 0.
//
// The rank's heads run in config.pipeline_groups groups (attention/head_parallel_pipeline.h): the
// all-to-alls of one group travel while the core computes another, forward and backward; one
// group overlaps nothing. Each group's core is told its global heads, so any grouping gives the
// one-device result. Inner variants whose result depends on the head index must honour
// head_offset and total_heads (dense and dilated do); an inner variant with parameters runs as one group.
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

// What the last head_parallel call of this process ran: its heads in `groups` pipelined groups
// (1 = the all-to-alls do not overlap the core).
struct HeadParallelRun {
  int64_t groups = 0;
};
HeadParallelRun last_head_parallel_run();

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
