#pragma once
// Grad mode is per thread, so ranks running as threads each keep their own.
namespace longtape::autograd {

bool grad_enabled();
void set_grad_enabled(bool on);

// Disables recording for its scope (like torch.no_grad()).
class NoGradGuard {
 public:
  NoGradGuard() : previous_(grad_enabled()) { set_grad_enabled(false); }
  ~NoGradGuard() { set_grad_enabled(previous_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// Whether backward adds into a leaf's existing .grad in place (AccumulateInPlaceGuard).
bool accumulate_in_place();
void set_accumulate_in_place(bool on);

// While alive on this thread, backward adds each leaf's gradient into the .grad it already has,
// in place (when shape, dtype and device match and .grad is contiguous), instead of replacing
// .grad with a new tensor, so gradients keep their memory from step to step, as a captured CUDA
// graph needs (zero them with Optimizer::zero_grad(false) first). Anyone holding the old .grad
// sees the sum, as in PyTorch.
class AccumulateInPlaceGuard {
 public:
  AccumulateInPlaceGuard() : previous_(accumulate_in_place()) { set_accumulate_in_place(true); }
  ~AccumulateInPlaceGuard() { set_accumulate_in_place(previous_); }
  AccumulateInPlaceGuard(const AccumulateInPlaceGuard&) = delete;
  AccumulateInPlaceGuard& operator=(const AccumulateInPlaceGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace longtape::autograd

namespace longtape {
using autograd::NoGradGuard;
}
