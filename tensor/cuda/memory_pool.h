#pragma once
// The process-wide caching memory pool, one per CUDA device, created on first use. Plain C++:
// callers need no CUDA headers. Setting LONGTAPE_NO_CACHING_ALLOCATOR=1 in the environment sends
// every allocation straight to cudaMalloc/cudaFree (for compute-sanitizer); the stats still count.
#include <cstddef>
#include <cstdint>

#include "tensor/allocator.h"

namespace longtape::cuda {

// A block of at least `nbytes` on `device`, for work on the calling thread's longtape stream;
// cached blocks are only reused by requests on the stream they were allocated for. When a thread
// exits, its stream is synchronized and its cached blocks become available to every stream.
// Throws OutOfMemoryError (with requested, reserved, allocated and the device's free/total bytes)
// when the device has no room even after the pool released its cache.
void* pool_allocate(int device, size_t nbytes);
// Returns a block to the pool. nullptr is ignored; a pointer the pool did not hand out throws.
// CUDA errors caused by the runtime shutting down at process exit are ignored.
void pool_free(int device, void* ptr);
// The block at `ptr` (from pool_allocate) is also used by work queued on `stream` (a cudaStream_t;
// cudaStreamPerThread means the calling thread's stream): when freed, it is reused only after that
// work has completed, as torch's record_stream. Another thread's per-thread stream cannot be
// named; a block freed while such a stream is recorded makes the free wait for the device.
void pool_record_stream(int device, void* ptr, void* stream);
// Blocks freed after pool_record_stream that still wait for their streams.
size_t pool_pending_frees(int device);
MemoryStats pool_stats(int device);
void pool_reset_peak(int device);
// Returns cached segments that hold no live block to the device.
void pool_empty_cache(int device);
// True when LONGTAPE_NO_CACHING_ALLOCATOR turned the cache off.
bool pool_bypasses_cache();

// Graph-private pools (tensor/cuda/graph.h). pool_begin_private creates a pool on `device` and sends
// every allocation of the calling thread on that device to it until pool_end_private; its blocks
// are reused only by later allocations routed to the same pool, never by other work, so memory a
// captured graph uses stays its own while the graph lives. Returns the pool's id. Throws in
// bypass mode (LONGTAPE_NO_CACHING_ALLOCATOR=1 frees to the device, which a capture forbids) and
// when the thread already routes to a pool.
uintptr_t pool_begin_private(int device);
// The calling thread's allocations go to its stream's cache again.
void pool_end_private(int device);
// The graph that used pool `id` is destroyed: its free segments return to the device, the rest
// (blocks still referenced) join the cache of the thread that created the pool.
void pool_release_private(int device, uintptr_t id);

}  // namespace longtape::cuda
