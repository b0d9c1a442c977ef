// The caching memory pool: its policy on the CPU with a fake device, then (with a GPU) the
// per-device pools over cudaMalloc.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensor/cuda/caching_allocator.h"
#include "tensor/error.h"

#ifdef LONGTAPE_WITH_CUDA
#include <cuda_runtime.h>

#include "tensor/cuda/memory_pool.h"
#include "tensor/device.h"
#endif

using longtape::MemoryStats;
using longtape::cuda::CachingAllocator;
using longtape::cuda::CachingAllocatorOptions;
using longtape::cuda::DeviceMemory;
using longtape::cuda::format_bytes;

namespace {

constexpr size_t KiB = size_t{1} << 10;
constexpr size_t MiB = size_t{1} << 20;

// A device with a capacity limit that hands out fake addresses (never dereferenced) and counts calls.
class FakeDevice final : public DeviceMemory {
 public:
  explicit FakeDevice(size_t capacity) : capacity_(capacity) {}

  void* malloc(size_t nbytes) override {
    ++malloc_calls;
    if (nbytes > capacity_ - used_) {
      ++failed_mallocs;
      return nullptr;
    }
    const uintptr_t address = next_address_;
    // A gap between allocations so blocks of different segments can never look adjacent.
    next_address_ += (nbytes + 4095) / 4096 * 4096 + 4096;
    used_ += nbytes;
    live_.emplace(address, nbytes);
    sizes.push_back(nbytes);
    return reinterpret_cast<void*>(address);
  }

  void free(void* ptr) override {
    auto it = live_.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == live_.end()) throw std::logic_error("fake device: free of a pointer it never gave out");
    used_ -= it->second;
    live_.erase(it);
    ++free_calls;
  }

  std::pair<size_t, size_t> mem_info() override { return {capacity_ - used_, capacity_}; }
  std::string name() const override { return "fake:0"; }

  // Events complete only when the test says the stream's work is done (finish_stream).
  uintptr_t record_event(uintptr_t stream) override {
    events_.push_back({stream, false});
    return events_.size();  // ids from 1: 0 means "already complete"
  }
  bool event_completed(uintptr_t event) override { return events_.at(event - 1).second; }
  void destroy_event(uintptr_t event) override { ++destroyed_events; }
  void finish_stream(uintptr_t stream) {
    for (auto& [on, done] : events_)
      if (on == stream) done = true;
  }
  size_t recorded_events() const { return events_.size(); }
  int destroyed_events = 0;

  size_t used() const { return used_; }
  size_t live_count() const { return live_.size(); }
  bool is_live(void* ptr) const { return live_.count(reinterpret_cast<uintptr_t>(ptr)) > 0; }

  int malloc_calls = 0;
  int failed_mallocs = 0;
  int free_calls = 0;
  std::vector<size_t> sizes;  // sizes of successful mallocs, in order

 private:
  size_t capacity_;
  size_t used_ = 0;
  uintptr_t next_address_ = uintptr_t{1} << 32;
  std::map<uintptr_t, size_t> live_;
  std::vector<std::pair<uintptr_t, bool>> events_;  // (stream, completed)
};

uintptr_t address_of(void* ptr) { return reinterpret_cast<uintptr_t>(ptr); }

// Checks everything that must hold for any pool state; `live` maps handed-out pointers to the
// sizes that were requested for them. Violations are counted so one CHECK reports each property.
void check_invariants(const CachingAllocator& pool, const FakeDevice& device,
                      const std::map<void*, size_t>& live) {
  const MemoryStats stats = pool.stats();
  const auto segments = pool.snapshot();

  size_t reserved = 0;
  size_t allocated_in_snapshot = 0;
  size_t allocated_blocks = 0;
  int untiled = 0, misaligned = 0, unmerged = 0, unknown_blocks = 0;
  for (const auto& segment : segments) {
    reserved += segment.size;
    REQUIRE(!segment.blocks.empty());
    uintptr_t expected_address = segment.address;
    bool previous_free = false;
    for (const auto& block : segment.blocks) {
      // Blocks tile their segment, are aligned, and free neighbours were merged.
      untiled += block.address != expected_address;
      misaligned += block.size % CachingAllocator::kAlignment != 0;
      unmerged += previous_free && !block.allocated;
      previous_free = !block.allocated;
      expected_address += block.size;
      if (block.allocated) {
        allocated_in_snapshot += block.size;
        ++allocated_blocks;
        unknown_blocks += live.count(reinterpret_cast<void*>(block.address)) != 1;
      }
    }
    untiled += expected_address != segment.address + segment.size;
  }
  CHECK(untiled == 0);
  CHECK(misaligned == 0);
  CHECK(unmerged == 0);
  CHECK(unknown_blocks == 0);
  CHECK(allocated_blocks == live.size());

  // Live blocks: large enough for their request and never overlapping.
  size_t allocated_by_live = 0;
  uintptr_t previous_end = 0;
  int too_small = 0, overlapping = 0;
  for (const auto& [ptr, requested] : live) {  // std::map: ordered by address
    const size_t size = pool.allocation_size(ptr);
    too_small += size < CachingAllocator::round_size(requested);
    overlapping += address_of(ptr) < previous_end;
    previous_end = address_of(ptr) + size;
    allocated_by_live += size;
  }
  CHECK(too_small == 0);
  CHECK(overlapping == 0);

  CHECK(stats.allocated_bytes == static_cast<int64_t>(allocated_by_live));
  CHECK(stats.allocated_bytes == static_cast<int64_t>(allocated_in_snapshot));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(reserved));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(device.used()));
  CHECK(stats.device_allocs - stats.device_frees == static_cast<int64_t>(segments.size()));
  CHECK(device.live_count() == segments.size());
  CHECK(stats.peak_allocated_bytes >= stats.allocated_bytes);
  CHECK(stats.peak_reserved_bytes >= stats.reserved_bytes);
  CHECK(stats.reserved_bytes >= stats.allocated_bytes);
}

}  // namespace

