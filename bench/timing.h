#pragma once
// Timing and peak memory of benchmark cases: CUDA events on the GPU, a monotonic clock on the CPU,
// and the allocator's peak counters after emptying the pool cache.
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "tensor/device.h"

namespace longtape::cuda {
class DeviceTimer;
}

namespace longtape::bench {

using Json = nlohmann::ordered_json;

// Waits for the device's queued work (nothing to wait for on the CPU).
void synchronize(Device device);

// Times one call of `fn`: CUDA events on the GPU, a monotonic clock (after a sync) otherwise.
class CaseTimer {
 public:
  explicit CaseTimer(Device device);
  ~CaseTimer();
  CaseTimer(const CaseTimer&) = delete;
  CaseTimer& operator=(const CaseTimer&) = delete;
  double milliseconds(const std::function<void()>& fn);

 private:
  Device device_;
#ifdef LONGTAPE_WITH_CUDA
  std::unique_ptr<cuda::DeviceTimer> events_;  // null on the CPU
#endif
};

struct Peak {
  int64_t allocated = 0;
  int64_t reserved = 0;
};

// Peak memory of one call of `fn`, the pool emptied first so reserved bytes mean what this call
// needed (allocations made inside `fn` count).
Peak measure_peak(Device device, const std::function<void()>& fn);

// Median of the values; throws on an empty list.
double median(std::vector<double> v);

// median_ms, min_ms, max_ms, mean_ms, stdev_ms (sample) and runs of the timed runs.
Json timing_json(const std::vector<double>& ms);

}  // namespace longtape::bench
