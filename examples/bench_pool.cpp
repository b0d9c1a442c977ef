// Benchmark of longtape's caching GPU memory pool.
//  (a) mixed-size churn: blocks of 512 B .. 64 MiB (log-uniform) come and go in a window of live
//      blocks; the pool against raw cudaMalloc/cudaFree, in allocate/free calls per second.
//  (b) a training-like pattern: parameters stay alive, each step allocates activations layer by
//      layer and frees them in reverse order during backward; how much memory the pool holds
//      from the device (peak reserved) for what the tensors need (peak allocated).
// Usage: bench_pool [seed]
#include <cstdio>
#include <cstdlib>

#ifdef LONGTAPE_WITH_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensor/cuda/caching_allocator.h"
#include "tensor/cuda/memory_pool.h"
#include "tensor/error.h"

namespace {

using longtape::MemoryStats;
using longtape::cuda::format_bytes;
constexpr size_t KiB = size_t{1} << 10;
constexpr size_t MiB = size_t{1} << 20;

void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw longtape::Error(std::string(call) + " failed: " + cudaGetErrorString(status));
}

// The two ways of getting device memory under test.
struct Allocator {
  const char* name;
  void* (*allocate)(size_t);
  void (*release)(void*);
};

void* raw_allocate(size_t nbytes) {
  void* ptr = nullptr;
  check_cuda(cudaMalloc(&ptr, nbytes), "cudaMalloc");
  return ptr;
}
void raw_release(void* ptr) { check_cuda(cudaFree(ptr), "cudaFree"); }
void* pool_allocate(size_t nbytes) { return longtape::cuda::pool_allocate(0, nbytes); }
void pool_release(void* ptr) { longtape::cuda::pool_free(0, ptr); }

const Allocator kRaw{"cudaMalloc/cudaFree", raw_allocate, raw_release};
const Allocator kPool{"longtape pool", pool_allocate, pool_release};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// ---- (a) mixed-size churn ------------------------------------------------------------------

struct ChurnStep {
  int slot;     // which live block is replaced
  size_t size;  // size of its replacement
};

struct ChurnSchedule {
  std::vector<size_t> initial;  // one block per slot before the timed steps
  std::vector<ChurnStep> steps;
};

ChurnSchedule make_churn_schedule(uint64_t seed, int window, int steps) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> log_size(std::log(512.0), std::log(64.0 * MiB));
  std::uniform_int_distribution<int> slot(0, window - 1);
  auto draw_size = [&] { return static_cast<size_t>(std::exp(log_size(rng))); };
  ChurnSchedule schedule;
  for (int i = 0; i < window; ++i) schedule.initial.push_back(draw_size());
  for (int i = 0; i < steps; ++i) schedule.steps.push_back({slot(rng), draw_size()});
  return schedule;
}

// Seconds for the timed steps (each one free and one allocate); filling and draining the window
// happen outside the timed part.
double run_churn(const Allocator& allocator, const ChurnSchedule& schedule) {
  std::vector<void*> live;
  for (size_t size : schedule.initial) live.push_back(allocator.allocate(size));
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const auto start = std::chrono::steady_clock::now();
  for (const ChurnStep& step : schedule.steps) {
    allocator.release(live[step.slot]);
    live[step.slot] = allocator.allocate(step.size);
  }
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const double elapsed = seconds_since(start);
  for (void* ptr : live) allocator.release(ptr);
  return elapsed;
}

double median_churn_seconds(const Allocator& allocator, const ChurnSchedule& schedule,
                            int repetitions) {
  run_churn(allocator, schedule);  // warm-up: the pool fills its cache, the driver its state
  std::vector<double> times;
  for (int i = 0; i < repetitions; ++i) times.push_back(run_churn(allocator, schedule));
  return median(times);
}

// ---- (b) training-like pattern -------------------------------------------------------------

struct Tracker {
  const Allocator& allocator;
  size_t requested = 0;       // bytes requested and not yet freed
  size_t peak_requested = 0;
  std::unordered_map<void*, size_t> sizes;

  void* allocate(size_t nbytes) {
    void* ptr = allocator.allocate(nbytes);
    requested += nbytes;
    peak_requested = std::max(peak_requested, requested);
    sizes.emplace(ptr, nbytes);
    return ptr;
  }
  void release(void* ptr) {
    auto it = sizes.find(ptr);
    requested -= it->second;
    sizes.erase(it);
    allocator.release(ptr);
  }
};

