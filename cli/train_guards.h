#pragma once
// Checks `longtape train` makes before it trains: sizes within the command line's limits, output
// paths that can be written, and a --resume checkpoint whose optimizer state is complete and sane;
// and the warnings a resumed run prints when its schedule differs from the saved run's.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "nn/checkpoint.h"
#include "nn/optim.h"

namespace longtape::cli {

// The flags that size the model and a training step.
struct TrainSizes {
  int64_t batch, seq_len, layers, width, heads;
  int64_t vocab;  // an upper bound: keys + values + filler + specials, or 256 bytes for --text
  bool untied;
};

// Throws FlagError when tokens per step exceed 2^40 or a rough lower bound on the memory of the
// model, its optimizer and one step's activations exceeds 1 TiB.
void check_train_sizes(const TrainSizes& s);

// Makes sure `path` (the value of `flag`) can be written before any work: creates its folder and
// creates and removes a temporary file next to it. Throws longtape::Error naming the flag, the
// path and the system's reason. An empty path is not checked.
void check_writable(const std::string& path, const char* flag);

// The largest optimizer step count a checkpoint may claim.
constexpr int64_t kMaxOptimizerStep = int64_t{1} << 40;

// Reads the --resume checkpoint's metadata (without loading anything) and refuses one whose step
// or optimizer_step is out of [0, 2^40], or that holds no optimizer state, unless
// `fresh_optimizer` (then the saved moments, if any, are not used).
nn::CheckpointInfo check_resume_metadata(const std::string& path, bool fresh_optimizer);

// After loading: with a step count > 0, every parameter must have every slot of the optimizer
// (a checkpoint with some of its optimizer tensors removed is refused).
void check_optimizer_state_complete(const std::string& path, const nn::Optimizer& optimizer);

// Warnings (stderr) when the resumed run's schedule (steps, lr, min_lr, warmup) differs from the
// saved run's "optim" settings.
void warn_schedule_changes(const std::string& path, const nlohmann::ordered_json& saved_optim,
                           const nlohmann::ordered_json& optim);

}  // namespace longtape::cli
