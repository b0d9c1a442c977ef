#include "attention/fused/backends.h"

#include <cstdint>

#include "tensor/error.h"

namespace longtape::attention::fused {

namespace {

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool strides_vectorisable(const Strides& s) { return s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0; }

}  // namespace

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::composed: return "composed";
    case Backend::cpu_fused: return "fused-cpu";
    case Backend::cuda_fused: return "fused-cuda";
  }
  return "unknown";
}

std::string cuda_unsupported_reason(const Problem& p) {
  using detail::concat;
  // bf16 and f16 run on tensor cores; f32 runs exact on the CUDA cores (no TF32); f64 runs composed.
  if (!is_half_precision(p.dtype) && p.dtype != DType::f32)
    return concat("the fused CUDA kernels take bf16, f16 or f32 inputs, got ", dtype_name(p.dtype));
  if (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128)
    return concat("the fused CUDA kernels take head_dim 32, 64 or 128, got ", p.head_dim);
  if (!(p.scale > 0.0))  // the kernels take row maxima of unscaled scores
    return concat("the fused CUDA kernels take a positive softmax scale, got ", p.scale);
  if (p.heads > kMaxHeads) return concat("the fused CUDA kernels take at most ", kMaxHeads, " heads, got ", p.heads);
  if (p.batch > 65535) return concat("the fused CUDA kernels take a batch of at most 65535, got ", p.batch);
  if (p.causal && p.seq_q != p.seq_k)
    return concat("causal attention needs as many queries as keys, got ", p.seq_q, " and ", p.seq_k);
  if (p.key_set == KeySet::dilated) {
    if (p.seq_q != p.seq_k)
      return concat("dilated attention needs as many queries as keys, got ", p.seq_q, " and ", p.seq_k);
    if (p.dilated.num_branches < 1 || p.dilated.num_branches > kMaxBranches)
      return concat("the fused kernels take 1 to ", kMaxBranches, " dilated branches, got ", p.dilated.num_branches);
    for (int i = 0; i < p.dilated.num_branches; ++i)
      if (p.dilated.dilation[i] > 32767)
        return concat("the fused CUDA kernels take dilation rates up to 32767, got ", p.dilated.dilation[i]);
  }
  if (p.key_set == KeySet::blocks) {
    if (p.blocks.block_size % 64 != 0)
      return concat("the fused CUDA kernels take block_size a multiple of 64, got ", p.blocks.block_size);
    if (p.blocks.bias && p.blocks.block_size != 64)
      return concat("the fused CUDA kernels take a block bias only with block_size 64, got ", p.blocks.block_size);
    if (p.seq_q != p.seq_k)
      return concat("block-sparse attention needs as many queries as keys, got ", p.seq_q, " and ", p.seq_k);
  }
  if (p.dtype == DType::f32) return "";  // the f32 kernels fall back to scalar loads for unaligned rows
  if (!strides_vectorisable(p.q_stride) || !strides_vectorisable(p.k_stride) || !strides_vectorisable(p.v_stride) ||
      !strides_vectorisable(p.out_stride))
    return "the fused CUDA kernels need batch, row and head strides that are multiples of 8 elements";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return "the fused CUDA kernels need 16-byte aligned q, k, v and out";
  return "";
}

Selection select_backend(const Problem& problem, Device device, double dropout) {
  Selection s;
  if (dropout > 0.0) {
    s.reason = "dropout > 0 runs on the composed path (the fused kernels apply no dropout)";
    return s;
  }
  if (device.is_cpu()) {
    if (problem.dtype == DType::f32 || problem.dtype == DType::f64)
      s.backend = Backend::cpu_fused;
    else
      s.reason = detail::concat("the fused CPU kernels take f32 or f64 inputs, got ", dtype_name(problem.dtype));
    return s;
  }
#ifdef LONGTAPE_WITH_CUDA
  s.reason = cuda_unsupported_reason(problem);
  if (s.reason.empty()) s.backend = Backend::cuda_fused;
#else
  s.reason = "longtape was built without CUDA";
#endif
  return s;
}

#ifndef LONGTAPE_WITH_CUDA
void cuda_forward(const Problem&) { LT_CHECK(false, "fused attention (CUDA): longtape was built without CUDA"); }
void cuda_backward(const BackwardProblem&) {
  LT_CHECK(false, "fused attention (CUDA): longtape was built without CUDA");
}
#endif

}  // namespace longtape::attention::fused
