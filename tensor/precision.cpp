#include "tensor/precision.h"

#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape {

namespace {
thread_local Precision t_precision = Precision::f32;
}  // namespace

Precision parse_precision(const std::string& text) {
  if (text == "f32") return Precision::f32;
  if (text == "tf32") return Precision::tf32;
  if (text == "bf16") return Precision::bf16;
  throw Error(detail::concat("precision: expected auto, f32, tf32 or bf16, got '", text, "'"));
}

const char* precision_name(Precision precision) {
  switch (precision) {
    case Precision::f32: return "f32";
    case Precision::tf32: return "tf32";
    case Precision::bf16: return "bf16";
  }
  return "?";
}

Precision default_precision(Device device) { return device.is_cuda() ? Precision::bf16 : Precision::f32; }

Precision precision_for(const std::string& text, Device device) {
  return text == "auto" ? default_precision(device) : parse_precision(text);
}

std::string precision_compute_label(Precision precision, Device device) {
  switch (precision) {
    case Precision::f32: return "f32";
    case Precision::tf32: return device.is_cuda() ? "tf32 products, f32 accumulation" : "f32 (tf32 is CUDA-only)";
    case Precision::bf16:
      return device.is_cuda() ? "bf16 operands, f32 accumulation" : "bf16-rounded operands, f32 math (CPU)";
  }
  return "?";
}

Precision autocast_precision() { return t_precision; }

AutocastScope::AutocastScope(Precision precision) : previous_(t_precision) { t_precision = precision; }

AutocastScope::~AutocastScope() { t_precision = previous_; }

Tensor bf16_operand(const Tensor& x) {
  LT_CHECK(x.defined() && x.dtype() == DType::f32, "bf16_operand: expected an f32 tensor, got ",
           x.defined() ? dtype_name(x.dtype()) : "undefined");
  Tensor low = cast(x, DType::bf16);
  return x.device().is_cuda() ? low : cast(low, DType::f32);
}

Tensor f32_activation(const Tensor& y) { return cast(y, DType::f32); }

}  // namespace longtape
