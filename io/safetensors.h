#pragma once
// safetensors files (https://github.com/huggingface/safetensors), readable by the Python package:
//   u64 little-endian N | N bytes of UTF-8 JSON header, space-padded to a multiple of 8 | data
// Header: {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
// "data_offsets": [begin, end]}, ...} with offsets relative to the data buffer start; the tensors
// tile the data buffer exactly. Supported dtypes: F32 F64 BF16 F16 I32 I64.
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "io/array_file.h"

namespace longtape::io {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  // In file order: write order when writing; data-offset order when read.
  std::vector<std::pair<std::string, RawArray>> tensors;

  const RawArray* find(const std::string& name) const;  // nullptr when absent
  RawArray* find(const std::string& name);
  const RawArray& at(const std::string& name) const;    // throws, listing the names present
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  void add(std::string name, RawArray array);           // appends; throws on a duplicate name
  std::vector<std::string> names() const;
};

// Data is laid out contiguously in the order of `file.tensors`; the file is replaced atomically.
// Throws on duplicate / empty / "__metadata__" names, byte sizes that do not match dtype*shape,
// and strings that are not valid UTF-8.
void write_safetensors(const std::string& path, const SafetensorsFile& file);
std::vector<uint8_t> serialize_safetensors(const SafetensorsFile& file);

// Validates everything (header length, JSON, dtypes, shapes, offsets in range and tiling the
// buffer, duplicate names) and throws longtape::Error naming the file and the problem.
SafetensorsFile read_safetensors(const std::string& path);
SafetensorsFile parse_safetensors(const std::vector<uint8_t>& bytes,
                                  const std::string& source = "<safetensors bytes>");

// "F32" etc. for the supported dtypes.
const char* safetensors_dtype_name(DType dtype);

}  // namespace longtape::io
