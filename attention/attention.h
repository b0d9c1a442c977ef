#pragma once
// The one interface every attention variant implements: forward(q, k, v) on (B, N, H, D) tensors.
#include <string>

#include "attention/config.h"
#include "nn/module.h"
#include "tensor/tensor.h"

namespace longtape::attention {

struct AttentionOutput {
  Tensor out;  // (B, N, H, D), dtype of q
  Tensor lse;  // (B, H, N) f32 (f64 for f64 inputs); -inf where a query sees no key
};

class Attention : public nn::Module {
 public:
  explicit Attention(AttentionConfig config) : config_(std::move(config)) {}
  // Output only.
  Tensor forward(const Tensor& q, const Tensor& k, const Tensor& v) { return forward_with_lse(q, k, v).out; }
  // Output and the row log-sum-exp, so results of several variants merge through lse.
  virtual AttentionOutput forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) = 0;
  const AttentionConfig& config() const { return config_; }
  virtual std::string variant_name() const = 0;
  std::string type_name() const override { return "Attention(" + variant_name() + ")"; }
  // What ran the last forward ("fused-cuda", "fused-cpu", "composed"; "none" before any) and the
  // precision its math ran in (e.g. "bf16 tensor cores, f32 accumulation"), for reports.
  const std::string& last_backend() const { return last_backend_; }
  const std::string& last_precision() const { return last_precision_; }

 protected:
  // Throws a clear error unless q, k, v are (B, N, H, D) with H and D matching the config.
  void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) const;
  // Called by variants after each forward with what ran it.
  void note_backend(const std::string& backend, const std::string& precision) {
    last_backend_ = backend;
    last_precision_ = precision;
  }
  AttentionConfig config_;

 private:
  std::string last_backend_ = "none";
  std::string last_precision_ = "none";
};

}  // namespace longtape::attention