TEST_CASE("format_bytes writes sizes in readable units") {
  CHECK(format_bytes(0) == "0 B");
  CHECK(format_bytes(512) == "512 B");
  CHECK(format_bytes(1536) == "1.50 KiB");
  CHECK(format_bytes(2 * MiB) == "2.00 MiB");
  CHECK(format_bytes(size_t{80} << 30) == "80.00 GiB");
}

TEST_CASE("sizes are rounded up to 512 bytes") {
  CHECK(CachingAllocator::round_size(0) == 512);
  CHECK(CachingAllocator::round_size(1) == 512);
  CHECK(CachingAllocator::round_size(512) == 512);
  CHECK(CachingAllocator::round_size(513) == 1024);
  CHECK(CachingAllocator::round_size(1000 * 1000) == 1954 * 512);
  CHECK(CachingAllocator::segment_size(512) == 2 * MiB);
  CHECK(CachingAllocator::segment_size(MiB) == 2 * MiB);
  CHECK(CachingAllocator::segment_size(MiB + 512) == 2 * MiB);
  CHECK(CachingAllocator::segment_size(3 * MiB + 512) == 4 * MiB);

  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  std::mt19937 rng(std::random_device{}());
  const size_t odd_size = 1 + std::uniform_int_distribution<size_t>(0, 510)(rng) + 512 * 7;
  void* a = pool.allocate(odd_size);
  CHECK(pool.allocation_size(a) == 8 * 512);
  CHECK(address_of(a) % 512 == 0);
  CHECK(pool.stats().allocated_bytes == 8 * 512);

  // Zero bytes still gives a distinct, valid pointer.
  void* empty1 = pool.allocate(0);
  void* empty2 = pool.allocate(0);
  CHECK(empty1 != nullptr);
  CHECK(empty1 != empty2);
  CHECK(pool.allocation_size(empty1) == 512);

  // A large request gets its own segment, rounded up to a multiple of 2 MiB.
  void* large = pool.allocate(3 * MiB + 1);
  CHECK(device.sizes.back() == 4 * MiB);
  CHECK(pool.stats().reserved_bytes == static_cast<int64_t>(6 * MiB));
  pool.free(a);
  pool.free(empty1);
  pool.free(empty2);
  pool.free(large);
  CHECK(pool.stats().allocated_bytes == 0);
}

TEST_CASE("small requests share one 2 MiB segment") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<size_t> size_dist(1, 64 * KiB);

  std::vector<void*> blocks;
  size_t total = 0;
  while (true) {
    const size_t size = size_dist(rng);
    if (total + CachingAllocator::round_size(size) > 2 * MiB) break;
    total += CachingAllocator::round_size(size);
    blocks.push_back(pool.allocate(size));
  }
  REQUIRE(blocks.size() >= 20);
  CHECK(device.malloc_calls == 1);
  CHECK(device.sizes.at(0) == 2 * MiB);
  const auto segments = pool.snapshot();
  REQUIRE(segments.size() == 1);
  for (void* ptr : blocks) {
    CHECK(address_of(ptr) >= segments[0].address);
    CHECK(address_of(ptr) + pool.allocation_size(ptr) <= segments[0].address + 2 * MiB);
  }
  const MemoryStats stats = pool.stats();
  CHECK(stats.reserved_bytes == static_cast<int64_t>(2 * MiB));
  CHECK(stats.allocated_bytes == static_cast<int64_t>(total));
  CHECK(stats.num_allocs == static_cast<int64_t>(blocks.size()));
  CHECK(stats.cache_hits == static_cast<int64_t>(blocks.size()) - 1);  // all but the first

  // A request that no longer fits opens a second segment.
  void* overflow = pool.allocate(2 * MiB - total + 512);
  CHECK(device.malloc_calls == 2);
  CHECK(pool.snapshot().size() == 2);
  for (void* ptr : blocks) pool.free(ptr);
  pool.free(overflow);
}

TEST_CASE("split blocks merge back so the whole segment is reused") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);

  SUBCASE("small segment") {
    std::vector<void*> quarters;
    for (int i = 0; i < 4; ++i) quarters.push_back(pool.allocate(512 * KiB));
    CHECK(device.malloc_calls == 1);
    for (int i = 1; i < 4; ++i)
      CHECK(address_of(quarters[i]) == address_of(quarters[i - 1]) + 512 * KiB);
    // Free in an order that needs merges on both sides.
    for (int index : {1, 3, 0, 2}) pool.free(quarters[index]);
    const auto segments = pool.snapshot();
    REQUIRE(segments.size() == 1);
    REQUIRE(segments[0].blocks.size() == 1);
    CHECK(segments[0].blocks[0].size == 2 * MiB);
    CHECK_FALSE(segments[0].blocks[0].allocated);

    void* whole = pool.allocate(MiB);
    CHECK(device.malloc_calls == 1);
    CHECK(whole == quarters[0]);
    void* rest = pool.allocate(MiB);
    CHECK(device.malloc_calls == 1);
    CHECK(address_of(rest) == address_of(whole) + MiB);
    pool.free(rest);
    pool.free(whole);
  }

  SUBCASE("large segment") {
    void* big = pool.allocate(8 * MiB);
    pool.free(big);
    void* first = pool.allocate(3 * MiB);
    void* second = pool.allocate(3 * MiB);
    CHECK(device.malloc_calls == 1);
    CHECK(first == big);
    CHECK(address_of(second) == address_of(big) + 3 * MiB);
    pool.free(first);
    pool.free(second);
    void* again = pool.allocate(8 * MiB);
    CHECK(device.malloc_calls == 1);
    CHECK(again == big);
    CHECK(pool.stats().cache_hits == 3);
    pool.free(again);
  }
  CHECK(pool.stats().allocated_bytes == 0);
}

