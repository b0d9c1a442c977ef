#pragma once
// Process-wide switches of the compute backends.

namespace longtape {

// Lets f32 matrix products on CUDA use TF32 tensor cores (10-bit mantissa inputs, f32
// accumulation): much faster, relative error near 1e-3 instead of 1e-6. Off by default, so f32
// means f32. No effect on the CPU backend or on bf16/f64 products.
void set_allow_tf32(bool allow);
bool allow_tf32();

// Kernels that could sum in a run-dependent order use a fixed order (on by default). Off lets the
// fused CUDA attention backward gather dQ with f32 atomics inside its dK/dV kernel instead of a
// dQ kernel of its own: fewer FLOPs, one f32 dQ buffer more, results equal across runs only to
// float rounding. Measured on an H200 it is not faster yet (benchmarks/lab/NOTES.md).
void set_deterministic_algorithms(bool on);
bool deterministic_algorithms();

}  // namespace longtape
