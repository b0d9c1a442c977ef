#include "tensor/cuda/caching_allocator.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "tensor/error.h"

namespace longtape::cuda {

std::string format_bytes(size_t nbytes) {
  static const char* const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (nbytes < 1024) return std::to_string(nbytes) + " B";
  double value = static_cast<double>(nbytes) / 1024.0;
  int unit = 0;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, "%.2f %s", value, units[unit]);
  return text;
}

namespace {

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Requests above this cannot be rounded to a segment size without overflowing.
constexpr size_t kLargestRequest =
    std::numeric_limits<size_t>::max() / 2 - CachingAllocator::kLargeGranularity;

}  // namespace

CachingAllocator::CachingAllocator(DeviceMemory& device, CachingAllocatorOptions options)
    : device_(device), options_(options) {}

CachingAllocator::~CachingAllocator() {
  // Destructors must not throw: a device that fails to free here (e.g. at process exit) is ignored.
  for (auto& [base, segment] : segments_) {
    try {
      device_.free(base);
    } catch (...) {
    }
    Block* block = segment->head;
    while (block) {
      Block* next = block->next;
      delete block;
      block = next;
    }
    delete segment;
  }
  for (auto& [ptr, size] : bypass_allocations_) {
    try {
      device_.free(ptr);
    } catch (...) {
    }
  }
  for (PendingFree& pending : pending_) {
    for (uintptr_t event : pending.events) {
      try {
        device_.destroy_event(event);
      } catch (...) {
      }
    }
  }
}

size_t CachingAllocator::round_size(size_t nbytes) {
  return nbytes == 0 ? kAlignment : round_up(nbytes, kAlignment);
}

size_t CachingAllocator::segment_size(size_t rounded) {
  return rounded <= kSmallRequest ? kSmallSegment : round_up(rounded, kLargeGranularity);
}

bool CachingAllocator::worth_splitting(bool small, size_t remaining) {
  // In small segments any remainder can serve a later request; in large ones a remainder that
  // only a small request could use stays attached (small requests never come from large segments).
  return small ? remaining >= kAlignment : remaining > kSmallRequest;
}

void CachingAllocator::count_allocated(int64_t delta) {
  stats_.allocated_bytes += delta;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
}

void CachingAllocator::count_reserved(int64_t delta) {
  stats_.reserved_bytes += delta;
  stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
}

void at_thread_exit(std::function<void()> fn) {
  struct Hooks {
    std::vector<std::function<void()>> functions;
    ~Hooks() {
      for (auto& f : functions) {
        try {
          f();
        } catch (...) {
        }
      }
    }
  };
  thread_local Hooks hooks;
  hooks.functions.push_back(std::move(fn));
}

void* CachingAllocator::allocate(size_t nbytes, uintptr_t stream) {
  std::lock_guard lock(mutex_);
  if (nbytes > kLargestRequest) throw_out_of_memory(nbytes, nbytes);
  if (options_.bypass_cache) return bypass_allocate(nbytes);
  const bool private_pool = private_pools_.count(stream) > 0;
  if (!private_pool) process_pending_frees();

  const size_t size = round_size(nbytes);
  const bool small = size <= kSmallRequest;
  FreeBlocks& pool = small ? small_free_ : large_free_;
  Block* block = take_cached_block(pool, stream, size);
  if (!block && stream != kSharedStream) block = take_shared_segment(pool, stream, size);
  if (block) {
    ++stats_.cache_hits;
  } else {
    block = new_segment(size, small, stream, nbytes, /*may_release=*/!private_pool);
  }

  const size_t remaining = block->size - size;
  if (worth_splitting(small, remaining)) {
    auto* rest = new Block{stream, remaining, block->ptr + size, false, block->segment, block,
                           block->next};
    if (block->next) block->next->prev = rest;
    block->next = rest;
    block->size = size;
    pool.insert(rest);
  }
  block->allocated = true;
  allocated_blocks_.emplace(block->ptr, block);
  count_allocated(static_cast<int64_t>(block->size));
  ++stats_.num_allocs;
  return block->ptr;
}

