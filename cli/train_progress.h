#pragma once
// What `longtape train` shows while it runs: counts, durations and byte sizes in short human form,
// and the progress line on stderr.
#include <chrono>
#include <cstdint>
#include <string>

namespace longtape::cli {

std::string human_count(double v);         // 2.67M, 13.4k, 512
std::string human_duration(double seconds);  // 1:02:03, 0:49; --:-- when unknown
std::string human_bytes(int64_t b);          // 1.50 GiB, 3.2 MiB, 0.5 KiB

// One line redrawn in place on a terminal; on a pipe or file, a plain line every ~5% of the run.
class ProgressBar {
 public:
  ProgressBar(int64_t first, int64_t total);
  void update(int64_t step, double loss, double tokens_per_s, double eta_s);
  // Ends the in-place line so other output starts on a fresh one.
  void break_line();

 private:
  int64_t first_, total_;
  bool tty_;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace longtape::cli
