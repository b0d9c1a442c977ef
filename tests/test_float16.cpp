// The f16 storage type (tensor/dtype.h): conversions against the compiler's own IEEE binary16
// (_Float16, an independent implementation) and against bit patterns that IEEE 754 fixes, then
// f16 tensors on the CPU: casts, printing, and clear errors where the CPU has no f16 arithmetic.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>

#include "tensor/ops.h"

using namespace longtape;

namespace {

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
float float_of(uint32_t u) { return std::bit_cast<float>(u); }
uint16_t half_bits(float f) { return float16(f).bits; }
float from_half_bits(uint16_t bits) {
  float16 h;
  h.bits = bits;
  return static_cast<float>(h);
}

#ifdef __FLT16_MAX__
uint16_t reference_bits(float f) { return std::bit_cast<uint16_t>(static_cast<_Float16>(f)); }
float reference_value(uint16_t bits) { return static_cast<float>(std::bit_cast<_Float16>(bits)); }
#endif

}  // namespace

TEST_CASE("f16 conversion: values IEEE 754 binary16 fixes") {
  CHECK(half_bits(0.f) == 0x0000);
  CHECK(half_bits(-0.f) == 0x8000);
  CHECK(half_bits(1.f) == 0x3c00);
  CHECK(half_bits(-2.f) == 0xc000);
  CHECK(half_bits(0.333333343f) == 0x3555);  // 1/3 rounds down to 0x3555 (0.33325195)
  CHECK(half_bits(65504.f) == 0x7bff);       // largest finite
  CHECK(half_bits(65519.f) == 0x7bff);       // below the midpoint to 65536: stays finite
  CHECK(half_bits(65520.f) == 0x7c00);       // the midpoint ties to the even "65536" = inf
  CHECK(half_bits(1e6f) == 0x7c00);
  CHECK(half_bits(-1e6f) == 0xfc00);
  CHECK(half_bits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(half_bits(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(half_bits(std::ldexp(1.f, -14)) == 0x0400);  // smallest normal
  CHECK(half_bits(std::ldexp(1.f, -24)) == 0x0001);  // smallest subnormal
  CHECK(half_bits(std::ldexp(1023.f, -24)) == 0x03ff);  // largest subnormal
  CHECK(half_bits(std::ldexp(1.f, -25)) == 0x0000);  // tie between 0 and 2^-24: even 0
  CHECK(half_bits(std::ldexp(1.5f, -25)) == 0x0001);  // above the tie
  CHECK(half_bits(std::ldexp(3.f, -25)) == 0x0002);  // 1.5 units: tie to even 2
  CHECK(half_bits(std::ldexp(5.f, -25)) == 0x0002);  // 2.5 units: tie to even 2
  CHECK(half_bits(-std::ldexp(1.f, -30)) == 0x8000);  // underflow keeps the sign
  // Ties between normals: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10 and goes to the even 1;
  // 1 + 3 * 2^-11 goes up to the even 1 + 2^-9.
  CHECK(half_bits(1.f + std::ldexp(1.f, -11)) == 0x3c00);
  CHECK(half_bits(1.f + 3 * std::ldexp(1.f, -11)) == 0x3c02);
  CHECK(half_bits(1.f + std::ldexp(1.f, -11) + std::ldexp(1.f, -20)) == 0x3c01);
  // The largest subnormal plus half a unit rounds up into the smallest normal.
  CHECK(half_bits(std::ldexp(1023.5f, -24)) == 0x0400);

  CHECK(from_half_bits(0x3c00) == 1.f);
  CHECK(from_half_bits(0x7bff) == 65504.f);
  CHECK(from_half_bits(0x0001) == std::ldexp(1.f, -24));
  CHECK(from_half_bits(0x03ff) == std::ldexp(1023.f, -24));
  CHECK(from_half_bits(0x0400) == std::ldexp(1.f, -14));
  CHECK(std::isinf(from_half_bits(0x7c00)));
  CHECK(std::signbit(from_half_bits(0x8000)));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(static_cast<float>(float16(nan))));
  CHECK((half_bits(nan) & 0x7c00) == 0x7c00);
  CHECK((half_bits(nan) & 0x0200) != 0);  // quiet
  // A signalling NaN whose payload lies only in the low float bits stays a NaN (not inf).
  CHECK(std::isnan(static_cast<float>(float16(float_of(0x7f800001u)))));
  CHECK(std::isnan(from_half_bits(0x7e00)));
  CHECK(std::isnan(from_half_bits(0xfd01)));
}

TEST_CASE("f16 conversion: every half round-trips, random floats round like _Float16") {
  // Every non-NaN half converts to float and back to itself; NaNs stay NaN.
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    const float f = from_half_bits(bits);
    if ((bits & 0x7c00) == 0x7c00 && (bits & 0x3ff)) {
      CHECK(std::isnan(f));
      continue;
    }
    if (half_bits(f) != bits) {
      CAPTURE(b);
      CHECK(half_bits(f) == bits);
    }
  }
#ifdef __FLT16_MAX__
  int mismatches = 0;
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<uint16_t>(b);
    if ((bits & 0x7c00) == 0x7c00 && (bits & 0x3ff)) continue;
    if (bits_of(from_half_bits(bits)) != bits_of(reference_value(bits))) ++mismatches;
  }
  CHECK(mismatches == 0);
  // Random float bit patterns over the whole range, and dense samples where halves live (with the
  // ties between neighbours, which the random patterns rarely hit).
  std::mt19937 rng(20261127);
  std::uniform_int_distribution<uint32_t> any(0, 0xffffffffu);
  std::uniform_int_distribution<uint32_t> near(0x33000000u, 0x47800000u);  // 2^-25 .. 65536
  mismatches = 0;
  for (int i = 0; i < 400000; ++i) {
    const uint32_t u = i % 2 ? any(rng) : (near(rng) | (any(rng) & 0x80000000u));
    const float f = float_of(u);
    if (std::isnan(f)) continue;
    if (half_bits(f) != reference_bits(f)) ++mismatches;
  }
  for (uint32_t b = 0; b < 0x7c00; ++b) {  // every midpoint between two adjacent finite halves
    const float mid = 0.5f * (from_half_bits(static_cast<uint16_t>(b)) + from_half_bits(static_cast<uint16_t>(b + 1)));
    if (half_bits(mid) != reference_bits(mid)) ++mismatches;
    if (half_bits(-mid) != reference_bits(-mid)) ++mismatches;
  }
  CHECK(mismatches == 0);
#else
  MESSAGE("no _Float16 in this compiler: the comparison with the compiler's conversion is skipped");
#endif
}

