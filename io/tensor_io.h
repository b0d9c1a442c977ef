#pragma once
// Tensor <-> RawArray adapters and .npy shortcuts. Arrays are dense, C order, little-endian;
// tensors read from files live on the CPU with the file's dtype.
#include <string>

#include "io/array_file.h"
#include "tensor/tensor.h"

namespace longtape::io {

// A contiguous CPU tensor holding a copy of the array (same dtype and shape).
Tensor tensor_from_raw(const RawArray& raw);
// The tensor's values (from any device and layout) as a C-order array of the same dtype.
RawArray raw_from_tensor(const Tensor& t);

Tensor load_npy(const std::string& path);
// bf16 has no .npy dtype: cast to f32 first (the error says so).
void save_npy(const std::string& path, const Tensor& t);

}  // namespace longtape::io
