#pragma once
// Dilated attention (LongNet; docs/attention.md, dilated) on the composed path, both mixing modes:
//   lse          every head takes part in every branch (offset h mod r_i); branches merge by lse.
//   head_groups  heads split into G contiguous groups, group i runs branch i alone, output / G.
// Segments of a branch with equal stream length (all full segments, and the ragged last one when
// its stream happens to be as long) are batched into one attention call per offset; heads sharing
// an offset share the gathered rows. Memory grows linearly with N.
#include <vector>

#include "attention/attention.h"
#include "attention/patterns.h"

namespace longtape::attention {

class DilatedAttention : public Attention {
 public:
  // Reads num_heads, head_dim, segment_lengths, dilation_rates, mixing, causal, softmax_scale,
  // dropout (training mode only), and head_offset / total_heads: the module may compute the slice
  // [head_offset, head_offset + num_heads) of total_heads global heads, with offsets h mod r and
  // head groups taken from the global index h, so that the slice equals that slice of the full
  // result. Throws on an invalid config (list lengths differ, a value <= 0, fewer heads than
  // branches in head_groups mode, a head slice outside total_heads).
  explicit DilatedAttention(AttentionConfig config);
  // q, k, v (B, N, H, D), all with the same N.
  AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) override;
  std::string variant_name() const override { return "dilated"; }
  // The composed reference path (gather, attend, scatter, lse merge), whatever config.impl says.
  AttentionOutput composed_forward(const Tensor& q, const Tensor& k, const Tensor& v);
  const std::vector<DilatedBranch>& branches() const { return branches_; }

 private:
  std::vector<DilatedBranch> branches_;
};

}  // namespace longtape::attention
