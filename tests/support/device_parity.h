#pragma once
// Comparisons for CPU/CUDA parity in f32 and bf16: normwise relative errors with tolerances from
// the dtype and the number of terms summed, bitwise equality, and a GPU pool filled with NaN so
// that outputs a kernel forgets to write fail. Include after <doctest/doctest.h>.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "tensor/ops.h"
#include "tensor/tensor.h"

namespace longtape::testing {

// Fills the caching pool with NaN-filled blocks of many sizes and frees them, so outputs that a
// kernel forgets to write show up as NaN instead of passing with stale or zero memory.
inline void poison_gpu_pool() {
  std::vector<Tensor> blocks;
  for (int64_t n : {64, 1000, 16000, 250000, 4000000})
    for (int k = 0; k < 3; ++k)
      blocks.push_back(Tensor::full({n}, std::numeric_limits<double>::quiet_NaN(), DType::f32, Device::cuda(0)));
}

// Normwise relative tolerance for outputs that each sum about `len` terms.
inline double dtype_tolerance(DType dt, int64_t len) {
  const double growth = std::sqrt(static_cast<double>(std::max<int64_t>(len, 1)));
  switch (dt) {
    case DType::f32: return 1e-5 * growth;
    case DType::bf16: return 3e-2;  // 8-bit mantissa: each rounding is up to 4e-3; f32 accumulation
    default: return 1e-12 * growth;
  }
}

// ||got - ref|| / ||ref|| on the host in f64. A NaN or inf that the reference does not have
// (at the same place) is an infinite error.
inline double normwise_rel_err(const Tensor& got, const Tensor& ref) {
  const std::vector<double> g = got.to_vector(), r = ref.to_vector();
  REQUIRE(g.size() == r.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (!std::isfinite(r[i]) || !std::isfinite(g[i])) {
      const bool same = (std::isnan(r[i]) && std::isnan(g[i])) || r[i] == g[i];
      if (!same) return std::numeric_limits<double>::infinity();
      continue;
    }
    num += (g[i] - r[i]) * (g[i] - r[i]);
    den += r[i] * r[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

inline void check_normwise_close(const Tensor& got, const Tensor& ref, double tol, const std::string& what) {
  REQUIRE(got.defined());
  REQUIRE(ref.defined());
  INFO(what);
  CHECK(got.shape() == ref.shape());
  const double err = normwise_rel_err(got, ref);
  INFO("relative error ", err, " vs tolerance ", tol);
  CHECK(err <= tol);
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  for (size_t i = 0; i < x.size(); ++i)
    if (!(x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i])))) return false;
  return true;
}

}  // namespace longtape::testing
