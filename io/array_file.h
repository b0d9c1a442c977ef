#pragma once
// Types shared by the file formats (npy, safetensors): a dense, row-major, little-endian array
// held as raw bytes, independent of Tensor so the formats can be read and written on their own.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/tensor.h"

namespace longtape::io {

struct RawArray {
  DType dtype = DType::f32;
  Shape shape;                 // empty shape = 0-d scalar (one element)
  std::vector<uint8_t> bytes;  // C order, little-endian, numel * dtype_size(dtype) bytes
};

// "(2, 3)" / "()" for error messages (header-only so the formats do not depend on the tensor library).
inline std::string shape_text(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

// Element count of a shape; throws when a dimension is negative or the product (in elements or
// in bytes of `item_size`) does not fit in 64 bits. `context` names the file or array in errors.
inline int64_t checked_numel(const Shape& shape, size_t item_size, const std::string& context) {
  int64_t numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    LT_CHECK(shape[i] >= 0, context, ": expected non-negative dimensions, got ", shape[i],
             " at axis ", i);
  }
  for (int64_t d : shape) {
    // Any zero dimension makes the product zero, even when the other dimensions are huge.
    if (d == 0) return 0;
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    LT_CHECK(!__builtin_mul_overflow(numel, shape[i], &numel), context,
             ": shape product overflows 64 bits at axis ", i);
  }
  int64_t nbytes = 0;
  LT_CHECK(!__builtin_mul_overflow(numel, static_cast<int64_t>(item_size), &nbytes), context,
           ": byte size of ", numel, " elements overflows 64 bits");
  return numel;
}

// Byte size an array of this dtype and shape must have.
inline size_t expected_nbytes(DType dtype, const Shape& shape, const std::string& context) {
  return static_cast<size_t>(checked_numel(shape, dtype_size(dtype), context)) * dtype_size(dtype);
}

// Throws unless raw.bytes holds exactly numel * dtype_size bytes.
inline void check_raw_array(const RawArray& raw, const std::string& context) {
  size_t expected = expected_nbytes(raw.dtype, raw.shape, context);
  LT_CHECK(raw.bytes.size() == expected, context, ": expected ", expected, " bytes for dtype ",
           dtype_name(raw.dtype), " and shape ", shape_text(raw.shape), ", got ", raw.bytes.size(),
           " bytes");
}

}  // namespace longtape::io
