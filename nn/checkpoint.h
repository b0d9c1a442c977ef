#pragma once
// Training checkpoints as safetensors files (readable by the Python safetensors package):
//   model tensors         under their dotted names        ("blocks.0.mlp.fc1.weight")
//   optimizer state       under "optim.<param>.<slot>"    ("optim.blocks.0.mlp.fc1.weight.exp_avg")
//   __metadata__          format, step, optimizer type and step count, lr, the default generator's
//                         (seed, offset), and any extra string pairs the caller adds.
// Files are replaced atomically (temporary file, fsync, rename), so a crash mid-save leaves the
// previous checkpoint intact. Loading validates everything before changing the model, the
// optimizer or the generator; a corrupt, truncated or mismatched file throws longtape::Error
// naming the file and the problem. Restoring the generator makes a resumed run bitwise identical
// to an uninterrupted one on the CPU (dropout masks included).
#include <cstdint>
#include <map>
#include <string>

#include "nn/module.h"
#include "nn/optim.h"

namespace longtape::nn {

constexpr const char* kCheckpointFormat = "longtape.checkpoint.v1";

struct CheckpointInfo {
  int64_t step = 0;
  std::map<std::string, std::string> metadata;  // the whole __metadata__ table
};

// `optimizer` may be null (weights only). Extra metadata keys must not shadow the reserved ones
// (format, step, optimizer, optimizer_step, lr, rng_seed, rng_offset).
void save_checkpoint(const std::string& path, const Module& model, const Optimizer* optimizer, int64_t step,
                     const std::map<std::string, std::string>& extra_metadata = {});

// Loads into an existing model (names and shapes must match exactly; dtypes are converted) and,
// when given, an optimizer of the same type over the same parameter names. With restore_rng the
// default generator continues where it was at save time.
CheckpointInfo load_checkpoint(const std::string& path, Module& model, Optimizer* optimizer = nullptr,
                               bool restore_rng = true);

// Reads and validates the file and returns its step and metadata without loading anything.
CheckpointInfo read_checkpoint_info(const std::string& path);

}  // namespace longtape::nn
