#pragma once
// Training data for long-sequence language models, generated on the fly and seeded: batch i of a
// dataset is a pure function of (seed, i), so a resumed run sees exactly the batches it would
// have seen, and no data RNG state has to be checkpointed.
//
// RecallTask (multi-query associative recall). Vocabulary layout, in this order:
//   keys     [0, num_keys)
//   values   [num_keys, num_keys + num_values)
//   filler   [num_keys + num_values, ... + num_filler)   noise tokens
//   query    vocab_size() - 1                           marks the start of the queries
// A sequence of length T is
//   context (T - 1 - 2Q tokens: filler noise with K key/value pairs "k v" planted at random,
//            non-overlapping positions anywhere in it; the K keys are distinct)
//   QUERY  k_1 v_1  k_2 v_2 ... k_Q v_Q      (Q of the planted keys, each followed by its value)
// Targets are ignore_index everywhere except at the positions of the queried keys k_j, where the
// target is the value planted with k_j: the model must look back up to T tokens to answer. The
// values after the queried keys are given as input (teacher forcing) and are not scored. Accuracy
// counts the scored positions only (chance is 1 / num_values).
//
// CharTextDataset: byte-level language modelling on any file (vocabulary = 256 byte values).
// Windows of T + 1 bytes at random offsets; inputs are the first T, targets the last T. The first
// (1 - holdout_fraction) of the file is for training, the rest for held-out batches.
#include <cstdint>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace longtape::nn {

constexpr int64_t kIgnoreIndex = -100;

struct Batch {
  Tensor inputs;   // (B, T) i64
  Tensor targets;  // (B, T) i64, kIgnoreIndex where nothing is scored
};

enum class Split { train, heldout };

struct RecallTaskConfig {
  int64_t seq_len = 256;
  int64_t num_keys = 32;
  int64_t num_values = 16;
  int64_t num_filler = 16;
  int64_t num_pairs = 8;    // K planted pairs per sequence
  int64_t num_queries = 4;  // Q queries at the end (Q <= K)
  uint64_t seed = 0;
};

class RecallTask {
 public:
  explicit RecallTask(RecallTaskConfig config);  // validates (throws on impossible layouts)
  int64_t vocab_size() const;
  int64_t seq_len() const { return config_.seq_len; }
  int64_t query_token() const { return vocab_size() - 1; }
  const RecallTaskConfig& config() const { return config_; }
  // Batch `index` of the split; train and held-out batches come from disjoint random streams.
  Batch batch(int64_t batch_size, int64_t index, Split split = Split::train, Device device = Device::cpu()) const;

 private:
  RecallTaskConfig config_;
};

class CharTextDataset {
 public:
  CharTextDataset(const std::string& path, int64_t seq_len, uint64_t seed = 0, double holdout_fraction = 0.1);
  // From bytes already in memory (`source` names them in errors).
  CharTextDataset(std::vector<uint8_t> bytes, int64_t seq_len, uint64_t seed = 0, double holdout_fraction = 0.1,
                  const std::string& source = "<bytes>");
  static constexpr int64_t vocab_size() { return 256; }
  int64_t seq_len() const { return seq_len_; }
  size_t size_bytes() const { return bytes_.size(); }
  Batch batch(int64_t batch_size, int64_t index, Split split = Split::train, Device device = Device::cpu()) const;

 private:
  std::vector<uint8_t> bytes_;
  int64_t seq_len_;
  uint64_t seed_;
  size_t train_end_;  // bytes [0, train_end_) train; [train_end_, size) held out
};

// Correct predictions (argmax over the last dim of logits (B, T, V)) and scored positions
// (targets != ignore_index).
struct AccuracyCount {
  int64_t correct = 0;
  int64_t total = 0;
  double value() const { return total > 0 ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};
AccuracyCount accuracy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = kIgnoreIndex);

// A small deterministic generator (SplitMix64) for data: same seed, same numbers on every platform.
class DataRng {
 public:
  explicit DataRng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  uint64_t below(uint64_t n);  // uniform in [0, n), unbiased; n > 0
  // Mixes several words into one seed.
  static uint64_t mix(uint64_t a, uint64_t b, uint64_t c = 0);

 private:
  uint64_t state_;
};

}  // namespace longtape::nn
