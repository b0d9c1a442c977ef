#pragma once
// CPU implementations of tensor/kernels.h (same contracts, host memory).
#include "tensor/kernels.h"

namespace longtape::cpu {
// The same declaration list as the CUDA backend, from one shared file so the two cannot drift apart.
#include "tensor/backend_kernels.inc"
}  // namespace longtape::cpu
