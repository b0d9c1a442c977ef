#pragma once
// Caching allocator for host tensors. Freed blocks are kept on per-size-class free lists and
// handed out again for requests of the same class, so a training step reuses last step's
// activation buffers instead of asking the system (mmap + page faults) for every large tensor.
// Size classes: multiples of 64 bytes up to 1 KiB, then four classes per power of two (at most
// 25% slack). Blocks beyond the cap on cached bytes go back to the system at once.
// LONGTAPE_NO_CACHING_ALLOCATOR=1 turns the cache off (every block comes from and returns to the
// system), as for the CUDA pool. Thread-safe.
#include <cstddef>
#include <cstdint>

namespace longtape::host_cache {

struct Stats {
  int64_t cached_bytes = 0;    // free blocks held, by class size
  int64_t cache_hits = 0;      // requests served from a free list
  int64_t system_allocs = 0;   // blocks taken from the system
  int64_t system_frees = 0;    // blocks given back to the system
};

// The block size a request of nbytes is served with.
size_t class_size(size_t nbytes);
// A 64-byte-aligned block of at least nbytes (class_size(nbytes)); throws OutOfMemoryError.
void* allocate(size_t nbytes);
// Returns a block from allocate(nbytes) (the same nbytes).
void release(void* block, size_t nbytes);
Stats stats();
// Gives every cached block back to the system.
void empty();
// Most bytes the free lists may hold (default 1 GiB, LONGTAPE_HOST_CACHE_MB overrides); lowering
// it gives back what is above the new cap.
void set_cap(size_t bytes);
size_t cap();

}  // namespace longtape::host_cache
