#pragma once
// The caching memory pool's policy, independent of CUDA so it can be tested on the CPU with a
// fake device. Device memory is requested in segments (2 MiB for small requests, the rounded
// request for large ones); segments are split into blocks that are handed out, and freed blocks
// stay cached (merged with free neighbours) to serve later requests on the same stream without
// another device malloc. A block used on a second stream is reused only after that stream's work
// is done (record_stream); the cache of a stream whose thread exited is shared (retire_stream).
// Thread-safe: ranks run as threads and share one pool per device.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensor/allocator.h"

namespace longtape::cuda {

// The raw device allocator under the pool (cudaMalloc/cudaFree on a GPU, a fake in tests).
class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;
  // Returns nullptr when the device is out of memory; throws on any other failure.
  virtual void* malloc(size_t nbytes) = 0;
  virtual void free(void* ptr) = 0;
  // (free bytes, total bytes) of the device, for out-of-memory messages.
  virtual std::pair<size_t, size_t> mem_info() = 0;
  // How the device is named in messages, e.g. "cuda:0".
  virtual std::string name() const { return "device"; }
  // Stream-ordered reuse (CachingAllocator::record_stream): an event recorded on `stream` now; it
  // completes once all work queued on the stream so far has finished. The default, for a device
  // without asynchronous streams, returns 0, which counts as complete.
  virtual uintptr_t record_event(uintptr_t stream) { return 0; }
  // Whether the event has completed (0 always has). Must not block.
  virtual bool event_completed(uintptr_t event) { return true; }
  virtual void destroy_event(uintptr_t event) {}
};

// Runs `fn` when the calling thread exits (from a thread_local destructor), after the functions
// the thread registered before it. Exceptions from `fn` are swallowed: a thread exit cannot report.
void at_thread_exit(std::function<void()> fn);

struct CachingAllocatorOptions {
  // Every allocate/free goes straight to the device (still counted in the stats), so tools
  // such as compute-sanitizer see each allocation with its exact size.
  bool bypass_cache = false;
};

// "1.50 MiB", "512 B": sizes in messages and tables.
std::string format_bytes(size_t nbytes);

class CachingAllocator {
 public:
  static constexpr size_t kAlignment = 512;             // every block size is a multiple of this
  static constexpr size_t kSmallRequest = size_t{1} << 20;  // requests up to this share segments
  static constexpr size_t kSmallSegment = size_t{2} << 20;  // segment size for small requests
  static constexpr size_t kLargeGranularity = size_t{2} << 20;  // large segments are multiples

  // `device` must outlive the allocator.
  explicit CachingAllocator(DeviceMemory& device, CachingAllocatorOptions options = {});
  // Returns every segment to the device, including blocks still handed out.
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // A block of at least `nbytes` (0 gives a valid, unique pointer) for work on `stream`.
  // Throws OutOfMemoryError when the device has no room even after releasing the cache.
  void* allocate(size_t nbytes, uintptr_t stream = 0);
  // Returns a block to the cache (to the device in bypass mode). nullptr is ignored; a pointer
  // this allocator did not hand out (or already took back) throws longtape::Error.
  void free(void* ptr);

  MemoryStats stats() const;
  // Peaks restart from the current values.
  void reset_peak();
  // Returns every cached segment that has no block in use to the device (a private pool's stay).
  void empty_cache();
  bool bypass_cache() const { return options_.bypass_cache; }

  // Blocks are cached per stream. kSharedStream holds the segments of retired streams: a request
  // on any stream that its own cache cannot serve takes a whole free shared segment (which then
  // belongs to that stream) before asking the device.
  static constexpr uintptr_t kSharedStream = 0;

  // The block behind `ptr` (handed out for another stream) is also used by work on `stream`: when
  // it is freed, an event is recorded on `stream`, and the block is reused only once that event
  // has completed. Without this, a block freed while another stream still reads it could be
  // handed out and overwritten. Repeats and the block's own stream are ignored.
  void record_stream(void* ptr, uintptr_t stream);
  // Blocks freed after record_stream whose events have not all completed yet.
  size_t pending_frees() const;

  // The owner of `stream` is gone (its thread exited) and the stream's work has completed: its
  // wholly free segments join the shared pool, so other streams reuse them instead of leaving them
  // stranded until empty_cache. A segment with a block still in use keeps the key (the block may
  // be freed by a thread whose stream is still using it).
  void retire_stream(uintptr_t stream);

