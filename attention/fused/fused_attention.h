#pragma once
// The attention core as one differentiable op over (B, N, H, D) tensors: builds a fused::Problem,
// asks select_backend, runs the fused CPU or CUDA kernel, and records one tape node whose backward
// runs the fused backward kernel. Variants call attention_core(), which falls back to the composed
// path (attention/composed.h) when the selector says the fused kernels cannot run the problem.
// The sequence-parallel step (one query chunk against one key chunk of a longer sequence) is in
// attention/fused/chunk_attention.h.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/fused/backends.h"
#include "attention/patterns.h"
#include "tensor/tensor.h"

namespace longtape::attention {

// Which implementation a layer uses: auto = fused where supported, else composed;
// fused = fused or a clear error saying why not; composed = the composed reference path.
enum class Impl : uint8_t { automatic, fused, composed };
Impl parse_impl(const std::string& text);  // "auto" | "fused" | "composed"
std::string impl_name(Impl impl);

// The key set of one attention core call (see attention/fused/problem.h).
struct CoreKeys {
  fused::KeySet kind = fused::KeySet::dense;
  // dilated
  std::vector<DilatedBranch> branches;
  fused::BranchMixing mixing = fused::BranchMixing::lse;
  int64_t head_offset = 0;  // global index of local head 0
  int64_t total_heads = 0;  // 0 = the local head count (head groups are those of all total_heads)
  // blocks: one list (shared), H lists (per head) or B*H lists (per (b, h)); optional bias
  // (B, H, nqb, nkb), differentiable.
  // Shared and immutable, so that a layer's fixed pattern is built once and its device copy is
  // found again by identity on every call (make_block_lists wraps a plain vector).
  std::shared_ptr<const std::vector<BlockLists>> block_lists;
  int64_t block_size = 64;
  Tensor block_bias;
};

inline std::shared_ptr<const std::vector<BlockLists>> make_block_lists(std::vector<BlockLists> lists) {
  return std::make_shared<const std::vector<BlockLists>>(std::move(lists));
}

struct CoreOptions {
  double scale = 1.0;
  bool causal = false;
  double dropout = 0.0;  // > 0 is only supported on the composed path
  Impl impl = Impl::automatic;
};

// The core options a layer's config asks for: its scale, causal flag, impl, and its dropout when
// training (none in eval mode).
CoreOptions core_options(const AttentionConfig& config, bool training);

// The precision the math of `backend` runs in for inputs of `dtype`, as reports state it.
std::string compute_precision(fused::Backend backend, DType dtype);

// What attention_core would run for these inputs, and why not fused when it does not.
fused::Selection select_core(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                             const CoreOptions& options);

// The fused problem of q (B, Nq, H, D), k, v (B, Nk, H, D) and the key set, without output
// pointers (output strides: contiguous (B, Nq, H, D)). Validates the key set.
fused::Problem describe_problem(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                                const CoreOptions& options);
// Batch, row and head strides of a (B, N, H, D) tensor, as the kernels take them.
fused::Strides strides_of(const Tensor& x);

// The dtype of the lse the fused kernels write for inputs of `input`: f32, f64 for f64.
DType fused_lse_dtype(DType input);
// out (B, Nq, H, D) in p's dtype and lse (B, H, Nq) (fused_lse_dtype) of p's sizes on `device`,
// allocated and entered in p (pointers and out strides).
AttentionOutput attach_forward_outputs(fused::Problem& p, Device device);
// dq (B, Nq, H, D) and dk, dv (B, Nk, H, D) of bp.forward's sizes, in `dtype` on `device`, allocated
// and entered in bp (pointers and strides).
struct GradientOutputs {
  Tensor dq, dk, dv;
};
GradientOutputs attach_gradient_outputs(fused::BackwardProblem& bp, DType dtype, Device device);

// The fused op itself (no fallback): q (B, Nq, H, D), k, v (B, Nk, H, D), one floating dtype, one
// device. Returns out (B, Nq, H, D) in q's dtype and lse (B, H, Nq) (f32; f64 for f64 inputs).
// Throws the selector's reason when the fused kernels cannot run the problem.
AttentionOutput fused_attention(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                                const CoreOptions& options);

// What ran one attention_core call, for Attention::note_backend.
struct CoreRun {
  std::string backend;
  std::string precision;
};

// The attention core every variant calls: the fused kernels when options.impl and the selector
// allow them, otherwise `composed` (the variant's composed path). impl = fused on a problem the
// fused kernels cannot run throws the selector's reason.
AttentionOutput attention_core(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                               const CoreOptions& options, const std::function<AttentionOutput()>& composed,
                               CoreRun& run);

}  // namespace longtape::attention
