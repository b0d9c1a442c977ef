#include "nn/data.h"

#include <unistd.h>

#include <algorithm>
#include <new>
#include <stdexcept>

#include "tensor/autograd/grad_mode.h"
#include "io/atomic_file.h"
#include "io/regular_file.h"
#include "tensor/checked_math.h"
#include "tensor/ops.h"

namespace longtape::nn {

// ---------------------------------------------------------------- DataRng

uint64_t DataRng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t DataRng::below(uint64_t n) {
  LT_ASSERT(n > 0);
  // Rejection sampling keeps every value equally likely.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = next();
  while (x >= limit);
  return x % n;
}

uint64_t DataRng::mix(uint64_t a, uint64_t b, uint64_t c) {
  DataRng r(a);
  uint64_t h = r.next();
  r = DataRng(h ^ (b * 0xD6E8FEB86659FD93ull));
  h = r.next();
  r = DataRng(h ^ (c * 0xA0761D6478BD642Full));
  return r.next();
}

namespace {
constexpr uint64_t kTrainStream = 0x7472616;  // distinct streams for the two splits
constexpr uint64_t kHeldoutStream = 0x686f6c64;
uint64_t stream_of(Split split) { return split == Split::train ? kTrainStream : kHeldoutStream; }

// Token ids must fit in i32 (the model accepts i32 tokens); keys are shuffled per sequence, so
// their count bounds the work (and memory) of every batch.
constexpr int64_t kMaxVocab = INT32_MAX;
constexpr int64_t kMaxKeys = int64_t{1} << 24;

// Bytes of memory the machine has (0 when unknown).
uint64_t machine_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) : 0;
}

// The inputs (all `input_fill`) and targets (all `target_fill`) of batch_size sequences of seq_len
// tokens, in one CPU tensor (2, batch_size, seq_len) from the host cache: a step's batch reuses
// the pages of an earlier one (a malloc of 1 MiB or more is a fresh mmap to fault in every time,
// tensor/allocator.cpp) and goes to a device in one upload. The product is overflow-checked, a
// buffer larger than the machine's memory is refused before it is requested (it could only be
// filled by swapping or the out-of-memory killer), and an allocation failure is
// longtape::OutOfMemoryError.
Tensor token_pair(int64_t batch_size, int64_t seq_len, int64_t input_fill, int64_t target_fill, const char* op) {
  const int64_t n = checked::mul(batch_size, seq_len, std::string(op) + ": batch_size * seq_len");
  const int64_t bytes = checked::mul(checked::mul(n, int64_t{2}, std::string(op) + ": inputs and targets"),
                                     static_cast<int64_t>(sizeof(int64_t)),
                                     std::string(op) + ": bytes of the batch_size * seq_len inputs and targets");
  const uint64_t memory = machine_memory_bytes();
  if (memory > 0 && static_cast<uint64_t>(bytes) > memory)
    throw OutOfMemoryError(detail::concat(op, ": cannot allocate ", n, " tokens and targets (batch_size ", batch_size,
                                          " * seq_len ", seq_len, "): ", bytes,
                                          " bytes, more than this machine's memory of ", memory, " bytes"));
  Tensor both = Tensor::empty({2, batch_size, seq_len}, DType::i64, Device::cpu());
  std::fill_n(both.data<int64_t>(), n, input_fill);
  std::fill_n(both.data<int64_t>() + n, n, target_fill);
  return both;
}
}  // namespace

// ---------------------------------------------------------------- RecallTask

RecallTask::RecallTask(RecallTaskConfig config) : config_(config) {
  const auto& c = config_;
  LT_CHECK(c.num_keys >= 1 && c.num_values >= 1 && c.num_filler >= 0, "RecallTask: need num_keys >= 1, num_values >= 1 "
           "and num_filler >= 0, got ", c.num_keys, ", ", c.num_values, ", ", c.num_filler);
  LT_CHECK(c.num_pairs >= 1 && c.num_pairs <= c.num_keys, "RecallTask: num_pairs must be in [1, num_keys = ",
           c.num_keys, "] (planted keys are distinct), got ", c.num_pairs);
  LT_CHECK(c.num_queries >= 1 && c.num_queries <= c.num_pairs, "RecallTask: num_queries must be in [1, num_pairs = ",
           c.num_pairs, "], got ", c.num_queries);
  LT_CHECK(c.num_keys <= kMaxKeys, "RecallTask: num_keys ", c.num_keys, " exceeds the limit ", kMaxKeys);
  const int64_t vocab = checked::add(
      checked::add(checked::add(c.num_keys, c.num_values, "RecallTask: num_keys + num_values"), c.num_filler,
                   "RecallTask: num_keys + num_values + num_filler"),
      1, "RecallTask: vocabulary size");
  LT_CHECK(vocab <= kMaxVocab, "RecallTask: vocabulary size num_keys + num_values + num_filler + 1 = ", vocab,
           " exceeds the limit ", kMaxVocab);
  LT_CHECK(c.seq_len >= 1, "RecallTask: seq_len must be >= 1, got ", c.seq_len);
  // Q <= K <= num_keys <= 2^24, so these cannot overflow.
  const int64_t needed = 2 * c.num_pairs + 1 + 2 * c.num_queries;
  LT_CHECK(c.seq_len >= needed, "RecallTask: seq_len ", c.seq_len, " is too short for ", c.num_pairs,
           " pairs and ", c.num_queries, " queries (needs at least ", needed, ")");
  const int64_t context = c.seq_len - 1 - 2 * c.num_queries;
  LT_CHECK(c.num_filler > 0 || context == 2 * c.num_pairs,
           "RecallTask: num_filler must be > 0 when the context has room beyond the pairs");
}