TEST_CASE("a remainder too small to be useful stays attached to the block") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  // 1.5 MiB in a 2 MiB large segment: the 0.5 MiB left over could only serve small requests,
  // which never come from large segments.
  void* a = pool.allocate(MiB + 512 * KiB);
  CHECK(pool.allocation_size(a) == 2 * MiB);
  CHECK(pool.snapshot().at(0).blocks.size() == 1);
  // Small segments split down to a single 512 B remainder.
  void* b = pool.allocate(2 * MiB - 512 - 512 * KiB);  // > 1 MiB: large
  void* c = pool.allocate(MiB - 512);
  void* d = pool.allocate(MiB);
  CHECK(pool.allocation_size(c) == MiB - 512);
  CHECK(pool.allocation_size(d) == MiB);
  void* e = pool.allocate(1);
  CHECK(address_of(e) == address_of(c) + 2 * MiB - 512);  // the last 512 B of c's segment
  for (void* ptr : {a, b, c, d, e}) pool.free(ptr);
}

TEST_CASE("allocation picks the best-fitting free block") {
  FakeDevice device(256 * MiB);
  CachingAllocator pool(device);

  SUBCASE("large blocks in separate segments") {
    void* four = pool.allocate(4 * MiB);
    void* ten = pool.allocate(10 * MiB);
    void* six = pool.allocate(6 * MiB);
    for (void* ptr : {four, ten, six}) pool.free(ptr);
    const int mallocs = device.malloc_calls;
    CHECK(pool.allocate(5 * MiB) == six);
    CHECK(pool.allocate(3 * MiB) == four);
    CHECK(pool.allocate(7 * MiB) == ten);
    CHECK(device.malloc_calls == mallocs);
  }

  SUBCASE("small blocks inside one segment") {
    // Free holes of 64, 256 and 128 KiB kept apart by live 16 KiB blocks, then the free tail.
    std::vector<void*> blocks;
    for (size_t size : {64, 16, 256, 16, 128, 16}) blocks.push_back(pool.allocate(size * KiB));
    for (int index : {0, 2, 4}) pool.free(blocks[index]);
    CHECK(pool.allocate(100 * KiB) == blocks[4]);  // the 128 KiB hole
    CHECK(pool.allocate(60 * KiB) == blocks[0]);   // the 64 KiB hole
    CHECK(pool.allocate(200 * KiB) == blocks[2]);  // the 256 KiB hole
    CHECK(device.malloc_calls == 1);
  }
}

TEST_CASE("a block freed on one stream only serves that stream") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  const uintptr_t stream_a = 0x1000, stream_b = 0x2000;

  void* on_a = pool.allocate(4 * MiB, stream_a);
  pool.free(on_a);
  void* on_b = pool.allocate(4 * MiB, stream_b);
  CHECK(on_b != on_a);
  CHECK(device.malloc_calls == 2);
  void* again_a = pool.allocate(4 * MiB, stream_a);
  CHECK(again_a == on_a);
  CHECK(device.malloc_calls == 2);

  void* small_a = pool.allocate(1000, stream_a);
  pool.free(small_a);
  void* small_b = pool.allocate(1000, stream_b);
  CHECK(device.malloc_calls == 4);  // a small segment for each stream
  for (const auto& segment : pool.snapshot())
    for (const auto& block : segment.blocks)
      if (block.address == address_of(small_b)) CHECK(segment.stream == stream_b);
  pool.free(on_b);
  pool.free(again_a);
  pool.free(small_b);
}

TEST_CASE("a block recorded on another stream is reused only after that stream's work completes") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  const uintptr_t own = 0x1000, reader = 0x2000, writer = 0x3000;

  void* block = pool.allocate(4 * MiB, own);
  pool.record_stream(block, reader);
  pool.record_stream(block, writer);
  pool.record_stream(block, reader);  // repeats are ignored
  pool.record_stream(block, own);     // so is the block's own stream
  pool.free(block);
  CHECK(device.recorded_events() == 2);  // one per other stream, recorded at the free
  CHECK(pool.pending_frees() == 1);
  // Still counted as allocated: nobody may reuse it yet.
  CHECK(pool.stats().allocated_bytes == static_cast<int64_t>(4 * MiB));

  void* other = pool.allocate(4 * MiB, own);
  CHECK(other != block);
  CHECK(device.malloc_calls == 2);
  device.finish_stream(reader);
  void* third = pool.allocate(4 * MiB, own);
  CHECK(third != block);  // the writer's event has not completed
  CHECK(pool.pending_frees() == 1);
  device.finish_stream(writer);
  void* again = pool.allocate(4 * MiB, own);
  CHECK(again == block);  // released at this request, and served from the cache
  CHECK(pool.pending_frees() == 0);
  CHECK(device.destroyed_events == 2);
  CHECK(device.malloc_calls == 3);

  // A block freed without record_stream is reusable at once, and its record list was cleared.
  pool.free(again);
  CHECK(pool.pending_frees() == 0);
  CHECK(pool.allocate(4 * MiB, own) == block);
  for (void* p : {block, other, third}) pool.free(p);
  check_invariants(pool, device, {});

  CHECK_THROWS_WITH_AS(pool.record_stream(block, reader), doctest::Contains("record_stream: expected a pointer"),
                       longtape::Error);
}

