#include "attention/dense.h"

#include "attention/composed.h"
#include "attention/fused/fused_attention.h"
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
  const CoreOptions core = core_options(config_, is_training());
  CoreRun run;
  AttentionOutput result = attention_core(q, k, v, CoreKeys{}, core, [&] {
    const DType work = compute_dtype(q.dtype());
    StreamOptions options;
    options.scale = core.scale;
    options.causal = core.causal;
    options.dropout = core.dropout;
    AttentionOutput composed = stream_attention(q.to(work), k.to(work), v.to(work), options);
    return AttentionOutput{composed.out.to(q.dtype()), composed.lse};
  }, run);
  note_backend(run.backend, run.precision);
  return result;
}

}  // namespace longtape::attention
