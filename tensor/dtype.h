#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "tensor/error.h"

namespace longtape {

enum class DType : uint8_t { f32, f64, bf16, i32, i64, f16 };

// The IEEE binary32 bits of a float, and back (what the half-precision conversions work on).
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 storage type: the upper 16 bits of an IEEE float, round-to-nearest-even on conversion.
struct bfloat16 {
  uint16_t bits = 0;
  bfloat16() = default;
  explicit bfloat16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
      bits = static_cast<uint16_t>((u >> 16) | 0x40);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  explicit operator float() const { return float_from_bits(static_cast<uint32_t>(bits) << 16); }
};

// IEEE binary16 storage type (1 sign, 5 exponent, 10 mantissa bits): round-to-nearest-even on
// conversion, overflow to inf, gradual underflow through subnormals, NaN stays a quiet NaN.
struct float16 {
  uint16_t bits = 0;
  float16() = default;
  explicit float16(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {  // NaN: quiet, top payload bits kept
      bits = static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    } else if (a >= 0x38800000u) {  // |f| >= 2^-14: a normal half (or inf after rounding)
      const uint32_t rebiased = a - (112u << 23);  // float exponent bias 127 -> half bias 15
      const uint32_t h = (rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13;
      bits = static_cast<uint16_t>(sign | (h >= 0x7c00u ? 0x7c00u : h));
    } else if (a > 0x33000000u) {  // 2^-25 < |f| < 2^-14: a subnormal half, units of 2^-24
      const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
      const int shift = 126 - static_cast<int>(a >> 23);  // 14..24
      const uint32_t rest = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
      uint32_t h = mant >> shift;
      if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
      bits = static_cast<uint16_t>(sign | h);
    } else {  // at most 2^-25: the tie at 2^-25 goes to the even 0
      bits = sign;
    }
  }
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1fu, mant = bits & 0x3ffu;
    uint32_t u;
    if (exponent == 0x1fu) {
      u = sign | 0x7f800000u | (mant << 13);
    } else if (exponent != 0) {
      u = sign | ((exponent + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
      u = sign;
    } else {  // subnormal: mant * 2^-24, normal as a float
      int e = 0;
      uint32_t m = mant;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++e;
      }
      u = sign | ((113u - static_cast<uint32_t>(e)) << 23) | ((m & 0x3ffu) << 13);
    }
    return float_from_bits(u);
  }
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}

inline bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}
// The 16-bit storage types (bf16, f16): kept in memory, computed in f32.
inline bool is_half_precision(DType t) { return t == DType::bf16 || t == DType::f16; }

DType dtype_from_name(const std::string& name);  // "f32", "float32", "bf16", ... ; throws on unknown

}  // namespace longtape