TEST_CASE("empty_cache releases pending blocks whose streams are done, and keeps the others") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  void* a = pool.allocate(4 * MiB, 0x10);
  void* b = pool.allocate(4 * MiB, 0x10);
  pool.record_stream(a, 0x20);
  pool.record_stream(b, 0x30);
  pool.free(a);
  pool.free(b);
  device.finish_stream(0x20);
  pool.empty_cache();
  CHECK(pool.pending_frees() == 1);
  CHECK(device.is_live(b));
  CHECK_FALSE(device.is_live(a));
  device.finish_stream(0x30);
  pool.empty_cache();
  CHECK(pool.pending_frees() == 0);
  CHECK(device.live_count() == 0);
}

TEST_CASE("at_thread_exit runs a thread's functions in order when it exits") {
  std::vector<int> order;
  std::thread worker([&] {
    longtape::cuda::at_thread_exit([&] { order.push_back(1); });
    longtape::cuda::at_thread_exit([] { throw std::runtime_error("swallowed"); });
    longtape::cuda::at_thread_exit([&] { order.push_back(2); });
    order.push_back(0);
  });
  worker.join();
  CHECK(order == std::vector<int>{0, 1, 2});
}

// Each thread caches under its own key (as the CUDA pool keys a thread's per-thread stream) and
// retires it when it exits, as pool_allocate arranges.
uintptr_t thread_stream_key() {
  thread_local const char identity = 0;
  return reinterpret_cast<uintptr_t>(&identity);
}

TEST_CASE("blocks cached by a thread that exited are reused by other streams") {
  FakeDevice device(256 * MiB);
  CachingAllocator pool(device);
  std::map<void*, size_t> live;
  void* outliving = nullptr;
  void* worker_small = nullptr;
  uintptr_t worker_key = 0;
  std::thread worker([&] {
    const uintptr_t key = thread_stream_key();
    worker_key = key;
    longtape::cuda::at_thread_exit([&pool, key] { pool.retire_stream(key); });
    void* large = pool.allocate(8 * MiB, key);
    void* small = pool.allocate(1000, key);
    worker_small = small;
    outliving = pool.allocate(2000, key);  // handed to the main thread, freed there later
    pool.free(large);
    pool.free(small);
  });
  worker.join();
  REQUIRE(worker_key != 0);
  live[outliving] = 2000;
  check_invariants(pool, device, live);
  // Whole free segments are shared; the one holding the outliving block keeps the worker's key.
  for (const auto& segment : pool.snapshot()) {
    const bool holds_outliving = address_of(outliving) >= segment.address &&
                                 address_of(outliving) < segment.address + segment.size;
    CHECK(segment.stream == (holds_outliving ? worker_key : CachingAllocator::kSharedStream));
  }
  const int mallocs = device.malloc_calls;
  const int64_t hits = pool.stats().cache_hits;

  // The worker's whole free large segment serves another stream without a device malloc ...
  const uintptr_t main_stream = 0x5000;
  void* large = pool.allocate(8 * MiB, main_stream);
  CHECK(device.malloc_calls == mallocs);
  CHECK(pool.stats().cache_hits == hits + 1);
  // ... and now belongs to that stream.
  for (const auto& segment : pool.snapshot())
    if (segment.address == address_of(large)) CHECK(segment.stream == main_stream);
  // The small segment still holds the outliving block: it is not split between streams.
  void* small = pool.allocate(1000, main_stream);
  CHECK(device.malloc_calls == mallocs + 1);
  live[large] = 8 * MiB;
  live[small] = 1000;
  check_invariants(pool, device, live);

  // The outliving block may be freed while the freeing thread's stream still uses it: its
  // segment stays with the exited worker's key, so no other stream takes it.
  pool.free(outliving);
  live.erase(outliving);
  void* other = pool.allocate(1500, 0x6000);
  CHECK(device.malloc_calls == mallocs + 2);
  CHECK(other != worker_small);
  live[other] = 1500;
  check_invariants(pool, device, live);
  for (auto& [ptr, size] : live) pool.free(ptr);
  CHECK_THROWS_AS(pool.retire_stream(CachingAllocator::kSharedStream), longtape::Error);
}

TEST_CASE("many short-lived threads do not grow the pool") {
  FakeDevice device(2048 * MiB);
  CachingAllocator pool(device);
  // Every thread gets a key no thread had before (as distinct streams would), so without
  // retiring, each would strand its segments in the cache.
  std::atomic<uintptr_t> next_key{0x100000};
  auto work = [&pool, &next_key] {
    const uintptr_t key = next_key.fetch_add(0x100);
    longtape::cuda::at_thread_exit([&pool, key] { pool.retire_stream(key); });
    const size_t sizes[] = {3 * MiB, 700 * KiB, 12 * MiB};
    std::vector<void*> held;
    for (int i = 0; i < 12; ++i) held.push_back(pool.allocate(sizes[i % 3], key));
    for (void* p : held) pool.free(p);
  };
  std::thread(work).join();
  const int64_t one_thread = pool.stats().reserved_bytes;
  for (int wave = 0; wave < 8; ++wave) {
    std::thread a(work), b(work);
    a.join();
    b.join();
  }
  INFO("reserved after one thread: ", one_thread, ", after 16 more: ", pool.stats().reserved_bytes);
  // Two threads at a time need about twice what one needed; stranded caches would need 17 times.
  CHECK(pool.stats().reserved_bytes <= 3 * one_thread);
  check_invariants(pool, device, {});
}

