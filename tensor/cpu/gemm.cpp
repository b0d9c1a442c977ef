#include <Eigen/Core>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"

namespace longtape::cpu {

void gemm(const GemmArgs& g) {
  dispatch_float(g.dtype, "matmul", [&]<typename T>() {
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using MapC = Eigen::Map<Mat>;
    using MapA = Eigen::Map<const Mat>;
    const int64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
    const int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
    for (int64_t i = 0; i < g.batch; ++i) {
      MapC c(static_cast<T*>(g.c) + i * g.stride_c, g.m, g.n);
      MapA a(static_cast<const T*>(g.a) + i * g.stride_a, a_rows, a_cols);
      MapA b(static_cast<const T*>(g.b) + i * g.stride_b, b_rows, b_cols);
      const T alpha = static_cast<T>(g.alpha);
      if (g.beta == 0) c.setZero();
      else if (g.beta != 1) c *= static_cast<T>(g.beta);
      if (g.trans_a && g.trans_b) c.noalias() += alpha * (a.transpose() * b.transpose());
      else if (g.trans_a) c.noalias() += alpha * (a.transpose() * b);
      else if (g.trans_b) c.noalias() += alpha * (a * b.transpose());
      else c.noalias() += alpha * (a * b);
    }
  });
}

}  // namespace longtape::cpu
