#pragma once
// Branch-free float exp and erf that the compiler vectorises (libm's expf/erff are scalar calls).
// exp: Cephes range reduction x = n ln2 + r and a degree-5 polynomial, within 2 ulp of expf for
// normal results, 0 below -103.97, +inf above 88.72, NaN kept.
// erf: Abramowitz & Stegun 7.1.26, absolute error below 6e-7 in float (GELU adds it to 1). The
// f64 kernels keep libm.
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace longtape::cpu {

[[gnu::always_inline]] inline float vexp(float x) {
  const float hi = 88.72283935546875f, lo = -103.972076f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // round to nearest by the 1.5 * 2^23 trick (no libm call)
  const float shifter = 12582912.0f;
  const float nf = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  // 2^n in two factors, so that n in [-150, 128] stays within the exponent range of each.
  const int32_t n = static_cast<int32_t>(nf);
  const int32_t n1 = n / 2, n2 = n - n1;
  y *= std::bit_cast<float>((n1 + 127) << 23);
  y *= std::bit_cast<float>((n2 + 127) << 23);
  y = x < lo ? 0.0f : y;
  y = x > hi ? __builtin_inff() : y;
  return x != x ? x : y;
}

[[gnu::always_inline]] inline float verf(float x) {
  const float a = x < 0 ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * vexp(-a * a);
  return x < 0 ? -y : y;
}

// exp and erf of a kernel's element type: the forms above for f32, libm for f64.
template <typename T>
[[gnu::always_inline]] inline T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return vexp(x);
  else return std::exp(x);
}
template <typename T>
[[gnu::always_inline]] inline T erf_of(T x) {
  if constexpr (std::is_same_v<T, float>) return verf(x);
  else return std::erf(x);
}

}  // namespace longtape::cpu
