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

// Copies rank `root`'s parameters and buffers to every rank (identical replicas before training).
void broadcast_parameters(Communicator& comm, nn::Module& module, int root = 0);

}  // namespace longtape::dist