TEST_CASE("a failed device malloc releases the cache and retries once") {
  FakeDevice device(8 * MiB);
  CachingAllocator pool(device);
  // Fill the device with cached small segments, then ask for a large block.
  std::vector<void*> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(pool.allocate(MiB));
  CHECK(device.malloc_calls == 4);
  for (void* ptr : blocks) pool.free(ptr);
  CHECK(pool.stats().reserved_bytes == static_cast<int64_t>(8 * MiB));

  void* large = pool.allocate(6 * MiB);
  const MemoryStats stats = pool.stats();
  CHECK(stats.retries == 1);
  CHECK(device.failed_mallocs == 1);
  CHECK(stats.device_frees == 4);
  CHECK(stats.reserved_bytes == static_cast<int64_t>(6 * MiB));
  CHECK(device.is_live(large));
  pool.free(large);
}

TEST_CASE("out of memory throws OutOfMemoryError with the numbers that explain it") {
  FakeDevice device(8 * MiB);
  CachingAllocator pool(device);
  void* held = pool.allocate(4 * MiB);
  void* small = pool.allocate(100 * KiB);  // keeps its 2 MiB segment in use
  void* cached = pool.allocate(2 * MiB);
  pool.free(cached);  // a cached 2 MiB segment, too small for the request below

  std::string message;
  try {
    pool.allocate(3 * MiB);
  } catch (const longtape::OutOfMemoryError& error) {
    message = error.what();
  }
  REQUIRE_FALSE(message.empty());
  INFO(message);
  CHECK(message.find("fake:0") != std::string::npos);
  CHECK(message.find("requested 3.00 MiB") != std::string::npos);
  CHECK(message.find("6.00 MiB reserved") != std::string::npos);  // after releasing the cache
  CHECK(message.find("4.10 MiB allocated") != std::string::npos);
  CHECK(message.find("2.00 MiB free") != std::string::npos);
  CHECK(message.find("8.00 MiB total") != std::string::npos);
  CHECK(pool.stats().retries == 1);
  CHECK(device.failed_mallocs == 2);

  // Also an ordinary longtape::Error; the pool keeps working afterwards.
  CHECK_THROWS_AS(pool.allocate(7 * MiB), longtape::Error);
  void* fits = pool.allocate(2 * MiB);
  CHECK(device.is_live(fits));
  CHECK(pool.stats().allocated_bytes == static_cast<int64_t>(6 * MiB + 100 * KiB));
  // A request too large to even round is refused without reaching the device.
  const int mallocs = device.malloc_calls;
  CHECK_THROWS_AS(pool.allocate(SIZE_MAX), longtape::OutOfMemoryError);
  CHECK(device.malloc_calls == mallocs);
  pool.free(held);
  pool.free(small);
  pool.free(fits);
}

TEST_CASE("stats count allocations, device calls, cache hits and peaks") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  void* a = pool.allocate(4 * MiB);     // its own 4 MiB segment
  void* b = pool.allocate(100 * KiB);   // 2 MiB segment
  void* c = pool.allocate(200 * KiB);   // same segment
  MemoryStats stats = pool.stats();
  CHECK(stats.allocated_bytes == static_cast<int64_t>(4 * MiB + 300 * KiB));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(6 * MiB));
  CHECK(stats.device_allocs == 2);
  CHECK(stats.cache_hits == 1);
  CHECK(stats.num_allocs == 3);

  pool.free(a);
  pool.free(c);
  stats = pool.stats();
  CHECK(stats.allocated_bytes == static_cast<int64_t>(100 * KiB));
  CHECK(stats.peak_allocated_bytes == static_cast<int64_t>(4 * MiB + 300 * KiB));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(6 * MiB));
  CHECK(stats.device_frees == 0);

  pool.reset_peak();
  stats = pool.stats();
  CHECK(stats.peak_allocated_bytes == static_cast<int64_t>(100 * KiB));
  CHECK(stats.peak_reserved_bytes == static_cast<int64_t>(6 * MiB));
  void* d = pool.allocate(MiB);
  pool.free(d);
  pool.empty_cache();  // the 4 MiB segment goes; b keeps the small one
  stats = pool.stats();
  CHECK(stats.peak_allocated_bytes == static_cast<int64_t>(100 * KiB + MiB));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(2 * MiB));
  CHECK(stats.peak_reserved_bytes == static_cast<int64_t>(6 * MiB));
  CHECK(stats.device_frees == 1);
  CHECK(stats.cache_hits == 2);
  CHECK(stats.num_allocs == 4);
  pool.reset_peak();
  CHECK(pool.stats().peak_reserved_bytes == static_cast<int64_t>(2 * MiB));
  pool.free(b);
}

TEST_CASE("empty_cache releases only segments with nothing in use") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  std::vector<void*> first_segment;
  for (int i = 0; i < 4; ++i) first_segment.push_back(pool.allocate(512 * KiB));
  void* in_second = pool.allocate(512 * KiB);
  void* second_rest = pool.allocate(512 * KiB);
  void* large = pool.allocate(5 * MiB);
  CHECK(device.live_count() == 3);
  for (void* ptr : first_segment) pool.free(ptr);
  pool.free(second_rest);
  pool.free(large);

  pool.empty_cache();
  CHECK(device.live_count() == 1);
  CHECK(pool.stats().reserved_bytes == static_cast<int64_t>(2 * MiB));
  CHECK(pool.stats().device_frees == 2);
  CHECK(pool.allocation_size(in_second) == 512 * KiB);
  // The surviving segment still serves requests from its free part.
  void* reuse = pool.allocate(MiB);
  CHECK(device.malloc_calls == 3);
  pool.free(reuse);
  pool.free(in_second);
  pool.empty_cache();
  CHECK(device.live_count() == 0);
  CHECK(pool.stats().reserved_bytes == 0);
  CHECK(pool.snapshot().empty());
}

