#pragma once
// Differentiable collectives: the forward communicates like the Communicator method of the same
// name, and the backward runs the reverse communication:
//   all_to_all  -> the reverse all-to-all of the gradients,
//   all_gather  -> a reduce-scatter (each rank keeps the sum over ranks of the gradient of its slice),
//   all_reduce  -> an all-reduce of the gradients (sum; mean for mean).
// The backward of a collective communicates too, and it runs on each rank's own thread during that
// rank's backward(). So every rank must run backward through the same collectives in the same
// order: every rank's loss must depend on the outputs of every collective it took part in (or
// backward must be started with explicit output gradients on every rank), and backward must be
// called while the communicator is alive (inside the run_ranks body). A rank that skips one makes
// the others fail with a timeout error, never hang. The node keeps its communicator alive.
#include <vector>

#include "nn/dist/communicator.h"
#include "tensor/tensor.h"

namespace longtape::dist {

// to_each[d] goes to rank d; result[s] came from rank s.
std::vector<Tensor> all_to_all(Communicator& comm, const std::vector<Tensor>& to_each);
// Splits along split_dim (split_sizes, one per rank; empty = equal pieces), exchanges, and
// concatenates the received pieces along concat_dim in rank order.
Tensor all_to_all(Communicator& comm, const Tensor& tensor, int64_t split_dim, int64_t concat_dim,
                  const std::vector<int64_t>& split_sizes = {});
// result[s] = rank s's tensor.
std::vector<Tensor> all_gather(Communicator& comm, const Tensor& tensor);
// The ranks' tensors concatenated along dim in rank order.
Tensor all_gather(Communicator& comm, const Tensor& tensor, int64_t dim);
Tensor all_reduce(Communicator& comm, const Tensor& tensor, ReduceOp op = ReduceOp::sum);

}  // namespace longtape::dist
