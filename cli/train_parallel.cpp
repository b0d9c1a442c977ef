#include "cli/train_parallel.h"

#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <utility>

#include "attention/config_text.h"
#include "tensor/autograd/grad_mode.h"
#include "cli/numeric_flags.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/profiler.h"

namespace longtape::cli {

namespace {

// This rank's rows of global batch `index` on the CPU, inputs and targets stacked (2, rows, T).
// While the step runs, the rows of the next training batch are made on a worker thread: every
// rank makes the whole global batch (the data sets are defined per global batch), so this host
// work grows with the number of ranks, and on the caller's thread it would delay the step's end.
// The source is never called on two threads at once (a request for another batch waits for the
// prefetch first).
// One long-lived worker: an OpenMP team its copies may start is made once, not per batch.
class RowsAhead {
 public:
  RowsAhead(nn::BatchSource data, int64_t ranks, int64_t at, bool prefetch)
      : data_(std::move(data)), ranks_(ranks), at_(at), prefetch_(prefetch) {}
  ~RowsAhead() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (worker_.joinable()) worker_.join();
  }
  RowsAhead(const RowsAhead&) = delete;
  RowsAhead& operator=(const RowsAhead&) = delete;

  Tensor take(int64_t batch_size, int64_t index, nn::Split split) {
    const Key key{batch_size, index, split};
    Tensor rows;
    if (ahead_.valid() && ahead_key_ == key) {
      rows = ahead_.get();
    } else {
      if (ahead_.valid()) ahead_.wait();  // another batch (kept for its turn, e.g. across a held-out pass)
      rows = make(key);
    }
    if (prefetch_ && split == nn::Split::train) {
      ahead_key_ = Key{batch_size, index + 1, split};
      std::packaged_task<Tensor()> job([this, next = ahead_key_] { return make(next); });
      ahead_ = job.get_future();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = std::move(job);
      }
      wake_.notify_one();
      if (!worker_.joinable()) worker_ = std::thread([this] { serve(); });
    }
    return rows;
  }

 private:
  struct Key {
    int64_t batch_size = 0, index = -1;
    nn::Split split = nn::Split::train;
    bool operator==(const Key&) const = default;
  };

  Tensor make(const Key& key) const {
    profiler::Scope scope("global batch rows");  // the host work that grows with the ranks
    NoGradGuard no_grad;
    const nn::Batch global = data_(key.batch_size * ranks_, key.index, key.split);
    return stack({global.inputs.narrow(0, at_, key.batch_size), global.targets.narrow(0, at_, key.batch_size)}, 0);
  }

  void serve() {
    while (true) {
      std::packaged_task<Tensor()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || job_.valid(); });
        if (stopping_) return;
        job = std::move(job_);
      }
      job();  // its result or exception goes to ahead_
    }
  }

  nn::BatchSource data_;
  int64_t ranks_, at_;
  bool prefetch_;
  Key ahead_key_;
  std::future<Tensor> ahead_;
  std::mutex mutex_;  // job_ and stopping_, shared with the worker
  std::condition_variable wake_;
  std::packaged_task<Tensor()> job_;
  bool stopping_ = false;
  std::thread worker_;
};

// LONGTAPE_DATA_PREFETCH=0 makes every batch on the calling thread (for measuring what the
// worker thread saves).
bool prefetch_enabled() {
  const char* value = std::getenv("LONGTAPE_DATA_PREFETCH");
  if (value == nullptr || *value == '\0') return true;
  LT_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0,
           "train --parallel data: LONGTAPE_DATA_PREFETCH must be 0 or 1, got \"", shown_value(value), "\"");
  return std::strcmp(value, "1") == 0;
}

}  // namespace

DataParallelRun::DataParallelRun(Device requested) : group_(dist::init_process_group({"auto", requested})) {}

nn::BatchSource DataParallelRun::shard(nn::BatchSource host_data, int64_t per_rank) const {
  const Device device = this->device();
  auto rows = std::make_shared<RowsAhead>(std::move(host_data), size(), rank() * per_rank, prefetch_enabled());
  return [rows, device](int64_t batch_size, int64_t index, nn::Split split) {
    const Tensor mine = rows->take(batch_size, index, split);
    NoGradGuard no_grad;
    const Tensor both = mine.to(device);  // inputs and targets in one upload
    return nn::Batch{both.select(0, 0), both.select(0, 1)};
  };
}

std::pair<size_t, size_t> parse_bucket_mb(const std::string& text) {
  const std::vector<std::string> parts = attention::split_list(text, ',');
  if (parts.empty() || parts.size() > 2)
    throw FlagError("--bucket-mb must be FIRST,REST or one size for all buckets (MiB), got \"" + shown_value(text) +
                    "\"");
  size_t bytes[2] = {0, 0};
  for (size_t i = 0; i < parts.size(); ++i) {
    std::string value = parts[i];
    const std::string error = check_real(value, 0.0, 4096.0, /*lo_open=*/true, /*hi_open=*/false);
    if (!error.empty()) throw FlagError("--bucket-mb " + error);
    bytes[i] = std::max<size_t>(1, static_cast<size_t>(std::stod(value) * 1048576.0));
  }
  return {bytes[0], parts.size() == 2 ? bytes[1] : bytes[0]};
}

void DataParallelRun::prepare(nn::Module& model, uint64_t seed, int64_t step, const std::string& bucket_mb) {
  const auto [first, rest] = parse_bucket_mb(bucket_mb);
  dist::broadcast_parameters(group_->comm(), model, 0);
  reducer_ = std::make_unique<dist::GradientReducer>(group_->comm(), model, rest, first);
  if (rank() > 0) manual_seed(derive_stream_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(rank())));
}

size_t DataParallelRun::bucket_count() const { return reducer_ ? reducer_->bucket_count() : 0; }

void DataParallelRun::average_gradients() {
  LT_CHECK(reducer_ != nullptr, "train --parallel data: the gradient buckets are not set up (prepare() first)");
  reducer_->average();
}

Tensor DataParallelRun::mean(const Tensor& value) {
  if (size() == 1) return value;
  NoGradGuard no_grad;
  return group_->comm().all_reduce(value.detach().reshape({1}), dist::ReduceOp::mean).reshape(value.shape());
}

nn::EvalResult DataParallelRun::combine(const nn::EvalResult& local) {
  if (size() == 1) return local;
  const Tensor sums = group_->comm().all_reduce(
      Tensor::from_vector(std::vector<double>{local.loss, static_cast<double>(local.accuracy.correct),
                                              static_cast<double>(local.accuracy.total)},
                          {3}),
      dist::ReduceOp::sum);
  const std::vector<double> v = sums.to_vector();
  nn::EvalResult r;
  r.loss = v[0] / size();
  r.accuracy.correct = static_cast<int64_t>(v[1]);
  r.accuracy.total = static_cast<int64_t>(v[2]);
  return r;
}

}  // namespace longtape::cli
