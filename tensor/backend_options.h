#pragma once
// Process-wide switches of the compute backends.

namespace longtape {

// Lets f32 matrix products on CUDA use TF32 tensor cores (10-bit mantissa inputs, f32
// accumulation): much faster, relative error near 1e-3 instead of 1e-6. Off by default, so f32
// means f32. No effect on the CPU backend or on bf16/f64 products.
void set_allow_tf32(bool allow);
bool allow_tf32();

}  // namespace longtape
