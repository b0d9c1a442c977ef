// Cross-entropy fused with log-softmax, one block per row (rows in chunks of the grid): the
// forward writes the row's loss, counted flag and log-sum-exp (f32; f64 for f64 logits), the
// backward recomputes softmax - onehot from the logits and that log-sum-exp, scaled by a value in
// device memory. Row sums use the fixed block-reduction tree (bitwise reproducible); no sort, no
// atomics, no host reads. Targets outside [0, classes) count as ignored here (the op checks them).
#include "tensor/cuda/block_reduce.cuh"
#include "tensor/cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

__device__ __forceinline__ bool counted(int64_t target, int64_t classes, int64_t ignore_index) {
  return target != ignore_index && target >= 0 && target < classes;
}

template <typename T>
__global__ void cross_entropy_kernel(AccT<T>* loss, AccT<T>* count, AccT<T>* lse, const T* logits,
                                     const int64_t* targets, int64_t rows, int64_t classes, int64_t ignore_index) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = logits + r * classes;
    const RowMaxSumExp<A> row = row_max_sum_exp(xr, classes, shared);
    if (threadIdx.x == 0) {
      const A row_lse = row.max + m_log(row.sum_exp);
      const int64_t t = targets[r];
      const bool use = counted(t, classes, ignore_index);
      lse[r] = row_lse;
      loss[r] = use ? row_lse - static_cast<A>(E::load(xr, t)) : A(0);
      count[r] = use ? A(1) : A(0);
    }
  }
}

template <typename T>
__global__ void cross_entropy_backward_kernel(T* dlogits, const T* logits, const AccT<T>* lse,
                                              const int64_t* targets, const AccT<T>* scale, int64_t rows,
                                              int64_t classes, int64_t ignore_index) {
  using A = AccT<T>;
  using E = Elem<T>;
  const A s = *scale;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t t = targets[r];
    const bool use = counted(t, classes, ignore_index);
    const A row_lse = lse[r];
    const T* xr = logits + r * classes;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      A d = 0;
      if (use) d = (m_exp(static_cast<A>(E::load(xr, c)) - row_lse) - (c == t ? A(1) : A(0))) * s;
      E::store(dlogits, r * classes + c, d);
    }
  }
}

}  // namespace

void cross_entropy(void* loss_rows, void* counted_rows, void* lse_rows, const void* logits, const int64_t* targets,
                   DType dtype, int64_t rows, int64_t classes, int64_t ignore_index) {
  if (rows == 0) return;
  DeviceGuard guard(device_of(loss_rows));
  dispatch_floating(dtype, "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = AccT<T>;
    cross_entropy_kernel<T><<<row_grid(rows), row_block_size(classes), 0, stream()>>>(
        static_cast<A*>(loss_rows), static_cast<A*>(counted_rows), static_cast<A*>(lse_rows),
        static_cast<const T*>(logits), targets, rows, classes, ignore_index);
  });
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(void* dlogits, const void* logits, const void* lse_rows, const int64_t* targets,
                            const void* scale, DType dtype, int64_t rows, int64_t classes, int64_t ignore_index) {
  if (rows == 0) return;
  DeviceGuard guard(device_of(dlogits));
  dispatch_floating(dtype, "cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = AccT<T>;
    cross_entropy_backward_kernel<T><<<row_grid(rows), row_block_size(classes), 0, stream()>>>(
        static_cast<T*>(dlogits), static_cast<const T*>(logits), static_cast<const A*>(lse_rows), targets,
        static_cast<const A*>(scale), rows, classes, ignore_index);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtape::cuda
