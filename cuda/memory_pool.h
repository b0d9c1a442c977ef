#pragma once
// The process-wide caching memory pool, one per CUDA device, created on first use. Plain C++:
// callers need no CUDA headers. Setting LONGTAPE_NO_CACHING_ALLOCATOR=1 in the environment sends
// every allocation straight to cudaMalloc/cudaFree (for compute-sanitizer); the stats still count.
#include <cstddef>

#include "tensor/allocator.h"

namespace longtape::cuda {

// A block of at least `nbytes` on `device`, for work on the calling thread's longtape stream;
// cached blocks are only reused by requests on the stream they were allocated for.
// Throws OutOfMemoryError (with requested, reserved, allocated and the device's free/total bytes)
// when the device has no room even after the pool released its cache.
void* pool_allocate(int device, size_t nbytes);
// Returns a block to the pool. nullptr is ignored; a pointer the pool did not hand out throws.
// CUDA errors caused by the runtime shutting down at process exit are ignored.
void pool_free(int device, void* ptr);
MemoryStats pool_stats(int device);
void pool_reset_peak(int device);
// Returns cached segments that hold no live block to the device.
void pool_empty_cache(int device);
// True when LONGTAPE_NO_CACHING_ALLOCATOR turned the cache off.
bool pool_bypasses_cache();

}  // namespace longtape::cuda
