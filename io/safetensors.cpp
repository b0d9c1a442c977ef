#include "io/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "io/regular_file.h"

namespace longtape::io {

static_assert(std::endian::native == std::endian::little,
              "array bytes are stored little-endian and copied as is");

namespace {

using Json = nlohmann::ordered_json;  // keeps the header's key order
constexpr const char* kMetadataKey = "__metadata__";
// The reference implementation refuses headers over 100 MB as well.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Deeper JSON is refused before parsing (a valid header nests 3 levels).
constexpr int kMaxJsonDepth = 64;

// A JSON value for an error message: its type and a short, printable excerpt; never the whole
// value (which may be megabytes).
std::string describe(const Json& value) {
  std::string text;
  try {
    text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  } catch (const std::exception&) {
    text = "?";
  }
  return std::string(value.type_name()) + " " + printable(text);
}

// Refuses a NUL byte anywhere, and [ / { nesting deeper than kMaxJsonDepth outside strings; runs
// before the JSON parser so that no recursive code (parsing, printing, destroying) ever sees a
// deep value.
void check_header_bytes(const char* header, size_t n, const std::string& source) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (size_t i = 0; i < n; ++i) {
    const char c = header[i];
    LT_CHECK(c != '\0', source, ": safetensors header contains a NUL byte at offset ", i, " of ", n,
             "; expected UTF-8 JSON text");
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      ++depth;
      LT_CHECK(depth <= kMaxJsonDepth, source, ": safetensors header: JSON nesting depth ", depth,
               " at offset ", i, " exceeds the limit of ", kMaxJsonDepth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

std::optional<DType> dtype_from_safetensors_name(const std::string& name) {
  if (name == "F32") return DType::f32;
  if (name == "F64") return DType::f64;
  if (name == "BF16") return DType::bf16;
  if (name == "F16") return DType::f16;
  if (name == "I32") return DType::i32;
  if (name == "I64") return DType::i64;
  return std::nullopt;
}

bool is_known_unsupported_dtype(const std::string& name) {
  static const std::set<std::string> known = {"BOOL", "U8", "I8", "U16", "I16", "U32",
                                              "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                                              "F4", "F6_E2M3", "F6_E3M2", "E8M0"};
  return known.count(name) > 0;
}

uint64_t to_u64(const Json& value, const std::string& what, const std::string& source) {
  LT_CHECK(value.is_number_unsigned(), source, ": ", what,
           ": expected a non-negative integer, found ", describe(value));
  return value.get<uint64_t>();
}

// Key of each JSON object seen twice (nlohmann keeps the last silently; safetensors forbids it).
// A SAX pass of its own: nlohmann's parse callback rescans the parent object every time a child
// object closes, quadratic in the number of tensors.
struct DuplicateKeyFinder {
  std::vector<std::set<std::string>> open_objects;
  std::optional<std::string> duplicate;

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(Json::number_integer_t) { return true; }
  bool number_unsigned(Json::number_unsigned_t) { return true; }
  bool number_float(Json::number_float_t, const std::string&) { return true; }
  bool string(std::string&) { return true; }
  bool binary(Json::binary_t&) { return true; }
  bool start_object(std::size_t) {
    open_objects.emplace_back();
    return true;
  }
  bool key(std::string& key) {
    if (!open_objects.empty() && !open_objects.back().insert(key).second && !duplicate) duplicate = key;
    return true;
  }
  bool end_object() {
    if (!open_objects.empty()) open_objects.pop_back();
    return true;
  }
  bool start_array(std::size_t) { return true; }
  bool end_array() { return true; }
  // Syntax errors are reported by the parse that follows, with its message.
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) { return false; }
};

struct TensorEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin;
  uint64_t end;
};

TensorEntry parse_tensor_entry(const std::string& name, const Json& info, const std::string& source) {
  const std::string where = "tensor '" + printable(name) + "'";
  LT_CHECK(info.is_object(), source, ": ", where,
           ": expected an object with dtype, shape and data_offsets, found ", describe(info));
  for (const auto& [key, value] : info.items()) {
    LT_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", source, ": ", where,
             ": unexpected field '", printable(key), "'; expected dtype, shape and data_offsets");
  }
  LT_CHECK(info.contains("dtype") && info.contains("shape") && info.contains("data_offsets"),
           source, ": ", where, ": expected fields dtype, shape and data_offsets, found ", describe(info));

  TensorEntry entry;
  entry.name = name;
  const Json& dtype = info["dtype"];
  LT_CHECK(dtype.is_string(), source, ": ", where, ": expected dtype to be a string, found ",
           describe(dtype));
  const std::string dtype_text = dtype.get<std::string>();
  std::optional<DType> parsed = dtype_from_safetensors_name(dtype_text);
  LT_CHECK(parsed || !is_known_unsupported_dtype(dtype_text), source, ": ", where,
           ": unsupported dtype ", printable(dtype_text), "; supported are F32, F64, BF16, F16, I32, I64");
  LT_CHECK(parsed.has_value(), source, ": ", where, ": unknown dtype '", printable(dtype_text),
           "'; supported are F32, F64, BF16, F16, I32, I64");
  entry.dtype = *parsed;

  const Json& shape = info["shape"];
  LT_CHECK(shape.is_array(), source, ": ", where, ": expected shape to be an array, found ",
           describe(shape));
  for (const Json& dim : shape) {
    uint64_t d = to_u64(dim, where + " shape", source);
    LT_CHECK(d <= static_cast<uint64_t>(INT64_MAX), source, ": ", where, ": dimension ", d,
             " does not fit in int64");
    entry.shape.push_back(static_cast<int64_t>(d));
  }

  const Json& offsets = info["data_offsets"];
  LT_CHECK(offsets.is_array() && offsets.size() == 2, source, ": ", where,
           ": expected data_offsets to be [begin, end], found ", describe(offsets));
  entry.begin = to_u64(offsets[0], where + " data_offsets", source);
  entry.end = to_u64(offsets[1], where + " data_offsets", source);
  LT_CHECK(entry.begin <= entry.end, source, ": ", where, ": data_offsets [", entry.begin, ", ",
           entry.end, "] end before they begin");

  const size_t expected = expected_nbytes(entry.dtype, entry.shape, source + ": " + where + " shape");
  LT_CHECK(entry.end - entry.begin == expected, source, ": ", where, ": data_offsets [",
           entry.begin, ", ", entry.end, "] span ", entry.end - entry.begin, " bytes, expected ",
           expected, " for dtype ", printable(dtype_text), " and shape ", shape_text(entry.shape));
  return entry;
}

}  // namespace

const char* safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
  }
  LT_CHECK(false, "safetensors: unknown dtype ", static_cast<int>(dtype));
  return "";
}

