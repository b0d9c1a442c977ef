// Eigen runs every product single-threaded: its own OpenMP GEMM busy-waits between blocks, which
// costs more than it gains on the small products of a training step and collapses when the cores
// are shared. Threads split the work here instead: over the batch, or over row blocks of C, and
// only when each thread gets enough arithmetic to pay for the fork.
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"

namespace longtape::cpu {

namespace {
// Multiply-adds per thread below which a fork costs more than it saves.
constexpr double kMinFlopsPerThread = 1 << 22;

int gemm_threads(double flops, int64_t max_parts) {
#ifdef _OPENMP
  const int64_t by_work = static_cast<int64_t>(flops / kMinFlopsPerThread);
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(by_work, max_parts), 1, omp_get_max_threads()));
#else
  (void)flops;
  (void)max_parts;
  return 1;
#endif
}
}  // namespace

void gemm(const GemmArgs& g) {
  LT_CHECK(!g.f32_out, "matmul: the CPU backend has no bf16 products (bf16 precision rounds f32 operands instead)");
  LT_CHECK(!(g.bias && g.a_sums), "matmul: a product adds a bias or sums A's rows, not both");
  LT_CHECK(!g.a_sums || g.batch == 1, "matmul: A's row sums are taken for one product, got batch ", g.batch);
  LT_CHECK(!(g.bias || g.a_sums) || g.dtype == DType::f64 || g.dtype == DType::f32,
           "matmul: the bias epilogues take f32 or f64 products, got ", dtype_name(g.dtype));
  dispatch_float(g.dtype, "matmul", [&]<typename T>() {
    using Vec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
    // The vectors are f32 for f32 products and f64 for f64 ones, i.e. T.
    if (g.a_sums) {
      // Sums over the reduction dim in a fixed order (the product below does not touch A).
      const T* a = static_cast<const T*>(g.a);
      T* sums = static_cast<T*>(g.a_sums);
      if (g.trans_a) {  // A is (K, M): column sums
        Eigen::Map<Vec>(sums, g.m).setZero();
        for (int64_t r = 0; r < g.k; ++r) Eigen::Map<Vec>(sums, g.m) += Eigen::Map<const Vec>(a + r * g.m, g.m);
      } else {
        for (int64_t i = 0; i < g.m; ++i) sums[i] = Eigen::Map<const Vec>(a + i * g.k, g.k).sum();
      }
    }
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using MapC = Eigen::Map<Mat>;
    using MapA = Eigen::Map<const Mat>;
    const T alpha = static_cast<T>(g.alpha);
    // C rows [r0, r0 + rows) of batch entry i. Row r of op(A) is row r of A, or column r when
    // transposed (a column block of a row-major matrix: outer stride a_cols).
    auto product = [&](int64_t i, int64_t r0, int64_t rows) {
      using Stride = Eigen::OuterStride<>;
      const T* a = static_cast<const T*>(g.a) + i * g.stride_a;
      const T* b = static_cast<const T*>(g.b) + i * g.stride_b;
      MapC c(static_cast<T*>(g.c) + i * g.stride_c + r0 * g.n, rows, g.n);
      if (g.c_in && g.c_in != g.c && g.beta != 0)
        c = Eigen::Map<const Mat>(static_cast<const T*>(g.c_in) + i * g.stride_c + r0 * g.n, rows, g.n);
      if (g.beta == 0) c.setZero();
      else if (g.beta != 1) c *= static_cast<T>(g.beta);
      const int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
      MapA bm(b, b_rows, b_cols);
      if (g.trans_a) {
        // A is (K, M): the block is columns [r0, r0 + rows) of every row.
        Eigen::Map<const Mat, 0, Stride> at(a + r0, g.k, rows, Stride(g.m));
        if (g.trans_b) c.noalias() += alpha * (at.transpose() * bm.transpose());
        else c.noalias() += alpha * (at.transpose() * bm);
      } else {
        MapA am(a + r0 * g.k, rows, g.k);
        if (g.trans_b) c.noalias() += alpha * (am * bm.transpose());
        else c.noalias() += alpha * (am * bm);
      }
      if (g.bias) c.rowwise() += Eigen::Map<const Vec>(static_cast<const T*>(g.bias), g.n);
    };
    const double flops = static_cast<double>(g.batch) * static_cast<double>(g.m) * static_cast<double>(g.n) *
                         static_cast<double>(g.k);
    if (g.batch > 1) {
      const int threads = gemm_threads(flops, g.batch);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
      for (int64_t i = 0; i < g.batch; ++i) product(i, 0, g.m);
      return;
    }
    // One product: split C's rows into blocks of whole 8-row panels.
    const int threads = gemm_threads(flops, std::max<int64_t>(1, g.m / 32));
    if (threads <= 1) {
      product(0, 0, g.m);
      return;
    }
    const int64_t block = (g.m + threads - 1) / threads;
    const int64_t aligned = (block + 7) / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; ++t) {
      const int64_t r0 = std::min<int64_t>(g.m, t * aligned);
      const int64_t r1 = std::min<int64_t>(g.m, r0 + aligned);
      if (r1 > r0) product(0, r0, r1 - r0);
    }
  });
}

}  // namespace longtape::cpu
