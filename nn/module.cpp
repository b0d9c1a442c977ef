#include "nn/module.h"

#include <set>

#include "tensor/autograd/grad_mode.h"
#include "tensor/ops.h"

namespace longtape::nn {

namespace {
void check_name(const std::string& name, const char* what) {
  LT_CHECK(!name.empty() && name.find('.') == std::string::npos, "Module::", what,
           ": names must be non-empty and contain no '.', got '", name, "'");
}
}  // namespace

Tensor Module::register_parameter(const std::string& name, Tensor value, bool requires_grad) {
  check_name(name, "register_parameter");
  LT_CHECK(value.defined(), "register_parameter: '", name, "' is undefined");
  for (auto& [n, t] : parameters_) LT_CHECK(n != name, "register_parameter: '", name, "' is already registered");
  Tensor leaf = value.is_leaf() ? value : value.detach();
  if (requires_grad) leaf.requires_grad_(true);
  parameters_.emplace_back(name, leaf);
  return leaf;
}

Tensor Module::register_buffer(const std::string& name, Tensor value) {
  check_name(name, "register_buffer");
  for (auto& [n, t] : buffers_) LT_CHECK(n != name, "register_buffer: '", name, "' is already registered");
  buffers_.emplace_back(name, value);
  return value;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_name(name, "register_module");
  LT_CHECK(module != nullptr, "register_module: '", name, "' is null");
  for (auto& [n, m] : children_) LT_CHECK(n != name, "register_module: '", name, "' is already registered");
  children_.emplace_back(name, std::move(module));
}

void Module::collect(const std::string& prefix, bool params, bool recurse,
                     std::vector<std::pair<std::string, Tensor>>& out) const {
  // Iterative walk: deep stacks of blocks never recurse on the C++ stack.
  std::vector<std::pair<std::string, const Module*>> stack{{prefix, this}};
  std::set<const TensorImpl*> seen;  // tied weights appear once, under their first name
  while (!stack.empty()) {
    auto [pre, m] = stack.back();
    stack.pop_back();
    for (const auto& [n, t] : params ? m->parameters_ : m->buffers_)
      if (t.defined() && seen.insert(t.impl_ptr().get()).second) out.emplace_back(pre + n, t);
    if (!recurse) break;
    for (auto it = m->children_.rbegin(); it != m->children_.rend(); ++it)
      stack.emplace_back(pre + it->first + ".", it->second.get());
  }
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters(bool recurse) const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", true, recurse, out);
  return out;
}

std::vector<std::pair<std::string, Tensor>> Module::named_buffers(bool recurse) const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", false, recurse, out);
  return out;
}

std::vector<Tensor> Module::parameters(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [n, t] : named_parameters(recurse)) out.push_back(t);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (auto& t : parameters()) n += t.numel();
  return n;
}

std::shared_ptr<Module> Module::child(const std::string& name) const {
  for (auto& [n, m] : children_)
    if (n == name) return m;
  throw Error("Module::child: no child module named '" + name + "' in " + type_name());
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [n, m] : children_) m->train(on);
}

void assign_in_place(const Tensor& target, const Tensor& source) {
  TensorImpl& t = target.impl();
  const TensorImpl& s = source.impl();
  t.storage = s.storage;
  t.shape = s.shape;
  t.strides = s.strides;
  t.offset = s.offset;
  t.dtype = s.dtype;
  t.device = s.device;
}

void Module::to(Device device) {
  NoGradGuard guard;
  for (bool list : {true, false}) {
    for (auto& [n, t] : list ? named_parameters() : named_buffers()) {
      if (t.device() == device) continue;
      assign_in_place(t, t.detach().to(device));
      if (t.grad().defined()) t.set_grad(t.grad().to(device));
    }
  }
}

void Module::to(DType dtype) {
  NoGradGuard guard;
  for (bool list : {true, false}) {
    for (auto& [n, t] : list ? named_parameters() : named_buffers()) {
      if (!is_floating(t.dtype()) || t.dtype() == dtype) continue;
      assign_in_place(t, cast(t.detach(), dtype));
      t.set_grad(Tensor());
    }
  }
}

void Module::zero_grad() {
  for (auto& t : parameters()) t.set_grad(Tensor());
}

std::map<std::string, Tensor> Module::state_dict() const {
  std::map<std::string, Tensor> out;
  for (auto& [n, t] : named_parameters()) out[n] = t.detach();
  for (auto& [n, t] : named_buffers()) out[n] = t.detach();
  return out;
}

void Module::load_state_dict(const std::map<std::string, Tensor>& state, bool strict) {
  NoGradGuard guard;
  std::map<std::string, Tensor> own = state_dict();
  if (strict) {
    for (auto& [n, t] : state)
      LT_CHECK(own.count(n), "load_state_dict: unexpected key '", n, "' (not in ", type_name(), ")");
    for (auto& [n, t] : own) LT_CHECK(state.count(n), "load_state_dict: missing key '", n, "'");
  }
  for (auto& [n, t] : own) {
    auto it = state.find(n);
    if (it == state.end()) continue;
    LT_CHECK(it->second.shape() == t.shape(), "load_state_dict: '", n, "' has shape ", shape_str(t.shape()),
             " in the module but ", shape_str(it->second.shape()), " in the state");
    t.copy_(it->second);
  }
}

}  // namespace longtape::nn
