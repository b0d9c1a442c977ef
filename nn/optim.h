#pragma once
// Optimizers (SGD, AdamW), global-norm gradient clipping and a warmup + cosine learning-rate
// schedule. Updates run without recording on the tape and write parameters in place (copy_), so
// every handle a layer keeps stays valid. State tensors are named "<param>.<slot>" (for example
// "blocks.0.mlp.fc1.weight.exp_avg") so checkpoints can store them beside the model.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "nn/module.h"
#include "tensor/tensor.h"

namespace longtape::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Optimizer {
 public:
  // Parameters by name (module.named_parameters()); names must be unique.
  Optimizer(NamedTensors parameters, double lr);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update from the parameters' current .grad (parameters without a gradient are skipped).
  virtual void step() = 0;
  // Clears every parameter's .grad; with set_to_none = false, gradients that exist are zeroed in
  // place instead (they keep their memory, as a captured CUDA graph needs; backward then adds into
  // them under autograd's AccumulateInPlaceGuard).
  void zero_grad(bool set_to_none = true);

  double lr() const { return lr_; }
  void set_lr(double lr);
  // Number of step() calls so far (AdamW's bias correction depends on it).
  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t steps);

  const NamedTensors& named_parameters() const { return parameters_; }
  virtual std::string type_name() const = 0;

  // State tensors by "<param>.<slot>". Slots appear once they exist (after the first step).
  std::map<std::string, Tensor> state() const;
  // Replaces the state: every key must name a known parameter and slot of this optimizer, and its
  // shape must match the parameter. Values are copied to the parameter's device and dtype.
  void load_state(const std::map<std::string, Tensor>& state, int64_t step_count);
  // The checks of load_state alone (throws on the first problem, changes nothing).
  void check_state(const std::map<std::string, Tensor>& state) const;
  // Slot names this optimizer keeps per parameter ("momentum_buffer"; "exp_avg", "exp_avg_sq").
  virtual std::vector<std::string> slot_names() const = 0;

 protected:
  // The slot tensor of parameter i, created as zeros like the parameter when absent.
  Tensor& slot(size_t i, const std::string& name);
  bool has_slot(size_t i, const std::string& name) const;
  // Gradient of parameter i, checked against the parameter, in the state dtype (undefined when it
  // has none). State and update arithmetic are f32 for bf16 parameters (bf16 has too few bits for
  // the moments, and the CPU computes no bf16), the parameter's dtype otherwise.
  Tensor grad_of(size_t i) const;

  NamedTensors parameters_;
  std::vector<std::map<std::string, Tensor>> slots_;  // per parameter
  double lr_;
  int64_t step_count_ = 0;
};

struct SGDOptions {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;  // L2 penalty added to the gradient (classic, not decoupled)
  bool nesterov = false;
};

// PyTorch's SGD: g += wd * p; buf = momentum * buf + (1 - dampening) * g (buf = g on the first
// step); g = nesterov ? g + momentum * buf : buf; p -= lr * g.
class SGD : public Optimizer {
 public:
  SGD(NamedTensors parameters, SGDOptions options);
  void step() override;
  std::string type_name() const override { return "SGD"; }
  std::vector<std::string> slot_names() const override { return {"momentum_buffer"}; }
  const SGDOptions& options() const { return options_; }

 private:
  SGDOptions options_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // Which parameters decay (by name and tensor); null = all. decay_matrices_only() is the usual choice.
  std::function<bool(const std::string&, const Tensor&)> decays;
  // On CUDA, f32 parameters are updated by one fused kernel launch (when built with CUDA).
  bool fused = true;
};

// Decays only tensors of 2 or more dims (weights of Linear and Embedding, not biases or norms).
bool decay_matrices_only(const std::string& name, const Tensor& parameter);

// AdamW (Loshchilov & Hutter), PyTorch's formulation, at step t:
//   p *= 1 - lr * wd                        (decoupled weight decay)
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
class AdamW : public Optimizer {
 public:
  AdamW(NamedTensors parameters, AdamWOptions options);
  ~AdamW() override;
  void step() override;
  std::string type_name() const override { return "AdamW"; }
  std::vector<std::string> slot_names() const override { return {"exp_avg", "exp_avg_sq"}; }
  const AdamWOptions& options() const { return options_; }
  // Number of step() calls that used the fused CUDA kernel (for tests and logs).
  int64_t fused_steps() const { return fused_steps_; }

  // CUDA graphs (TrainerOptions::cuda_graph). Empty when every parameter with a gradient takes
  // the fused kernel (contiguous f32 on one CUDA device, options().fused), else why not.
  std::string fused_blocker() const;
  // With device scalars on, step() launches the fused kernel reading its learning rate and bias
  // corrections from device memory, which stage_device_scalars() fills (asynchronously, on the
  // current stream) for step step_count() + 1 at lr(): a step captured while they are on replays
  // with each step's values. Turning them off keeps the memory (a captured graph still reads it).
  void use_device_scalars(bool on);
  void stage_device_scalars();
  // With a gate (a 0-d f32 tensor on the parameters' device, such as the gradient norm), the
  // fused update is skipped on the device when the gate's value is not finite. Undefined = none.
  void set_skip_gate(const Tensor& gate) { skip_gate_ = gate; }

 private:
  void step_with_ops(const std::vector<size_t>& which, double bias1, double bias2);
  bool decays(size_t i) const;

  AdamWOptions options_;
  int64_t fused_steps_ = 0;
  struct FusedTable;
  std::unique_ptr<FusedTable> fused_table_;  // device-side parameter list, reused while unchanged
  Tensor device_scalars_;  // f32 (lr, 1 - b1^t, sqrt(1 - b2^t)) on the device, once used
  bool device_scalars_on_ = false;
  Tensor skip_gate_;
};

// Scales all gradients so their global L2 norm is at most max_norm (when it is larger) and returns
// the norm before clipping. Parameters without a gradient are ignored. A non-finite norm leaves
// the gradients unchanged (and is returned, so the caller can skip the step).
double clip_grad_norm(const std::vector<Tensor>& parameters, double max_norm);
double grad_norm(const std::vector<Tensor>& parameters);
// The same two in parts, for a caller that reads the norm together with other values (one device
// read per training step): the norm as a 0-d tensor on the gradients' device (f32, f64 when a
// gradient is f64; undefined when no parameter has a gradient), and the clipping rule applied to
// a norm read elsewhere.
Tensor grad_norm_tensor(const std::vector<Tensor>& parameters);
void scale_grads_to_norm(const std::vector<Tensor>& parameters, double norm, double max_norm);
// The clipping rule on the device, for a norm that stays there (CUDA graphs): the gradients are
// scaled by max_norm / (norm + 1e-6) when `norm` (from grad_norm_tensor) is finite and above
// max_norm. Needs every gradient contiguous f32 on one CUDA device (throws otherwise).
void clip_grads_on_device(const std::vector<Tensor>& parameters, const Tensor& norm, double max_norm);

// Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to `min_lr` at
// `total_steps`; constant min_lr afterwards. lr_at(step) for step = 0, 1, ...
struct CosineSchedule {
  double base_lr = 1e-3;
  double min_lr = 0.0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  double lr_at(int64_t step) const;
  void apply(Optimizer& optimizer, int64_t step) const { optimizer.set_lr(lr_at(step)); }
};

}  // namespace longtape::nn
