// The GEMM epilogues as separate passes: a bias added to every row and the row sums of op(A).
#include "tensor/cuda/common.cuh"
#include "tensor/cuda/gemm_epilogue.h"

namespace longtape::cuda {

using namespace impl;

namespace {

template <typename T, typename V>
__global__ void add_bias_rows_kernel(T* c, const V* bias, int64_t batch, int64_t m, int64_t n, int64_t stride_c) {
  const int64_t total = batch * m * n;
  for (int64_t i = global_tid(); i < total; i += grid_stride()) {
    const int64_t j = i % n, row = i / n, b = row / m;
    const int64_t at = b * stride_c + (row - b * m) * n + j;
    Elem<T>::store(c, at, Elem<T>::load(c, at) + static_cast<typename Elem<T>::C>(bias[j]));
  }
}

// One thread per output i; A (k, m) when trans_a (neighbouring threads read neighbouring columns),
// else (m, k).
template <typename T, typename V>
__global__ void sum_operand_rows_kernel(V* sums, const T* a, bool trans_a, int64_t m, int64_t k) {
  for (int64_t i = global_tid(); i < m; i += grid_stride()) {
    V s = 0;
    for (int64_t r = 0; r < k; ++r) s += static_cast<V>(Elem<T>::load(a, trans_a ? r * m + i : i * k + r));
    sums[i] = s;
  }
}

}  // namespace

void add_bias_rows(void* c, DType dtype, const void* bias, int64_t batch, int64_t m, int64_t n, int64_t stride_c) {
  if (batch * m * n == 0) return;
  dispatch_floating(dtype, "matmul bias", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using V = std::conditional_t<std::is_same_v<T, double>, double, float>;
    add_bias_rows_kernel<T, V><<<grid_for(batch * m * n), kThreads, 0, stream()>>>(
        static_cast<T*>(c), static_cast<const V*>(bias), batch, m, n, stride_c);
  });
  CUDA_CHECK_LAUNCH();
}

void sum_operand_rows(void* sums, const void* a, DType dtype, bool trans_a, int64_t m, int64_t k) {
  if (m == 0) return;
  dispatch_floating(dtype, "matmul row sums", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using V = std::conditional_t<std::is_same_v<T, double>, double, float>;
    sum_operand_rows_kernel<T, V><<<grid_for(m), kThreads, 0, stream()>>>(static_cast<V*>(sums),
                                                                           static_cast<const T*>(a), trans_a, m, k);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
