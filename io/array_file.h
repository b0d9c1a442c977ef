#pragma once
// Types shared by the file formats (npy, safetensors): a dense, row-major, little-endian array
// held as raw bytes, independent of Tensor so the formats can be read and written on their own.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tensor/checked_math.h"
#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/tensor.h"

namespace longtape::io {

struct RawArray {
  DType dtype = DType::f32;
  Shape shape;                 // empty shape = 0-d scalar (one element)
  std::vector<uint8_t> bytes;  // C order, little-endian, numel * dtype_size(dtype) bytes
};

// "(2, 3)" / "()" for error messages (header-only so the formats do not depend on the tensor
// library). Shapes from hostile files can have millions of entries: the text stops near 200
// characters with "... N more".
inline std::string shape_text(const Shape& shape) { return checked::detail::short_shape(shape); }

// `s` made safe for an error message: valid UTF-8 of printable characters is kept, control
// characters, DEL and bytes that are not valid UTF-8 become \xNN, and the result stops after
// about `max_chars` characters with "..." (values from hostile files can be megabytes long).
inline std::string printable(std::string_view s, size_t max_chars = 200) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  size_t chars = 0;
  size_t i = 0;
  while (i < s.size()) {
    if (chars >= max_chars) {
      out += "...";
      break;
    }
    const auto u = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0;
    if (u >= 0x20 && u < 0x7f) {
      len = 1;
    } else if (u >= 0xc2 && u <= 0xdf) {
      len = 2;
      cp = u & 0x1f;
    } else if (u >= 0xe0 && u <= 0xef) {
      len = 3;
      cp = u & 0x0f;
    } else if (u >= 0xf0 && u <= 0xf4) {
      len = 4;
      cp = u & 0x07;
    }
    bool valid = len > 0 && i + len <= s.size();
    for (size_t k = 1; valid && k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      valid = (c & 0xc0) == 0x80;
      cp = (cp << 6) | (c & 0x3f);
    }
    // Overlong forms, surrogates, code points past U+10FFFF and C1 controls are escaped.
    if (valid && len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) valid = false;
    if (valid && len == 4 && (cp < 0x10000 || cp > 0x10ffff)) valid = false;
    if (valid && len == 2 && cp < 0xa0) valid = false;
    if (valid) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\\x";
      out += hex[u >> 4];
      out += hex[u & 15];
      ++i;
    }
    ++chars;
  }
  return out;
}

// Element count of a shape; throws when a dimension is negative or the product of the non-zero
// dimensions (in elements or in bytes of `item_size`) does not fit in 64 bits -- also when
// another dimension is 0: (0, 2^62, 2^62, 4) is refused. `context` names the file or array.
inline int64_t checked_numel(const Shape& shape, size_t item_size, const std::string& context) {
  return checked::numel_for_bytes(shape, item_size, context);
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