// Byte sizes of one transformer layer's tensors for `tokens` tokens of width `width` (fp32).
struct LayerShapes {
  size_t hidden, qkv, mlp, row_stats;
};
LayerShapes layer_shapes(size_t tokens, size_t width) {
  return {tokens * width * 4, 3 * tokens * width * 4, 4 * tokens * width * 4, tokens * 4};
}

// One optimizer step of a `layers`-deep model: forward keeps what backward needs, backward frees
// it in reverse order while gradient temporaries come and go; parameter gradients are created on
// the first step and kept, like .grad.
void training_step(Tracker& memory, int layers, size_t tokens, size_t width,
                   std::vector<void*>& parameter_grads, const std::vector<size_t>& parameter_sizes) {
  const LayerShapes shape = layer_shapes(tokens, width);
  std::vector<std::vector<void*>> saved(layers);
  void* x = memory.allocate(shape.hidden);  // embeddings
  for (int layer = 0; layer < layers; ++layer) {
    auto& keep = saved[layer];
    keep.push_back(memory.allocate(shape.row_stats));  // layer norm mean/rstd
    keep.push_back(memory.allocate(shape.hidden));     // normalized input
    keep.push_back(memory.allocate(shape.qkv));
    void* scratch = memory.allocate(shape.hidden);     // attention workspace
    keep.push_back(memory.allocate(shape.hidden));     // attention output
    memory.release(scratch);
    keep.push_back(memory.allocate(shape.mlp));        // MLP pre-activation
    keep.push_back(memory.allocate(shape.mlp));        // GELU output
    keep.push_back(memory.allocate(shape.hidden));     // residual output
  }
  void* loss = memory.allocate(512);
  void* grad = memory.allocate(shape.hidden);
  memory.release(loss);
  for (int layer = layers - 1; layer >= 0; --layer) {
    void* grad_mlp = memory.allocate(shape.mlp);
    void* grad_qkv = memory.allocate(shape.qkv);
    void* grad_input = memory.allocate(shape.hidden);
    memory.release(grad_qkv);
    memory.release(grad_mlp);
    memory.release(grad);
    grad = grad_input;
    for (auto it = saved[layer].rbegin(); it != saved[layer].rend(); ++it) memory.release(*it);
  }
  memory.release(grad);
  memory.release(x);
  if (parameter_grads.empty())
    for (size_t size : parameter_sizes) parameter_grads.push_back(memory.allocate(size));
}

struct TrainingResult {
  MemoryStats stats;
  size_t peak_requested = 0;
  int64_t device_allocs_after_first_step = 0;
  double seconds_per_step = 0;
};

TrainingResult run_training(const Allocator& allocator, int steps, int layers, size_t width,
                            const std::vector<size_t>& token_counts) {
  using namespace longtape::cuda;
  pool_empty_cache(0);
  pool_reset_peak(0);
  Tracker memory{allocator, 0, 0, {}};
  std::vector<size_t> parameter_sizes;
  for (int layer = 0; layer < layers; ++layer)
    for (size_t size : {3 * width * width * 4, width * width * 4, 4 * width * width * 4,
                        4 * width * width * 4, width * 4, width * 4, 3 * width * 4, 4 * width * 4})
      parameter_sizes.push_back(size);
  std::vector<void*> parameters, parameter_grads;
  for (size_t size : parameter_sizes) parameters.push_back(memory.allocate(size));

  int64_t device_allocs_after_first = 0;
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    if (step == 1) {
      device_allocs_after_first = pool_stats(0).device_allocs;
      check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      start = std::chrono::steady_clock::now();  // time the steady state only
    }
    const size_t tokens = token_counts[step % token_counts.size()];
    training_step(memory, layers, tokens, width, parameter_grads, parameter_sizes);
  }
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  TrainingResult result;
  result.seconds_per_step = seconds_since(start) / std::max(1, steps - 1);
  result.stats = pool_stats(0);
  result.peak_requested = memory.peak_requested;
  result.device_allocs_after_first_step = result.stats.device_allocs - device_allocs_after_first;
  for (void* ptr : parameter_grads) memory.release(ptr);
  for (void* ptr : parameters) memory.release(ptr);
  pool_empty_cache(0);
  return result;
}

void print_rule(int width) { std::printf("%s\n", std::string(width, '-').c_str()); }

