#include "cli/train_progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace longtape::cli {

std::string human_count(double v) {
  char buf[32];
  if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

std::string human_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

std::string human_bytes(int64_t b) {
  char buf[32];
  const double v = static_cast<double>(b);
  if (v >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", v / (1024.0 * 1024 * 1024));
  else if (v >= 1024.0 * 1024) std::snprintf(buf, sizeof buf, "%.1f MiB", v / (1024.0 * 1024));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", v / 1024.0);
  return buf;
}

ProgressBar::ProgressBar(int64_t first, int64_t total) : first_(first), total_(total), tty_(isatty(2) != 0) {}

void ProgressBar::update(int64_t step, double loss, double tokens_per_s, double eta_s) {
  const auto now = std::chrono::steady_clock::now();
  const bool last = step == total_;
  if (tty_) {
    if (!last && now - last_draw_ < std::chrono::milliseconds(100)) return;
  } else {
    const int64_t every = std::max<int64_t>(1, (total_ - first_) / 20);
    if (!last && (step - first_) % every != 0) return;
  }
  last_draw_ = now;
  const int width = 24;
  const int filled = total_ > 0 ? static_cast<int>(width * step / total_) : width;
  std::string bar(filled, '=');
  if (filled < width) bar += '>' + std::string(width - filled - 1, ' ');
  std::fprintf(stderr, "%sstep %lld/%lld [%s] loss %.4f | %s tok/s | ETA %s%s", tty_ ? "\r\033[K" : "",
               static_cast<long long>(step), static_cast<long long>(total_), bar.c_str(), loss,
               human_count(tokens_per_s).c_str(), human_duration(eta_s).c_str(), tty_ ? "" : "\n");
  std::fflush(stderr);
}

void ProgressBar::break_line() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace longtape::cli
