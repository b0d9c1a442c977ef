#include "tensor/host_cache.h"

#include <bit>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensor/error.h"

namespace longtape::host_cache {

namespace {
constexpr size_t kAlignment = 64;
constexpr size_t kSmallLimit = 1024;

size_t env_cap() {
  const char* mb = std::getenv("LONGTAPE_HOST_CACHE_MB");
  if (!mb || !*mb) return size_t{1} << 30;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(mb, &end, 10);
  LT_CHECK(end && *end == '\0' && v < (1ull << 40), "LONGTAPE_HOST_CACHE_MB: expected a count of MiB below 2^40, "
           "got '", mb, "'");
  return static_cast<size_t>(v) << 20;
}

bool env_bypass() {
  const char* v = std::getenv("LONGTAPE_NO_CACHING_ALLOCATOR");
  return v && *v && std::string(v) != "0";
}

struct Cache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free_lists;  // class size -> blocks
  size_t cached = 0;
  size_t cap = env_cap();
  bool bypass = env_bypass();
  Stats stats;

  // Frees cached blocks (largest classes first would need ordering; any order keeps the cap).
  void trim_to(size_t limit) {
    for (auto it = free_lists.begin(); it != free_lists.end() && cached > limit; ++it) {
      auto& list = it->second;
      while (!list.empty() && cached > limit) {
        std::free(list.back());
        list.pop_back();
        cached -= it->first;
        ++stats.system_frees;
      }
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed during static destruction
  return *c;
}
}  // namespace

size_t class_size(size_t nbytes) {
  if (nbytes <= kSmallLimit) return std::max(kAlignment, (nbytes + kAlignment - 1) / kAlignment * kAlignment);
  LT_CHECK(nbytes <= (size_t{1} << 60), "host allocation of ", nbytes, " bytes is beyond any machine");
  // Four classes per power of two: step = 2^(floor(log2(n - 1)) - 2).
  const int top = std::bit_width(nbytes - 1) - 1;
  const size_t step = size_t{1} << (top - 2);
  return (nbytes + step - 1) / step * step;
}

void* allocate(size_t nbytes) {
  const size_t size = class_size(nbytes);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_lists.find(size);
    if (it != c.free_lists.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached -= size;
      ++c.stats.cache_hits;
      return p;
    }
    ++c.stats.system_allocs;
  }
  void* p = std::aligned_alloc(kAlignment, size);
  if (!p) {
    // Give the cache back and try once more before failing.
    empty();
    p = std::aligned_alloc(kAlignment, size);
  }
  if (!p) throw OutOfMemoryError(detail::concat("out of host memory: requested ", nbytes, " bytes"));
  return p;
}

void release(void* block, size_t nbytes) {
  if (!block) return;
  const size_t size = class_size(nbytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.bypass || size > c.cap) {
    std::free(block);
    ++c.stats.system_frees;
    return;
  }
  c.free_lists[size].push_back(block);
  c.cached += size;
  if (c.cached > c.cap) c.trim_to(c.cap);
}

Stats stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  Stats s = c.stats;
  s.cached_bytes = static_cast<int64_t>(c.cached);
  return s;
}

void empty() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.trim_to(0);
}

void set_cap(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.cap = bytes;
  c.trim_to(bytes);
}

size_t cap() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.cap;
}

}  // namespace longtape::host_cache
