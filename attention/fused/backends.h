#pragma once
// The backends behind the fused attention seam and the one selector that picks among them. The
// selector's answer is also the "is this supported?" answer, so the two can never disagree.
#include <string>

#include "attention/fused/problem.h"
#include "tensor/device.h"

namespace longtape::attention::fused {

enum class Backend : uint8_t { composed, cpu_fused, cuda_fused };
const char* backend_name(Backend backend);  // "composed" | "fused-cpu" | "fused-cuda"

struct Selection {
  Backend backend = Backend::composed;
  std::string reason;  // why the fused kernels cannot run this problem (empty when they can)
  bool fused() const { return backend != Backend::composed; }
};

// What a fused kernel on `device` can run: the dtype, head dim, tile constraints, strides and
// alignment of `problem` (pointers may be null: only their alignment is checked when set), and
// dropout (the fused kernels have none: dropout > 0 selects the composed path).
Selection select_backend(const Problem& problem, Device device, double dropout);

// Forward and backward of the fused kernels. Callers go through select_backend first; these
// re-check and throw the selector's reason when called on an unsupported problem.
void cpu_forward(const Problem& problem);
void cpu_backward(const BackwardProblem& problem);
void cuda_forward(const Problem& problem);   // on cuda::current_stream(); no host sync
void cuda_backward(const BackwardProblem& problem);

// What the CUDA kernels support, answered without CUDA headers (empty = supported).
std::string cuda_unsupported_reason(const Problem& problem);

}  // namespace longtape::attention::fused