int64_t RecallTask::vocab_size() const { return config_.num_keys + config_.num_values + config_.num_filler + 1; }

namespace {
// token_pair's inputs and targets in one upload (a copy to the device waits for it), viewed as two tensors.
Batch batch_on(const Tensor& both, Device device) {
  const Tensor there = both.device() == device ? both : both.to(device);
  return {there.select(0, 0), there.select(0, 1)};
}
}  // namespace

Batch RecallTask::batch(int64_t batch_size, int64_t index, Split split, Device device) const {
  LT_CHECK(batch_size >= 1, "RecallTask::batch: batch_size must be >= 1, got ", batch_size);
  LT_CHECK(index >= 0, "RecallTask::batch: index must be >= 0, got ", index);
  const auto& c = config_;
  const int64_t T = c.seq_len, K = c.num_pairs, Q = c.num_queries;
  const int64_t context = T - 1 - 2 * Q;
  const int64_t value_base = c.num_keys, filler_base = c.num_keys + c.num_values;
  const Tensor both = token_pair(batch_size, T, 0, kIgnoreIndex, "RecallTask::batch");
  int64_t* const inputs = both.data<int64_t>();
  int64_t* const targets = inputs + batch_size * T;
  DataRng rng(DataRng::mix(c.seed, stream_of(split), static_cast<uint64_t>(index)));
  std::vector<int64_t> keys(c.num_keys), slots(context - K), starts(K), values(K), order(K);
  for (int64_t b = 0; b < batch_size; ++b) {
    int64_t* in = inputs + b * T;
    int64_t* tg = targets + b * T;
    for (int64_t t = 0; t < context; ++t) in[t] = filler_base + static_cast<int64_t>(rng.below(c.num_filler ? c.num_filler : 1));
    // K distinct keys: a partial Fisher-Yates shuffle of all keys.
    for (int64_t k = 0; k < c.num_keys; ++k) keys[k] = k;
    for (int64_t k = 0; k < K; ++k) std::swap(keys[k], keys[k + rng.below(c.num_keys - k)]);
    // K non-overlapping pair starts, uniform over all layouts: K distinct sorted picks s_i from
    // [0, context - K), then start_i = s_i + i leaves room for each pair's second token.
    for (int64_t s = 0; s < context - K; ++s) slots[s] = s;
    for (int64_t k = 0; k < K; ++k) std::swap(slots[k], slots[k + rng.below(context - K - k)]);
    std::copy(slots.begin(), slots.begin() + K, starts.begin());
    std::sort(starts.begin(), starts.end());
    for (int64_t k = 0; k < K; ++k) {
      starts[k] += k;
      values[k] = static_cast<int64_t>(rng.below(c.num_values));
      in[starts[k]] = keys[k];
      in[starts[k] + 1] = value_base + values[k];
    }
    // Q distinct planted pairs are queried, in random order.
    for (int64_t k = 0; k < K; ++k) order[k] = k;
    for (int64_t q = 0; q < Q; ++q) std::swap(order[q], order[q + rng.below(K - q)]);
    int64_t t = context;
    in[t++] = query_token();
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t k = order[q];
      in[t] = keys[k];
      tg[t] = value_base + values[k];
      in[t + 1] = value_base + values[k];
      t += 2;
    }
  }
  return batch_on(both, device);
}

// ---------------------------------------------------------------- CharTextDataset

