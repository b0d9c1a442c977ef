#pragma once
// Plain C++ view of the CUDA runtime pieces the rest of longtape needs (no CUDA headers here).
#include <cstddef>

namespace longtape::cuda {

// Copies between any mix of host and device memory; synchronous with respect to the host.
void memcpy_any(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t nbytes);
void set_device(int device);
int current_device();
void synchronize(int device);
// The stream longtape launches its kernels on (the per-thread default stream for now).
void* current_stream();

}  // namespace longtape::cuda
