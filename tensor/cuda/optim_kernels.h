#pragma once
// Fused optimizer kernels (tensor/cuda/adamw.cu). Plain C++ declarations, no CUDA headers: callers build
// the tensor list on the host, copy it to device memory, and launch once for all parameters.
#include <cstdint>

namespace longtape::cuda {

// One parameter of a fused AdamW step; every pointer is device memory of `numel` f32 values.
struct AdamWTensor {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  float weight_decay;  // 0 for parameters that do not decay
  float pad_ = 0.0f;
};

// The work of one thread block of a fused kernel over a tensor list (AdamW, gradient clipping):
// elements [start, min(start + chunk, numel)) of list entry `tensor`.
struct TensorChunk {
  int64_t tensor;
  int64_t start;
};

struct AdamWHyper {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float bias_correction1;       // 1 - beta1^t
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  // CUDA graphs: when set, lr, bias_correction1 and bias_correction2_sqrt are read from these
  // three device floats (written before each replay by set_adamw_scalars) instead of the fields.
  const float* device_scalars = nullptr;
  // When set, the whole update (moments included) is skipped if this device float is not finite
  // (the gradient norm of the step: a diverged step leaves the weights as they were).
  const float* skip_unless_finite = nullptr;
};

// Writes (lr, bias_correction1, bias_correction2_sqrt) to `device_scalars` with one tiny kernel on
// the current stream (no host synchronisation; outside a graph, before its replay).
void set_adamw_scalars(float* device_scalars, float lr, float bias_correction1, float bias_correction2_sqrt);

// Updates every listed parameter in ONE kernel launch on the current longtape stream:
//   p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// `tensors` and `chunks` are device arrays; each chunk covers `chunk_size` elements.
void fused_adamw(const AdamWTensor* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                 const AdamWHyper& hyper);

// One gradient of a fused norm or scale: `numel` f32 values of device memory.
struct GradientRef {
  float* data;
  int64_t numel;
};

// Gradient clipping (tensor/cuda/grad_clip.cu), one launch each on the current longtape stream:
// partials[c] = sum of g^2 over chunk c (a fixed order per chunk), and g *= scale in place.
void fused_sum_squares(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                       float* partials);
void fused_scale(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                 float scale);
// The clipping rule on the device, for CUDA graphs: with n = *norm (the global norm), when n is
// finite and n > max_norm every gradient is scaled by float(max_norm / (n + 1e-6)) (computed in
// double, as the host does), else nothing changes.
void fused_clip_to_norm(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                        const float* norm, double max_norm);

}  // namespace longtape::cuda
