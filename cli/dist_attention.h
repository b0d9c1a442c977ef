#pragma once
// Ring and head-parallel attention over a real process group (`longtape dist-check --attention N`).
#include <cstdint>
#include <string>
#include <vector>

#include "nn/dist/process_group.h"

namespace longtape::cli {

// Every rank builds the same random q, k, v and output gradient (B=1, N, H=12, D=64; bf16 on CUDA,
// f32 on the CPU), runs ring (contiguous and zigzag layouts) and head_parallel attention over the
// group for dense and dilated lse attention (segments 2048,4096,8192, dilations 1,2,4, each capped
// at N), and compares its shard of the output and of dq, dk, dv with the same variant run on the
// whole sequence on its own device. Throws when a relative error exceeds `tolerance`. Rank 0
// prints one line per case: errors, forward+backward time on one device and over the group
// (median of `repeats` after two warm-ups), and their ratio. head_parallel runs once per entry of
// `head_groups` (its config.pipeline_groups: 0 = automatic, 1 = no overlap; token_chunks = 1) and
// once per entry of `token_chunks` and of `chunk_layouts` (config.token_chunks: 0 = automatic; head
// groups where the pattern allows no token chunks; config.token_chunk_layout), each line saying
// what ran, then one line with head_parallel's parts timed alone. `cores` picks the inner variants
// (dense, dilated).
void check_parallel_attention(dist::ProcessGroup& group, int64_t n, uint64_t seed, int repeats, double tolerance,
                              const std::vector<int64_t>& head_groups = {0},
                              const std::vector<std::string>& cores = {"dense", "dilated"},
                              const std::vector<int64_t>& token_chunks = {0},
                              const std::vector<std::string>& chunk_layouts = {"one_rank"});


}  // namespace longtape::cli
