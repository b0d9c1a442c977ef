// Gradient-norm clipping over all parameters in two launches instead of three small kernels per
// parameter: one for the per-chunk sums of squares (each chunk reduced in a fixed order, so the
// norm has the same bits on every run), one to scale every gradient in place.
#include <cuda_runtime.h>

#include "tensor/cuda/block_reduce.cuh"
#include "tensor/cuda/check.cuh"
#include "tensor/cuda/optim_kernels.h"
#include "tensor/cuda/runtime.h"

namespace longtape::cuda {

namespace {

constexpr int kClipThreads = 256;

__global__ void sum_squares_kernel(const GradientRef* __restrict__ tensors, const TensorChunk* __restrict__ chunks,
                                   int64_t chunk_size, float* __restrict__ partials) {
  __shared__ float shared[32];
  const TensorChunk chunk = chunks[blockIdx.x];
  const GradientRef t = tensors[chunk.tensor];
  const int64_t end = min(chunk.start + chunk_size, t.numel);
  float acc = 0.0f;
  for (int64_t i = chunk.start + threadIdx.x; i < end; i += blockDim.x) {
    const float g = t.data[i];
    acc = fmaf(g, g, acc);
  }
  acc = impl::block_reduce(acc, impl::SumOp{}, 0.0f, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Scales this block's chunk of gradient in place.
__device__ __forceinline__ void scale_block_chunk(const GradientRef* __restrict__ tensors,
                                                  const TensorChunk* __restrict__ chunks, int64_t chunk_size,
                                                  float scale) {
  const TensorChunk chunk = chunks[blockIdx.x];
  const GradientRef t = tensors[chunk.tensor];
  const int64_t end = min(chunk.start + chunk_size, t.numel);
  for (int64_t i = chunk.start + threadIdx.x; i < end; i += blockDim.x) t.data[i] *= scale;
}

__global__ void scale_kernel(const GradientRef* __restrict__ tensors, const TensorChunk* __restrict__ chunks,
                             int64_t chunk_size, float scale) {
  scale_block_chunk(tensors, chunks, chunk_size, scale);
}

// The host's rule (nn/optim.cpp scale_grads_to_norm) on a norm that stays on the device.
__global__ void clip_to_norm_kernel(const GradientRef* __restrict__ tensors, const TensorChunk* __restrict__ chunks,
                                    int64_t chunk_size, const float* __restrict__ norm, double max_norm) {
  const double n = static_cast<double>(*norm);
  if (!isfinite(n) || n <= max_norm) return;
  scale_block_chunk(tensors, chunks, chunk_size, static_cast<float>(max_norm / (n + 1e-6)));
}

}  // namespace

void fused_clip_to_norm(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                        const float* norm, double max_norm) {
  if (num_chunks == 0) return;
  LT_CHECK(num_chunks < (int64_t{1} << 31), "fused_clip_to_norm: too many chunks (", num_chunks, ")");
  clip_to_norm_kernel<<<static_cast<unsigned>(num_chunks), kClipThreads, 0,
                        static_cast<cudaStream_t>(current_stream())>>>(tensors, chunks, chunk_size, norm, max_norm);
  CUDA_CHECK_LAUNCH();
}

void fused_sum_squares(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                       float* partials) {
  if (num_chunks == 0) return;
  LT_CHECK(num_chunks < (int64_t{1} << 31), "fused_sum_squares: too many chunks (", num_chunks, ")");
  sum_squares_kernel<<<static_cast<unsigned>(num_chunks), kClipThreads, 0, static_cast<cudaStream_t>(current_stream())>>>(
      tensors, chunks, chunk_size, partials);
  CUDA_CHECK_LAUNCH();
}

void fused_scale(const GradientRef* tensors, const TensorChunk* chunks, int64_t num_chunks, int64_t chunk_size,
                 float scale) {
  if (num_chunks == 0) return;
  LT_CHECK(num_chunks < (int64_t{1} << 31), "fused_scale: too many chunks (", num_chunks, ")");
  scale_kernel<<<static_cast<unsigned>(num_chunks), kClipThreads, 0, static_cast<cudaStream_t>(current_stream())>>>(
      tensors, chunks, chunk_size, scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
