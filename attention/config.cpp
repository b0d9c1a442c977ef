#include "attention/config.h"

#include <cctype>
#include <charconv>
#include <cmath>

#include "tensor/error.h"

namespace longtape::attention {

double AttentionConfig::scale() const {
  if (softmax_scale) return *softmax_scale;
  LT_CHECK(head_dim > 0, "attention config: head_dim must be > 0 to derive the softmax scale 1/sqrt(head_dim), got ",
           head_dim);
  return 1.0 / std::sqrt(static_cast<double>(head_dim));
}

Mixing parse_mixing(const std::string& text) {
  if (text == "lse") return Mixing::lse;
  if (text == "head_groups") return Mixing::head_groups;
  LT_CHECK(false, "mixing must be \"lse\" or \"head_groups\", got \"", text, "\"");
  return Mixing::lse;
}

std::string mixing_name(Mixing m) { return m == Mixing::head_groups ? "head_groups" : "lse"; }

std::vector<int64_t> parse_int_list(const std::string& text, const char* what) {
  // Accepts comma-separated integers with optional spaces around each: "2048, 4096". Signs are
  // parsed so that a negative value reaches the config check, which says why it is invalid.
  std::vector<int64_t> values;
  LT_CHECK(!text.empty(), what, ": expected a comma-separated list of integers such as \"2048,4096\", got an empty string");
  size_t begin = 0;
  while (true) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    size_t a = begin, b = end;
    while (a < b && std::isspace(static_cast<unsigned char>(text[a]))) ++a;
    while (b > a && std::isspace(static_cast<unsigned char>(text[b - 1]))) --b;
    int64_t value = 0;
    const char* first = text.data() + a;
    const char* last = text.data() + b;
    if (a < b && *first == '+') ++first;
    auto [ptr, ec] = std::from_chars(first, last, value);
    LT_CHECK(a < b && ec == std::errc() && ptr == last, what,
             ": expected a comma-separated list of integers such as \"2048,4096\", got \"", text, "\" (item ",
             values.size(), " is \"", text.substr(a, b - a), "\")");
    values.push_back(value);
    if (end == text.size()) break;
    begin = end + 1;
  }
  return values;
}

}  // namespace longtape::attention