  // Private pools (CUDA graphs): a request under a registered private key is served only from
  // segments of that key, which no other key ever takes, so blocks a captured graph reads or
  // writes are never handed to work outside it. While a key is private, its requests do not
  // process pending frees and do not release cached segments on a failed device malloc (both
  // would call the device in the middle of a capture). Throws for a key already registered.
  void begin_private_pool(uintptr_t key);
  // The graph is gone: wholly free segments of `key` go back to the device, segments with a block
  // still in use (a graph output still referenced) join the cache of `owner` (the stream the
  // graph ran on, so stream order keeps them safe). Throws for a key that is not private.
  void release_private_pool(uintptr_t key, uintptr_t owner);
  bool is_private_pool(uintptr_t key) const;

  // Size of the block behind a pointer handed out by allocate() (>= the rounded request).
  size_t allocation_size(void* ptr) const;

  static size_t round_size(size_t nbytes);
  // Device bytes requested for a new segment that serves a request of `rounded` bytes.
  static size_t segment_size(size_t rounded);

  // A picture of the pool for tests and debugging: every segment with its blocks in address order.
  struct BlockInfo {
    uintptr_t address = 0;
    size_t size = 0;
    bool allocated = false;
  };
  struct SegmentInfo {
    uintptr_t address = 0;
    size_t size = 0;
    uintptr_t stream = 0;
    bool small = false;  // serves requests <= kSmallRequest
    std::vector<BlockInfo> blocks;
  };
  std::vector<SegmentInfo> snapshot() const;

 private:
  struct Segment;
  struct Block {
    uintptr_t stream = 0;
    size_t size = 0;
    char* ptr = nullptr;
    bool allocated = false;
    Segment* segment = nullptr;
    Block* prev = nullptr;  // neighbours inside the same segment, by address
    Block* next = nullptr;
    std::vector<uintptr_t> recorded_streams{};  // other streams that use it (record_stream)
  };
  // A freed block waiting for the events recorded on the streams that used it.
  struct PendingFree {
    Block* block;
    std::vector<uintptr_t> events;
  };
  struct Segment {
    char* base = nullptr;
    size_t size = 0;
    uintptr_t stream = 0;
    bool small = false;
    Block* head = nullptr;  // the block at `base`; merges always keep the lower block, so it stays
  };
  // Best fit: the smallest free block of the same stream that is large enough.
  struct BlockOrder {
    bool operator()(const Block* a, const Block* b) const {
      if (a->stream != b->stream) return a->stream < b->stream;
      if (a->size != b->size) return a->size < b->size;
      return a->ptr < b->ptr;
    }
  };
  using FreeBlocks = std::set<Block*, BlockOrder>;

  FreeBlocks& pool_of(const Segment& segment) { return segment.small ? small_free_ : large_free_; }
  Block* take_cached_block(FreeBlocks& pool, uintptr_t stream, size_t size);
  Block* take_shared_segment(FreeBlocks& pool, uintptr_t stream, size_t size);
  void release_block(Block* block);  // back to its stream's free list, merged with free neighbours
  void process_pending_frees();
  Block* new_segment(size_t rounded, bool small, uintptr_t stream, size_t requested, bool may_release);
  // `may_release`: a failed malloc may return cached segments to the device and try again.
  void* device_malloc_with_retry(size_t nbytes, size_t requested, bool may_release);
  [[noreturn]] void throw_out_of_memory(size_t requested, size_t device_request);
  static bool worth_splitting(bool small, size_t remaining);
  void release_unused_segments();
  void release_segment(Block* head);
  void rekey_segment(Segment& segment, uintptr_t key);  // every block of it to another stream key
  void* bypass_allocate(size_t nbytes);
  void bypass_free(void* ptr);
  void count_allocated(int64_t delta);
  void count_reserved(int64_t delta);

  DeviceMemory& device_;
  const CachingAllocatorOptions options_;
  mutable std::mutex mutex_;
  FreeBlocks small_free_;
  FreeBlocks large_free_;
  std::unordered_map<void*, Block*> allocated_blocks_;
  std::unordered_map<char*, Segment*> segments_;          // by base address
  std::unordered_map<void*, size_t> bypass_allocations_;  // bypass mode: pointer -> size
  std::vector<PendingFree> pending_;
  std::set<uintptr_t> private_pools_;
  MemoryStats stats_;
};

}  // namespace longtape::cuda
