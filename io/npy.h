#pragma once
// NumPy .npy files (format versions 1.0, 2.0 and 3.0). Supported element types: little-endian
// float32, float64, int32, int64 ('<f4' '<f8' '<i4' '<i8'), C order only. Any other input
// (big-endian, Fortran order, other dtypes, malformed or truncated files) is rejected with a
// longtape::Error that names the file and says what was expected and what was found.
#include <cstdint>
#include <string>
#include <vector>

#include "io/array_file.h"

namespace longtape::io {

RawArray read_npy(const std::string& path);
// `source` names the bytes' origin in error messages.
RawArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& source = "<npy bytes>");

// Writes version 1.0 (2.0 when the header would exceed 64 KiB), header padded with spaces and a
// final '\n' so the data starts at a multiple of 64 bytes, as numpy does. The file is replaced
// atomically. bfloat16 has no numpy dtype and is rejected.
void write_npy(const std::string& path, const RawArray& array);
std::vector<uint8_t> serialize_npy(const RawArray& array);

}  // namespace longtape::io