// ---- SafetensorsFile ----

const RawArray* SafetensorsFile::find(const std::string& name) const {
  for (const auto& [n, array] : tensors)
    if (n == name) return &array;
  return nullptr;
}

RawArray* SafetensorsFile::find(const std::string& name) {
  for (auto& [n, array] : tensors)
    if (n == name) return &array;
  return nullptr;
}

const RawArray& SafetensorsFile::at(const std::string& name) const {
  const RawArray* array = find(name);
  if (!array) {
    std::string present;
    for (const auto& [n, a] : tensors) present += (present.empty() ? "'" : ", '") + n + "'";
    LT_CHECK(false, "safetensors: no tensor named '", name, "'; present are ",
             present.empty() ? "none" : present);
  }
  return *array;
}

void SafetensorsFile::add(std::string name, RawArray array) {
  LT_CHECK(!contains(name), "safetensors: duplicate tensor name '", name, "'");
  tensors.emplace_back(std::move(name), std::move(array));
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors.size());
  for (const auto& [n, a] : tensors) out.push_back(n);
  return out;
}

// ---- writing ----

std::vector<uint8_t> serialize_safetensors(const SafetensorsFile& file) {
  Json header = Json::object();
  if (!file.metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : file.metadata) meta[key] = value;
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, array] : file.tensors) {
    LT_CHECK(!name.empty(), "write_safetensors: expected non-empty tensor names, got ''");
    LT_CHECK(name != kMetadataKey, "write_safetensors: the tensor name '", kMetadataKey,
             "' is reserved for the metadata");
    LT_CHECK(seen.insert(name).second, "write_safetensors: duplicate tensor name '", name, "'");
    check_raw_array(array, "write_safetensors: tensor '" + name + "'");
    Json info = Json::object();
    info["dtype"] = safetensors_dtype_name(array.dtype);
    info["shape"] = array.shape;
    info["data_offsets"] = {offset, offset + array.bytes.size()};
    header[name] = std::move(info);
    offset += array.bytes.size();
  }

  std::string text;
  try {
    text = header.dump(-1, ' ', false, Json::error_handler_t::strict);
  } catch (const nlohmann::json::exception& e) {
    LT_CHECK(false, "write_safetensors: tensor names and metadata must be valid UTF-8: ", e.what());
  }
  // Pad with spaces so the data buffer starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');

  std::vector<uint8_t> out(8 + text.size() + offset);
  uint8_t* p = out.data();
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) *p++ = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(p, text.data(), text.size());
  p += text.size();
  for (const auto& [name, array] : file.tensors) {
    if (array.bytes.empty()) continue;
    std::memcpy(p, array.bytes.data(), array.bytes.size());
    p += array.bytes.size();
  }
  return out;
}

