// Cross-entropy rows fused with log-softmax: the forward keeps one log-sum-exp per row, the
// backward recomputes the softmax from it (no (rows, classes) log-probabilities are stored).
#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"
#include "tensor/cpu/vector_math.h"

namespace longtape::cpu {

namespace {
bool counted(int64_t target, int64_t classes, int64_t ignore_index) {
  return target != ignore_index && target >= 0 && target < classes;
}
}  // namespace

void cross_entropy(void* loss_rows, void* counted_rows, void* lse_rows, const void* logits, const int64_t* targets,
                   DType dtype, int64_t rows, int64_t classes, int64_t ignore_index) {
  dispatch_float(dtype, "cross_entropy", [&]<typename T>() {
    const T* x = static_cast<const T*>(logits);
    T* loss = static_cast<T*>(loss_rows);
    T* count = static_cast<T*>(counted_rows);
    T* lse = static_cast<T*>(lse_rows);
#pragma omp parallel for if (rows * classes > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * classes;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < classes; ++c) m = std::max(m, xr[c]);
      if (m == -std::numeric_limits<T>::infinity()) m = 0;  // all -inf row: avoid inf - inf
      double s = 0;
      for (int64_t c = 0; c < classes; ++c) s += exp_of(xr[c] - m);
      lse[r] = m + static_cast<T>(std::log(s));
      const int64_t t = targets[r];
      const bool use = counted(t, classes, ignore_index);
      loss[r] = use ? lse[r] - xr[t] : T(0);
      count[r] = use ? T(1) : T(0);
    }
  });
}

void cross_entropy_backward(void* dlogits, const void* logits, const void* lse_rows, const int64_t* targets,
                            const void* scale, DType dtype, int64_t rows, int64_t classes, int64_t ignore_index) {
  dispatch_float(dtype, "cross_entropy_backward", [&]<typename T>() {
    const T* x = static_cast<const T*>(logits);
    const T* lse = static_cast<const T*>(lse_rows);
    const T s = *static_cast<const T*>(scale);
    T* d = static_cast<T*>(dlogits);
#pragma omp parallel for if (rows * classes > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      T* dr = d + r * classes;
      const int64_t t = targets[r];
      if (!counted(t, classes, ignore_index)) {
        std::fill(dr, dr + classes, T(0));
        continue;
      }
      const T* xr = x + r * classes;
      for (int64_t c = 0; c < classes; ++c) dr[c] = exp_of(xr[c] - lse[r]) * s;
      dr[t] -= s;
    }
  });
}

}  // namespace longtape::cpu
