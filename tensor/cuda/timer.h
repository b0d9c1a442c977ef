#pragma once
// Plain C++ view of CUDA event timing and device properties, for benchmarks (no CUDA headers
// here). Implemented in timer_cuda.cpp, which is built only with the CUDA backend: callers guard
// their use with #ifdef LONGTAPE_WITH_CUDA.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace longtape::cuda {

// Times work queued on longtape's current stream between start() and stop() with a pair of CUDA
// events, so the figure is GPU time, not the host's launch time.
class DeviceTimer {
 public:
  explicit DeviceTimer(int device);
  ~DeviceTimer();
  DeviceTimer(const DeviceTimer&) = delete;
  DeviceTimer& operator=(const DeviceTimer&) = delete;

  void start();  // records the start event on the current stream
  void stop();   // records the stop event on the current stream
  // Waits for the stop event and returns the milliseconds between the two events.
  double elapsed_ms();

 private:
  int device_;
  void* start_ = nullptr;  // cudaEvent_t
  void* stop_ = nullptr;   // cudaEvent_t
};

// Points of one stream's timeline: mark() records an event on the current stream; times() waits
// for the last and returns each mark's milliseconds after the first one. For finding where a
// pipeline's stream waits (a mark after a wait on other streams lands late when it waited).
class DeviceTimeline {
 public:
  explicit DeviceTimeline(int device) : device_(device) {}
  ~DeviceTimeline();
  DeviceTimeline(const DeviceTimeline&) = delete;
  DeviceTimeline& operator=(const DeviceTimeline&) = delete;

  void mark(std::string name);
  std::vector<std::pair<std::string, double>> times();

 private:
  int device_;
  std::vector<std::pair<std::string, void*>> marks_;  // cudaEvent_t
};

// What a benchmark reports about the GPU it ran on.
struct DeviceProperties {
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
  int64_t total_memory_bytes = 0;
  int driver_version = 0;   // cudaDriverGetVersion: 1000 * major + 10 * minor (e.g. 12040)
  int runtime_version = 0;  // cudaRuntimeGetVersion, same encoding
};

DeviceProperties device_properties(int device);

// "12.4" from 12040.
std::string cuda_version_string(int version);

}  // namespace longtape::cuda
