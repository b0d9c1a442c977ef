#pragma once
// Module: the base of every layer, in the LibTorch style. Parameters, buffers and child modules
// are registered by name; named_parameters() walks the tree with dotted names
// ("blocks.0.attn.qkv.weight"). Tensors are moved between devices in place, so handles a layer
// keeps in its own fields stay valid after to(device).
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace longtape::nn {

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Registers a parameter (a leaf that requires grad) and returns the stored handle.
  Tensor register_parameter(const std::string& name, Tensor value, bool requires_grad = true);
  // Registers state that is saved with the module but not trained (e.g. running statistics).
  Tensor register_buffer(const std::string& name, Tensor value);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

  std::vector<std::pair<std::string, Tensor>> named_parameters(bool recurse = true) const;
  std::vector<std::pair<std::string, Tensor>> named_buffers(bool recurse = true) const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const { return children_; }
  std::vector<Tensor> parameters(bool recurse = true) const;
  int64_t num_parameters() const;
  std::shared_ptr<Module> child(const std::string& name) const;  // throws when absent

  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }

  void to(Device device);  // moves parameters and buffers, in place
  void to(DType dtype);    // casts floating parameters and buffers, in place
  void zero_grad();

  // Parameters and buffers by dotted name.
  std::map<std::string, Tensor> state_dict() const;
  // Copies values in; strict = every name must match both ways; shapes must match.
  void load_state_dict(const std::map<std::string, Tensor>& state, bool strict = true);

  virtual std::string type_name() const { return "Module"; }

 protected:
  void add_child(const std::string& name, std::shared_ptr<Module> module);

 private:
  void collect(const std::string& prefix, bool params, bool recurse,
               std::vector<std::pair<std::string, Tensor>>& out) const;
  std::vector<std::pair<std::string, Tensor>> parameters_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// Replaces the storage/device/dtype of `target`'s TensorImpl with `source`'s, keeping autograd
// fields, so every handle of `target` sees the new value.
void assign_in_place(const Tensor& target, const Tensor& source);

}  // namespace longtape::nn
