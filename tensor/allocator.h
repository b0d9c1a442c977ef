#pragma once
// Storage: one reference-counted block of device or host memory. Allocation goes through
// allocate_storage(), which uses an aligned, counted host allocator on the CPU and the
// caching memory pool (tensor/cuda/memory_pool.h) on CUDA devices; host blocks go through the host
// cache (tensor/host_cache.h).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "tensor/device.h"

namespace longtape {

struct MemoryStats {
  int64_t allocated_bytes = 0;       // bytes handed out to tensors now
  int64_t peak_allocated_bytes = 0;  // since the last reset_peak
  int64_t reserved_bytes = 0;        // bytes held from the device (allocated + cached)
  int64_t peak_reserved_bytes = 0;
  int64_t device_allocs = 0;         // calls to the device's malloc
  int64_t device_frees = 0;
  int64_t cache_hits = 0;            // requests served from cached blocks
  int64_t retries = 0;               // device mallocs retried after freeing the cache
  int64_t num_allocs = 0;            // requests served in total
};

struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device;
  // In-place modification count, shared by every tensor (view) of this storage: each in-place
  // write bumps it, and autograd compares it with the count an op saved (tensor.h, version()).
  std::atomic<uint64_t> version{0};
  Storage(void* d, size_t n, Device dev) : data(d), nbytes(n), device(dev) {}
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

std::shared_ptr<Storage> allocate_storage(Device device, size_t nbytes);

MemoryStats memory_stats(Device device);
void reset_peak_memory(Device device);
// Returns cached, unused memory to the device (on the CPU: the host cache, tensor/host_cache.h).
void empty_cache(Device device);

// Raw copies between host and device memory (synchronous on the current stream).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes);

}  // namespace longtape