TEST_CASE("bypass mode sends every allocation to the device with its exact size") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device, CachingAllocatorOptions{.bypass_cache = true});
  CHECK(pool.bypass_cache());
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<size_t> size_dist(1, 3 * MiB);

  std::vector<std::pair<void*, size_t>> blocks;
  size_t total = 0;
  for (int i = 0; i < 10; ++i) {
    const size_t size = size_dist(rng);
    blocks.emplace_back(pool.allocate(size), size);
    total += size;
    CHECK(device.sizes.back() == size);
  }
  CHECK(device.malloc_calls == 10);
  MemoryStats stats = pool.stats();
  CHECK(stats.allocated_bytes == static_cast<int64_t>(total));
  CHECK(stats.reserved_bytes == static_cast<int64_t>(total));
  CHECK(stats.device_allocs == 10);
  CHECK(stats.num_allocs == 10);

  for (auto& [ptr, size] : blocks) pool.free(ptr);
  CHECK(device.free_calls == 10);
  CHECK(device.live_count() == 0);
  void* again = pool.allocate(blocks[0].second);
  CHECK(device.malloc_calls == 11);  // nothing cached
  stats = pool.stats();
  CHECK(stats.cache_hits == 0);
  CHECK(stats.device_frees == 10);
  CHECK(stats.peak_allocated_bytes == static_cast<int64_t>(total));
  CHECK_THROWS_AS(pool.free(blocks[1].first), longtape::Error);
  CHECK_THROWS_AS(pool.allocate(128 * MiB), longtape::OutOfMemoryError);
  pool.free(again);
  CHECK(pool.stats().allocated_bytes == 0);
}

TEST_CASE("freeing a pointer the pool does not own throws") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  void* ptr = pool.allocate(4096);
  int local = 0;
  CHECK_THROWS_AS(pool.free(&local), longtape::Error);
  CHECK_THROWS_AS(pool.free(static_cast<char*>(ptr) + 512), longtape::Error);  // interior pointer
  CHECK_THROWS_AS(pool.allocation_size(&local), longtape::Error);
  pool.free(nullptr);  // ignored, like std::free
  pool.free(ptr);
  CHECK_THROWS_AS(pool.free(ptr), longtape::Error);  // double free
  CHECK(pool.stats().allocated_bytes == 0);
}

TEST_CASE("randomized churn keeps every invariant") {
  const uint64_t seed = std::random_device{}();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  FakeDevice device(192 * MiB);
  CachingAllocator pool(device);
  std::map<void*, size_t> live;
  std::uniform_real_distribution<double> log_size(0.0, std::log(32.0 * MiB));
  std::uniform_int_distribution<int> stream_dist(0, 2);
  std::uniform_real_distribution<double> coin(0.0, 1.0);

  int out_of_memory = 0;
  for (int op = 0; op < 4000; ++op) {
    const double roll = coin(rng);
    if (roll < 0.005) {
      pool.empty_cache();
    } else if (roll < 0.005 + 0.01) {
      pool.reset_peak();
      CHECK(pool.stats().peak_allocated_bytes == pool.stats().allocated_bytes);
    } else if (live.empty() || (live.size() < 64 && roll < 0.55)) {
      const size_t size = static_cast<size_t>(std::exp(log_size(rng)));
      try {
        void* ptr = pool.allocate(size, static_cast<uintptr_t>(stream_dist(rng)));
        REQUIRE(live.count(ptr) == 0);
        live.emplace(ptr, size);
      } catch (const longtape::OutOfMemoryError&) {
        ++out_of_memory;
      }
    } else {
      auto it = live.begin();
      std::advance(it, std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng));
      pool.free(it->first);
      live.erase(it);
    }
    check_invariants(pool, device, live);
  }
  const MemoryStats stats = pool.stats();
  MESSAGE("churn: " << stats.num_allocs << " allocations, " << stats.cache_hits << " cache hits, "
                    << stats.device_allocs << " device mallocs, " << stats.retries << " retries, "
                    << out_of_memory << " out-of-memory errors");
  CHECK(stats.cache_hits > stats.num_allocs / 2);

  for (auto& [ptr, size] : live) pool.free(ptr);
  live.clear();
  check_invariants(pool, device, live);
  pool.empty_cache();
  CHECK(device.live_count() == 0);
  CHECK(pool.stats().reserved_bytes == 0);
}

