// Cross-entropy fused with log-softmax: the forward kernel writes each row's loss and log-sum-exp
// (no (rows, classes) log-probabilities are kept), the mean over counted rows is taken on the
// device, and the backward kernel recomputes softmax - onehot from the logits and the saved
// log-sum-exp, scaled by a device value. Nothing is read back to the host: targets are checked by
// a device flag (tensor/device_checks.h).
#include <string>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/device_checks.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  LT_CHECK(logits.defined(), "cross_entropy: logits is an undefined tensor");
  LT_CHECK(is_floating(logits.dtype()), "cross_entropy: logits must be a floating tensor (f32, f64, bf16, f16), got ",
           dtype_name(logits.dtype()));
  LT_CHECK(logits.dim() == 2 || logits.dim() == 3, "cross_entropy: logits must be (N, C) or (B, T, C), got shape ",
           shape_str(logits.shape()));
  const Shape lead(logits.shape().begin(), logits.shape().end() - 1);
  LT_CHECK(targets.defined() && targets.shape() == lead, "cross_entropy: targets must have shape ", shape_str(lead),
           " for logits of shape ", shape_str(logits.shape()), ", got ",
           targets.defined() ? shape_str(targets.shape()) : std::string("undefined"));
  LT_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32,
           "cross_entropy: targets must be an i64 or i32 tensor, got ", dtype_name(targets.dtype()));
  LT_CHECK(targets.device() == logits.device(), "cross_entropy: targets must be on ", logits.device().str(), ", got ",
           targets.device().str());
  const int64_t classes = logits.shape().back();
  LT_CHECK(classes > 0, "cross_entropy: logits need at least one class, got shape ", shape_str(logits.shape()));
  const DType dt = logits.dtype();
  const DType acc = dt == DType::f64 ? DType::f64 : DType::f32;
  const Device dev = logits.device();
  Tensor target_rows = cast(targets.detach(), DType::i64).contiguous();
  const int64_t rows = target_rows.numel();
  check_indices_deferred(target_rows, classes, ignore_index, "cross_entropy", "target",
                         " and is not ignore_index (" + std::to_string(ignore_index) + ")");

  Tensor logit_rows = logits.detach().contiguous();
  Tensor loss_rows = Tensor::empty({rows}, acc, dev);
  Tensor counted_rows = Tensor::empty({rows}, acc, dev);
  Tensor lse_rows = Tensor::empty({rows}, acc, dev);
  if (rows > 0)
    kernels::cross_entropy(loss_rows.raw_data(), counted_rows.raw_data(), lse_rows.raw_data(), logit_rows.raw_data(),
                           static_cast<const int64_t*>(target_rows.raw_data()), dt, rows, classes, ignore_index, dev);
  // Mean over counted rows; with none counted the scale is 1 over 1 and the sum is 0: loss and
  // gradient are 0, not NaN.
  Tensor one = Tensor::ones({}, acc, dev);
  Tensor scale = div(one, maximum(sum(counted_rows), one));
  Tensor out = mul(sum(loss_rows), scale);

  const Shape logits_shape = logits.shape();
  record("cross_entropy", {logits}, {out},
         [logit_rows, lse_rows, target_rows, scale, logits_shape, rows, classes, ignore_index](
             const std::vector<Tensor>& g) -> std::vector<Tensor> {
           Tensor step = mul(scale, g[0].detach()).contiguous();  // d loss / d row loss, on the device
           Tensor d = Tensor::empty({rows, classes}, logit_rows.dtype(), logit_rows.device());
           if (rows > 0)
             kernels::cross_entropy_backward(d.raw_data(), logit_rows.raw_data(), lse_rows.raw_data(),
                                             static_cast<const int64_t*>(target_rows.raw_data()), step.raw_data(),
                                             logit_rows.dtype(), rows, classes, ignore_index, logit_rows.device());
           return {d.reshape(logits_shape)};
         }, {logit_rows});
  return out;
}

}  // namespace longtape
