#pragma once
// The rank-local step of head_parallel (attention/head_parallel.h) as a pipeline over groups of
// the rank's heads. The all-to-alls that bring every group's q, k, v (full sequence, the group's
// heads of every rank) are started at once (Communicator::start_all_to_all; on NCCL they queue on
// the communication stream), so group g+1's are in flight while the core runs group g, which
// waits only for its own; group g's out and lse start back as soon as its core is queued and
// travel while the core runs group g+1. The backward is the same pipeline the other way: dO and
// the lse gradient there, dq, dk, dv back, around each group's core backward. With one group
// nothing overlaps (every all-to-all is waited for before the core needs it).
//
// Each tensor is packed for sending with at most one strided copy per group, and what arrives is
// written into place with at most one more; the host never waits inside the pipeline.
#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention.h"
#include "attention/fused/fused_attention.h"
#include "nn/dist/communicator.h"

namespace longtape::attention {

// Local heads [first, first + count) of every rank: one group of the pipeline.
struct HeadGroup {
  int64_t first = 0;
  int64_t count = 0;
};

// `groups` contiguous groups of `local_heads` heads, as equal as possible (the first ones one
// head larger when they do not divide). Needs 1 <= groups <= local_heads.
std::vector<HeadGroup> split_heads(int64_t local_heads, int64_t groups);

// The group count config.pipeline_groups = 0 picks: the largest divisor of local_heads up to 4
// (so the groups are equal), else min(local_heads, 4).
int64_t automatic_pipeline_groups(int64_t local_heads);

// Runs the pipeline on this rank's shards q, k, v (B, n_r, H, D) with H = P * local heads.
// `lengths` are every rank's sequence lengths; cores[g] computes group g's heads (told their
// global indices) on (B, N, count, D). Returns this rank's out (B, n_r, H, D) and lse (B, H, n_r),
// differentiable with respect to q, k, v and the cores' trainable parameters (every rank must run
// the backward). `run`, when given, receives what ran group 0's core.
AttentionOutput pipelined_head_parallel(dist::Communicator& comm, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<int64_t>& lengths, const std::vector<HeadGroup>& groups,
                                        const std::vector<std::shared_ptr<Attention>>& cores, CoreRun* run);

}  // namespace longtape::attention
