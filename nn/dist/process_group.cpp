#include "nn/dist/process_group.h"

#include <cmath>
#include <cstdlib>

#include "tensor/cuda/runtime.h"
#include "nn/dist/nccl_communicator.h"
#include "nn/dist/tcp_communicator.h"
#include "tensor/error.h"

namespace longtape::dist {

namespace {

const char* variable(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

int integer_variable(const char* name, int fallback, int lo, int hi) {
  const char* text = variable(name);
  if (text == nullptr) return fallback;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  LT_CHECK(end != text && *end == '\0' && value >= lo && value <= hi, "dist: the environment variable ", name,
           " must be an integer in [", lo, ", ", hi, "], got \"", text, "\"");
  return static_cast<int>(value);
}

}  // namespace

LaunchEnvironment launch_environment() {
  LaunchEnvironment env;
  env.launched = variable("WORLD_SIZE") != nullptr;
  env.world_size = integer_variable("WORLD_SIZE", 1, 1, 1 << 20);
  env.rank = integer_variable("RANK", 0, 0, env.world_size - 1);
  env.local_world_size = integer_variable("LOCAL_WORLD_SIZE", env.world_size, 1, env.world_size);
  env.local_rank = integer_variable("LOCAL_RANK", env.rank % env.local_world_size, 0, env.local_world_size - 1);
  if (const char* addr = variable("MASTER_ADDR")) env.master_addr = addr;
  env.master_port = integer_variable("MASTER_PORT", 0, 1, 65535);
  LT_CHECK(!env.launched || env.world_size == 1 || env.master_port > 0, "dist: WORLD_SIZE is ", env.world_size,
           " but MASTER_PORT is not set (start the job with `longtape launch`, which sets it)");
  if (const char* text = variable("LONGTAPE_DIST_TIMEOUT")) {
    char* end = nullptr;
    const double s = std::strtod(text, &end);
    LT_CHECK(end != text && *end == '\0' && std::isfinite(s) && s > 0 && s <= 86400.0 * 365,
             "dist: LONGTAPE_DIST_TIMEOUT must be a positive number of seconds, got \"", text, "\"");
    env.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(s * 1000.0)));
  }
  return env;
}

ProcessGroup::ProcessGroup(LaunchEnvironment env, std::unique_ptr<TcpStore> store, std::shared_ptr<Communicator> comm,
                           std::string backend, Device device)
    : env_(std::move(env)), store_(std::move(store)), comm_(std::move(comm)), backend_(std::move(backend)),
      device_(device) {}

ProcessGroup::~ProcessGroup() {
  comm_.reset();
  store_.reset();
}

std::unique_ptr<ProcessGroup> init_process_group(const ProcessGroupOptions& options) {
  const LaunchEnvironment env = launch_environment();
  std::string backend = options.backend;
  LT_CHECK(backend == "auto" || backend == "tcp" || backend == "nccl", "dist: the backend must be auto, tcp or nccl, got \"",
           backend, "\"");
  if (backend == "auto") backend = options.device.is_cuda() && nccl_built() ? "nccl" : "tcp";
  CommOptions comm_options;
  comm_options.timeout = env.timeout;
  const bool serve = env.rank == 0;
  auto store = std::make_unique<TcpStore>(env.master_addr, env.launched ? env.master_port : 0, serve, env.timeout);
  Device device = options.device;
  std::shared_ptr<Communicator> comm;
  if (backend == "nccl") {
    LT_CHECK(cuda_available(), "dist: the NCCL backend needs a CUDA device, and this process sees none");
    device = Device::cuda(env.local_rank);
    comm = make_nccl_process_group(*store, env.rank, env.world_size, env.local_rank, comm_options);
  } else {
    if (device.is_cuda()) {
      device = Device::cuda(env.local_rank);
#ifdef LONGTAPE_WITH_CUDA
      cuda::set_device(env.local_rank);
#endif
    }
    comm = make_tcp_process_group(*store, env.rank, env.world_size, comm_options);
  }
  return std::make_unique<ProcessGroup>(env, std::move(store), std::move(comm), backend, device);
}

}  // namespace longtape::dist
