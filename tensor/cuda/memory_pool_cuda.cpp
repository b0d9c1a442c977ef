// The per-device pools over cudaMalloc/cudaFree. The pools are created once and deliberately never
// destroyed: tensors held by static objects may be freed during process exit, after any static
// pool would already be gone.
#include "tensor/cuda/memory_pool.h"

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "tensor/cuda/caching_allocator.h"
#include "tensor/cuda/runtime.h"
#include "tensor/error.h"

namespace longtape::cuda {
namespace {

constexpr int kMaxDevices = 64;

void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw Error(detail::concat("CUDA error in ", call, ": ", cudaGetErrorString(status)));
}

// Errors that only mean the runtime is being torn down (process exit): nothing left to free.
bool is_shutdown_error(cudaError_t status) {
  return status == cudaErrorCudartUnloading || status == cudaErrorContextIsDestroyed;
}

// Makes `device` current for a scope and restores the previous device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);  // a destructor must not throw
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The private pool the calling thread's allocations go to (0 = none) and its device.
thread_local uintptr_t t_private_key = 0;
thread_local int t_private_device = -1;

class CudaDeviceMemory final : public DeviceMemory {
 public:
  explicit CudaDeviceMemory(int device) : device_(device) {}

  void* malloc(size_t nbytes) override {
    DeviceScope scope(device_);
    void* ptr = nullptr;
    // A graph's pool grows during its capture: cudaMalloc is not captured (the block outlives the
    // graph's replays), so this thread's capture mode is relaxed for the one call.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    if (t_private_key != 0) check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
    const cudaError_t status = cudaMalloc(&ptr, nbytes);
    if (t_private_key != 0) cudaThreadExchangeStreamCaptureMode(&mode);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear it, so later error checks do not report this handled failure
      return nullptr;
    }
    check_cuda(status, "cudaMalloc");
    return ptr;
  }

  void free(void* ptr) override {
    // cudaFree finds the owning device from the pointer (unified addressing); no device switch,
    // which could itself fail while the runtime shuts down.
    const cudaError_t status = cudaFree(ptr);
    if (is_shutdown_error(status)) {
      cudaGetLastError();
      return;
    }
    check_cuda(status, "cudaFree");
  }

  std::pair<size_t, size_t> mem_info() override {
    DeviceScope scope(device_);
    size_t free_bytes = 0, total_bytes = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    return {free_bytes, total_bytes};
  }

  std::string name() const override { return "cuda:" + std::to_string(device_); }

  uintptr_t record_event(uintptr_t stream_key) override;

  bool event_completed(uintptr_t event) override {
    const cudaError_t status = cudaEventQuery(reinterpret_cast<cudaEvent_t>(event));
    if (status == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    if (is_shutdown_error(status)) {
      cudaGetLastError();
      return true;
    }
    check_cuda(status, "cudaEventQuery");
    return true;
  }

  void destroy_event(uintptr_t event) override {
    const cudaError_t status = cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event));
    if (status != cudaSuccess) cudaGetLastError();  // nothing to do about it; clear the sticky state
  }

 private:
  int device_;
};

bool bypass_from_environment() {
  const char* value = std::getenv("LONGTAPE_NO_CACHING_ALLOCATOR");
  return value && *value && std::strcmp(value, "0") != 0;
}

using PoolSlots = std::array<std::atomic<CachingAllocator*>, kMaxDevices>;

PoolSlots& pool_slots() {
  static auto* slots = new PoolSlots();  // never destroyed, see the top of the file
  return *slots;
}

void check_device_index(int device) {
  LT_CHECK(device >= 0 && device < kMaxDevices, "memory pool: expected a CUDA device index in [0, ",
           kMaxDevices, "), got ", device);
}

// The device's pool if it was created, else nullptr.
CachingAllocator* existing_pool(int device) {
  check_device_index(device);
  return pool_slots()[device].load(std::memory_order_acquire);
}

CachingAllocator& pool_for(int device) {
  if (CachingAllocator* pool = existing_pool(device)) return *pool;
  static auto* creation = new std::mutex();
  std::lock_guard lock(*creation);
  auto& slot = pool_slots()[device];
  if (CachingAllocator* pool = slot.load(std::memory_order_acquire)) return *pool;
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  LT_CHECK(device < count, "memory pool: expected a CUDA device index in [0, ", count, "), got ",
           device);
  auto* memory = new CudaDeviceMemory(device);
  auto* pool = new CachingAllocator(*memory, {.bypass_cache = bypass_from_environment()});
  slot.store(pool, std::memory_order_release);
  return *pool;
}

// The key under which blocks are cached: the stream longtape launches on. That is the per-thread
// default stream, whose handle is the same constant in every thread although each thread has its
// own stream, so the key is the thread instead: a block freed by one thread (its kernels possibly
// still running) must not be handed to another thread's stream. When the thread exits, its
// stream is synchronized and its cache retired into the pool's shared one.
thread_local const char thread_identity = 0;

uintptr_t this_thread_key() { return reinterpret_cast<uintptr_t>(&thread_identity); }

uintptr_t stream_key(void* stream) {
  if (stream != static_cast<void*>(cudaStreamPerThread)) return reinterpret_cast<uintptr_t>(stream);
  return this_thread_key();
}

// Keys that stand for a thread's per-thread stream (not stream handles), while the thread lives.
std::mutex& thread_keys_mutex() {
  static auto* m = new std::mutex();
  return *m;
}
std::set<uintptr_t>& thread_keys() {
  static auto* keys = new std::set<uintptr_t>();
  return *keys;
}

