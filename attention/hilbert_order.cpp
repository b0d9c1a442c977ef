#include "attention/hilbert_order.h"

#include "attention/hilbert.h"
#include "attention/registry.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

Tensor index_tensor(const std::vector<int64_t>& values, Device device) {
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}, device);
}

void check_order(const AttentionConfig& config, const std::string& who) {
  LT_CHECK(config.order == "natural" || config.order == "hilbert", who, ": order must be \"natural\" or \"hilbert\", ",
           "got \"", config.order, "\"");
}

}  // namespace

HilbertOrderAttention::HilbertOrderAttention(AttentionConfig config) : Attention(std::move(config)) {
  const std::string who = "attention 'hilbert'";
  LT_CHECK(!config_.inner_variant.empty() && config_.inner_variant != "hilbert", who,
           ": inner_variant must name the variant to run in Hilbert order (e.g. dense, dilated, block_sparse), got \"",
           config_.inner_variant, "\"");
  if (!config_.grid.empty()) parse_grid(config_.grid);  // a malformed grid fails here, not at the first forward
  config_.order = "hilbert";
  AttentionConfig inner_config = config_;
  inner_config.order = "natural";
  inner_ = register_module("inner", make_attention(config_.inner_variant, inner_config));
}

std::vector<int64_t> HilbertOrderAttention::permutation(int64_t n) const {
  try {
    const auto [height, width] = grid_for(n, config_.grid);
    return hilbert_permutation(height, width);
  } catch (const Error& e) {
    LT_CHECK(false, "attention 'hilbert': ", e.what(), "; set config.grid (--grid) to \"HxW\" with H * W = ", n);
  }
  return {};
}

AttentionOutput HilbertOrderAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(k.size(1) == q.size(1), "attention 'hilbert': q and k must have the same length (one token grid), got q ",
           shape_str(q.shape()), ", k ", shape_str(k.shape()));
  const int64_t n = q.size(1);
  if (n == 0) return inner_->forward_with_lse(q, k, v);
  const std::vector<int64_t> perm = permutation(n);
  const Tensor forward_index = index_tensor(perm, q.device());
  const Tensor inverse_index = index_tensor(inverse_permutation(perm), q.device());
  AttentionOutput result = inner_->forward_with_lse(index_select(q, 1, forward_index), index_select(k, 1, forward_index),
                                                    index_select(v, 1, forward_index));
  note_backend(inner_->last_backend(), inner_->last_precision());
  return {index_select(result.out, 1, inverse_index), index_select(result.lse, 2, inverse_index)};
}

std::shared_ptr<Attention> apply_token_order(const std::string& inner, const AttentionConfig& config) {
  check_order(config, "attention '" + inner + "'");
  if (config.order == "natural" || inner == "hilbert") return make_attention(inner, config);
  AttentionConfig wrapped = config;
  wrapped.inner_variant = inner;
  return std::make_shared<HilbertOrderAttention>(wrapped);
}

}  // namespace longtape::attention