int run(uint64_t seed) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    std::printf("bench_pool: no CUDA device is visible; nothing to measure\n");
    return 0;
  }
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  check_cuda(cudaFree(nullptr), "cudaFree");  // create the context before any timing
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, pool mode: %s, seed %llu\n", properties.name,
              longtape::cuda::pool_bypasses_cache() ? "BYPASS (LONGTAPE_NO_CACHING_ALLOCATOR)" : "caching",
              static_cast<unsigned long long>(seed));

  // (a) churn
  constexpr int kWindow = 32, kSteps = 5000, kRepetitions = 5;
  const ChurnSchedule schedule = make_churn_schedule(seed, kWindow, kSteps);
  const double raw_seconds = median_churn_seconds(kRaw, schedule, kRepetitions);
  const double pool_seconds = median_churn_seconds(kPool, schedule, kRepetitions);
  const double ops = 2.0 * kSteps;  // one free and one allocate per step
  const double speedup = raw_seconds / pool_seconds;
  std::printf("\n(a) mixed-size churn: %d steps of free + allocate, %d live blocks, sizes 512 B .. "
              "64 MiB log-uniform,\n    median of %d runs after a warm-up\n",
              kSteps, kWindow, kRepetitions);
  print_rule(76);
  std::printf("%-24s %14s %16s %18s\n", "allocator", "median time", "ops/s", "per op");
  print_rule(76);
  for (auto [allocator, seconds] : {std::pair{&kRaw, raw_seconds}, std::pair{&kPool, pool_seconds}})
    std::printf("%-24s %11.3f ms %16.0f %15.3f us\n", allocator->name, seconds * 1e3, ops / seconds,
                seconds / ops * 1e6);
  print_rule(76);
  std::printf("speed-up of the pool: %.1fx (target >= 50x): %s\n", speedup,
              speedup >= 50 ? "met" : "NOT met");

  // (b) training-like
  constexpr int kLayers = 12, kTrainSteps = 6;
  constexpr size_t kWidth = 1024;
  struct Scenario {
    const char* name;
    std::vector<size_t> tokens;
  };
  const std::vector<Scenario> scenarios = {{"fixed shapes, 8192 tokens", {8192}},
                                           {"varying, 4096/8192/6144 tokens", {4096, 8192, 6144}}};
  std::printf("\n(b) training-like steps: %d layers, width %zu, fp32, %d steps; parameters and "
              "their gradients stay alive\n", kLayers, kWidth, kTrainSteps);
  print_rule(114);
  std::printf("%-32s %12s %12s %12s %9s %9s %11s %9s\n", "pattern", "peak reqst", "peak alloc",
              "peak resrvd", "resv/all", "resv/req", "new mallocs", "ms/step");
  print_rule(114);
  bool ratio_met = true;
  for (const Scenario& scenario : scenarios) {
    const TrainingResult r = run_training(kPool, kTrainSteps, kLayers, kWidth, scenario.tokens);
    const double reserved_per_allocated = static_cast<double>(r.stats.peak_reserved_bytes) /
                                          static_cast<double>(r.stats.peak_allocated_bytes);
    const double reserved_per_requested =
        static_cast<double>(r.stats.peak_reserved_bytes) / static_cast<double>(r.peak_requested);
    ratio_met = ratio_met && reserved_per_allocated <= 1.3;
    std::printf("%-32s %12s %12s %12s %9.3f %9.3f %11lld %9.3f\n", scenario.name,
                format_bytes(r.peak_requested).c_str(),
                format_bytes(static_cast<size_t>(r.stats.peak_allocated_bytes)).c_str(),
                format_bytes(static_cast<size_t>(r.stats.peak_reserved_bytes)).c_str(),
                reserved_per_allocated, reserved_per_requested,
                static_cast<long long>(r.device_allocs_after_first_step), r.seconds_per_step * 1e3);
  }
  {
    const TrainingResult r = run_training(kRaw, kTrainSteps, kLayers, kWidth, {8192});
    std::printf("%-32s %12s %12s %12s %9s %9s %11s %9.3f\n", "fixed shapes, raw cudaMalloc",
                format_bytes(r.peak_requested).c_str(), "-", "-", "-", "-", "-",
                r.seconds_per_step * 1e3);
  }
  print_rule(114);
  std::printf("peak reserved / peak allocated <= 1.3: %s\n", ratio_met ? "met" : "NOT met");
  std::printf("(new mallocs: device mallocs after the first step; ms/step: host time of the "
              "allocation calls only)\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20240611;
  try {
    return run(seed);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_pool: %s\n", error.what());
    return 1;
  }
}

#else  // LONGTAPE_WITH_CUDA

int main() {
  std::printf("bench_pool: built without CUDA; nothing to measure\n");
  return 0;
}

#endif  // LONGTAPE_WITH_CUDA
