#include "bench/timing.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "tensor/allocator.h"
#include "tensor/error.h"
#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/runtime.h"
#include "tensor/cuda/timer.h"
#endif

namespace longtape::bench {

void synchronize(Device device) {
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) cuda::synchronize(device.index);
#else
  (void)device;
#endif
}

CaseTimer::CaseTimer(Device device) : device_(device) {
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) events_ = std::make_unique<cuda::DeviceTimer>(device.index);
#endif
}

CaseTimer::~CaseTimer() = default;

double CaseTimer::milliseconds(const std::function<void()>& fn) {
#ifdef LONGTAPE_WITH_CUDA
  if (events_) {
    synchronize(device_);
    events_->start();
    fn();
    events_->stop();
    return events_->elapsed_ms();
  }
#endif
  synchronize(device_);
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  synchronize(device_);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

Peak measure_peak(Device device, const std::function<void()>& fn) {
  synchronize(device);
  empty_cache(device);
  reset_peak_memory(device);
  fn();
  synchronize(device);
  const MemoryStats stats = memory_stats(device);
  return {stats.peak_allocated_bytes, stats.peak_reserved_bytes};
}

double median(std::vector<double> v) {
  LT_CHECK(!v.empty(), "bench: no timed run to take the median of");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Json timing_json(const std::vector<double>& ms) {
  LT_CHECK(!ms.empty(), "bench: no timed run to report");
  Json t;
  double sum = 0.0;
  for (double x : ms) sum += x;
  const double mean = sum / static_cast<double>(ms.size());
  double var = 0.0;
  for (double x : ms) var += (x - mean) * (x - mean);
  t["median_ms"] = median(ms);
  t["min_ms"] = *std::min_element(ms.begin(), ms.end());
  t["max_ms"] = *std::max_element(ms.begin(), ms.end());
  t["mean_ms"] = mean;
  t["stdev_ms"] = ms.size() > 1 ? std::sqrt(var / static_cast<double>(ms.size() - 1)) : 0.0;
  t["runs"] = ms.size();
  return t;
}

}  // namespace longtape::bench
