#pragma once
// Numerical gradient check: compares the analytic gradients that autograd computes with central
// finite differences, element by element. Works on f64 inputs (f32 rounding swamps the
// differences). A fixed random weight w turns any output into the scalar sum(fn(x) * w), so
// every output element and its backward contribute to the check.
#include <functional>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace longtape::autograd {

struct GradcheckOptions {
  double eps = 1e-6;   // finite-difference step
  double atol = 1e-7;  // pass when |analytic - numeric| <= atol + rtol * |numeric|
  double rtol = 1e-5;
  uint64_t weight_seed = 0x9c0ffee;  // seed of the random output weight w
};

struct GradcheckResult {
  bool passed = true;
  double max_abs_error = 0.0;  // worst |analytic - numeric| over all checked elements
  double max_rel_error = 0.0;  // worst |analytic - numeric| / max(|numeric|, tiny)
  int64_t checked_elements = 0;
  std::string message;  // first failure: input index, element index, analytic vs numeric
};

using GradcheckFn = std::function<Tensor(const std::vector<Tensor>&)>;

// Checks d sum(fn(inputs) * w) / d inputs[i] for every input that requires grad. Inputs must be
// defined f64 CPU tensors; fn must be deterministic (reseed inside fn for random ops). The inputs'
// values and .grad are left as they were.
GradcheckResult gradcheck(GradcheckFn fn, std::vector<Tensor> inputs, GradcheckOptions options = {});

// Same, but throws longtape::Error carrying the failure message.
void check_gradcheck(GradcheckFn fn, std::vector<Tensor> inputs, GradcheckOptions options = {});

}  // namespace longtape::autograd
