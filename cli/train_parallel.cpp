#include "cli/train_parallel.h"

#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::cli {

DataParallelRun::DataParallelRun(Device requested) : group_(dist::init_process_group({"auto", requested})) {}

nn::BatchSource DataParallelRun::shard(nn::BatchSource host_data, int64_t per_rank) const {
  const int64_t ranks = size(), at = rank() * per_rank;
  const Device device = this->device();
  return [data = std::move(host_data), ranks, at, device](int64_t batch_size, int64_t index, nn::Split split) {
    nn::Batch global = data(batch_size * ranks, index, split);
    NoGradGuard no_grad;
    // Inputs and targets in one upload.
    const Tensor both = stack({global.inputs.narrow(0, at, batch_size), global.targets.narrow(0, at, batch_size)}, 0)
                            .to(device);
    return nn::Batch{both.select(0, 0), both.select(0, 1)};
  };
}

void DataParallelRun::prepare(nn::Module& model, uint64_t seed, int64_t step) {
  dist::broadcast_parameters(group_->comm(), model, 0);
  reducer_ = std::make_unique<dist::GradientReducer>(group_->comm(), model);
  if (rank() > 0) manual_seed(derive_stream_seed(seed, static_cast<uint64_t>(step), static_cast<uint64_t>(rank())));
}

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
