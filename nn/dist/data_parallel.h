#pragma once
// Data parallel training: every rank holds a replica of the model and trains on its own shard of
// the batch; after backward, the gradients are averaged over the ranks, so every replica takes
// the same optimizer step (the step of one model on the whole batch when the shards are equal and
// the loss is a mean).
#include "nn/dist/communicator.h"
#include "nn/module.h"

namespace longtape::dist {

// All-reduces (mean) the .grad of every parameter of `module`, in one flat exchange per dtype and
// device. A parameter without a gradient on some ranks counts as zero there; one without a
// gradient on every rank keeps none. Every rank must call it with the same model structure
// (checked: a different parameter count or shape throws on every rank).
void average_gradients(Communicator& comm, nn::Module& module);

// Averages the gradients of `module` over the ranks in buckets of about `bucket_bytes`, for a
// training loop that calls average() after every backward. The model structure is compared once,
// here (every rank must construct it with the same model). Buckets follow the parameters in
// reverse order (the order backward finishes them); the first holds at most `first_bucket_bytes`
// (as PyTorch's DDP: the first reduction starts after the last layers' backward instead of
// waiting for a whole bucket's worth of layers, and a model smaller than one bucket still
// overlaps some of its reduction with its backward). Each parameter gets a post-accumulate
// gradient hook (tensor/autograd/node.h): as soon as every gradient of a bucket is final, backward starts
// that bucket's all-reduce (start_all_reduce: on the NCCL group it runs on the communication
// stream beside the rest of the backward; the other groups reduce it there and then). Buckets
// start in bucket order on every rank, so the collectives match even when a rank's backward
// leaves some parameter without a gradient; average() starts whatever backward did not, waits for
// every bucket and sets each gradient to its averaged slice. Unlike average_gradients, every
// parameter gets a gradient: zero where a rank produced none. Several backwards before one
// average() (gradient accumulation) are correct too: the buckets started early are then reduced
// again from the accumulated gradients.
class GradientReducer {
 public:
  static constexpr size_t kDefaultBucketBytes = size_t{25} << 20, kDefaultFirstBucketBytes = size_t{1} << 20;
  GradientReducer(Communicator& comm, nn::Module& module, size_t bucket_bytes = kDefaultBucketBytes,
                  size_t first_bucket_bytes = kDefaultFirstBucketBytes);
  ~GradientReducer();  // removes its hooks
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  void average();
  size_t bucket_count() const { return buckets_.size(); }
  // How many buckets the backward before the last average() started (the rest started in average()).
  size_t buckets_started_in_backward() const { return last_started_in_backward_; }

 private:
  void gradient_ready(size_t param);
  void start_bucket(size_t bucket);
  void reset_round();

  Communicator& comm_;
  std::vector<Tensor> params_;
  std::vector<std::vector<size_t>> buckets_;  // indices into params_
  std::vector<size_t> bucket_of_;             // per parameter
  std::vector<size_t> hooked_in_bucket_;      // parameters with a hook (those that require grad), per bucket
  std::vector<uint64_t> hook_ids_;            // per parameter, 0 = none
  // This round (the backwards since the last average()):
  std::vector<bool> ready_;                   // per parameter: its gradient is final
  std::vector<size_t> ready_in_bucket_;
  std::vector<std::unique_ptr<Communicator::PendingReduce>> pending_;  // per started bucket
  size_t next_bucket_ = 0;                    // buckets start in order: [0, next_bucket_) have
  bool stale_ = false;                        // a started bucket's gradient changed again
  size_t started_in_backward_ = 0, last_started_in_backward_ = 0;
};

// Copies rank `root`'s parameters and buffers to every rank (identical replicas before training).
void broadcast_parameters(Communicator& comm, nn::Module& module, int root = 0);

}  // namespace longtape::dist