void write_safetensors(const std::string& path, const SafetensorsFile& file) {
  std::vector<uint8_t> bytes;
  try {
    bytes = serialize_safetensors(file);
  } catch (const Error& e) {
    throw Error(detail::concat(path, ": ", e.what()));
  }
  write_file_atomic(path, bytes);
}

// ---- reading ----

namespace {

struct SafetensorsLayout {
  std::map<std::string, std::string> metadata;
  std::vector<TensorEntry> entries;  // in data-offset order, tiling the data buffer
  uint64_t data_start = 0;           // file offset of the data buffer
};

// Header length from the first 8 bytes of a file of `file_size` bytes, checked against the file
// and the limit.
uint64_t parse_header_length(const uint8_t* bytes, uint64_t file_size, const std::string& source) {
  LT_CHECK(file_size >= 8, source, ": truncated safetensors file: expected at least 8 bytes for the "
           "header length, found ", file_size);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  LT_CHECK(header_len <= file_size - 8, source, ": safetensors header length ", header_len,
           " exceeds the file: only ", file_size - 8, " bytes follow the length field");
  LT_CHECK(header_len <= kMaxHeaderBytes, source, ": safetensors header length ", header_len,
           " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  return header_len;
}

// Everything but the data: JSON, dtypes, shapes, offsets tiling the data buffer of a file of
// `file_size` bytes. Nothing is allocated in proportion to what the header claims.
SafetensorsLayout parse_header(const char* header_begin, uint64_t header_len, uint64_t file_size,
                               const std::string& source) {
  check_header_bytes(header_begin, header_len, source);
  DuplicateKeyFinder duplicates;
  Json header;
  try {
    Json::sax_parse(header_begin, header_begin + header_len, &duplicates);
    header = Json::parse(header_begin, header_begin + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.101] parse error at line 1, column 7: <reason>"
    // and may quote raw header bytes: keep the reason, escaped and short.
    std::string reason = e.what();
    const size_t colon = reason.find(": ");
    if (reason.rfind("[json.exception", 0) == 0 && colon != std::string::npos) reason = reason.substr(colon + 2);
    LT_CHECK(false, source, ": safetensors header is not valid JSON at byte ", e.byte, " of ", header_len, ": ",
             printable(reason));
  } catch (const nlohmann::json::exception& e) {
    LT_CHECK(false, source, ": safetensors header is not valid JSON (error ", e.id, ")");
  }
  LT_CHECK(!duplicates.duplicate, source, ": safetensors header has duplicate key '",
           printable(*duplicates.duplicate), "'");
  LT_CHECK(header.is_object(), source, ": safetensors header: expected a JSON object, found ",
           header.type_name());

  SafetensorsLayout layout;
  std::vector<TensorEntry>& entries = layout.entries;
  try {
    for (const auto& [key, value] : header.items()) {
      if (key == kMetadataKey) {
        if (value.is_null()) continue;
        LT_CHECK(value.is_object(), source, ": safetensors ", kMetadataKey,
                 ": expected an object of strings, found ", describe(value));
        for (const auto& [meta_key, meta_value] : value.items()) {
          LT_CHECK(meta_value.is_string(), source, ": safetensors ", kMetadataKey, " entry '",
                   printable(meta_key), "': expected a string value, found ", describe(meta_value));
          layout.metadata[meta_key] = meta_value.get<std::string>();
        }
        continue;
      }
      entries.push_back(parse_tensor_entry(key, value, source));
    }
  } catch (const nlohmann::json::exception& e) {
    // Every access above is type-checked first; this is a safety net, not an expected path.
    LT_CHECK(false, source, ": safetensors header: unexpected JSON value (error ", e.id, ")");
  }

  // The tensors must tile the data buffer: sorted by offset, each starts where the previous
  // ended, the first at 0 and the last at the buffer's end (what the reference reader demands).
  std::stable_sort(entries.begin(), entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  layout.data_start = 8 + header_len;
  const uint64_t data_size = file_size - layout.data_start;
  uint64_t expected_begin = 0;
  const TensorEntry* previous = nullptr;
  for (const TensorEntry& entry : entries) {
    LT_CHECK(entry.begin >= expected_begin, source, ": tensor '", printable(entry.name), "' data_offsets [",
             entry.begin, ", ", entry.end, "] overlap tensor '", previous ? printable(previous->name) : "",
             "' which ends at ", expected_begin);
    LT_CHECK(entry.begin == expected_begin, source, ": tensor '", printable(entry.name), "' data_offsets [",
             entry.begin, ", ", entry.end, "] leave a gap: expected it to begin at ",
             expected_begin);
    LT_CHECK(entry.end <= data_size, source, ": tensor '", printable(entry.name), "' data_offsets [",
             entry.begin, ", ", entry.end, "] exceed the data buffer of ", data_size,
             " bytes (file truncated?)");
    expected_begin = entry.end;
    previous = &entry;
  }
  LT_CHECK(expected_begin == data_size, source, ": safetensors data buffer has ", data_size,
           " bytes but the tensors cover only ", expected_begin);
  return layout;
}

}  // namespace

// The tensors of a checked layout, their bytes read by read(offset, count) (offsets from the
// start of the file).
template <typename Read>
static SafetensorsFile assemble(SafetensorsLayout layout, Read&& read) {
  SafetensorsFile file;
  file.metadata = std::move(layout.metadata);
  file.tensors.reserve(layout.entries.size());
  for (const TensorEntry& entry : layout.entries) {
    RawArray array;
    array.dtype = entry.dtype;
    array.shape = entry.shape;
    array.bytes = read(layout.data_start + entry.begin, static_cast<size_t>(entry.end - entry.begin));
    file.tensors.emplace_back(entry.name, std::move(array));
  }
  return file;
}

SafetensorsFile parse_safetensors(const std::vector<uint8_t>& bytes, const std::string& source) {
  const uint64_t header_len = parse_header_length(bytes.data(), bytes.size(), source);
  SafetensorsLayout layout =
      parse_header(reinterpret_cast<const char*>(bytes.data() + 8), header_len, bytes.size(), source);
  return assemble(std::move(layout), [&](uint64_t offset, size_t n) {
    const uint8_t* begin = bytes.data() + offset;
    return std::vector<uint8_t>(begin, begin + n);
  });
}

// Reads the length and the header first; the data is read (and allocated) only once the header
// has been checked against the file's size.
SafetensorsFile read_safetensors(const std::string& path) {
  RegularFile in(path, "safetensors file");
  const uint64_t size = in.size();
  uint8_t head[8] = {};
  in.read_at(0, head, static_cast<size_t>(std::min<uint64_t>(size, 8)));
  const uint64_t header_len = parse_header_length(head, size, path);
  const std::vector<uint8_t> header = in.read_at(8, static_cast<size_t>(header_len));
  SafetensorsLayout layout =
      parse_header(reinterpret_cast<const char*>(header.data()), header_len, size, path);
  return assemble(std::move(layout),
                  [&](uint64_t offset, size_t n) { return in.read_at(offset, n); });
}

}  // namespace longtape::io
