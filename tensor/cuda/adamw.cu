// Fused AdamW: one launch updates all parameters (multi-tensor apply). Each block takes one chunk
// of one tensor from a host-built chunk table, so tensors of any size share the launch.
#include <cuda_runtime.h>

#include "tensor/cuda/check.cuh"
#include "tensor/cuda/optim_kernels.h"
#include "tensor/cuda/runtime.h"

namespace longtape::cuda {

namespace {

__global__ void fused_adamw_kernel(const AdamWTensor* __restrict__ tensors, const TensorChunk* __restrict__ chunks,
                                   int64_t chunk_size, AdamWHyper h) {
  if (h.skip_unless_finite && !isfinite(*h.skip_unless_finite)) return;
  float lr = h.lr, bias_correction1 = h.bias_correction1, bias_correction2_sqrt = h.bias_correction2_sqrt;
  if (h.device_scalars) {
    lr = h.device_scalars[0];
    bias_correction1 = h.device_scalars[1];
    bias_correction2_sqrt = h.device_scalars[2];
  }
  const TensorChunk chunk = chunks[blockIdx.x];
  const AdamWTensor t = tensors[chunk.tensor];
  const int64_t end = min(chunk.start + chunk_size, t.numel);
  const float decay = 1.0f - lr * t.weight_decay;
  const float step_size = lr / bias_correction1;
  for (int64_t i = chunk.start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = t.grad[i];
    const float m = h.beta1 * t.exp_avg[i] + (1.0f - h.beta1) * g;
    const float v = h.beta2 * t.exp_avg_sq[i] + (1.0f - h.beta2) * g * g;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    const float denom = sqrtf(v) / bias_correction2_sqrt + h.eps;
    t.param[i] = t.param[i] * decay - step_size * (m / denom);
  }
}

__global__ void set_scalars_kernel(float* out, float a, float b, float c) {
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

}  // namespace

void set_adamw_scalars(float* device_scalars, float lr, float bias_correction1, float bias_correction2_sqrt) {
  set_scalars_kernel<<<1, 1, 0, static_cast<cudaStream_t>(current_stream())>>>(device_scalars, lr, bias_correction1,
                                                                              bias_correction2_sqrt);
  CUDA_CHECK_LAUNCH();
}

void fused_adamw(const AdamWTensor* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                 const AdamWHyper& hyper) {
  if (num_chunks == 0) return;
  LT_CHECK(num_chunks < (int64_t{1} << 31), "fused_adamw: too many chunks (", num_chunks, ")");
  cudaStream_t stream = static_cast<cudaStream_t>(current_stream());
  fused_adamw_kernel<<<static_cast<unsigned>(num_chunks), 256, 0, stream>>>(tensors, chunks, chunk_size, hyper);
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
