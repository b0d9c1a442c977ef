// uniform / normal on CUDA. Design: the numbers come from tensor/philox.h, the counter-based
// Philox4x32-10 generator (the algorithm behind cuRAND's Philox), written once in a header that
// both backends compile. Element i of a tensor uses counter block offset + i / 4, lane i % 4, so
// a (seed, offset) pair gives the same numbers on the CPU and on every GPU: dropout masks and
// initial weights agree across devices and are independent of the launch configuration.
//
// Uniform values are bitwise equal to the CPU's: the double arithmetic is written with
// explicitly rounded operations so the compiler cannot fuse it into FMAs the CPU does not use.
// Normal values pass through log/sin/cos, whose CUDA and C library versions may differ in the
// last bit of a double, so they agree with the CPU to about 1e-15 before rounding to the dtype.
#include "tensor/cuda/common.cuh"
#include "tensor/cuda/kernels.h"
#include "tensor/philox.h"

namespace longtape::cuda {

using namespace impl;

namespace {

// One thread per counter block: computes it once and writes its (up to) 4 elements, visited
// in row-major order of `out` (a strided output gets the values of a contiguous one).
template <typename T, bool Normal>
__global__ void random_kernel(Strided<1> s, bool linear, T* out, uint64_t seed, uint64_t offset, double a, double b,
                              int64_t n) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t blk = global_tid(); blk < blocks; blk += grid_stride()) {
    const philox::U32x4 r = philox::block(seed, offset + static_cast<uint64_t>(blk));
    double z[4];
    if (Normal) {
      // Box-Muller on lane pairs (0,1) and (2,3), exactly as philox::normal_at.
#pragma unroll
      for (int pair = 0; pair < 4; pair += 2) {
        const double u1 = philox::to_unit(r.v[pair]), u2 = philox::to_unit(r.v[pair + 1]);
        const double radius = sqrt(__dmul_rn(-2.0, log(u1)));
        const double theta = __dmul_rn(6.283185307179586, u2);
        z[pair] = __dadd_rn(a, __dmul_rn(b, __dmul_rn(radius, cos(theta))));
        z[pair + 1] = __dadd_rn(a, __dmul_rn(b, __dmul_rn(radius, sin(theta))));
      }
    } else {
      const double width = __dadd_rn(b, -a);
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) z[lane] = __dadd_rn(a, __dmul_rn(width, philox::to_unit(r.v[lane])));
    }
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = blk * 4 + lane;
      if (i >= n) break;
      int64_t off[1] = {i};
      if (!linear) strided_offsets(s, i, off);
      Elem<T>::store(out, off[0], static_cast<typename Elem<T>::C>(z[lane]));
    }
  }
}

template <bool Normal>
void launch_random(const View& out, uint64_t seed, uint64_t offset, double a, double b, const char* op) {
  LT_CHECK(out.device.is_cuda(), op, ": expected a CUDA tensor, got one on ", out.device.str());
  const int64_t n = out.numel();
  if (n == 0) return;
  DeviceGuard guard(out.device);
  const View* views[1] = {&out};
  const Strided<1> s = make_strided(views);
  const bool linear = is_linear(s);
  const unsigned grid = grid_for((n + 3) / 4);
  switch (out.dtype) {
    case DType::f32:
      random_kernel<float, Normal><<<grid, kThreads, 0, stream()>>>(s, linear, static_cast<float*>(out.data), seed, offset, a, b, n);
      break;
    case DType::f64:
      random_kernel<double, Normal><<<grid, kThreads, 0, stream()>>>(s, linear, static_cast<double*>(out.data), seed, offset, a, b, n);
      break;
    case DType::bf16:
      random_kernel<bf16, Normal><<<grid, kThreads, 0, stream()>>>(s, linear, static_cast<bf16*>(out.data), seed, offset, a, b, n);
      break;
    case DType::f16:
      random_kernel<f16, Normal><<<grid, kThreads, 0, stream()>>>(s, linear, static_cast<f16*>(out.data), seed, offset, a, b, n);
      break;
    default:
      throw Error(detail::concat(op, ": expected a floating dtype (f32, f64, bf16, f16), got ", dtype_name(out.dtype)));
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void uniform(const View& out, uint64_t seed, uint64_t offset, double low, double high) {
  launch_random<false>(out, seed, offset, low, high, "uniform");
}

void normal(const View& out, uint64_t seed, uint64_t offset, double mean, double std) {
  launch_random<true>(out, seed, offset, mean, std, "normal");
}

}  // namespace longtape::cuda
