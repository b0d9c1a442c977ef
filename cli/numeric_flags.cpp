// Strict numeric flags and one-line usage errors (see numeric_flags.h).
#include "cli/numeric_flags.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>

namespace longtape::cli {

namespace {

std::string range_text(const std::string& lo, const std::string& hi, bool lo_open = false, bool hi_open = false) {
  return std::string(lo_open ? "(" : "[") + lo + ", " + hi + (hi_open ? ")" : "]");
}

std::string real_text(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

std::string refuse(const std::string& text, const char* why, const char* kind, const std::string& range) {
  const bool comma = kind[std::strlen(kind) - 1] == ',';
  return "'" + shown_value(text) + "' " + why + "; expected " + kind + (comma ? " " : " in ") + range;
}

// Skips one leading '+' when a digit follows (the only sign besides '-' that is accepted).
const char* skip_plus(const std::string& text) {
  const char* first = text.data();
  if (text.size() > 1 && text[0] == '+' && (std::isdigit(static_cast<unsigned char>(text[1])) || text[1] == '.'))
    ++first;
  return first;
}

// "[0, 1)", ">= 0", "> 0" or "any" (finite is said separately).
std::string real_range_text(double lo, double hi, bool lo_open, bool hi_open) {
  constexpr double kMax = std::numeric_limits<double>::max();
  if (hi == kMax && lo == -kMax) return "any value";
  if (hi == kMax) return std::string(lo_open ? "> " : ">= ") + real_text(lo);
  return range_text(real_text(lo), real_text(hi), lo_open, hi_open);
}

// A byte that is not printable ASCII, shown as \xNN.
void append_hex_escape(std::string& out, unsigned char c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\x%02x", c);
  out += buf;
}

}  // namespace

std::string shown_value(const std::string& text, size_t max_chars) {
  std::string out;
  size_t shown = 0;
  for (unsigned char c : text) {
    if (shown >= max_chars) {
      out += "... (" + std::to_string(text.size()) + " bytes)";
      return out;
    }
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      append_hex_escape(out, c);
    }
    ++shown;
  }
  return out;
}

std::string one_line(const std::string& message) {
  constexpr size_t kMax = 300;
  std::string out;
  for (size_t i = 0; i < message.size() && out.size() < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(message[i]);
    if (c == '\n' || c == '\r') {
      if (i + 1 < message.size()) out += "; ";
    } else if (c == '\t') {
      out += ' ';
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      append_hex_escape(out, c);
    }
  }
  while (!out.empty() && (out.back() == ' ' || out.back() == ';')) out.pop_back();
  if (out.size() >= kMax) out += "...";
  return out;
}

// Parses `first..end of text` as a decimal integer of type T within [lo, hi]; on success text
// becomes its canonical form.
template <typename T>
std::string parse_integer(std::string& text, const char* first, T lo, T hi, const std::string& range) {
  const char* last = text.data() + text.size();
  T value = 0;
  const auto [end, ec] = std::from_chars(first, last, value);
  if (end != last || (ec != std::errc() && ec != std::errc::result_out_of_range))
    return refuse(text, "is not a decimal integer", "an integer", range);
  if (ec == std::errc::result_out_of_range || value < lo || value > hi)
    return refuse(text, "is out of range", "an integer", range);
  text = std::to_string(value);
  return "";
}

std::string check_signed(std::string& text, int64_t lo, int64_t hi) {
  const std::string range = range_text(std::to_string(lo), std::to_string(hi));
  if (text.empty()) return "empty value; expected an integer in " + range;
  return parse_integer(text, skip_plus(text), lo, hi, range);
}

std::string check_unsigned(std::string& text, uint64_t lo, uint64_t hi) {
  const std::string range = range_text(std::to_string(lo), std::to_string(hi));
  if (text.empty()) return "empty value; expected an integer in " + range;
  if (text[0] == '-') {
    // "-0" is zero; anything else negative is refused rather than wrapped.
    const bool zero = text.size() > 1 && text.find_first_not_of('0', 1) == std::string::npos;
    if (!zero) {
      const bool digits = text.size() > 1 && text.find_first_not_of("0123456789", 1) == std::string::npos;
      return refuse(text, digits ? "is negative" : "is not a decimal integer", "an integer", range);
    }
    text = "0";
    return lo == 0 ? "" : refuse("-0", "is out of range", "an integer", range);
  }
  return parse_integer(text, skip_plus(text), lo, hi, range);
}

std::string check_real(std::string& text, double lo, double hi, bool lo_open, bool hi_open) {
  const std::string range = real_range_text(lo, hi, lo_open, hi_open);
  if (text.empty()) return "empty value; expected a finite number, " + range;
  const char* first = skip_plus(text);
  const char* last = text.data() + text.size();
  double value = 0;
  const auto [end, ec] = std::from_chars(first, last, value, std::chars_format::general);
  if (end != last || (ec != std::errc() && ec != std::errc::result_out_of_range))
    return refuse(text, "is not a decimal number", "a finite number,", range);
  if (ec == std::errc::result_out_of_range) return refuse(text, "is out of range", "a finite number,", range);
  if (!std::isfinite(value)) return refuse(text, "is not finite", "a finite number,", range);
  if (value < lo || value > hi || (lo_open && value == lo) || (hi_open && value == hi))
    return refuse(text, "is out of range", "a finite number,", range);
  text.assign(first, last);  // CLI11's strtold reads the same decimal text
  return "";
}

CLI::Validator real_in(double lo, double hi, bool lo_open, bool hi_open) {
  return CLI::Validator(
      [lo, hi, lo_open, hi_open](std::string& text) { return check_real(text, lo, hi, lo_open, hi_open); },
      real_range_text(lo, hi, lo_open, hi_open), "number");
}

void enforce_numeric_checks(CLI::App& app) {
  for (CLI::Option* opt : app.get_options()) {
    if (opt->get_expected_max() == 0) continue;  // a flag without a value
    bool checked = true;
    try {
      checked = opt->get_validator("number") != nullptr;
    } catch (const CLI::OptionNotFound&) {
      checked = false;
    }
    if (checked) continue;
    std::string type = opt->get_type_name();
    type = type.substr(0, type.find(':'));
    if (type == "INT")
      opt->transform(integer_in<int64_t>());
    else if (type == "UINT")
      opt->transform(integer_in<uint64_t>());
    else if (type == "FLOAT" || type == "NUMBER")
      opt->transform(real_in(-std::numeric_limits<double>::max(), std::numeric_limits<double>::max()));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) enforce_numeric_checks(*sub);
}

}  // namespace longtape::cli
