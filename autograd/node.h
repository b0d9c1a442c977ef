#pragma once
// The tape. Every recorded op creates a Node stamped with a global creation number; backward()
// collects the nodes reachable from the root without recursion and runs them in reverse creation
// order (a topological order, because a node is always created after its inputs' nodes).
// Graph destruction is iterative too, so a 100k-node chain neither overflows the stack on
// backward nor on release.
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace longtape::autograd {

struct Node;

struct Edge {
  std::shared_ptr<Node> node;  // null when the input needs no gradient
  uint32_t input_nr = 0;       // which output of `node` the input was
};

struct OutputMeta {
  Shape shape;
  DType dtype;
  Device device;
};

using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grad_outputs)>;

struct Node {
  uint64_t sequence_nr;
  std::string op_name;
  std::vector<Edge> next_edges;         // one per input of the op
  std::vector<OutputMeta> outputs;      // one per output of the op
  std::vector<std::weak_ptr<TensorImpl>> retained;  // outputs that asked for retain_grad()
  BackwardFn backward_fn;               // gradients of the inputs, one per input (undefined = none)
  bool released = false;

  Node();
  virtual ~Node();
  // Returns one gradient per input; grad_outputs has one defined tensor per output.
  virtual std::vector<Tensor> apply(const std::vector<Tensor>& grad_outputs);
  virtual void release();  // frees saved tensors after a backward without retain_graph
};

// Writes gradients into a leaf tensor's .grad (accumulating with +=).
struct AccumulateGrad : Node {
  std::shared_ptr<TensorImpl> leaf;
  explicit AccumulateGrad(std::shared_ptr<TensorImpl> l);
  std::vector<Tensor> apply(const std::vector<Tensor>& grad_outputs) override;
  void release() override {}
};

// True when grad mode is on and any input requires grad.
bool any_requires_grad(const std::vector<Tensor>& inputs);

// Records an op: builds edges to the inputs, attaches the node as the grad_fn of each output
// (marking them requires_grad). `backward` must capture only detached tensors (t.detach()),
// never the outputs themselves, or the graph keeps itself alive. No-op when no input requires
// grad or grad mode is off.
void record(const char* op_name, const std::vector<Tensor>& inputs,
            const std::vector<Tensor>& outputs, BackwardFn backward);

// Runs backward from `roots` with the given output gradients (undefined = ones for scalars).
void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grad_roots,
                  bool retain_graph);

// Gradients of `outputs` w.r.t. `inputs` without touching .grad (returns undefined where
// an input does not influence the outputs).
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, bool retain_graph = false);

}  // namespace longtape::autograd
