#pragma once
// One 2-D product with the GEMM epilogues of tensor/kernels.h (a bias, a starting value, A's row
// sums), not recorded: the building block of the fused ops' own forward and backward passes
// (tensor/ops/linear.cpp, tensor/ops/gelu_mlp.cpp). Defined in tensor/ops/matmul.cpp.
#include "tensor/tensor.h"

namespace longtape::detail {

struct ProductEpilogue {
  bool f32_out = false;  // bf16 operands write an f32 result (CUDA)
  Tensor bias;           // (N,): added to every row; f32 (f64 for f64 operands)
  Tensor c_in;           // (M, N) in the result's dtype: the result starts from it (beta = 1)
  Tensor into;           // (M, N) contiguous in the result's dtype: written instead of a new tensor
  bool accumulate = false;  // with `into`: the product is added to what it holds
  Tensor a_sums;         // (M,) contiguous, f32 (f64 for f64 operands): written with op(A)'s row sums
};

// op(a) @ op(b) (+ epilogue) for contiguous 2-D a, b of one dtype on one device; op transposes when
// the flag is set. Returns the result (`into` when given).
Tensor gemm_product(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const ProductEpilogue& epilogue = {});

// `t` (f32, f64 or bf16) as a product of this precision reads it, contiguous: with `low` (bf16
// products) a bf16 tensor on CUDA and bf16-rounded f32 on the CPU (which has no bf16 arithmetic);
// otherwise itself.
Tensor product_operand(const Tensor& t, bool low);

}  // namespace longtape::detail