TEST_CASE("threads sharing one pool keep it consistent") {
  FakeDevice device(size_t{1} << 40);
  CachingAllocator pool(device);
  const uint64_t seed = std::random_device{}();
  INFO("seed = " << seed);
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  std::vector<int> failures(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      std::uniform_real_distribution<double> log_size(0.0, std::log(8.0 * MiB));
      std::vector<void*> mine;
      for (int op = 0; op < 3000; ++op) {
        if (mine.empty() || rng() % 2 == 0) {
          mine.push_back(pool.allocate(static_cast<size_t>(std::exp(log_size(rng))), rng() % 2));
        } else {
          const size_t index = rng() % mine.size();
          pool.free(mine[index]);
          mine[index] = mine.back();
          mine.pop_back();
        }
        if (op % 500 == 0) pool.empty_cache();
      }
      for (void* ptr : mine) {
        try {
          pool.free(ptr);
        } catch (const longtape::Error&) {
          ++failures[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int failure : failures) CHECK(failure == 0);
  check_invariants(pool, device, {});
  CHECK(pool.stats().allocated_bytes == 0);
  CHECK(pool.stats().num_allocs > 4000);
  pool.empty_cache();
  CHECK(device.live_count() == 0);
}

TEST_CASE("destroying the allocator returns every segment to the device") {
  FakeDevice device(64 * MiB);
  {
    CachingAllocator pool(device);
    pool.allocate(3 * MiB);
    void* cached = pool.allocate(100);
    pool.free(cached);
    CHECK(device.live_count() == 2);
  }
  CHECK(device.live_count() == 0);
  CHECK(device.used() == 0);
}

#ifdef LONGTAPE_WITH_CUDA

TEST_CASE("a private pool serves only its own key, reuses its frees inside itself and keeps its segments") {
  FakeDevice device(64 * MiB);
  CachingAllocator pool(device);
  constexpr uintptr_t kStream = 7, kGraph = 1001;
  std::map<void*, size_t> live;
  // A block freed on the stream before the capture is not taken by the private pool.
  void* before = pool.allocate(300 * KiB, kStream);
  pool.free(before);
  pool.begin_private_pool(kGraph);
  CHECK(pool.is_private_pool(kGraph));
  CHECK_THROWS_WITH_AS(pool.begin_private_pool(kGraph), doctest::Contains("not yet private"), longtape::Error);
  void* a = pool.allocate(300 * KiB, kGraph);
  void* big = pool.allocate(5 * MiB, kGraph);
  CHECK(a != before);
  // Freed inside the capture: reused by the next private request of a size it fits.
  pool.free(a);
  void* b = pool.allocate(200 * KiB, kGraph);
  CHECK(b == a);
  live[b] = 200 * KiB;
  live[big] = 5 * MiB;
  // Ordinary requests of the stream never see the private pool's free blocks.
  void* outside = pool.allocate(100 * KiB, kStream);
  live[outside] = 100 * KiB;
  CHECK(outside == before);
  pool.free(big);
  live.erase(big);
  void* outside_big = pool.allocate(5 * MiB, kStream);
  live[outside_big] = 5 * MiB;
  CHECK(outside_big != big);
  // empty_cache leaves the live graph's free segment alone.
  const int64_t frees_before = pool.stats().device_frees;
  pool.empty_cache();
  CHECK(pool.stats().device_frees == frees_before);
  check_invariants(pool, device, live);
  for (const auto& segment : pool.snapshot())
    if (segment.address <= address_of(b) && address_of(b) < segment.address + segment.size)
      CHECK(segment.stream == kGraph);

  // Released: the wholly free large segment goes back to the device, the segment with the block
  // still in use (a graph output) joins the owner stream's cache.
  pool.release_private_pool(kGraph, kStream);
  CHECK_FALSE(pool.is_private_pool(kGraph));
  CHECK(pool.stats().device_frees == frees_before + 1);
  check_invariants(pool, device, live);
  int owned_by_stream = 0, still_private = 0;
  for (const auto& segment : pool.snapshot()) {
    owned_by_stream += segment.stream == kStream;
    still_private += segment.stream == kGraph;
  }
  CHECK(still_private == 0);
  CHECK(owned_by_stream == 3);  // the small one with `outside`, the one with `b`, `outside_big`'s
  pool.free(b);
  live.erase(b);
  // Three 1 MiB requests fit without a device malloc only if the old private segment serves the stream.
  const int mallocs = device.malloc_calls;
  for (int i = 0; i < 3; ++i) {
    void* ptr = pool.allocate(MiB, kStream);
    live[ptr] = MiB;
  }
  CHECK(device.malloc_calls == mallocs);
  check_invariants(pool, device, live);
  for (auto& [ptr, size] : live) pool.free(ptr);
  CHECK_THROWS_WITH_AS(pool.release_private_pool(kGraph, kStream), doctest::Contains("private pool's key"),
                       longtape::Error);
}

TEST_CASE("a private pool that runs out of device memory throws without releasing the cache") {
  FakeDevice device(8 * MiB);
  CachingAllocator pool(device);
  constexpr uintptr_t kStream = 3, kGraph = 77;
  std::vector<void*> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(pool.allocate(MiB, kStream));
  for (void* ptr : blocks) pool.free(ptr);
  pool.begin_private_pool(kGraph);
  // Releasing the stream's cache would free device memory in the middle of a capture.
  CHECK_THROWS_AS(pool.allocate(6 * MiB, kGraph), longtape::OutOfMemoryError);
  CHECK(pool.stats().device_frees == 0);
  CHECK(pool.stats().retries == 0);
  pool.release_private_pool(kGraph, kStream);
  void* large = pool.allocate(6 * MiB, kStream);  // an ordinary request still may
  CHECK(pool.stats().retries == 1);
  pool.free(large);
}

TEST_CASE("GPU pool: asking for more than the GPU has throws OutOfMemoryError and the pool recovers") {
  if (!longtape::cuda_available()) {
    MESSAGE("skipped: no CUDA device is visible");
    return;
  }
  using namespace longtape::cuda;
  size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  const MemoryStats before = pool_stats(0);

  std::string message;
  try {
    void* ptr = pool_allocate(0, total_bytes + (size_t{1} << 30));
    pool_free(0, ptr);
  } catch (const longtape::OutOfMemoryError& error) {
    message = error.what();
  }
  REQUIRE_FALSE(message.empty());
  INFO(message);
  CHECK(message.find("cuda:0") != std::string::npos);
  for (const char* word : {"requested", "reserved", "allocated", "free", "total"})
    CHECK(message.find(word) != std::string::npos);
  CHECK(message.find(format_bytes(total_bytes)) != std::string::npos);
  // The handled cudaMalloc failure must not linger as a CUDA error.
  CHECK(cudaGetLastError() == cudaSuccess);
  if (!pool_bypasses_cache()) CHECK(pool_stats(0).retries == before.retries + 1);

  // Smaller blocks still work and hold what is written to them.
  std::mt19937 rng(std::random_device{}());
  for (size_t size : {size_t{1000}, size_t{3} << 20, size_t{64} << 20}) {
    auto* ptr = static_cast<unsigned char*>(pool_allocate(0, size));
    REQUIRE(ptr != nullptr);
    std::vector<unsigned char> host(size), back(size, 0);
    for (auto& byte : host) byte = static_cast<unsigned char>(rng());
    REQUIRE(cudaMemcpy(ptr, host.data(), size, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(back.data(), ptr, size, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(back == host);
    pool_free(0, ptr);
  }
  CHECK(pool_stats(0).allocated_bytes == before.allocated_bytes);
  CHECK_THROWS_AS(pool_free(0, &free_bytes), longtape::Error);
}

TEST_CASE("GPU pool: a block recorded on another stream is not reused until that stream's work completes" *
          doctest::skip(!longtape::cuda_available())) {
  using namespace longtape::cuda;
  if (pool_bypasses_cache()) {
    MESSAGE("skipped: LONGTAPE_NO_CACHING_ALLOCATOR turns the cache off");
    return;
  }
  cudaStream_t side = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) == cudaSuccess);
  // The side stream is held busy by a host function until the test releases it.
  std::atomic<bool> release{false};
  REQUIRE(cudaLaunchHostFunc(
              side,
              [](void* flag) {
                while (!static_cast<std::atomic<bool>*>(flag)->load()) std::this_thread::yield();
              },
              &release) == cudaSuccess);
  const size_t size = size_t{8} << 20;
  void* block = pool_allocate(0, size);
  REQUIRE(cudaMemsetAsync(block, 1, size, side) == cudaSuccess);  // work on the side stream
  pool_record_stream(0, block, side);
  pool_free(0, block);
  CHECK(pool_pending_frees(0) >= 1);
  void* other = pool_allocate(0, size);
  CHECK(other != block);  // the side stream may still write it
  release = true;
  REQUIRE(cudaStreamSynchronize(side) == cudaSuccess);
  const MemoryStats before = pool_stats(0);
  void* again = pool_allocate(0, size);
  CHECK(again == block);
  CHECK(pool_stats(0).device_allocs == before.device_allocs);
  pool_free(0, again);
  pool_free(0, other);
  CHECK(pool_pending_frees(0) == 0);
  CHECK(cudaStreamDestroy(side) == cudaSuccess);
}

TEST_CASE("GPU pool: blocks cached by a thread that exited serve other threads" *
          doctest::skip(!longtape::cuda_available())) {
  using namespace longtape::cuda;
  if (pool_bypasses_cache()) {
    MESSAGE("skipped: LONGTAPE_NO_CACHING_ALLOCATOR turns the cache off");
    return;
  }
  const size_t size = size_t{24} << 20;
  pool_empty_cache(0);
  std::thread worker([&] {
    void* ptr = pool_allocate(0, size);
    CHECK(cudaMemsetAsync(ptr, 0, size, cudaStreamPerThread) == cudaSuccess);  // no REQUIRE off the main thread
    pool_free(0, ptr);
  });
  worker.join();
  const MemoryStats before = pool_stats(0);
  void* ptr = pool_allocate(0, size);  // the exited thread's segment, no cudaMalloc
  CHECK(pool_stats(0).device_allocs == before.device_allocs);
  CHECK(pool_stats(0).cache_hits == before.cache_hits + 1);
  pool_free(0, ptr);
}

TEST_CASE("GPU pool: a request above the free memory retries after releasing the cache") {
  if (!longtape::cuda_available()) {
    MESSAGE("skipped: no CUDA device is visible");
    return;
  }
  using namespace longtape::cuda;
  if (pool_bypasses_cache()) {
    MESSAGE("skipped: LONGTAPE_NO_CACHING_ALLOCATOR turns the cache off");
    return;
  }
  pool_empty_cache(0);
  size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  // Cache about 70% of the free memory in 64 MiB blocks, then ask for half of it in one block:
  // no cached block is large enough and the device only fits it once the cache is released.
  const size_t block = size_t{64} << 20;
  std::vector<void*> blocks;
  for (size_t cached = 0; cached + block <= free_bytes / 10 * 7; cached += block)
    blocks.push_back(pool_allocate(0, block));
  for (void* ptr : blocks) pool_free(0, ptr);
  const MemoryStats cached = pool_stats(0);
  CHECK(cached.reserved_bytes >= static_cast<int64_t>(blocks.size() * block));

  void* half = nullptr;
  try {
    half = pool_allocate(0, free_bytes / 2);
  } catch (const longtape::OutOfMemoryError& error) {
    FAIL("unexpected out-of-memory: " << error.what());
  }
  const MemoryStats after = pool_stats(0);
  CHECK(after.retries == cached.retries + 1);
  CHECK(after.device_frees >= cached.device_frees + static_cast<int64_t>(blocks.size()));
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaMemset(half, 0x5a, free_bytes / 2) == cudaSuccess);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  pool_free(0, half);
  pool_empty_cache(0);
  CHECK(pool_stats(0).reserved_bytes == pool_stats(0).allocated_bytes);
}

#endif  // LONGTAPE_WITH_CUDA