namespace {
// A regular file of at most io::kDefaultMaxReadBytes, checked before its bytes are allocated.
std::vector<uint8_t> read_text_file(const std::string& path) {
  const io::RegularFile file(path, "text file");
  LT_CHECK(file.size() <= io::kDefaultMaxReadBytes, "cannot read text file '", path, "': it has ", file.size(),
           " bytes, over the limit of ", io::kDefaultMaxReadBytes, " bytes");
  return file.read_all();
}
}  // namespace

CharTextDataset::CharTextDataset(const std::string& path, int64_t seq_len, uint64_t seed, double holdout_fraction)
    : CharTextDataset(read_text_file(path), seq_len, seed, holdout_fraction, path) {}

CharTextDataset::CharTextDataset(std::vector<uint8_t> bytes, int64_t seq_len, uint64_t seed, double holdout_fraction,
                                 const std::string& source)
    : bytes_(std::move(bytes)), seq_len_(seq_len), seed_(seed) {
  LT_CHECK(seq_len >= 1, "CharTextDataset: seq_len must be >= 1, got ", seq_len);
  LT_CHECK(holdout_fraction >= 0 && holdout_fraction < 1, "CharTextDataset: holdout_fraction must be in [0, 1), got ",
           holdout_fraction);
  const size_t window = static_cast<size_t>(seq_len) + 1;
  const size_t holdout = static_cast<size_t>(static_cast<double>(bytes_.size()) * holdout_fraction);
  train_end_ = bytes_.size() - holdout;
  LT_CHECK(train_end_ >= window, source, ": ", bytes_.size(), " bytes is too short for windows of seq_len + 1 = ",
           window, " bytes", holdout > 0 ? " in its training part" : "", " (", train_end_, " bytes)");
  // A held-out part shorter than one window is useless: evaluate on the training part instead.
  if (holdout > 0 && holdout < window) train_end_ = bytes_.size();
}

Batch CharTextDataset::batch(int64_t batch_size, int64_t index, Split split, Device device) const {
  LT_CHECK(batch_size >= 1, "CharTextDataset::batch: batch_size must be >= 1, got ", batch_size);
  LT_CHECK(index >= 0, "CharTextDataset::batch: index must be >= 0, got ", index);
  const int64_t T = seq_len_;
  size_t begin = 0, end = train_end_;
  if (split == Split::heldout && train_end_ < bytes_.size()) {
    begin = train_end_;
    end = bytes_.size();
  }
  const uint64_t starts = end - begin - static_cast<size_t>(T);  // number of valid window starts
  DataRng rng(DataRng::mix(seed_, stream_of(split), static_cast<uint64_t>(index)));
  const Tensor both = token_pair(batch_size, T, 0, 0, "CharTextDataset::batch");
  int64_t* const inputs = both.data<int64_t>();
  int64_t* const targets = inputs + batch_size * T;
  for (int64_t b = 0; b < batch_size; ++b) {
    const size_t start = begin + rng.below(starts);
    for (int64_t t = 0; t < T; ++t) {
      inputs[b * T + t] = bytes_[start + t];
      targets[b * T + t] = bytes_[start + t + 1];
    }
  }
  return batch_on(both, device);
}

// ---------------------------------------------------------------- accuracy

AccuracyCount accuracy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  LT_CHECK(logits.defined() && targets.defined(), "accuracy: got an undefined tensor");
  LT_CHECK(logits.dim() >= 2, "accuracy: logits must be (..., V), got shape ", shape_str(logits.shape()));
  const Shape lead(logits.shape().begin(), logits.shape().end() - 1);
  LT_CHECK(targets.shape() == lead, "accuracy: targets must have shape ", shape_str(lead), " for logits ",
           shape_str(logits.shape()), ", got ", shape_str(targets.shape()));
  NoGradGuard guard;
  const int64_t V = logits.shape().back();
  std::vector<int64_t> host_targets = targets.to_vector_as<int64_t>();
  std::vector<int64_t> rows, wanted;
  for (size_t r = 0; r < host_targets.size(); ++r) {
    if (host_targets[r] == ignore_index) continue;
    rows.push_back(static_cast<int64_t>(r));
    wanted.push_back(host_targets[r]);
  }
  AccuracyCount count;
  count.total = static_cast<int64_t>(rows.size());
  if (rows.empty()) return count;
  // Only the scored rows travel to the host.
  Tensor flat = logits.detach().reshape({-1, V});
  Tensor picked = index_select(flat, 0, Tensor::from_vector(rows, {count.total}, logits.device()));
  std::vector<double> values = picked.to_vector();
  for (int64_t r = 0; r < count.total; ++r) {
    const double* row = values.data() + r * V;
    const int64_t best = std::max_element(row, row + V) - row;
    if (best == wanted[r]) ++count.correct;
  }
  return count;
}

}  // namespace longtape::nn
