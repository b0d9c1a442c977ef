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

// A tensor an op's backward reads, with the version (Tensor::version) of its storage at the time
// it was saved. Cheap: one storage reference and one integer.
struct SavedVersion {
  std::shared_ptr<Storage> storage;
  uint64_t version = 0;
};

// A saved tensor for code that unpacks it itself (outside record()'s `saved` list): the detached
// tensor and the version it was saved at. unpack() throws if it was modified in place since.
class SavedTensor {
 public:
  SavedTensor() = default;
  explicit SavedTensor(const Tensor& t)
      : tensor_(t.defined() ? t.detach() : Tensor()), version_(t.defined() ? t.version() : 0) {}
  bool defined() const { return tensor_.defined(); }
  uint64_t saved_version() const { return version_; }
  // The tensor; throws longtape::Error naming `op` when its storage was modified in place.
  const Tensor& unpack(const std::string& op) const;

 private:
  Tensor tensor_;
  uint64_t version_ = 0;
};

// Throws the in-place modification error for `op` when the storage's version moved on.
void check_saved_version(const std::string& op, const SavedVersion& saved);

struct Node {
  uint64_t sequence_nr;
  std::string op_name;
  std::vector<Edge> next_edges;         // one per input of the op
  std::vector<OutputMeta> outputs;      // one per output of the op
  std::vector<std::weak_ptr<TensorImpl>> retained;  // outputs that asked for retain_grad()
  BackwardFn backward_fn;               // gradients of the inputs, one per input (undefined = none)
  std::vector<SavedVersion> saved;      // what backward_fn reads, checked before it runs
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

// The post-accumulate gradient hooks of one leaf, in registration order.
struct GradHooks {
  uint64_t next_id = 1;
  std::vector<std::pair<uint64_t, std::function<void(const Tensor& leaf)>>> hooks;
};

// Registers `hook` on the leaf tensor `leaf` (requires_grad, no grad_fn): backward (run_backward,
// Tensor::backward; not grad(), which writes no .grad) calls hook(leaf) once per backward in which
// the leaf received a gradient, as soon as leaf.grad() holds its final value for that backward
// (after the last of its uses has accumulated into it), while the rest of the backward is still to
// run. Hooks run on the thread of the backward, with grad mode off. Returns an id for
// remove_post_accumulate_grad_hook. Throws for a non-leaf or a leaf that needs no gradient.
uint64_t register_post_accumulate_grad_hook(const Tensor& leaf, std::function<void(const Tensor& leaf)> hook);
// Removes a hook registered on `leaf` (an unknown id is ignored).
void remove_post_accumulate_grad_hook(const Tensor& leaf, uint64_t id);

// True when grad mode is on and any input requires grad.
bool any_requires_grad(const std::vector<Tensor>& inputs);

// Records an op: builds edges to the inputs, attaches the node as the grad_fn of each output
// (marking them requires_grad). `backward` must capture only detached tensors (t.detach()),
// never the outputs themselves, or the graph keeps itself alive. No-op when no input requires
// grad or grad mode is off.
// `saved` lists the tensors (inputs, outputs or views of them) that `backward` reads: their
// versions are recorded now, and the backward throws longtape::Error ("one of the tensors needed
// for gradient computation has been modified by an in-place operation: ...") if any of them was
// modified in place in between (copy_, fill_, zero_, an optimizer step, ...).
void record(const char* op_name, const std::vector<Tensor>& inputs,
            const std::vector<Tensor>& outputs, BackwardFn backward,
            const std::vector<Tensor>& saved = {});

// Runs backward from `roots` with the given output gradients (undefined = ones for scalars).
void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grad_roots,
                  bool retain_graph);

// Gradients of `outputs` w.r.t. `inputs` without touching .grad (returns undefined where
// an input does not influence the outputs).
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, bool retain_graph = false);

}  // namespace longtape::autograd
