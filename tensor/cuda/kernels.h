#pragma once
// CUDA implementations of tensor/kernels.h (same contracts, device memory, launched on
// cuda::current_stream()). Plain C++ declarations; the definitions live in tensor/cuda/*.cu.
#include "tensor/kernels.h"

namespace longtape::cuda {
// The same declaration list as the CPU backend, from one shared file so the two cannot drift apart.
#include "tensor/backend_kernels.inc"
}  // namespace longtape::cuda
