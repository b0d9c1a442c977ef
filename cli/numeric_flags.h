#pragma once
// Strict parsing of the numeric flags of every `longtape` subcommand, and the usage errors the
// command line reports with exit code 2.
//
// CLI11 on its own clamps out-of-range integers (strtoll), wraps negatives into unsigned flags
// ("--seed -1"), reads "" as 0, reads "010" as octal and takes "nan" and "inf" for doubles. Every
// numeric flag therefore gets one of the validators below (`->transform(integer_in<T>(lo, hi))`,
// `->transform(real_in(lo, hi))`): the value must be a plain decimal number, nothing before or
// after it, inside the flag's range (no clamping, no wrapping) and, for reals, finite. The
// validator rewrites the text into a canonical form, so CLI11's own conversion then reads exactly
// the value that was checked. A numeric option left without one of these validators gets the
// full range of its type from enforce_numeric_checks (main.cpp calls it for every subcommand).
//
// A rejected value is reported on one printable line that names the flag, shows the value
// (escaped, truncated) and the accepted range; the command exits with kUsageExitCode before it
// reads or writes anything.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace longtape::cli {

// Exit status of a command line that was refused before any work (a bad flag or flag value).
constexpr int kUsageExitCode = 2;

// The largest count or size any flag may give (sequence lengths, batch, widths, block sizes,
// steps...): 2^40. Products of several such flags are bounded separately (size_limits.h).
constexpr int64_t kMaxCount = int64_t{1} << 40;

// --ranks runs P ranks as threads of this process.
constexpr int64_t kMaxRanks = 1024;

// A flag value or combination refused before the command does any work; main() prints it on one
// line and exits with kUsageExitCode.
class FlagError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// `text` for a message: non-printable bytes as \xNN, quotes and backslashes escaped, at most
// `max_chars` characters (then "..." and the full length in bytes).
std::string shown_value(const std::string& text, size_t max_chars = 40);

// One printable line (no control characters, at most ~300 characters) from any message.
std::string one_line(const std::string& message);

// The checks behind the validators: parse `text` strictly, return "" and rewrite `text` into a
// canonical form when it is valid, else an error message (without the flag name, which CLI11
// prepends).
std::string check_signed(std::string& text, int64_t lo, int64_t hi);
std::string check_unsigned(std::string& text, uint64_t lo, uint64_t hi);
std::string check_real(std::string& text, double lo, double hi, bool lo_open, bool hi_open);

// Validator of an integer flag of type T, accepting [lo, hi] (both within T's range).
template <typename T>
CLI::Validator integer_in(T lo = std::numeric_limits<T>::min(), T hi = std::numeric_limits<T>::max()) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
  std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if constexpr (std::is_signed_v<T>) {
    return CLI::Validator([lo, hi](std::string& text) { return check_signed(text, lo, hi); }, range, "number");
  } else {
    return CLI::Validator([lo, hi](std::string& text) { return check_unsigned(text, lo, hi); }, range, "number");
  }
}

// Validator of a real flag: finite, in [lo, hi]; lo_open / hi_open exclude the bound.
CLI::Validator real_in(double lo, double hi, bool lo_open = false, bool hi_open = false);

// A count or size flag: an integer in [lo, kMaxCount].
template <typename T>
CLI::Validator count_in(T lo) {
  return integer_in<T>(lo, static_cast<T>(std::min<int64_t>(kMaxCount, static_cast<int64_t>(std::numeric_limits<T>::max()))));
}

// Gives every numeric option of `app` and its subcommands that has no validator from this file
// the full range of its type (INT: int64, UINT: uint64, FLOAT: finite doubles).
void enforce_numeric_checks(CLI::App& app);

}  // namespace longtape::cli
