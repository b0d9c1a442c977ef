#include "bench/machine.h"

#include <sys/utsname.h>

#include <cctype>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/timer.h"
#endif

namespace longtape::bench {

using Json = nlohmann::ordered_json;

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

namespace {

std::string first_line_of_command(const std::string& command) {
  std::string out;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[512];
    if (std::fgets(buffer, sizeof(buffer), pipe)) out = buffer;
    pclose(pipe);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

// The NVIDIA kernel driver version ("580.159.04"): from /proc, else from nvidia-smi.
std::string nvidia_driver_version() {
  std::ifstream in("/proc/driver/nvidia/version");
  std::string line;
  if (std::getline(in, line)) {
    std::istringstream words(line);
    std::string word;
    while (words >> word)
      if (!word.empty() && std::isdigit(static_cast<unsigned char>(word[0])) && word.find('.') != std::string::npos)
        return word;
  }
  const std::string smi = first_line_of_command("nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null");
  return smi.empty() ? "unknown" : smi;
}

}  // namespace

Json machine_info(Device device) {
  Json m;
  struct utsname names {};
  if (uname(&names) == 0) {
    m["os"] = std::string(names.sysname) + " " + names.release;
    m["arch"] = names.machine;
    m["hostname"] = names.nodename;
  }
  m["cpu"] = cpu_model();
  m["cpu_threads"] = std::thread::hardware_concurrency();
#ifdef _OPENMP
  m["omp_max_threads"] = omp_get_max_threads();
#else
  m["omp_max_threads"] = 1;
#endif
#ifdef __VERSION__
  m["compiler"] = __VERSION__;
#endif
#ifdef NDEBUG
  m["build"] = "release";
#else
  m["build"] = "debug";
#endif
#ifdef LONGTAPE_WITH_CUDA
  m["cuda_backend"] = true;
#else
  m["cuda_backend"] = false;
#endif
  const std::string commit = first_line_of_command("git rev-parse --short HEAD 2>/dev/null");
  if (!commit.empty()) m["git_commit"] = commit;
  m["gpu"] = nullptr;
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) {
    const cuda::DeviceProperties p = cuda::device_properties(device.index);
    Json gpu;
    gpu["index"] = device.index;
    gpu["name"] = p.name;
    gpu["compute_capability"] = std::to_string(p.compute_major) + "." + std::to_string(p.compute_minor);
    gpu["memory_bytes"] = p.total_memory_bytes;
    gpu["multiprocessors"] = p.multiprocessors;
    gpu["driver_version"] = nvidia_driver_version();
    gpu["cuda_driver_version"] = cuda::cuda_version_string(p.driver_version);
    gpu["cuda_runtime_version"] = cuda::cuda_version_string(p.runtime_version);
    m["gpu"] = gpu;
  }
#else
  (void)device;
  (void)nvidia_driver_version;
#endif
  return m;
}
}  // namespace longtape::bench
