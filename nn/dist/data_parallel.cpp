#include "nn/dist/data_parallel.h"

#include <map>
#include <tuple>

#include "autograd/grad_mode.h"
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

}  // namespace

void average_gradients(Communicator& comm, nn::Module& module) {
  NoGradGuard no_grad;
  const auto params = module.named_parameters();
  // Same structure everywhere: the lengths first (an all_gather needs equal shapes), then the shapes.
  const Tensor structure = structure_of(params);
  const auto lengths = comm.all_gather(Tensor::from_vector(std::vector<int64_t>{structure.numel()}, {1}));
  for (int s = 0; s < comm.size(); ++s)
    LT_CHECK(lengths[static_cast<size_t>(s)].item() == static_cast<double>(structure.numel()),
             "average_gradients: rank ", comm.rank(), " and rank ", s,
             " have models with different parameter lists (every rank needs the same model)");
  const auto structures = comm.all_gather(structure);
  const auto mine = structure.to_vector();
  for (int s = 0; s < comm.size(); ++s)
    LT_CHECK(structures[static_cast<size_t>(s)].to_vector() == mine, "average_gradients: rank ", comm.rank(),
             " and rank ", s, " have models with different parameter shapes (every rank needs the same model)");

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
