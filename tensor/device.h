#pragma once
#include <string>

namespace longtape {

enum class DeviceKind : uint8_t { cpu, cuda };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;

  static Device cpu() { return {DeviceKind::cpu, 0}; }
  static Device cuda(int n = 0) { return {DeviceKind::cuda, n}; }
  static Device parse(const std::string& text);  // "cpu", "cuda", "cuda:1"; throws on anything else
  bool is_cpu() const { return kind == DeviceKind::cpu; }
  bool is_cuda() const { return kind == DeviceKind::cuda; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
};

// True when longtape was built with CUDA and at least one GPU is visible.
bool cuda_available();
int cuda_device_count();

}  // namespace longtape
