#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/ops.h"
#include "tensor/profiler.h"

namespace longtape::autograd {

namespace {
thread_local bool g_grad_enabled = true;
std::atomic<uint64_t> g_next_sequence_nr{0};

// Nodes whose last reference is being dropped wait here so destruction never recurses.
thread_local std::vector<std::shared_ptr<Node>> g_pending_release;
thread_local bool g_draining = false;
}  // namespace

bool grad_enabled() { return g_grad_enabled; }
void set_grad_enabled(bool on) { g_grad_enabled = on; }

namespace {
thread_local bool g_accumulate_in_place = false;
}
bool accumulate_in_place() { return g_accumulate_in_place; }
void set_accumulate_in_place(bool on) { g_accumulate_in_place = on; }

Node::Node() : sequence_nr(g_next_sequence_nr.fetch_add(1)) {}

Node::~Node() {
  for (auto& e : next_edges)
    if (e.node) g_pending_release.push_back(std::move(e.node));
  backward_fn = nullptr;
  if (g_draining) return;
  g_draining = true;
  while (!g_pending_release.empty()) {
    std::shared_ptr<Node> n = std::move(g_pending_release.back());
    g_pending_release.pop_back();
    n.reset();  // may push that node's own edges
  }
  g_draining = false;
}

void check_saved_version(const std::string& op, const SavedVersion& saved) {
  if (!saved.storage) return;
  const uint64_t now = saved.storage->version.load(std::memory_order_relaxed);
  LT_CHECK(now == saved.version,
           "one of the tensors needed for gradient computation has been modified by an in-place operation: ", op,
           " saved a tensor at version ", saved.version, ", now at version ", now,
           " (recompute the forward after the in-place change, or modify a clone() instead)");
}

const Tensor& SavedTensor::unpack(const std::string& op) const {
  if (tensor_.defined()) check_saved_version(op, {tensor_.storage(), version_});
  return tensor_;
}

std::vector<Tensor> Node::apply(const std::vector<Tensor>& grad_outputs) {
  LT_CHECK(!released && backward_fn, "autograd: trying to backward through '", op_name,
           "' a second time, but its saved tensors were freed by the first backward; pass "
           "retain_graph=true to the first backward() if you need to backward twice");
  for (const SavedVersion& s : saved) check_saved_version(op_name, s);
  return backward_fn(grad_outputs);
}

void Node::release() {
  backward_fn = nullptr;
  saved.clear();
  released = true;
}

AccumulateGrad::AccumulateGrad(std::shared_ptr<TensorImpl> l) : leaf(std::move(l)) {
  op_name = "AccumulateGrad";
  outputs.push_back({leaf->shape, leaf->dtype, leaf->device});
}

std::vector<Tensor> AccumulateGrad::apply(const std::vector<Tensor>& grad_outputs) {
  const Tensor& g = grad_outputs[0];
  if (!leaf->grad) {
    // A gradient nothing else can see (its only holder is the engine's slot, its storage is its
    // own, contiguous from element 0) becomes .grad as it is, as PyTorch's AccumulateGrad steals
    // it; anything else is cloned, so that later in-place accumulation never aliases.
    const bool unshared = g.impl_ptr().use_count() == 1 && g.storage() && g.storage().use_count() == 1 &&
                          g.impl().offset == 0 && g.is_contiguous() && !g.requires_grad() && !g.grad_fn();
    leaf->grad = unshared ? g.detach().impl_ptr() : g.detach().clone().impl_ptr();
  } else {
    Tensor acc(leaf->grad);
    if (g_accumulate_in_place && acc.is_contiguous() && acc.shape() == g.shape() && acc.dtype() == g.dtype() &&
        acc.device() == g.device())
      acc.copy_(add(acc, g));
    else
      leaf->grad = add(acc, g).impl_ptr();
  }
  return {};
}

uint64_t register_post_accumulate_grad_hook(const Tensor& leaf, std::function<void(const Tensor& leaf)> hook) {
  LT_CHECK(leaf.defined() && leaf.requires_grad() && !leaf.grad_fn(),
           "register_post_accumulate_grad_hook: expected a leaf tensor that requires grad, got ",
           !leaf.defined()  ? "an undefined tensor"
           : leaf.grad_fn() ? "a non-leaf tensor"
                            : "a tensor without requires_grad");
  LT_CHECK(static_cast<bool>(hook), "register_post_accumulate_grad_hook: expected a hook, got an empty function");
  TensorImpl& impl = leaf.impl();
  if (!impl.grad_hooks) impl.grad_hooks = std::make_shared<GradHooks>();
  const uint64_t id = impl.grad_hooks->next_id++;
  impl.grad_hooks->hooks.emplace_back(id, std::move(hook));
  return id;
}

void remove_post_accumulate_grad_hook(const Tensor& leaf, uint64_t id) {
  if (!leaf.defined() || !leaf.impl().grad_hooks) return;
  auto& hooks = leaf.impl().grad_hooks->hooks;
  std::erase_if(hooks, [id](const auto& entry) { return entry.first == id; });
}

bool any_requires_grad(const std::vector<Tensor>& inputs) {
  if (!grad_enabled()) return false;
  for (const auto& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

static Edge edge_for(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return {};
  if (t.grad_fn()) return {t.grad_fn(), t.impl().output_nr};
  return {std::make_shared<AccumulateGrad>(t.impl_ptr()), 0};
}

void record(const char* op_name, const std::vector<Tensor>& inputs,
            const std::vector<Tensor>& outputs, BackwardFn backward, const std::vector<Tensor>& saved) {
  if (!any_requires_grad(inputs)) return;
  // Edges first: a leaf's accumulator must be older than the node that feeds it.
  std::vector<Edge> edges;
  edges.reserve(inputs.size());
  for (const auto& t : inputs) edges.push_back(edge_for(t));
  auto node = std::make_shared<Node>();
  node->op_name = op_name;
  node->next_edges = std::move(edges);
  for (uint32_t i = 0; i < outputs.size(); ++i) {
    const Tensor& o = outputs[i];
    node->outputs.push_back({o.shape(), o.dtype(), o.device()});
    if (!is_floating(o.dtype())) continue;
    TensorImpl& impl = o.impl();
    impl.requires_grad = true;
    impl.grad_fn = node;
    impl.output_nr = i;
  }
  node->retained.resize(outputs.size());
  node->backward_fn = std::move(backward);
  node->saved.reserve(saved.size());
  for (const Tensor& t : saved)
    if (t.defined() && t.storage()) node->saved.push_back({t.storage(), t.version()});
}

namespace {

struct Capture {
  std::unordered_map<const Node*, std::vector<std::pair<uint32_t, size_t>>> at_node;  // slot->result
  std::unordered_map<const TensorImpl*, size_t> at_leaf;
  std::vector<Tensor> results;
};

void accumulate_into(std::vector<Tensor>& slot_grads, uint32_t slot, const Tensor& g) {
  if (!g.defined()) return;
  Tensor& cur = slot_grads[slot];
  cur = cur.defined() ? add(cur, g) : g;
}

void execute(const std::vector<Tensor>& roots, const std::vector<Tensor>& grad_roots,
             bool retain_graph, Capture* capture) {
  LT_CHECK(roots.size() == grad_roots.size() || grad_roots.empty(),
           "backward: expected one gradient per root (", roots.size(), "), got ",
           grad_roots.size());
  NoGradGuard no_grad;
  std::unordered_map<Node*, std::vector<Tensor>> pending;  // output-slot gradients per node
  std::vector<Node*> order;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  std::vector<std::shared_ptr<Node>> keep_alive;

  for (size_t i = 0; i < roots.size(); ++i) {
    const Tensor& root = roots[i];
    LT_CHECK(root.defined(), "backward: root tensor ", i, " is undefined");
    LT_CHECK(root.requires_grad(), "backward: root tensor ", i,
             " does not require grad and has no grad_fn (did you compute it under NoGradGuard, "
             "or from tensors without requires_grad?)");
    Tensor g;
    if (grad_roots.empty() || !grad_roots[i].defined()) {
      LT_CHECK(root.numel() == 1, "backward: a gradient must be given for a non-scalar root; root ",
               i, " has shape ", shape_str(root.shape()));
      g = Tensor::ones(root.shape(), root.dtype(), root.device());
    } else {
      g = grad_roots[i];
      LT_CHECK(g.shape() == root.shape(), "backward: gradient for root ", i, " must have shape ",
               shape_str(root.shape()), ", got ", shape_str(g.shape()));
    }
    std::shared_ptr<Node> node = root.grad_fn();
    if (!node) node = std::make_shared<AccumulateGrad>(root.impl_ptr());
    keep_alive.push_back(node);  // a leaf root's temporary accumulator
    auto& slots = pending[node.get()];
    slots.resize(node->outputs.size());
    accumulate_into(slots, root.is_leaf() ? 0 : root.impl().output_nr, g);
    if (seen.insert(node.get()).second) stack.push_back(node.get());
  }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    order.push_back(n);
    for (auto& e : n->next_edges)
      if (e.node && seen.insert(e.node.get()).second) stack.push_back(e.node.get());
  }
  std::sort(order.begin(), order.end(),
            [](const Node* a, const Node* b) { return a->sequence_nr > b->sequence_nr; });

  // Leaves with post-accumulate hooks: how many of their accumulators are still to come (a leaf
  // used by several ops has one per use), and whether one of them received a gradient. The hooks
  // run when the last one has been passed.
  std::unordered_map<TensorImpl*, int> uses_left;
  std::unordered_set<TensorImpl*> received;
  if (!capture) {
    for (Node* n : order)
      if (auto* acc = dynamic_cast<AccumulateGrad*>(n))
        if (acc->leaf->grad_hooks && !acc->leaf->grad_hooks->hooks.empty()) ++uses_left[acc->leaf.get()];
  }
  auto leaf_passed = [&](AccumulateGrad* acc, bool accumulated) {
    TensorImpl* leaf = acc->leaf.get();
    if (accumulated) received.insert(leaf);
    if (--uses_left[leaf] > 0 || !received.count(leaf)) return;
    const auto hooks = acc->leaf->grad_hooks->hooks;  // a copy: a hook may remove itself
    const Tensor tensor(acc->leaf);
    for (const auto& [id, hook] : hooks) hook(tensor);
  };

  for (Node* n : order) {
    AccumulateGrad* hooked = nullptr;
    if (!uses_left.empty())
      if (auto* acc = dynamic_cast<AccumulateGrad*>(n); acc && uses_left.count(acc->leaf.get())) hooked = acc;
    auto it = pending.find(n);
    if (it == pending.end()) {
      if (hooked) leaf_passed(hooked, false);
      continue;
    }
    std::vector<Tensor> grads = std::move(it->second);
    pending.erase(it);
    grads.resize(n->outputs.size());
    bool any = false;
    for (size_t s = 0; s < grads.size(); ++s) {
      if (grads[s].defined()) {
        any = true;
      } else {
        const auto& m = n->outputs[s];
        grads[s] = Tensor::zeros(m.shape, m.dtype, m.device);
      }
    }
    if (!any) {
      if (hooked) leaf_passed(hooked, false);
      continue;
    }
    for (size_t s = 0; s < n->retained.size(); ++s) {
      if (auto impl = n->retained[s].lock()) {
        Tensor holder(impl);
        impl->grad = impl->grad ? add(Tensor(impl->grad), grads[s]).impl_ptr()
                                : grads[s].clone().impl_ptr();
      }
    }
    if (capture) {
      auto ci = capture->at_node.find(n);
      if (ci != capture->at_node.end())
        for (auto [slot, r] : ci->second) capture->results[r] = grads[slot];
      if (auto* acc = dynamic_cast<AccumulateGrad*>(n)) {
        auto li = capture->at_leaf.find(acc->leaf.get());
        if (li != capture->at_leaf.end()) {
          Tensor& r = capture->results[li->second];
          r = r.defined() ? add(r, grads[0]) : grads[0];
        }
        continue;  // grad() never writes .grad
      }
    }
    std::vector<Tensor> input_grads;
    {
      profiler::Scope scope(profiler::enabled() ? std::string(n->op_name) + " backward" : std::string());
      input_grads = n->apply(grads);
    }
    if (!retain_graph) n->release();
    if (hooked) leaf_passed(hooked, true);
    for (size_t i = 0; i < n->next_edges.size() && i < input_grads.size(); ++i) {
      const Edge& e = n->next_edges[i];
      if (!e.node || !input_grads[i].defined()) continue;
      auto& slots = pending[e.node.get()];
      slots.resize(e.node->outputs.size());
      const Shape& want = e.node->outputs[e.input_nr].shape;
      LT_ASSERT(input_grads[i].shape() == want, "backward of '", n->op_name, "' gave input ", i,
                " a gradient of shape ", shape_str(input_grads[i].shape()), ", expected ",
                shape_str(want));
      accumulate_into(slots, e.input_nr, input_grads[i]);
    }
  }
}

}  // namespace

void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grad_roots,
                  bool retain_graph) {
  execute(roots, grad_roots, retain_graph, nullptr);
}

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, bool retain_graph) {
  Capture cap;
  cap.results.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    LT_CHECK(t.defined() && t.requires_grad(), "grad: input ", i, " does not require grad");
    if (t.grad_fn())
      cap.at_node[t.grad_fn().get()].push_back({t.impl().output_nr, i});
    else
      cap.at_leaf[t.impl_ptr().get()] = i;
  }
  execute(outputs, grad_outputs, retain_graph, &cap);
  return cap.results;
}

}  // namespace longtape::autograd
