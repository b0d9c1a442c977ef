#include "fuzz/entries.h"

#include <CLI/CLI.hpp>

#include <charconv>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "attention/config.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "tensor/device.h"
#include "tensor/dtype.h"
#include "tensor/error.h"

namespace longtape::fuzz {

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw FuzzInvariantError(what);
}

bool same_array(const io::RawArray& a, const io::RawArray& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.bytes == b.bytes;
}

// What an accepted array must satisfy whatever the format: bytes = numel * item size.
void check_accepted_array(const io::RawArray& array, const std::string& what) {
  int64_t numel = 1;
  for (int64_t d : array.shape) {
    require(d >= 0, what + ": accepted a negative dimension");
    require(!__builtin_mul_overflow(numel, d, &numel), what + ": accepted a shape whose size overflows");
  }
  require(array.bytes.size() == static_cast<size_t>(numel) * dtype_size(array.dtype),
          what + ": accepted an array whose byte size does not match its shape");
}

}  // namespace

void npy_entry(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  const io::RawArray first = io::parse_npy(bytes, "<fuzz npy>");
  check_accepted_array(first, "parse_npy");
  // Everything the reader accepts, the writer must write and the reader read back unchanged.
  const io::RawArray again = io::parse_npy(io::serialize_npy(first), "<fuzz npy round trip>");
  require(same_array(first, again), "npy round trip changed the array");
}

void safetensors_entry(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  const io::SafetensorsFile first = io::parse_safetensors(bytes, "<fuzz safetensors>");
  for (const auto& [name, array] : first.tensors) check_accepted_array(array, "parse_safetensors");
  const io::SafetensorsFile again =
      io::parse_safetensors(io::serialize_safetensors(first), "<fuzz safetensors round trip>");
  require(first.metadata == again.metadata, "safetensors round trip changed the metadata");
  require(first.tensors.size() == again.tensors.size(), "safetensors round trip changed the tensor count");
  for (const auto& [name, array] : first.tensors) {
    const io::RawArray* back = again.find(name);
    require(back != nullptr && same_array(array, *back), "safetensors round trip changed tensor '" + name + "'");
  }
}

namespace {

// Integer ranges the flags use: full types, counts, small bounded options.
struct SignedRange {
  int64_t lo, hi;
};
constexpr SignedRange kSignedRanges[] = {{std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()},
                                         {1, cli::kMaxCount},
                                         {0, cli::kMaxCount},
                                         {1, cli::kMaxRanks},
                                         {-5, 5}};
struct UnsignedRange {
  uint64_t lo, hi;
};
constexpr UnsignedRange kUnsignedRanges[] = {{0, std::numeric_limits<uint64_t>::max()}, {1, 1u << 20}};
struct RealRange {
  double lo, hi;
  bool lo_open, hi_open;
};
constexpr double kHuge = std::numeric_limits<double>::max();
constexpr RealRange kRealRanges[] = {{-kHuge, kHuge, false, false}, {0, 1, false, true}, {0, kHuge, true, false}};

void signed_value(std::string text, const SignedRange& r) {
  std::string canonical = text;
  const std::string error = cli::check_signed(canonical, r.lo, r.hi);
  if (!error.empty()) throw cli::FlagError(error);
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(canonical.data(), canonical.data() + canonical.size(), v);
  require(ec == std::errc() && end == canonical.data() + canonical.size(), "check_signed: canonical text not an integer");
  require(v >= r.lo && v <= r.hi, "check_signed: accepted a value out of range");
  // CLI11 with the validator must read exactly the checked value, or refuse.
  CLI::App app;
  int64_t parsed = 0;
  app.add_option("--n", parsed)->transform(cli::integer_in<int64_t>(r.lo, r.hi));
  std::vector<std::string> args{text, "--n"};  // CLI11 takes them in reverse order
  app.parse(args);
  require(parsed == v, "CLI11 read another value than check_signed accepted");
}

void unsigned_value(std::string text, const UnsignedRange& r) {
  std::string canonical = text;
  const std::string error = cli::check_unsigned(canonical, r.lo, r.hi);
  if (!error.empty()) throw cli::FlagError(error);
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(canonical.data(), canonical.data() + canonical.size(), v);
  require(ec == std::errc() && end == canonical.data() + canonical.size(), "check_unsigned: canonical text not an integer");
  require(v >= r.lo && v <= r.hi, "check_unsigned: accepted a value out of range");
  CLI::App app;
  uint64_t parsed = 0;
  app.add_option("--n", parsed)->transform(cli::integer_in<uint64_t>(r.lo, r.hi));
  std::vector<std::string> args{text, "--n"};
  app.parse(args);
  require(parsed == v, "CLI11 read another value than check_unsigned accepted");
}

void real_value(std::string text, const RealRange& r) {
  std::string canonical = text;
  const std::string error = cli::check_real(canonical, r.lo, r.hi, r.lo_open, r.hi_open);
  if (!error.empty()) throw cli::FlagError(error);
  CLI::App app;
  double parsed = 0;
  app.add_option("--x", parsed)->transform(cli::real_in(r.lo, r.hi, r.lo_open, r.hi_open));
  std::vector<std::string> args{text, "--x"};
  app.parse(args);
  require(std::isfinite(parsed), "CLI11 read a non-finite value that check_real accepted");
  require(parsed >= r.lo && parsed <= r.hi && !(r.lo_open && parsed == r.lo) && !(r.hi_open && parsed == r.hi),
          "CLI11 read a value out of the range check_real accepted");
}

}  // namespace

void flags_entry(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const uint8_t selector = data[0];
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  // CLI::ParseError from the CLI11 round trips is the refusal of a value (exit code 2 in main).
  try {
    switch (selector % 8) {
      case 0: signed_value(text, kSignedRanges[(selector / 8) % std::size(kSignedRanges)]); break;
      case 1: unsigned_value(text, kUnsignedRanges[(selector / 8) % std::size(kUnsignedRanges)]); break;
      case 2: real_value(text, kRealRanges[(selector / 8) % std::size(kRealRanges)]); break;
      case 3: {
        const std::vector<int64_t> values = attention::parse_int_list(text, "--segments");
        require(!values.empty(), "parse_int_list accepted text but gave no values");
        cli::check_list_bound(values, "--segments");
        for (int64_t v : values) require(v <= cli::kMaxCount, "check_list_bound let a value over 2^40 through");
        break;
      }
      case 4: cli::check_grid_text(text, "--grid"); break;
      case 5: {
        const Device device = Device::parse(text);
        require(device.is_cpu() || device.index >= 0, "Device::parse gave a negative index");
        break;
      }
      case 6: dtype_from_name(text); break;
      case 7: attention::parse_mixing(text); break;
    }
  } catch (const CLI::ParseError& e) {
    throw cli::FlagError(e.what());
  }
}

}  // namespace longtape::fuzz