CachingAllocator::Block* CachingAllocator::take_cached_block(FreeBlocks& pool, uintptr_t stream,
                                                             size_t size) {
  Block key{stream, size, nullptr};
  auto it = pool.lower_bound(&key);
  if (it == pool.end() || (*it)->stream != stream) return nullptr;
  Block* block = *it;
  pool.erase(it);
  return block;
}

CachingAllocator::Block* CachingAllocator::take_shared_segment(FreeBlocks& pool, uintptr_t stream, size_t size) {
  // Only a whole free segment changes hands: a segment's blocks all belong to one stream, and a
  // shared block next to one still in use elsewhere could not be merged back safely.
  Block key{kSharedStream, size, nullptr};
  for (auto it = pool.lower_bound(&key); it != pool.end() && (*it)->stream == kSharedStream; ++it) {
    Block* block = *it;
    if (block->prev || block->next) continue;
    pool.erase(it);
    block->stream = stream;
    block->segment->stream = stream;
    return block;
  }
  return nullptr;
}

CachingAllocator::Block* CachingAllocator::new_segment(size_t rounded, bool small, uintptr_t stream,
                                                       size_t requested, bool may_release) {
  const size_t bytes = segment_size(rounded);
  auto* base = static_cast<char*>(device_malloc_with_retry(bytes, requested, may_release));
  auto* segment = new Segment{base, bytes, stream, small, nullptr};
  auto* block = new Block{stream, bytes, base, false, segment, nullptr, nullptr};
  segment->head = block;
  segments_.emplace(base, segment);
  count_reserved(static_cast<int64_t>(bytes));
  return block;
}

void* CachingAllocator::device_malloc_with_retry(size_t nbytes, size_t requested, bool may_release) {
  void* ptr = device_.malloc(nbytes);
  if (!ptr && !may_release) throw_out_of_memory(requested, nbytes);
  if (!ptr) {
    // Cached segments of other sizes or streams may be what fills the device.
    release_unused_segments();
    ++stats_.retries;
    ptr = device_.malloc(nbytes);
    if (!ptr) throw_out_of_memory(requested, nbytes);
  }
  ++stats_.device_allocs;
  return ptr;
}

void CachingAllocator::throw_out_of_memory(size_t requested, size_t device_request) {
  std::string device_state;
  try {
    auto [free_bytes, total_bytes] = device_.mem_info();
    device_state = detail::concat("the device has ", format_bytes(free_bytes), " free of ",
                                  format_bytes(total_bytes), " total");
  } catch (const std::exception& error) {
    device_state = detail::concat("the device's free/total memory is unknown (", error.what(), ")");
  }
  throw OutOfMemoryError(detail::concat(
      "out of memory on ", device_.name(), ": requested ", format_bytes(requested), " (", requested,
      " bytes, a device allocation of ", format_bytes(device_request), "); this pool has ",
      format_bytes(static_cast<size_t>(stats_.reserved_bytes)), " reserved, of which ",
      format_bytes(static_cast<size_t>(stats_.allocated_bytes)), " allocated to live tensors; ",
      device_state, ". Free tensors that are no longer needed or use smaller sizes."));
}

void CachingAllocator::free(void* ptr) {
  if (!ptr) return;
  std::lock_guard lock(mutex_);
  if (options_.bypass_cache) return bypass_free(ptr);

  auto it = allocated_blocks_.find(ptr);
  LT_CHECK(it != allocated_blocks_.end(),
           "free: expected a pointer returned by allocate() and not yet freed, got ", ptr);
  Block* block = it->second;
  allocated_blocks_.erase(it);
  if (!block->recorded_streams.empty()) {
    // Still counted as allocated until the other streams are done with it.
    PendingFree pending{block, {}};
    try {
      for (uintptr_t stream : block->recorded_streams) pending.events.push_back(device_.record_event(stream));
    } catch (...) {
      for (uintptr_t event : pending.events) device_.destroy_event(event);
      allocated_blocks_.emplace(block->ptr, block);  // still owned by the caller, as before the call
      throw;
    }
    block->recorded_streams.clear();
    pending_.push_back(std::move(pending));
    return;
  }
  release_block(block);
}

