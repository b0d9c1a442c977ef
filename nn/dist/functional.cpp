#include "nn/dist/functional.h"

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

// Gradients arriving for tensors that were on other devices or dtypes go back to where they came from.
Tensor like(const Tensor& g, const autograd::OutputMeta& meta) {
  Tensor out = g;
  if (out.dtype() != meta.dtype) out = out.to(meta.dtype);
  if (out.device() != meta.device) out = out.to(meta.device);
  return out;
}

std::vector<autograd::OutputMeta> metas(const std::vector<Tensor>& tensors) {
  std::vector<autograd::OutputMeta> m;
  for (const Tensor& t : tensors) m.push_back({t.shape(), t.dtype(), t.device()});
  return m;
}

}  // namespace

std::vector<Tensor> all_to_all(Communicator& comm, const std::vector<Tensor>& to_each) {
  std::vector<Tensor> received = comm.all_to_all(to_each);
  if (autograd::any_requires_grad(to_each)) {
    std::shared_ptr<Communicator> keep = keep_alive(comm);
    auto sent = metas(to_each);
    autograd::record("dist_all_to_all", to_each, received,
                     [keep, sent](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       // g[s] is the gradient of what rank s sent here: it goes back to rank s.
                       std::vector<Tensor> back = keep->all_to_all(g);
                       for (size_t d = 0; d < back.size(); ++d) back[d] = like(back[d], sent[d]);
                       return back;
                     });
  }
  return received;
}

Tensor all_to_all(Communicator& comm, const Tensor& tensor, int64_t split_dim, int64_t concat_dim,
                  const std::vector<int64_t>& split_sizes) {
  LT_CHECK(tensor.defined(), "dist all_to_all: rank ", comm.rank(), " was given an undefined tensor");
  const int64_t sd = normalize_dim(split_dim, tensor.dim(), "dist all_to_all (split_dim)");
  const int64_t cd = normalize_dim(concat_dim, tensor.dim(), "dist all_to_all (concat_dim)");
  std::vector<int64_t> sizes = split_sizes;
  if (sizes.empty()) {
    LT_CHECK(tensor.size(sd) % comm.size() == 0, "dist all_to_all: dim ", sd, " of shape ",
             shape_str(tensor.shape()), " must divide evenly into ", comm.size(),
             " ranks, or split sizes must be given");
    sizes.assign(static_cast<size_t>(comm.size()), tensor.size(sd) / comm.size());
  }
  LT_CHECK(static_cast<int>(sizes.size()) == comm.size(), "dist all_to_all: expected one split size per rank (",
           comm.size(), "), got ", sizes.size());
  std::vector<Tensor> received = all_to_all(comm, split(tensor, sizes, sd));
  return received.size() == 1 ? received[0] : cat(received, cd);
}

std::vector<Tensor> all_gather(Communicator& comm, const Tensor& tensor) {
  std::vector<Tensor> gathered = comm.all_gather(tensor);
  if (autograd::any_requires_grad({tensor})) {
    std::shared_ptr<Communicator> keep = keep_alive(comm);
    autograd::OutputMeta mine{tensor.shape(), tensor.dtype(), tensor.device()};
    autograd::record("dist_all_gather", {tensor}, gathered,
                     [keep, mine](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       // Reduce-scatter: rank q's gradient of slice s goes to rank s, which sums them.
                       std::vector<Tensor> mine_from_each = keep->all_to_all(g);
                       Tensor total = mine_from_each[0];
                       for (size_t q = 1; q < mine_from_each.size(); ++q) total = add(total, mine_from_each[q]);
                       return {like(total, mine)};
                     });
  }
  return gathered;
}

Tensor all_gather(Communicator& comm, const Tensor& tensor, int64_t dim) {
  std::vector<Tensor> gathered = all_gather(comm, tensor);
  return gathered.size() == 1 ? gathered[0] : cat(gathered, dim);
}

Tensor all_reduce(Communicator& comm, const Tensor& tensor, ReduceOp op) {
  Tensor reduced = comm.all_reduce(tensor, op);
  if (autograd::any_requires_grad({tensor})) {
    std::shared_ptr<Communicator> keep = keep_alive(comm);
    autograd::record("dist_all_reduce", {tensor}, {reduced},
                     [keep, op](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       return {keep->all_reduce(g[0], op)};
                     });
  }
  return reduced;
}

}  // namespace longtape::dist
