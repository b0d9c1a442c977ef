// Up-front size limits of the command line (see size_limits.h).
#include "cli/size_limits.h"

#include <algorithm>
#include <charconv>
#include <cstdio>

namespace longtape::cli {

long double product(const std::vector<SizeTerm>& terms) {
  long double p = 1.0L;
  for (const SizeTerm& t : terms) p *= static_cast<long double>(t.value);
  return p;
}

std::string terms_text(const std::vector<SizeTerm>& terms) {
  std::string out;
  for (const SizeTerm& t : terms) out += (out.empty() ? "" : " x ") + t.flag + " " + std::to_string(t.value);
  return out;
}

std::string human_size(long double bytes) {
  char buf[48];
  const long double tib = kMaxBytes, gib = tib / 1024.0L;
  if (bytes >= 1024.0L * tib) std::snprintf(buf, sizeof buf, "%.3Lg bytes", bytes);
  else if (bytes >= tib) std::snprintf(buf, sizeof buf, "%.1Lf TiB", bytes / tib);
  else std::snprintf(buf, sizeof buf, "%.1Lf GiB", bytes / gib);
  return buf;
}

void check_count(const std::string& what, const std::vector<SizeTerm>& terms) {
  const long double p = product(terms);
  if (p <= static_cast<long double>(kMaxCount)) return;
  char value[32];
  std::snprintf(value, sizeof value, "%.3Lg", p);
  throw FlagError(terms_text(terms) + " = " + value + " " + what + ", over the limit of 2^40 (" +
                  std::to_string(kMaxCount) + ")");
}

void check_memory(const std::string& what, long double bytes,
                  const std::vector<SizeTerm>& terms) {
  if (bytes <= kMaxBytes) return;
  throw FlagError(terms_text(terms) + " needs about " + human_size(bytes) + " for " + what +
                  ", over the limit of 1 TiB");
}

void check_list_bound(const std::vector<int64_t>& values, const std::string& flag) {
  for (int64_t v : values)
    if (v > kMaxCount)
      throw FlagError(flag + " " + std::to_string(v) + " is out of range; every value must be at most 2^40 (" +
                      std::to_string(kMaxCount) + ")");
}

void check_grid_text(const std::string& text, const std::string& flag) {
  if (text.empty()) return;
  const size_t x = text.find('x');
  auto part = [&](size_t begin, size_t end, int64_t& out) {
    if (begin >= end) return false;
    const auto [p, ec] = std::from_chars(text.data() + begin, text.data() + end, out);
    return ec == std::errc() && p == text.data() + end && out >= 1 && out <= kMaxCount;
  };
  int64_t h = 0, w = 0;
  if (x == std::string::npos || !part(0, x, h) || !part(x + 1, text.size(), w))
    throw FlagError(flag + " '" + shown_value(text) + "' is not HxW with H and W integers in [1, " +
                    std::to_string(kMaxCount) + "]");
  check_count("grid cells", {{flag + " H", h}, {"W", w}});
}

void check_input_sizes(const std::vector<int64_t>& batches, const std::vector<int64_t>& seq_lens,
                       const std::vector<int64_t>& heads, const std::vector<int64_t>& head_dims, size_t dtype_bytes) {
  auto largest = [](const std::vector<int64_t>& v) { return v.empty() ? int64_t{0} : *std::max_element(v.begin(), v.end()); };
  const std::vector<SizeTerm> terms{{"--batch", largest(batches)},
                                    {"--seq-lens", largest(seq_lens)},
                                    {"--heads", largest(heads)},
                                    {"--head-dim", largest(head_dims)}};
  check_count("elements in each of q, k and v", terms);
  check_memory("q, k, v and the output gradient", 4.0L * product(terms) * static_cast<long double>(dtype_bytes), terms);
}

}  // namespace longtape::cli
