#pragma once
// A per-op profiler for host-side timing, in the spirit of torch.profiler's table: every kernel
// call of tensor/kernels.h, every autograd backward node and the phases a caller marks become
// rows with calls, total time, self time (total minus nested rows) and bytes touched. Off by
// default; when off a scope costs one relaxed atomic load. Timings are wall-clock on the calling
// thread, so CUDA kernels are counted at launch (synchronise inside a scope to time them).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace longtape::profiler {

struct Row {
  std::string name;
  int64_t calls = 0;
  double total_s = 0;  // including nested rows
  double self_s = 0;   // excluding nested rows
  int64_t bytes = 0;   // bytes read and written, as the kernel reports them
};

// Clears the rows and starts recording; stop() ends it; rows() is what was recorded, by self
// time, largest first.
void start();
void stop();
bool enabled();
std::vector<Row> rows();
// The rows as an aligned text table with a total line; at most max_rows rows (0 = all).
std::string table(size_t max_rows = 0);

// Times its own lifetime as one call of `name` (the name is copied only when recording).
class Scope {
 public:
  explicit Scope(std::string_view name, int64_t bytes = 0);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  bool active_ = false;
};

}  // namespace longtape::profiler
