#pragma once
// head_parallel attention run on p in-process ranks, each on its own token chunk, for the
// head_parallel tests.
#include <mutex>
#include <vector>

#include "attention/head_parallel.h"
#include "attention/ring_attention.h"
#include "nn/dist/communicator.h"
#include "support/parallel_configs.h"

namespace longtape::testing::parallel_cases {

// head_parallel_attention on each of p ranks' token chunks (sequence_chunk_starts), joined; `ran`
// (when set) receives every rank's last_head_parallel_run().
inline AttentionResults run_head_parallel_ranks(const attention::AttentionConfig& config, const AttentionInputs& in,
                                                int p, std::vector<attention::HeadParallelRun>* ran,
                                                bool training = false) {
  const std::vector<int64_t> starts = attention::sequence_chunk_starts(in.q.size(1), p);
  std::vector<AttentionResults> parts(static_cast<size_t>(p));
  std::mutex mutex;
  dist::run_ranks(p, [&](dist::Communicator& comm) {
    const size_t r = static_cast<size_t>(comm.rank());
    auto chunk = [&](const Tensor& x, int64_t dim) {
      return x.narrow(dim, starts[r], starts[r + 1] - starts[r]).contiguous();
    };
    parts[r] = run_with_gradients([&](const Tensor& q, const Tensor& k, const Tensor& v) {
      attention::AttentionOutput res = attention::head_parallel_attention(comm, config, q, k, v, training);
      std::lock_guard<std::mutex> lock(mutex);
      if (ran) ran->push_back(attention::last_head_parallel_run());
      return res;
    }, chunk(in.q, 1), chunk(in.k, 1), chunk(in.v, 1), chunk(in.dout, 1), chunk(in.dlse, 2));
  });
  return join_rank_chunks(parts);
}

}  // namespace longtape::testing::parallel_cases