TEST_CASE("f16 tensors on the CPU: casts, names, printing, and errors for arithmetic") {
  CHECK(dtype_from_name("f16") == DType::f16);
  CHECK(dtype_from_name("float16") == DType::f16);
  CHECK(dtype_from_name("half") == DType::f16);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK(is_floating(DType::f16));
  CHECK(std::string(dtype_name(DType::f16)) == "f16");
  CHECK_THROWS_WITH_AS(dtype_from_name("fp8"), doctest::Contains("f16"), Error);

  manual_seed(11);
  const Tensor x = Tensor::randn({3, 5}, DType::f64);
  const Tensor h = x.to(DType::f16);
  CHECK(h.dtype() == DType::f16);
  const std::vector<double> want = x.to_vector(), got = h.to(DType::f64).to_vector();
  REQUIRE(want.size() == got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    // Each value is the f16 rounding of the f32 rounding of the f64 value.
    CHECK(got[i] == static_cast<double>(static_cast<float>(float16(static_cast<float>(want[i])))));
    CHECK(std::abs(got[i] - want[i]) <= std::abs(want[i]) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25));
  }
  // f16 -> bf16 -> f32 goes through f32 like every other conversion.
  const std::vector<double> via_bf16 = h.to(DType::bf16).to(DType::f64).to_vector();
  for (size_t i = 0; i < got.size(); ++i)
    CHECK(via_bf16[i] == static_cast<double>(static_cast<float>(bfloat16(static_cast<float>(got[i])))));
  // Random f16 tensors hold f16 values; fills store the rounded value.
  const Tensor r = Tensor::randn({64}, DType::f16);
  for (double v : r.to(DType::f64).to_vector()) CHECK(v == static_cast<float>(float16(static_cast<float>(v))));
  CHECK(Tensor::full({2}, 0.1, DType::f16).to(DType::f64).to_vector()[0] == static_cast<double>(from_half_bits(0x2e66)));

  std::ostringstream os;
  os << h;
  CHECK(os.str().find("dtype=f16") != std::string::npos);

  // The CPU has no f16 arithmetic: a clear error, no silent result.
  CHECK_THROWS_WITH_AS(add(h, h), doctest::Contains("f16"), Error);
  CHECK_THROWS_WITH_AS(exp(h), doctest::Contains("f16"), Error);
}