// The first allocation of a thread on its per-thread stream arranges that, when the thread exits,
// the stream is synchronized and the pool's cache for it is handed to every stream.
void retire_at_thread_exit(int device, CachingAllocator& pool) {
  thread_local std::array<bool, kMaxDevices> registered{};
  if (registered[device]) return;
  registered[device] = true;
  const uintptr_t key = this_thread_key();
  {
    std::lock_guard lock(thread_keys_mutex());
    thread_keys().insert(key);
  }
  at_thread_exit([device, key, &pool] {
    {
      std::lock_guard lock(thread_keys_mutex());
      thread_keys().erase(key);
    }
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      return;  // the runtime is gone (process exit): nothing will reuse the cache
    }
    const cudaError_t status = cudaStreamSynchronize(cudaStreamPerThread);
    cudaSetDevice(previous);
    if (status != cudaSuccess) {
      cudaGetLastError();
      return;  // blocks whose work may still run are left to this thread's key, never reused
    }
    pool.retire_stream(key);
  });
}

}  // namespace

uintptr_t CudaDeviceMemory::record_event(uintptr_t key) {
  cudaStream_t stream = nullptr;
  if (key == this_thread_key()) {
    stream = cudaStreamPerThread;
  } else {
    bool other_thread = false;
    {
      std::lock_guard lock(thread_keys_mutex());
      other_thread = thread_keys().count(key) > 0;
    }
    if (other_thread) {
      // Another thread's per-thread stream has no handle this thread can record on: wait for the
      // whole device instead, after which the block is free of any work.
      DeviceScope scope(device_);
      check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      return 0;
    }
    stream = reinterpret_cast<cudaStream_t>(key);
  }
  DeviceScope scope(device_);
  cudaEvent_t event = nullptr;
  check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  const cudaError_t status = cudaEventRecord(event, stream);
  if (status != cudaSuccess) {
    cudaEventDestroy(event);
    check_cuda(status, "cudaEventRecord");
  }
  return reinterpret_cast<uintptr_t>(event);
}

// Private pools: the key of a pool and the thread key of its creator.
std::mutex& private_mutex() {
  static auto* m = new std::mutex();
  return *m;
}
std::map<uintptr_t, uintptr_t>& private_owners() {
  static auto* owners = new std::map<uintptr_t, uintptr_t>();
  return *owners;
}

void* pool_allocate(int device, size_t nbytes) {
  CachingAllocator& pool = pool_for(device);
  if (t_private_key != 0 && device == t_private_device) return pool.allocate(nbytes, t_private_key);
  void* stream = current_stream();
  if (stream == static_cast<void*>(cudaStreamPerThread) && !pool.bypass_cache()) retire_at_thread_exit(device, pool);
  return pool.allocate(nbytes, stream_key(stream));
}

void pool_record_stream(int device, void* ptr, void* stream) {
  if (!ptr) return;
  CachingAllocator* pool = existing_pool(device);
  LT_CHECK(pool, "pool_record_stream: expected a pointer from the pool of cuda:", device,
           ", but that pool never allocated anything; got ", ptr);
  pool->record_stream(ptr, stream_key(stream));
}

size_t pool_pending_frees(int device) {
  CachingAllocator* pool = existing_pool(device);
  return pool ? pool->pending_frees() : 0;
}

void pool_free(int device, void* ptr) {
  if (!ptr) return;
  CachingAllocator* pool = existing_pool(device);
  LT_CHECK(pool, "pool_free: expected a pointer from the pool of cuda:", device,
           ", but that pool never allocated anything; got ", ptr);
  pool->free(ptr);
}

MemoryStats pool_stats(int device) {
  CachingAllocator* pool = existing_pool(device);
  return pool ? pool->stats() : MemoryStats{};
}

void pool_reset_peak(int device) {
  if (CachingAllocator* pool = existing_pool(device)) pool->reset_peak();
}

void pool_empty_cache(int device) {
  if (CachingAllocator* pool = existing_pool(device)) pool->empty_cache();
}

uintptr_t pool_begin_private(int device) {
  LT_CHECK(t_private_key == 0, "memory pool: this thread already allocates from a graph's private pool on cuda:",
           t_private_device, "; captures do not nest");
  CachingAllocator& pool = pool_for(device);
  LT_CHECK(!pool.bypass_cache(), "memory pool: a CUDA graph needs the caching pool, but "
           "LONGTAPE_NO_CACHING_ALLOCATOR is set (it frees straight to the device, which a capture forbids)");
  // The key: the address of a byte that lives as long as the pool, so it can never equal another
  // pool's key, a thread's key or a stream handle.
  const uintptr_t key = reinterpret_cast<uintptr_t>(new char);
  pool.begin_private_pool(key);
  {
    std::lock_guard lock(private_mutex());
    private_owners()[key] = this_thread_key();
  }
  retire_at_thread_exit(device, pool);
  t_private_key = key;
  t_private_device = device;
  return key;
}

void pool_end_private(int device) {
  if (device != t_private_device) return;
  t_private_key = 0;
  t_private_device = -1;
}

void pool_release_private(int device, uintptr_t id) {
  CachingAllocator* pool = existing_pool(device);
  LT_CHECK(pool, "pool_release_private: cuda:", device, " has no pool");
  uintptr_t owner = 0;
  {
    std::lock_guard lock(private_mutex());
    auto it = private_owners().find(id);
    LT_CHECK(it != private_owners().end(), "pool_release_private: expected a private pool's id, got ", id);
    owner = it->second;
    private_owners().erase(it);
  }
  pool->release_private_pool(id, owner);
  delete reinterpret_cast<char*>(id);
}

bool pool_bypasses_cache() {
  static const bool bypass = bypass_from_environment();
  return bypass;
}

}  // namespace longtape::cuda
