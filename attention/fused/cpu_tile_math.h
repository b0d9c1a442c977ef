#pragma once
// The arithmetic of the fused CPU attention tiles (internal to attention/fused/): the target's
// vector width, a vectorised float exp for the softmax loops, and the register-blocked tile
// product C = or += A * B that every score and gradient product goes through.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace longtape::attention::fused::cpu_detail {

// ---------------------------------------------------------------------------------------------
// Vectors: the widest registers the target has (SSE2 is the x86-64 baseline).

#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
#else
inline constexpr int kVectorBytes = 16;
#endif

template <typename Real>
struct Simd {
  typedef Real type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / static_cast<int>(sizeof(Real));
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// exp

// What the softmax loops step by: a vector of floats, or one double. The float exp is written out
// (libm's has no vector form without -ffast-math); double keeps std::exp for its accuracy.
template <typename Real>
struct Pack;

template <>
struct Pack<float> {
  typedef Simd<float>::type type;
  typedef int32_t bits __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t width = kVectorBytes / 4;
  static type splat(float x) { return type{} + x; }
  static type load(const float* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // Cephes range reduction and degree-6 polynomial (about 2 ulp). Inputs below -87 give exactly 0,
  // -inf included, so masked scores vanish without a NaN.
  static type exp(type x) {
    const type low = splat(-87.0f), high = splat(88.0f);
    type clamped = x < low ? low : x;
    clamped = clamped > high ? high : clamped;
    // Round to nearest with the 1.5 * 2^23 trick: no rounding call.
    const type n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    type r = clamped - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    type p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const bits exponent = (__builtin_convertvector(n, bits) + 127) << 23;
    return x < low ? splat(0.0f) : p * std::bit_cast<type>(exponent);
  }
};

template <>
struct Pack<double> {
  typedef double type;
  static constexpr int64_t width = 1;
  static type splat(double x) { return x; }
  static type load(const double* p) { return *p; }
  static void store(double* p, type v) { *p = v; }
  static type exp(type x) { return std::exp(x); }
};

// ---------------------------------------------------------------------------------------------
// Tile products: C (M x N, row-major, ldc) = or += A (M x K) * B (K x N)
//
// B is read by rows through row pointers (b_rows[k] + n, n contiguous). A is either read by rows
// (a.rows[m][k], k contiguous) or stored k-major (a.data[k * a.ld + m], m contiguous): the scores
// are the left operand of P V and dS K without being transposed.

template <typename Real>
struct Operand {
  const Real* const* rows = nullptr;  // a_rows[m] (A by rows) or b_rows[k] (B)
  const Real* data = nullptr;         // A k-major
  int64_t ld = 0;
};

template <typename Real, bool kAKMajor>
inline Real a_at(const Operand<Real>& a, int64_t m, int64_t k) {
  if constexpr (kAKMajor) return a.data[k * a.ld + m];
  return a.rows[m][k];
}

// MR rows x NV vectors of C, accumulated in registers over all of K (6 x 2 vectors: 12
// accumulators, enough independent FMAs to hide their latency).
template <typename Real, int MR, int NV, bool kAKMajor>
inline void micro_tile(int64_t K, const Operand<Real>& a, int64_t m0, const Real* const* b_rows, int64_t n0,
                       Real* c, int64_t ldc, bool accumulate) {
  using V = typename Simd<Real>::type;
  constexpr int64_t W = Simd<Real>::lanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  const Real* a_row[MR] = {};
  if constexpr (!kAKMajor) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) a_row[i] = a.rows[m0 + i];
  }
  for (int64_t k = 0; k < K; ++k) {
    const Real* b = b_rows[k] + n0;
    V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + j * W, sizeof(V));
    const Real* ak = kAKMajor ? a.data + k * a.ld + m0 : nullptr;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Real s = kAKMajor ? ak[i] : a_row[i][k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += bv[j] * s;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      Real* out = c + (m0 + i) * ldc + n0 + j * W;
      if (accumulate) {
        V old;
        std::memcpy(&old, out, sizeof(V));
        acc[i][j] += old;
      }
      std::memcpy(out, &acc[i][j], sizeof(V));
    }
}

// All rows of one column band of NV vectors.
template <typename Real, int NV, bool kAKMajor>
inline void column_band(int64_t M, int64_t K, const Operand<Real>& a, const Real* const* b_rows, int64_t n0,
                        Real* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) micro_tile<Real, 6, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
  if (m + 4 <= M) {
    micro_tile<Real, 4, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
    m += 4;
  }
  if (m + 2 <= M) {
    micro_tile<Real, 2, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
    m += 2;
  }
  if (m < M) micro_tile<Real, 1, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
}

template <typename Real, bool kAKMajor>
void gemm(int64_t M, int64_t N, int64_t K, const Operand<Real>& a, const Real* const* b_rows, Real* c, int64_t ldc,
          bool accumulate) {
  constexpr int64_t W = Simd<Real>::lanes;
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W) column_band<Real, 2, kAKMajor>(M, K, a, b_rows, n, c, ldc, accumulate);
  for (; n + W <= N; n += W) column_band<Real, 1, kAKMajor>(M, K, a, b_rows, n, c, ldc, accumulate);
  if (n == N) return;
  // Columns past the last full vector (head dims that are not a multiple of the vector width).
  for (int64_t m = 0; m < M; ++m)
    for (int64_t col = n; col < N; ++col) {
      Real sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += a_at<Real, kAKMajor>(a, m, k) * b_rows[k][col];
      c[m * ldc + col] = accumulate ? c[m * ldc + col] + sum : sum;
    }
}

template <typename Real>
Operand<Real> by_rows(const Real* const* rows) {
  Operand<Real> a;
  a.rows = rows;
  return a;
}

template <typename Real>
Operand<Real> k_major(const Real* data, int64_t ld) {
  Operand<Real> a;
  a.data = data;
  a.ld = ld;
  return a;
}

}  // namespace longtape::attention::fused::cpu_detail