void CachingAllocator::release_block(Block* block) {
  count_allocated(-static_cast<int64_t>(block->size));
  block->allocated = false;

  FreeBlocks& pool = pool_of(*block->segment);
  // Merge into the lower block so a segment's head block never goes away.
  if (Block* next = block->next; next && !next->allocated) {
    pool.erase(next);
    block->size += next->size;
    block->next = next->next;
    if (next->next) next->next->prev = block;
    delete next;
  }
  if (Block* prev = block->prev; prev && !prev->allocated) {
    pool.erase(prev);
    prev->size += block->size;
    prev->next = block->next;
    if (block->next) block->next->prev = prev;
    delete block;
    block = prev;
  }
  pool.insert(block);
}

void CachingAllocator::process_pending_frees() {
  auto done = [this](PendingFree& p) {
    for (uintptr_t event : p.events)
      if (!device_.event_completed(event)) return false;
    for (uintptr_t event : p.events) device_.destroy_event(event);
    release_block(p.block);
    return true;
  };
  pending_.erase(std::remove_if(pending_.begin(), pending_.end(), done), pending_.end());
}

void CachingAllocator::record_stream(void* ptr, uintptr_t stream) {
  std::lock_guard lock(mutex_);
  if (options_.bypass_cache) {
    // Each block goes back to the device, whose free waits for all work: nothing to defer.
    LT_CHECK(bypass_allocations_.count(ptr), "record_stream: expected a pointer returned by allocate() and not yet "
             "freed, got ", ptr);
    return;
  }
  auto it = allocated_blocks_.find(ptr);
  LT_CHECK(it != allocated_blocks_.end(),
           "record_stream: expected a pointer returned by allocate() and not yet freed, got ", ptr);
  Block* block = it->second;
  if (stream == block->stream) return;
  auto& streams = block->recorded_streams;
  if (std::find(streams.begin(), streams.end(), stream) == streams.end()) streams.push_back(stream);
}

size_t CachingAllocator::pending_frees() const {
  std::lock_guard lock(mutex_);
  return pending_.size();
}

void CachingAllocator::retire_stream(uintptr_t stream) {
  LT_CHECK(stream != kSharedStream, "retire_stream: the shared stream ", kSharedStream, " cannot be retired");
  std::lock_guard lock(mutex_);
  process_pending_frees();
  for (auto& [base, segment] : segments_) {
    if (segment->stream != stream) continue;
    // A segment with a block still in use stays with the exited thread's key: that block may be
    // freed later by a thread whose stream is still using it, and only this key keeps it from
    // being handed to another stream at once.
    bool in_use = false;
    for (Block* block = segment->head; block; block = block->next) in_use = in_use || block->allocated;
    if (in_use) continue;
    rekey_segment(*segment, kSharedStream);
  }
}

void CachingAllocator::rekey_segment(Segment& segment, uintptr_t key) {
  FreeBlocks& pool = pool_of(segment);
  // The free lists are ordered by stream first: re-key each free block outside the set.
  for (Block* block = segment.head; block; block = block->next) {
    if (!block->allocated) pool.erase(block);
    block->stream = key;
    if (!block->allocated) pool.insert(block);
  }
  segment.stream = key;
}

void CachingAllocator::begin_private_pool(uintptr_t key) {
  std::lock_guard lock(mutex_);
  LT_CHECK(key != kSharedStream, "begin_private_pool: the shared key ", kSharedStream, " cannot be private");
  LT_CHECK(private_pools_.insert(key).second, "begin_private_pool: expected a key not yet private, got ", key);
}

bool CachingAllocator::is_private_pool(uintptr_t key) const {
  std::lock_guard lock(mutex_);
  return private_pools_.count(key) > 0;
}

