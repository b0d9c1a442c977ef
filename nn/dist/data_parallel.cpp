#include "nn/dist/data_parallel.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

// A fingerprint of the parameter list (count, then every shape), so ranks with different models
// fail clearly instead of exchanging mismatched buffers.
Tensor structure_of(const std::vector<std::pair<std::string, Tensor>>& params) {
  std::vector<int64_t> desc{static_cast<int64_t>(params.size())};
  for (const auto& [name, p] : params) {
    desc.push_back(p.dim());
    desc.insert(desc.end(), p.shape().begin(), p.shape().end());
  }
  return Tensor::from_vector(desc, {static_cast<int64_t>(desc.size())});
}

// Throws on every rank unless every rank has the same parameter list.
void check_same_structure(Communicator& comm, const std::vector<std::pair<std::string, Tensor>>& params,
                          const char* who) {
  const Tensor structure = structure_of(params);
  // The lengths first (an all_gather needs equal shapes), then the shapes.
  const std::vector<int64_t> lengths = comm.all_gather_sizes(structure.numel());
  for (int s = 0; s < comm.size(); ++s)
    LT_CHECK(lengths[static_cast<size_t>(s)] == structure.numel(), who, ": rank ",
             comm.rank(), " and rank ", s, " have models with different parameter lists (every rank needs the same model)");
  const auto structures = comm.all_gather(structure);
  const auto mine = structure.to_vector();
  for (int s = 0; s < comm.size(); ++s)
    LT_CHECK(structures[static_cast<size_t>(s)].to_vector() == mine, who, ": rank ", comm.rank(), " and rank ", s,
             " have models with different parameter shapes (every rank needs the same model)");
}

}  // namespace

GradientReducer::GradientReducer(Communicator& comm, nn::Module& module, size_t bucket_bytes,
                                 size_t first_bucket_bytes)
    : comm_(comm) {
  LT_CHECK(bucket_bytes > 0 && first_bucket_bytes > 0, "GradientReducer: bucket sizes must be > 0 bytes, got ",
           bucket_bytes, " (first bucket ", first_bucket_bytes, ")");
  const auto named = module.named_parameters();
  check_same_structure(comm, named, "GradientReducer");
  for (const auto& [name, p] : named) params_.push_back(p);
  // Reverse order, one (dtype, device) per bucket, cut when it would pass its size (the first's
  // own, at most bucket_bytes).
  size_t bytes = 0;
  bucket_of_.resize(params_.size());
  for (size_t k = params_.size(); k-- > 0;) {
    const Tensor& p = params_[k];
    const size_t cap = buckets_.size() == 1 ? std::min(first_bucket_bytes, bucket_bytes) : bucket_bytes;
    const bool fits = !buckets_.empty() && bytes + p.nbytes() <= cap &&
                      params_[buckets_.back().front()].dtype() == p.dtype() &&
                      params_[buckets_.back().front()].device() == p.device();
    if (!fits) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().push_back(k);
    bucket_of_[k] = buckets_.size() - 1;
    bytes += p.nbytes();
  }
  hooked_in_bucket_.assign(buckets_.size(), 0);
  hook_ids_.assign(params_.size(), 0);
  for (size_t k = 0; k < params_.size(); ++k) {
    const Tensor& p = params_[k];
    if (!p.requires_grad() || p.grad_fn()) continue;  // never gets a gradient from backward
    hook_ids_[k] = autograd::register_post_accumulate_grad_hook(p, [this, k](const Tensor&) { gradient_ready(k); });
    ++hooked_in_bucket_[bucket_of_[k]];
  }
  reset_round();
}

GradientReducer::~GradientReducer() {
  for (size_t k = 0; k < params_.size(); ++k)
    if (hook_ids_[k] != 0) autograd::remove_post_accumulate_grad_hook(params_[k], hook_ids_[k]);
}

void GradientReducer::reset_round() {
  ready_.assign(params_.size(), false);
  ready_in_bucket_.assign(buckets_.size(), 0);
  pending_.clear();
  pending_.resize(buckets_.size());
  next_bucket_ = 0;
  stale_ = false;
  started_in_backward_ = 0;
}

