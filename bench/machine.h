#pragma once
// What a benchmark ran on: operating system, CPU, threads, compiler, build type, git commit and,
// for a CUDA device, the GPU with its driver and CUDA versions.
#include <string>

#include <nlohmann/json.hpp>

#include "tensor/device.h"

namespace longtape::bench {

// "2026-01-31T12:00:00Z"
std::string utc_now();

// The machine object of the benchmark document (benchmarks/bench_schema.json); "gpu" is null
// unless `device` is a CUDA device.
nlohmann::ordered_json machine_info(Device device);

}  // namespace longtape::bench