void CachingAllocator::release_private_pool(uintptr_t key, uintptr_t owner) {
  std::lock_guard lock(mutex_);
  LT_CHECK(private_pools_.count(key), "release_private_pool: expected a private pool's key, got ", key);
  LT_CHECK(!private_pools_.count(owner), "release_private_pool: the owner ", owner, " is itself a private pool");
  std::vector<Block*> unused;
  for (auto& [base, segment] : segments_) {
    if (segment->stream != key) continue;
    if (!segment->head->allocated && !segment->head->next) {
      unused.push_back(segment->head);
      continue;
    }
    rekey_segment(*segment, owner);
  }
  private_pools_.erase(key);
  for (Block* head : unused) release_segment(head);
}

void CachingAllocator::release_segment(Block* head) {
  Segment* segment = head->segment;
  device_.free(segment->base);  // first, so a throwing device leaves the bookkeeping intact
  pool_of(*segment).erase(head);
  segments_.erase(segment->base);
  ++stats_.device_frees;
  count_reserved(-static_cast<int64_t>(segment->size));
  delete head;
  delete segment;
}

void CachingAllocator::release_unused_segments() {
  // After merging, a segment with nothing in use is a single free block covering all of it.
  for (FreeBlocks* pool : {&small_free_, &large_free_}) {
    std::vector<Block*> unused;
    for (Block* block : *pool)  // a live graph's pool keeps its segments (its replays use them)
      if (!block->prev && !block->next && !private_pools_.count(block->stream)) unused.push_back(block);
    for (Block* block : unused) release_segment(block);
  }
}

void CachingAllocator::empty_cache() {
  std::lock_guard lock(mutex_);
  process_pending_frees();
  release_unused_segments();
}

void* CachingAllocator::bypass_allocate(size_t nbytes) {
  // The exact size (at least one byte) so memory checkers flag accesses just past the end.
  const size_t bytes = std::max<size_t>(nbytes, 1);
  void* ptr = device_.malloc(bytes);
  if (!ptr) throw_out_of_memory(nbytes, bytes);
  bypass_allocations_.emplace(ptr, bytes);
  ++stats_.device_allocs;
  ++stats_.num_allocs;
  count_reserved(static_cast<int64_t>(bytes));
  count_allocated(static_cast<int64_t>(bytes));
  return ptr;
}

void CachingAllocator::bypass_free(void* ptr) {
  auto it = bypass_allocations_.find(ptr);
  LT_CHECK(it != bypass_allocations_.end(),
           "free: expected a pointer returned by allocate() and not yet freed, got ", ptr);
  const size_t bytes = it->second;
  device_.free(ptr);
  bypass_allocations_.erase(it);
  ++stats_.device_frees;
  count_allocated(-static_cast<int64_t>(bytes));
  count_reserved(-static_cast<int64_t>(bytes));
}

MemoryStats CachingAllocator::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard lock(mutex_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
}

size_t CachingAllocator::allocation_size(void* ptr) const {
  std::lock_guard lock(mutex_);
  if (options_.bypass_cache) {
    auto it = bypass_allocations_.find(ptr);
    LT_CHECK(it != bypass_allocations_.end(),
             "allocation_size: expected a pointer returned by allocate(), got ", ptr);
    return it->second;
  }
  auto it = allocated_blocks_.find(ptr);
  LT_CHECK(it != allocated_blocks_.end(),
           "allocation_size: expected a pointer returned by allocate(), got ", ptr);
  return it->second->size;
}

std::vector<CachingAllocator::SegmentInfo> CachingAllocator::snapshot() const {
  std::lock_guard lock(mutex_);
  std::vector<SegmentInfo> result;
  for (const auto& [base, segment] : segments_) {
    SegmentInfo info{reinterpret_cast<uintptr_t>(base), segment->size, segment->stream,
                     segment->small, {}};
    for (const Block* block = segment->head; block; block = block->next)
      info.blocks.push_back({reinterpret_cast<uintptr_t>(block->ptr), block->size, block->allocated});
    result.push_back(std::move(info));
  }
  for (const auto& [ptr, size] : bypass_allocations_) {
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    result.push_back({address, size, 0, false, {{address, size, true}}});
  }
  std::sort(result.begin(), result.end(),
            [](const SegmentInfo& a, const SegmentInfo& b) { return a.address < b.address; });
  return result;
}

}  // namespace longtape::cuda
