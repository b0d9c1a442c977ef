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

}  // namespace longtape::autograd

namespace longtape {
using autograd::NoGradGuard;
}
