#include "tensor/cuda/timer.h"

#include "tensor/cuda/check.cuh"
#include "tensor/cuda/runtime.h"

namespace longtape::cuda {

namespace {
cudaEvent_t event_of(void* e) { return static_cast<cudaEvent_t>(e); }
cudaStream_t stream() { return static_cast<cudaStream_t>(current_stream()); }
}  // namespace

DeviceTimer::DeviceTimer(int device) : device_(device) {
  set_device(device_);
  cudaEvent_t start_event = nullptr, stop_event = nullptr;
  CUDA_CHECK(cudaEventCreate(&start_event));
  try {
    CUDA_CHECK(cudaEventCreate(&stop_event));
  } catch (...) {
    cudaEventDestroy(start_event);
    throw;
  }
  start_ = start_event;
  stop_ = stop_event;
}

DeviceTimer::~DeviceTimer() {
  // A destructor must not throw: failures to destroy events are ignored.
  if (start_) cudaEventDestroy(event_of(start_));
  if (stop_) cudaEventDestroy(event_of(stop_));
}

void DeviceTimer::start() {
  set_device(device_);
  CUDA_CHECK(cudaEventRecord(event_of(start_), stream()));
}

void DeviceTimer::stop() {
  set_device(device_);
  CUDA_CHECK(cudaEventRecord(event_of(stop_), stream()));
}

double DeviceTimer::elapsed_ms() {
  CUDA_CHECK(cudaEventSynchronize(event_of(stop_)));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, event_of(start_), event_of(stop_)));
  return static_cast<double>(ms);
}

DeviceTimeline::~DeviceTimeline() {
  for (auto& [name, e] : marks_) cudaEventDestroy(event_of(e));
}

void DeviceTimeline::mark(std::string name) {
  set_device(device_);
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreate(&e));
  marks_.emplace_back(std::move(name), e);
  CUDA_CHECK(cudaEventRecord(e, stream()));
}

std::vector<std::pair<std::string, double>> DeviceTimeline::times() {
  std::vector<std::pair<std::string, double>> out;
  if (marks_.empty()) return out;
  set_device(device_);
  CUDA_CHECK(cudaEventSynchronize(event_of(marks_.back().second)));
  for (auto& [name, e] : marks_) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, event_of(marks_.front().second), event_of(e)));
    out.emplace_back(name, static_cast<double>(ms));
  }
  return out;
}

DeviceProperties device_properties(int device) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceProperties p;
  p.name = prop.name;
  p.compute_major = prop.major;
  p.compute_minor = prop.minor;
  p.multiprocessors = prop.multiProcessorCount;
  p.total_memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  CUDA_CHECK(cudaDriverGetVersion(&p.driver_version));
  CUDA_CHECK(cudaRuntimeGetVersion(&p.runtime_version));
  return p;
}

std::string cuda_version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

}  // namespace longtape::cuda
