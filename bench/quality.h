#pragma once
// Quality: the same small causal language model trained with each attention variant on the
// associative-recall task, then scored on held-out batches.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "attention/config.h"
#include "tensor/device.h"

namespace longtape::bench {

using Json = nlohmann::ordered_json;

struct QualityOptions {
  int64_t steps = 200;
  int64_t seq_len = 256;
  int64_t batch = 16;
  uint64_t seed = 0;                  // of the initialisation and the data
  attention::AttentionConfig attention;  // causal; heads and head_dim are set by the model
  std::string precision = "auto";     // tensor/precision.h: auto = bf16 on CUDA, f32 on the CPU
};

// The quality row of `variant`: accuracy, chance, final loss, speed; skipped or failed with the
// reason when it cannot train.
Json run_quality(const std::string& variant, const QualityOptions& options, Device device);

// The row of a variant that was not trained, with its reason.
Json quality_skipped(const std::string& variant, const QualityOptions& options, const std::string& reason);

}  // namespace longtape::bench
