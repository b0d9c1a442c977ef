#include "attention/attention.h"

#include "tensor/error.h"

namespace longtape::attention {

void Attention::check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) const {
  const std::string who = "attention '" + variant_name() + "'";
  LT_CHECK(q.defined() && k.defined() && v.defined(), who, ": q, k and v must be defined tensors, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who,
           ": q, k and v must be 4-d (batch, sequence, heads, head_dim), got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(is_floating(q.dtype()), who, ": q, k and v must be floating tensors (f32, f64, bf16, f16), got ",
           dtype_name(q.dtype()));
  LT_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), who, ": q, k and v must share one dtype, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(), who, ": q, k and v must be on one device, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(k.shape() == v.shape(), who, ": k and v must have the same shape, got k ", describe_tensor(k), ", v ",
           describe_tensor(v));
  LT_CHECK(k.size(0) == q.size(0), who, ": q and k must have the same batch size, got q ", describe_tensor(q), ", k ",
           describe_tensor(k));
  LT_CHECK(q.size(2) == config_.num_heads && k.size(2) == config_.num_heads, who, ": expected ", config_.num_heads,
           " heads (config.num_heads) in dim 2, got q ", describe_tensor(q), ", k ", describe_tensor(k));
  LT_CHECK(q.size(3) == config_.head_dim && k.size(3) == config_.head_dim, who, ": expected head_dim ",
           config_.head_dim, " (config.head_dim) in dim 3, got q ", describe_tensor(q), ", k ", describe_tensor(k));
  LT_CHECK(q.size(0) > 0, who, ": batch size must be > 0, got q ", describe_tensor(q));
}

}  // namespace longtape::attention
