#pragma once
// Philox4x32-10 counter-based generator, shared by the CPU and CUDA backends so that the same
// (seed, offset) gives the same numbers on every device. Element i of a tensor draws from counter
// block offset + i / 4, lane i % 4.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LT_HOST_DEVICE inline
#endif

namespace longtape::philox {

struct U32x4 {
  uint32_t v[4];
};

LT_HOST_DEVICE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

LT_HOST_DEVICE U32x4 block(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(0xD2511F53u, c0, &hi0);
    uint32_t lo1 = mulhilo(0xCD9E8D57u, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform in the open interval (0, 1).
LT_HOST_DEVICE double to_unit(uint32_t u) { return (static_cast<double>(u) + 0.5) * 2.3283064365386963e-10; }

LT_HOST_DEVICE double uniform_at(uint64_t seed, uint64_t offset, int64_t i) {
  U32x4 b = block(seed, offset + static_cast<uint64_t>(i) / 4);
  return to_unit(b.v[i % 4]);
}

// Box-Muller on lane pairs (0,1) and (2,3).
LT_HOST_DEVICE double normal_at(uint64_t seed, uint64_t offset, int64_t i) {
  U32x4 b = block(seed, offset + static_cast<uint64_t>(i) / 4);
  int lane = static_cast<int>(i % 4), pair = lane & ~1;
  double u1 = to_unit(b.v[pair]), u2 = to_unit(b.v[pair + 1]);
  double r = sqrt(-2.0 * log(u1));
  double theta = 6.283185307179586 * u2;
  return (lane & 1) ? r * sin(theta) : r * cos(theta);
}

}  // namespace longtape::philox
