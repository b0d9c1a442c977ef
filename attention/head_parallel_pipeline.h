#pragma once
// The rank-local step of head_parallel (attention/head_parallel.h) as a pipeline of steps. A step
// is a group of the rank's heads over some runs of tokens: the all-to-alls that bring its q, k, v
// (those tokens, one after another, for this rank's heads of the group) are started at once
// (Communicator::start_all_to_all; on NCCL they queue on the communication stream), so step g+1's
// are in flight while the core runs step g, which waits only for its own; step g's out and lse
// start back as soon as its core is queued and travel while the core runs step g+1. The backward
// is the same pipeline the other way, last step first: dO and the lse gradient there, dq, dk, dv
// back, around each step's core backward. With one step nothing overlaps (every all-to-all is
// waited for before the core needs it).
//
// Three kinds of steps: head groups (each a group of the heads over all tokens; any pattern) and
// token chunks, of every rank (all heads over chunk g of every rank's tokens) or of one rank (all
// heads over one chunk of one rank's tokens, the rank's own chunks first and last). Token chunks
// only where no segment of the pattern crosses a chunk, so that the core on those tokens gives
// their rows of the full-sequence result: head_parallel.h decides.
//
// Each piece is sent as a view or one copy, and what arrives is written into place with at most one
// more copy; this rank's own piece is copied into place after the transfer has started, so that
// the two overlap; the host never waits inside the pipeline.
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

// A run of one rank's tokens: [first, first + length) of rank `source`'s shard.
struct TokenPiece {
  int64_t source = 0;
  int64_t first = 0;
  int64_t length = 0;
};

// One step of the pipeline: the local heads `heads` of every rank; core[t] lists the pieces that
// rank t's core runs on, one after another (at most one piece per source rank).
struct PipelineStep {
  HeadGroup heads;
  std::vector<std::vector<TokenPiece>> core;  // one list per rank
};

// Head groups: group g's heads over all of every rank's `lengths` tokens, in rank order.
std::vector<PipelineStep> head_group_steps(const std::vector<HeadGroup>& groups, const std::vector<int64_t>& lengths);
// Token chunks of every rank: all `local_heads` heads over chunk g of `chunks` equal chunks of each
// of `ranks` ranks' `length` tokens, in rank order. Needs length % chunks == 0.
std::vector<PipelineStep> every_rank_chunk_steps(int64_t local_heads, int64_t ranks, int64_t length, int64_t chunks);
// Token chunks of one rank: each rank's `length` tokens cut into `chunks` equal chunks, and each
// step runs every rank's core on one chunk of one rank (ranks * chunks steps). Rank t takes its own
// chunk 0 first and its own last chunk last (no transfer before the first core, none after the
// last); between them, round j takes chunk j of ranks t+1, ..., t+P-1 (mod P), so that in every
// step each rank sends to one rank and receives from one. Needs length % chunks == 0.
// halve_own (one chunk per rank, of even length): rank t takes its own chunk in two halves, the
// first half first and the second last (P + 1 steps), so that the forward's last core and the
// backward's first need nothing from another rank either.
std::vector<PipelineStep> one_rank_chunk_steps(int64_t local_heads, int64_t ranks, int64_t length, int64_t chunks,
                                               bool halve_own = false);

// LONGTAPE_HEAD_PARALLEL_TIMELINE=1: head_parallel prints where each rank's step spends its time
// (read once per process).
bool head_parallel_timeline_enabled();

// Runs the pipeline on this rank's shards q, k, v (B, n_r, H, D) with H = P * local heads; every
// rank passes the same steps, whose tokens and heads cover every rank's shard and heads exactly
// once. cores[g] computes step g (told its heads' global indices) on (B, this rank's tokens of the
// step, count, D). The backward runs the steps in reverse order. A step in which every rank's core
// runs on its own tokens alone moves nothing between ranks. Returns this
// rank's out (B, n_r, H, D) and lse (B, H, n_r), differentiable with respect to q, k, v and the
// cores' trainable parameters (every rank must run the backward). `run`, when given, receives what
// ran step 0's core.
AttentionOutput pipelined_head_parallel(dist::Communicator& comm, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<PipelineStep>& steps,
                                        const std::vector<std::shared_ptr<Attention>>& cores, CoreRun* run);

}  // namespace longtape::attention
