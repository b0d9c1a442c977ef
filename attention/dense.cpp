#include "attention/dense.h"

#include "attention/composed.h"
#include "tensor/error.h"

namespace longtape::attention {

DenseAttention::DenseAttention(AttentionConfig config) : Attention(std::move(config)) {
  validate_core_config(config_, "dense");
}

AttentionOutput DenseAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(!config_.causal || q.size(1) == k.size(1),
           "attention 'dense': causal attention needs as many queries as keys, got q ", shape_str(q.shape()), ", k ",
           shape_str(k.shape()));
  const DType work = compute_dtype(q.dtype());
  StreamOptions options;
  options.scale = config_.scale();
  options.causal = config_.causal;
  options.dropout = is_training() ? config_.dropout : 0.0;
  AttentionOutput result = stream_attention(q.to(work), k.to(work), v.to(work), options);
  return {result.out.to(q.dtype()), result.lse};
}

}  // namespace longtape::attention
