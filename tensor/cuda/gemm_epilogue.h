#pragma once
// The GEMM epilogues as separate passes (tensor/cuda/gemm_epilogue.cu), for the products whose epilogue
// cuBLASLt does not offer (tensor/cuda/gemm_cuda.cpp). Launched on the current stream of the current device.
#include <cstdint>

#include "tensor/dtype.h"

namespace longtape::cuda {

// c[b][i][j] += bias[j] for b < batch, i < m, j < n; c is `dtype` with batch stride stride_c, bias
// is f64 for f64 c, else f32.
void add_bias_rows(void* c, DType dtype, const void* bias, int64_t batch, int64_t m, int64_t n, int64_t stride_c);

// sums[i] = sum over r < k of op(A)[i][r], A stored (m, k) row-major, or (k, m) when trans_a; sums
// are f64 for f64 A, else f32; summed in a fixed order (bitwise reproducible).
void sum_operand_rows(void* sums, const void* a, DType dtype, bool trans_a, int64_t m, int64_t k);

}  // namespace longtape::cuda
