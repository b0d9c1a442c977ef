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
// reverse order (the order backward finishes them) and every bucket's all-reduce is issued before
// any result is read, so on the NCCL group (asynchronous for the host) the reductions overlap
// each other and the flattening of the next bucket. Unlike average_gradients, every parameter
// gets a gradient: zero where a rank produced none.
class GradientReducer {
 public:
  GradientReducer(Communicator& comm, nn::Module& module, size_t bucket_bytes = size_t{25} << 20);
  void average();
  size_t bucket_count() const { return buckets_.size(); }

 private:
  Communicator& comm_;
  std::vector<Tensor> params_;
  std::vector<std::vector<size_t>> buckets_;  // indices into params_
};

// Copies rank `root`'s parameters and buffers to every rank (identical replicas before training).
void broadcast_parameters(Communicator& comm, nn::Module& module, int root = 0);

}  // namespace longtape::dist
