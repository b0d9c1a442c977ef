#include "tensor/profiler.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>

namespace longtape::profiler {

namespace {
using Clock = std::chrono::steady_clock;

std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
std::map<std::string, Row, std::less<>> g_rows;

struct Frame {
  std::string name;
  int64_t bytes;
  Clock::time_point start;
  double child_s;
};
thread_local std::vector<Frame> t_stack;
}  // namespace

void start() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_rows.clear();
  g_enabled.store(true, std::memory_order_relaxed);
}

void stop() { g_enabled.store(false, std::memory_order_relaxed); }

bool enabled() { return g_enabled.load(std::memory_order_relaxed); }

Scope::Scope(std::string_view name, int64_t bytes) {
  if (!g_enabled.load(std::memory_order_relaxed)) return;
  active_ = true;
  t_stack.push_back({std::string(name), bytes, Clock::now(), 0.0});
}

Scope::~Scope() {
  if (!active_ || t_stack.empty()) return;
  Frame f = std::move(t_stack.back());
  t_stack.pop_back();
  const double total = std::chrono::duration<double>(Clock::now() - f.start).count();
  if (!t_stack.empty()) t_stack.back().child_s += total;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_rows.find(f.name);
  if (it == g_rows.end()) it = g_rows.emplace(f.name, Row{f.name}).first;
  Row& r = it->second;
  ++r.calls;
  r.total_s += total;
  r.self_s += std::max(0.0, total - f.child_s);
  r.bytes += f.bytes;
}

std::vector<Row> rows() {
  std::vector<Row> out;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto& [name, row] : g_rows) out.push_back(row);
  }
  std::sort(out.begin(), out.end(), [](const Row& a, const Row& b) {
    return a.self_s != b.self_s ? a.self_s > b.self_s : a.name < b.name;
  });
  return out;
}

std::string table(size_t max_rows) {
  const std::vector<Row> all = rows();
  double self_sum = 0;
  int64_t calls = 0;
  size_t width = 4;
  for (const Row& r : all) {
    self_sum += r.self_s;
    calls += r.calls;
    width = std::max(width, r.name.size());
  }
  std::string out;
  char line[512];
  const int w = static_cast<int>(std::min<size_t>(width, 60));
  std::snprintf(line, sizeof line, "%-*s %8s %11s %11s %7s %11s %9s\n", w, "op", "calls", "self ms", "total ms",
                "self %", "MiB", "GB/s");
  out += line;
  out += std::string(static_cast<size_t>(w) + 64, '-') + "\n";
  size_t shown = 0;
  for (const Row& r : all) {
    if (max_rows > 0 && shown++ >= max_rows) break;
    const double mib = static_cast<double>(r.bytes) / (1024.0 * 1024.0);
    const double gbs = r.self_s > 0 && r.bytes > 0 ? static_cast<double>(r.bytes) / r.self_s / 1e9 : 0.0;
    std::snprintf(line, sizeof line, "%-*.*s %8lld %11.3f %11.3f %6.1f%% %11.2f %9.2f\n", w, w, r.name.c_str(),
                  static_cast<long long>(r.calls), r.self_s * 1e3, r.total_s * 1e3,
                  self_sum > 0 ? 100.0 * r.self_s / self_sum : 0.0, mib, gbs);
    out += line;
  }
  out += std::string(static_cast<size_t>(w) + 64, '-') + "\n";
  std::snprintf(line, sizeof line, "%-*s %8lld %11.3f\n", w, "total (self)", static_cast<long long>(calls),
                self_sum * 1e3);
  out += line;
  return out;
}

}  // namespace longtape::profiler
