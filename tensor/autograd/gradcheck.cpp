#include "tensor/autograd/gradcheck.h"

#include <cmath>
#include <limits>
#include <sstream>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape::autograd {

namespace {

std::string index_str(int64_t flat, const Shape& shape) {
  Shape idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  return shape_str(idx);
}

// The output weight w: drawn from its own Philox stream so the default generator (which fn may
// use, e.g. for dropout) is left alone.
Tensor output_weight(const Shape& shape, uint64_t seed) {
  Tensor w = Tensor::empty(shape, DType::f64);
  kernels::normal(kernels::make_view(w), seed, 0, 0.0, 1.0);
  return w;
}

Tensor call_checked(const GradcheckFn& fn, const std::vector<Tensor>& inputs) {
  Tensor y = fn(inputs);
  LT_CHECK(y.defined(), "gradcheck: the function returned an undefined tensor");
  LT_CHECK(is_floating(y.dtype()), "gradcheck: the function must return a floating tensor, got ",
           dtype_name(y.dtype()));
  LT_CHECK(y.device().is_cpu(), "gradcheck: the function must return a CPU tensor, got ", y.device().str());
  return y;
}

// sum(y * w) in double, without recording.
double weighted_sum(const Tensor& y, const std::vector<double>& w) {
  std::vector<double> v = y.to_vector();
  long double acc = 0;
  for (size_t i = 0; i < v.size(); ++i) acc += static_cast<long double>(v[i]) * w[i];
  return static_cast<double>(acc);
}

}  // namespace

GradcheckResult gradcheck(GradcheckFn fn, std::vector<Tensor> inputs, GradcheckOptions options) {
  LT_CHECK(fn != nullptr, "gradcheck: expected a function, got an empty one");
  LT_CHECK(options.eps > 0, "gradcheck: eps must be > 0, got ", options.eps);
  LT_CHECK(options.atol >= 0 && options.rtol >= 0, "gradcheck: atol and rtol must be >= 0, got ", options.atol,
           " and ", options.rtol);

  // Fresh contiguous leaves: perturbing their storage never touches the caller's tensors.
  std::vector<Tensor> xs(inputs.size());
  std::vector<size_t> checked;  // indices of the inputs that require grad
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& in = inputs[i];
    LT_CHECK(in.defined(), "gradcheck: input ", i, " is undefined");
    if (!in.requires_grad()) {
      xs[i] = in;  // passed through unchanged (index tensors, masks, ...)
      continue;
    }
    LT_CHECK(in.dtype() == DType::f64, "gradcheck: input ", i,
             " requires grad and must be f64 (finite differences need double precision), got ",
             dtype_name(in.dtype()));
    LT_CHECK(in.device().is_cpu(), "gradcheck: input ", i, " must be on the CPU, got ", in.device().str());
    {
      NoGradGuard no_grad;
      xs[i] = in.detach().clone();
    }
    xs[i].requires_grad_();
    checked.push_back(i);
  }
  LT_CHECK(!checked.empty(), "gradcheck: no input requires grad; call requires_grad_() on the inputs to check");

  // Analytic gradients of sum(fn(x) * w).
  Tensor y = call_checked(fn, xs);
  const Shape out_shape = y.shape();
  Tensor w = output_weight(out_shape, options.weight_seed);
  const std::vector<double> w_values = w.to_vector();
  std::vector<std::vector<double>> analytic(inputs.size());
  std::vector<Tensor> grad_inputs;
  for (size_t i : checked) grad_inputs.push_back(xs[i]);
  std::vector<Tensor> grads(grad_inputs.size());
  if (y.requires_grad()) {
    Tensor loss = sum(mul(cast(y, DType::f64), w));
    grads = grad({loss}, grad_inputs);
  }
  for (size_t k = 0; k < checked.size(); ++k) {
    const Tensor& x = xs[checked[k]];
    if (!grads[k].defined()) {
      analytic[checked[k]].assign(static_cast<size_t>(x.numel()), 0.0);  // x does not influence y
      continue;
    }
    LT_CHECK(grads[k].shape() == x.shape(), "gradcheck: the gradient of input ", checked[k], " has shape ",
             shape_str(grads[k].shape()), ", expected ", shape_str(x.shape()));
    analytic[checked[k]] = grads[k].to_vector();
  }

  // Central differences, one element at a time.
  GradcheckResult result;
  double worst_excess = 0.0;  // worst error / tolerance among the failures
  int64_t failures = 0;
  std::ostringstream first;
  NoGradGuard no_grad;
  auto evaluate = [&] {
    Tensor yp = call_checked(fn, xs);
    LT_CHECK(yp.shape() == out_shape, "gradcheck: the function returned shape ", shape_str(yp.shape()),
             " for a perturbed input but ", shape_str(out_shape), " at first");
    return weighted_sum(yp, w_values);
  };
  for (size_t i : checked) {
    double* p = xs[i].data<double>();
    const int64_t n = xs[i].numel();
    for (int64_t j = 0; j < n; ++j) {
      const double original = p[j];
      p[j] = original + options.eps;
      const double plus = evaluate();
      p[j] = original - options.eps;
      const double minus = evaluate();
      p[j] = original;
      xs[i].bump_version();  // written in place (and restored)
      const double numeric = (plus - minus) / (2.0 * options.eps);
      const double a = analytic[i][static_cast<size_t>(j)];
      const double err = std::fabs(a - numeric);
      const double tol = options.atol + options.rtol * std::fabs(numeric);
      const double rel = err / std::max(std::fabs(numeric), std::numeric_limits<double>::min());
      ++result.checked_elements;
      const bool ok = err <= tol;  // false for NaN as well
      if (std::isnan(err)) {
        result.max_abs_error = result.max_rel_error = std::numeric_limits<double>::quiet_NaN();
      } else if (!std::isnan(result.max_abs_error)) {
        result.max_abs_error = std::max(result.max_abs_error, err);
        result.max_rel_error = std::max(result.max_rel_error, rel);
      }
      if (ok) continue;
      ++failures;
      const double excess = std::isnan(err) ? std::numeric_limits<double>::infinity() : err / tol;
      if (failures == 1 || excess > worst_excess) {
        worst_excess = excess;
        first.str("");
        first.precision(10);
        first << "input " << i << ", element " << j << " (index " << index_str(j, xs[i].shape())
              << " of shape " << shape_str(xs[i].shape()) << "): analytic " << a << " vs numeric " << numeric
              << " (abs error " << err << ", allowed " << tol << ")";
      }
    }
  }
  if (failures > 0) {
    result.passed = false;
    std::ostringstream os;
    os << "gradcheck: " << failures << " of " << result.checked_elements
       << " gradient elements differ from finite differences; worst at " << first.str();
    result.message = os.str();
  } else {
    std::ostringstream os;
    os.precision(3);
    os << "gradcheck: all " << result.checked_elements << " gradient elements match (max abs error "
       << result.max_abs_error << ")";
    result.message = os.str();
  }
  return result;
}

void check_gradcheck(GradcheckFn fn, std::vector<Tensor> inputs, GradcheckOptions options) {
  GradcheckResult r = gradcheck(std::move(fn), std::move(inputs), options);
  if (!r.passed) throw Error(r.message);
}

}  // namespace longtape::autograd
