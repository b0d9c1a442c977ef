#pragma once
// Mixed precision decided in one place. A Precision names how the matrix products and the
// attention core of a forward/backward pass compute; an AutocastScope puts one in force on this
// thread, and the ops that consult it (matmul, and through MultiheadAttention the attention core)
// read it when they record their node, so their backward repeats the same choice:
//   f32  : f32 everywhere (the default).
//   tf32 : f32 tensors; CUDA f32 products run on TF32 tensor cores (f32 accumulation).
//   bf16 : f32 master weights and f32 activations; matmul and attention operands are rounded to
//          bf16 (a cast whose backward returns the f32 gradient), products accumulate in f32 and
//          write f32. Layer norm, softmax statistics and the loss stay f32. On CUDA the operands
//          are bf16 tensors (cuBLAS bf16 GEMM with f32 compute, the fused bf16 attention kernels);
//          the CPU has no bf16 arithmetic, so it rounds the operands to bf16 values and computes
//          in f32 (same roundings, f32 math; precision_compute_label says so).
// f64 tensors are never lowered: the policy only touches f32 operands.
#include <cstdint>
#include <string>

#include "tensor/device.h"
#include "tensor/tensor.h"

namespace longtape {

enum class Precision : uint8_t { f32, tf32, bf16 };

Precision parse_precision(const std::string& text);  // "f32" | "tf32" | "bf16"; throws naming them
const char* precision_name(Precision precision);
// The training default of `device`: bf16 on CUDA, f32 on the CPU (which has no bf16 arithmetic).
Precision default_precision(Device device);
// parse_precision, with "auto" meaning default_precision(device).
Precision precision_for(const std::string& text, Device device);

// What the products of `precision` compute in on `device`, as reports state it.
std::string precision_compute_label(Precision precision, Device device);

// The precision in force on this thread: the innermost AutocastScope's, else f32.
Precision autocast_precision();

// Puts `precision` in force on this thread until the scope ends (scopes nest).
class AutocastScope {
 public:
  explicit AutocastScope(Precision precision);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  Precision previous_;
};

// True when `precision` lowers an operand of dtype `dtype` to bf16 (only f32 is lowered).
inline bool lowers_to_bf16(Precision precision, DType dtype) {
  return precision == Precision::bf16 && dtype == DType::f32;
}

// The operand `x` (f32) as a product under bf16 reads it: a bf16 tensor on CUDA, bf16-rounded f32
// values on the CPU. Differentiable: the gradient comes back in x's dtype (f32).
Tensor bf16_operand(const Tensor& x);

// The result of a bf16 computation (`y`, bf16 on CUDA, f32 on the CPU) as an f32 activation.
Tensor f32_activation(const Tensor& y);

}  // namespace longtape
