#pragma once
// `longtape train --parallel data`: the process group of a job started by `longtape launch`, one
// replica of the model per rank. Every rank starts from rank 0's weights, trains on its own rows of
// each global batch (--batch rows per rank: batch i of the data set with batch * ranks rows, so
// R ranks at --batch B train on exactly what one process at --batch R*B does), averages the
// gradients over the ranks after backward (in buckets), and so takes the same step; losses and
// held-out results are averaged over the ranks. Rank 0 alone prints, writes metrics and writes
// checkpoints; every rank resumes from the same checkpoint, on the same number of ranks.
#include <memory>
#include <string>
#include <utility>

#include "nn/dist/data_parallel.h"
#include "nn/dist/process_group.h"
#include "nn/trainer.h"

namespace longtape::cli {

// --bucket-mb: (first bucket, other buckets) in bytes from "FIRST,REST" or one size for both, in
// MiB (> 0, at most 4096); throws FlagError otherwise.
std::pair<size_t, size_t> parse_bucket_mb(const std::string& text);

class DataParallelRun {
 public:
  // Joins the job's process group; `requested` says CPU or CUDA (the GPU is LOCAL_RANK's).
  explicit DataParallelRun(Device requested);

  int rank() const { return group_->comm().rank(); }
  int size() const { return group_->comm().size(); }
  bool is_writer() const { return rank() == 0; }
  Device device() const { return group_->device(); }
  const std::string& backend() const { return group_->backend(); }

  // This rank's rows of each global batch of `host_data` (a source of CPU batches), per_rank rows
  // each, on this rank's device (only those rows are uploaded). The next training batch's rows
  // are made on a worker thread during the step (LONGTAPE_DATA_PREFETCH=0: on the caller's).
  nn::BatchSource shard(nn::BatchSource host_data, int64_t per_rank) const;
  // Rank 0's weights everywhere, the gradient buckets (`bucket_mb`: --bucket-mb, "FIRST,REST" or
  // one size, MiB), and each rank's own dropout stream (keyed by seed, step and rank; rank 0
  // keeps the checkpointed one).
  void prepare(nn::Module& model, uint64_t seed, int64_t step, const std::string& bucket_mb);
  size_t bucket_count() const;
  // Averages the gradients (Trainer::on_gradients).
  void average_gradients();
  // The mean over the ranks of a per-rank scalar tensor (a loss), reduced where it lies (no
  // device read), and of held-out results.
  Tensor mean(const Tensor& value);
  nn::EvalResult combine(const nn::EvalResult& local);

 private:
  std::unique_ptr<dist::ProcessGroup> group_;
  std::unique_ptr<dist::GradientReducer> reducer_;
};

}  // namespace longtape::cli
