#include "tensor/allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/host_cache.h"
#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/memory_pool.h"
#include "tensor/cuda/runtime.h"
#endif

namespace longtape {

namespace {
// Host memory statistics: what the CPU backend allocated through tensors.
struct HostCounters {
  std::mutex mutex;
  MemoryStats stats;
} g_host;

void host_count(int64_t delta) {
  std::lock_guard<std::mutex> lock(g_host.mutex);
  MemoryStats& s = g_host.stats;
  s.allocated_bytes += delta;
  s.reserved_bytes = s.allocated_bytes + host_cache::stats().cached_bytes;
  if (delta > 0) {
    ++s.num_allocs;
    ++s.device_allocs;
  } else {
    ++s.device_frees;
  }
  s.peak_allocated_bytes = std::max(s.peak_allocated_bytes, s.allocated_bytes);
  s.peak_reserved_bytes = std::max(s.peak_reserved_bytes, s.reserved_bytes);
}

}  // namespace

Storage::~Storage() {
  if (!data) return;
  if (device.is_cpu()) {
    host_cache::release(data, nbytes);
    host_count(-static_cast<int64_t>(nbytes));
  } else {
#ifdef LONGTAPE_WITH_CUDA
    try {
      cuda::pool_free(device.index, data);
    } catch (const std::exception&) {
      // A destructor must not throw; a failed free (e.g. after a device fault) leaks the block.
    }
#endif
  }
}

std::shared_ptr<Storage> allocate_storage(Device device, size_t nbytes) {
  if (device.is_cpu()) {
#if defined(__GLIBC__)
    // Serve tensors of 1 MiB and more straight from mmap: otherwise glibc raises its threshold
    // after the first large free and keeps freed activations in the heap (RSS far above use).
    static const bool mmap_threshold_set = mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1;
    (void)mmap_threshold_set;
#endif
    void* p = host_cache::allocate(nbytes);
    host_count(static_cast<int64_t>(nbytes));
    return std::make_shared<Storage>(p, nbytes, device);
  }
#ifdef LONGTAPE_WITH_CUDA
  static const int device_count = cuda_device_count();
  LT_CHECK(device.index >= 0 && device.index < device_count, "cannot allocate on ", device.str(),
           ": this machine has ", device_count, " CUDA device(s)");
  void* p = nbytes ? cuda::pool_allocate(device.index, nbytes) : nullptr;
  return std::make_shared<Storage>(p, nbytes, device);
#else
  throw Error("this build of longtape has no CUDA backend (rebuild with -DLONGTAPE_CUDA=ON); asked for " +
              device.str());
#endif
}

MemoryStats memory_stats(Device device) {
  if (device.is_cpu()) {
    const host_cache::Stats cache = host_cache::stats();
    std::lock_guard<std::mutex> lock(g_host.mutex);
    MemoryStats s = g_host.stats;
    s.reserved_bytes = s.allocated_bytes + cache.cached_bytes;
    s.cache_hits = cache.cache_hits;
    s.device_allocs = cache.system_allocs;
    s.device_frees = cache.system_frees;
    return s;
  }
#ifdef LONGTAPE_WITH_CUDA
  return cuda::pool_stats(device.index);
#else
  throw Error("memory_stats: no CUDA backend in this build; asked for " + device.str());
#endif
}

void reset_peak_memory(Device device) {
  if (device.is_cpu()) {
    std::lock_guard<std::mutex> lock(g_host.mutex);
    g_host.stats.peak_allocated_bytes = g_host.stats.allocated_bytes;
    g_host.stats.peak_reserved_bytes = g_host.stats.reserved_bytes;
    return;
  }
#ifdef LONGTAPE_WITH_CUDA
  cuda::pool_reset_peak(device.index);
#endif
}

void empty_cache(Device device) {
  if (device.is_cpu()) host_cache::empty();
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) cuda::pool_empty_cache(device.index);
#endif
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes) {
  if (nbytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, nbytes);
    return;
  }
#ifdef LONGTAPE_WITH_CUDA
  cuda::memcpy_any(dst, dst_device.is_cuda(), src, src_device.is_cuda(), nbytes);
#else
  throw Error("copy between " + src_device.str() + " and " + dst_device.str() +
              " needs the CUDA backend, which this build does not have");
#endif
}

#ifndef LONGTAPE_WITH_CUDA
bool cuda_available() { return false; }
int cuda_device_count() { return 0; }
#endif

Device Device::parse(const std::string& text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  if (text.rfind("cuda:", 0) == 0) {
    try {
      size_t used = 0;
      int n = std::stoi(text.substr(5), &used);
      if (used == text.size() - 5 && n >= 0) return cuda(n);
    } catch (const std::exception&) {
    }
  }
  throw Error("device: expected 'cpu', 'cuda' or 'cuda:N', got '" + text + "'");
}

DType dtype_from_name(const std::string& name) {
  if (name == "f32" || name == "float32" || name == "float") return DType::f32;
  if (name == "f64" || name == "float64" || name == "double") return DType::f64;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  if (name == "f16" || name == "float16" || name == "half") return DType::f16;
  if (name == "i32" || name == "int32") return DType::i32;
  if (name == "i64" || name == "int64") return DType::i64;
  throw Error("dtype: expected one of f32, f64, bf16, f16, i32, i64, got '" + name + "'");
}

}  // namespace longtape