// Called by backward when parameter k's gradient is final: starts every bucket, in order, whose
// gradients are all final.
void GradientReducer::gradient_ready(size_t k) {
  const size_t b = bucket_of_[k];
  if (b < next_bucket_) {  // a later backward of this round changed a gradient already sent
    stale_ = true;
    return;
  }
  if (!ready_[k]) {
    ready_[k] = true;
    ++ready_in_bucket_[b];
  }
  while (next_bucket_ < buckets_.size() && ready_in_bucket_[next_bucket_] == hooked_in_bucket_[next_bucket_]) {
    start_bucket(next_bucket_++);
    ++started_in_backward_;
  }
}

void GradientReducer::start_bucket(size_t b) {
  NoGradGuard no_grad;
  std::vector<Tensor> flat;
  for (size_t i : buckets_[b]) {
    const Tensor& p = params_[i];
    const Tensor g = p.grad();
    flat.push_back(g.defined() ? g.reshape({-1}) : Tensor::zeros({p.numel()}, p.dtype(), p.device()));
  }
  pending_[b] = comm_.start_all_reduce(flat.size() == 1 ? flat[0] : cat(flat, 0), ReduceOp::mean);
}

void GradientReducer::average() {
  NoGradGuard no_grad;
  if (stale_) {
    // Every rank ran the same backwards, so every rank redoes the same buckets.
    for (size_t b = 0; b < next_bucket_; ++b) pending_[b]->wait();
    next_bucket_ = 0;
  }
  const size_t in_backward = stale_ ? 0 : started_in_backward_;
  while (next_bucket_ < buckets_.size()) start_bucket(next_bucket_++);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Tensor reduced = pending_[b]->wait();
    int64_t at = 0;
    for (size_t i : buckets_[b]) {
      Tensor p = params_[i];
      p.set_grad(reduced.narrow(0, at, p.numel()).reshape(p.shape()));  // a view of the bucket
      at += p.numel();
    }
  }
  reset_round();
  last_started_in_backward_ = in_backward;
}

void average_gradients(Communicator& comm, nn::Module& module) {
  NoGradGuard no_grad;
  const auto params = module.named_parameters();
  check_same_structure(comm, params, "average_gradients");

  // Which parameters have a gradient on some rank.
  std::vector<double> has(params.size());
  for (size_t i = 0; i < params.size(); ++i) has[i] = params[i].second.grad().defined() ? 1.0 : 0.0;
  const std::vector<double> any =
      params.empty() ? std::vector<double>{}
                     : comm.all_reduce(Tensor::from_vector(has, {static_cast<int64_t>(has.size())}, Device::cpu()))
                           .to_vector();

  // One flat buffer per (dtype, device), in parameter order, so one all-reduce moves them all.
  std::map<std::tuple<int, int, int>, std::vector<size_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) {
    if (any[i] == 0.0) continue;
    const Tensor& p = params[i].second;
    buckets[{static_cast<int>(p.dtype()), static_cast<int>(p.device().kind), p.device().index}].push_back(i);
  }
  for (const auto& [key, members] : buckets) {
    std::vector<Tensor> flat;
    for (size_t i : members) {
      const Tensor& p = params[i].second;
      Tensor g = p.grad();
      flat.push_back(g.defined() ? g.reshape({-1}) : Tensor::zeros({p.numel()}, p.dtype(), p.device()));
    }
    Tensor averaged = comm.all_reduce(flat.size() == 1 ? flat[0] : cat(flat, 0), ReduceOp::mean);
    int64_t at = 0;
    for (size_t i : members) {
      Tensor p = params[i].second;
      p.set_grad(averaged.narrow(0, at, p.numel()).reshape(p.shape()).clone());  // its own buffer
      at += p.numel();
    }
  }
}

void broadcast_parameters(Communicator& comm, nn::Module& module, int root) {
  NoGradGuard no_grad;
  for (const auto& [name, t] : module.state_dict()) {
    Tensor value = comm.broadcast(t, root);
    Tensor target = t;
    target.copy_(value);
  }
}

}  // namespace longtape::dist
