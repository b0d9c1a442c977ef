#include "io/npy.h"

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <optional>
#include <set>
#include <string_view>

#include "io/atomic_file.h"
#include "io/regular_file.h"

namespace longtape::io {

static_assert(std::endian::native == std::endian::little,
              "array bytes are stored little-endian and copied as is");

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kAlign = 64;  // numpy aligns the data start to 64 bytes
// numpy writes headers of a few hundred bytes; anything near this is hostile.
constexpr size_t kMaxHeaderBytes = 100'000'000;

// ---- a Python literal subset: the header is the repr() of a dict ----

struct PyEntry;

struct PyValue {
  enum class Kind { string, integer, boolean, none, sequence, dict } kind = Kind::none;
  std::string text;  // string
  int64_t integer = 0;
  bool boolean = false;
  bool is_tuple = false;                                // sequence: tuple or list
  std::vector<PyValue> items;                           // sequence
  // A vector of an incomplete type is allowed, a pair of one is not (std::pair needs it complete).
  std::vector<PyEntry> entries;                         // dict
};

struct PyEntry {
  PyValue key, value;
};

const char* kind_name(const PyValue& v) {
  switch (v.kind) {
    case PyValue::Kind::string: return "a string";
    case PyValue::Kind::integer: return "an integer";
    case PyValue::Kind::boolean: return "a boolean";
    case PyValue::Kind::none: return "None";
    case PyValue::Kind::sequence: return v.is_tuple ? "a tuple" : "a list";
    case PyValue::Kind::dict: return "a dict";
  }
  return "?";
}

class LiteralParser {
 public:
  LiteralParser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  PyValue parse_document() {
    PyValue value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the header dict");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 16;

  [[noreturn]] void fail(const std::string& what) {
    throw Error(detail::concat(source_, ": npy header: ", what, " at offset ", pos_, " of header '",
                               io::printable(text_), "'"));
  }

  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }

  bool at_end() const { return pos_ >= text_.size(); }

  PyValue parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 16 levels");
    skip_space();
    if (at_end()) fail("unexpected end of header");
    char c = text_[pos_];
    if (c == '\'' || c == '"') return parse_string();
    if (c == '{') return parse_dict(depth);
    if (c == '(' || c == '[') return parse_sequence(depth);
    if (c == '-' || c == '+' || (c >= '0' && c <= '9')) return parse_integer();
    if (consume_word("True")) return make_bool(true);
    if (consume_word("False")) return make_bool(false);
    if (consume_word("None")) return PyValue{};
    fail(detail::concat("unexpected character '", io::printable(text_.substr(pos_, 1)), "'"));
  }

  static PyValue make_bool(bool b) {
    PyValue v;
    v.kind = PyValue::Kind::boolean;
    v.boolean = b;
    return v;
  }

  bool consume_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    size_t end = pos_ + word.size();
    if (end < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[end])) || text_[end] == '_'))
      return false;
    pos_ = end;
    return true;
  }

  PyValue parse_string() {
    char quote = text_[pos_++];
    PyValue v;
    v.kind = PyValue::Kind::string;
    while (true) {
      if (at_end()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == quote) break;
      if (c == '\\') {
        if (at_end()) fail("unterminated string");
        v.text += text_[pos_++];  // the dtype strings we accept need no escape decoding
      } else {
        v.text += c;
      }
    }
    return v;
  }

  PyValue parse_integer() {
    bool negative = false;
    if (text_[pos_] == '-' || text_[pos_] == '+') negative = text_[pos_++] == '-';
    skip_space();
    if (at_end() || text_[pos_] < '0' || text_[pos_] > '9') fail("expected digits");
    int64_t value = 0;
    while (!at_end() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      int digit = text_[pos_] - '0';
      if (__builtin_mul_overflow(value, int64_t{10}, &value) ||
          __builtin_add_overflow(value, int64_t{digit}, &value))
        fail("integer does not fit in 64 bits");
      ++pos_;
    }
    if (!at_end() && (text_[pos_] == 'L' || text_[pos_] == 'l')) ++pos_;  // Python 2 long suffix
    PyValue v;
    v.kind = PyValue::Kind::integer;
    v.integer = negative ? -value : value;
    return v;
  }

  // (a, b), (a,), (), [a, b], [] — trailing commas allowed; "(3)" is just 3, as in Python.
  PyValue parse_sequence(int depth) {
    char open = text_[pos_++];
    char close = open == '(' ? ')' : ']';
    PyValue v;
    v.kind = PyValue::Kind::sequence;
    v.is_tuple = open == '(';
    bool trailing_comma = false;
    while (true) {
      skip_space();
      if (at_end()) fail(detail::concat("expected '", close, "'"));
      if (text_[pos_] == close) {
        ++pos_;
        break;
      }
      v.items.push_back(parse_value(depth + 1));
      trailing_comma = false;
      skip_space();
      if (at_end()) fail(detail::concat("expected ',' or '", close, "'"));
      if (text_[pos_] == ',') {
        ++pos_;
        trailing_comma = true;
      } else if (text_[pos_] != close) {
        fail(detail::concat("expected ',' or '", close, "'"));
      }
    }
    if (v.is_tuple && v.items.size() == 1 && !trailing_comma) return std::move(v.items[0]);
    return v;
  }

  PyValue parse_dict(int depth) {
    ++pos_;
    PyValue v;
    v.kind = PyValue::Kind::dict;
    while (true) {
      skip_space();
      if (at_end()) fail("expected '}'");
      if (text_[pos_] == '}') {
        ++pos_;
        break;
      }
      PyValue key = parse_value(depth + 1);
      skip_space();
      if (at_end() || text_[pos_] != ':') fail("expected ':' after a dict key");
      ++pos_;
      PyValue value = parse_value(depth + 1);
      v.entries.push_back(PyEntry{std::move(key), std::move(value)});
      skip_space();
      if (at_end()) fail("expected ',' or '}'");
      if (text_[pos_] == ',') {
        ++pos_;
      } else if (text_[pos_] != '}') {
        fail("expected ',' or '}'");
      }
    }
    return v;
  }

  std::string_view text_;
  const std::string& source_;
  size_t pos_ = 0;
};

// descr string -> dtype; rejects big-endian and everything but f2 f4 f8 i4 i8.
DType dtype_from_descr(const std::string& descr, const std::string& source) {
  LT_CHECK(!descr.empty(), source, ": npy header: expected a dtype descr like '<f4', got ''");
  char order = descr[0];
  std::string code = descr;
  if (order == '<' || order == '>' || order == '|' || order == '=') code = descr.substr(1);
  bool big_endian = order == '>';
  std::optional<DType> dtype;
  if (code == "f2") dtype = DType::f16;
  if (code == "f4") dtype = DType::f32;
  if (code == "f8") dtype = DType::f64;
  if (code == "i4") dtype = DType::i32;
  if (code == "i8") dtype = DType::i64;
  const std::string shown = printable(descr), shown_code = printable(code);
  LT_CHECK(!(big_endian && dtype), source, ": big-endian data ('", shown,
           "') is not supported; expected little-endian ('<", shown_code, "'), e.g. save with arr.astype('<",
           shown_code, "')");
  LT_CHECK(dtype.has_value(), source, ": unsupported npy dtype '", shown,
           "'; supported are '<f2' (float16), '<f4' (float32), '<f8' (float64), '<i4' (int32), '<i8' (int64)");
  LT_CHECK(order != '|', source, ": npy dtype '", shown, "' has no byte order; expected '<", shown_code,
           "'");
  return *dtype;
}

uint32_t read_le(const uint8_t* p, size_t n) {
  uint32_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

const char* descr_of(DType dtype) {
  switch (dtype) {
    case DType::f16: return "<f2";
    case DType::f32: return "<f4";
    case DType::f64: return "<f8";
    case DType::i32: return "<i4";
    case DType::i64: return "<i8";
    case DType::bf16: break;
  }
  return nullptr;
}

}  // namespace

namespace {

// Where the header lies, from the first min(file_size, 12) bytes of a file of `file_size` bytes.
struct NpyPrefix {
  size_t prefix = 0;      // magic, version and header length field
  size_t header_len = 0;  // header bytes after the prefix
};

NpyPrefix parse_npy_prefix(const uint8_t* bytes, uint64_t file_size, const std::string& source) {
  const uint64_t size = file_size;
  LT_CHECK(size >= kMagicLen + 2 && std::memcmp(bytes, kMagic, kMagicLen) == 0, source,
           ": not an npy file: expected the magic bytes \\x93NUMPY followed by a version, found ",
           size < kMagicLen + 2 ? "a file of only " + std::to_string(size) + " bytes"
                                : std::string("other bytes"));
  const int major = bytes[6];
  const int minor = bytes[7];
  LT_CHECK((major == 1 || major == 2 || major == 3) && minor == 0, source,
           ": unsupported npy format version ", major, ".", minor,
           "; supported are 1.0, 2.0 and 3.0");
  NpyPrefix out;
  const size_t length_bytes = major == 1 ? 2 : 4;
  out.prefix = kMagicLen + 2 + length_bytes;
  LT_CHECK(size >= out.prefix, source, ": truncated npy file: expected at least ", out.prefix,
           " bytes for the header length, found ", size);
  out.header_len = read_le(bytes + kMagicLen + 2, length_bytes);
  LT_CHECK(out.header_len <= size - out.prefix, source, ": npy header length ", out.header_len,
           " exceeds the file: only ", size - out.prefix, " bytes follow the header length field");
  LT_CHECK(out.header_len <= kMaxHeaderBytes, source, ": npy header length ", out.header_len,
           " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  return out;
}

// The array described by the header (dtype, shape; no bytes yet) and where its data starts,
// checked against the file size before any data is read or allocated.
struct NpyLayout {
  RawArray array;  // bytes empty
  size_t data_start = 0;
  size_t nbytes = 0;
};

NpyLayout parse_npy_header(std::string_view header, const NpyPrefix& where, uint64_t file_size,
                           const std::string& source) {
  PyValue dict = LiteralParser(header, source).parse_document();
  LT_CHECK(dict.kind == PyValue::Kind::dict, source, ": npy header: expected a dict, found ",
           kind_name(dict));

  const PyValue* descr = nullptr;
  const PyValue* fortran_order = nullptr;
  const PyValue* shape_value = nullptr;
  std::set<std::string> seen;
  for (const auto& [key, value] : dict.entries) {
    LT_CHECK(key.kind == PyValue::Kind::string, source, ": npy header: expected string keys, found ",
             kind_name(key));
    LT_CHECK(seen.insert(key.text).second, source, ": npy header: duplicate key '", printable(key.text), "'");
    if (key.text == "descr") {
      descr = &value;
    } else if (key.text == "fortran_order") {
      fortran_order = &value;
    } else if (key.text == "shape") {
      shape_value = &value;
    } else {
      LT_CHECK(false, source, ": npy header: unexpected key '", printable(key.text),
               "'; expected exactly 'descr', 'fortran_order' and 'shape'");
    }
  }
  LT_CHECK(descr && fortran_order && shape_value, source,
           ": npy header: expected keys 'descr', 'fortran_order' and 'shape', missing '",
           !descr ? "descr" : !fortran_order ? "fortran_order" : "shape", "'");
  LT_CHECK(descr->kind == PyValue::Kind::string, source,
           ": npy header: structured or non-string dtype descr (", kind_name(*descr),
           ") is not supported; expected a plain dtype like '<f4'");
  LT_CHECK(fortran_order->kind == PyValue::Kind::boolean, source,
           ": npy header: expected fortran_order to be True or False, found ", kind_name(*fortran_order));
  LT_CHECK(!fortran_order->boolean, source,
           ": Fortran-order (column-major) npy arrays are not supported; expected fortran_order "
           "False, e.g. save np.ascontiguousarray(arr)");
  LT_CHECK(shape_value->kind == PyValue::Kind::sequence, source,
           ": npy header: expected shape to be a tuple of integers, found ", kind_name(*shape_value));

  NpyLayout layout;
  RawArray& array = layout.array;
  array.dtype = dtype_from_descr(descr->text, source);
  for (const PyValue& dim : shape_value->items) {
    LT_CHECK(dim.kind == PyValue::Kind::integer, source,
             ": npy header: expected shape entries to be integers, found ", kind_name(dim));
    array.shape.push_back(dim.integer);
  }
  const size_t expected = expected_nbytes(array.dtype, array.shape, source + ": npy shape");
  layout.data_start = where.prefix + where.header_len;
  layout.nbytes = expected;
  const uint64_t found = file_size - layout.data_start;
  LT_CHECK(found == expected, source, ": npy data size mismatch: expected ", expected,
           " bytes for dtype ", printable(descr->text), " and shape ", shape_text(array.shape), ", found ",
           found, found < expected ? " (file truncated)" : " (trailing bytes)");
  return layout;
}

}  // namespace

RawArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& source) {
  const NpyPrefix where = parse_npy_prefix(bytes.data(), bytes.size(), source);
  std::string_view header(reinterpret_cast<const char*>(bytes.data() + where.prefix), where.header_len);
  NpyLayout layout = parse_npy_header(header, where, bytes.size(), source);
  layout.array.bytes.assign(bytes.begin() + static_cast<std::ptrdiff_t>(layout.data_start), bytes.end());
  return std::move(layout.array);
}

// Reads the header first and checks the file size against it before allocating the data.
RawArray read_npy(const std::string& path) {
  RegularFile file(path, "npy file");
  const uint64_t size = file.size();
  uint8_t head[kMagicLen + 2 + 4] = {};
  file.read_at(0, head, static_cast<size_t>(std::min<uint64_t>(size, sizeof head)));
  const NpyPrefix where = parse_npy_prefix(head, size, path);
  const std::vector<uint8_t> header_bytes = file.read_at(where.prefix, where.header_len);
  std::string_view header(reinterpret_cast<const char*>(header_bytes.data()), header_bytes.size());
  NpyLayout layout = parse_npy_header(header, where, size, path);
  layout.array.bytes = file.read_at(layout.data_start, layout.nbytes);
  return std::move(layout.array);
}

std::vector<uint8_t> serialize_npy(const RawArray& array) {
  const char* descr = descr_of(array.dtype);
  LT_CHECK(descr != nullptr, "write_npy: npy has no ", dtype_name(array.dtype),
           " dtype (numpy lacks bfloat16); expected f16, f32, f64, i32 or i64: convert to f32 first or "
           "use safetensors");
  check_raw_array(array, "write_npy");

  // Same text as numpy: keys sorted, each followed by ", ", tuple repr for the shape.
  std::string dict = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < array.shape.size(); ++i) {
    if (i) dict += ", ";
    dict += std::to_string(array.shape[i]);
  }
  if (array.shape.size() == 1) dict += ",";
  dict += "), }";
  // numpy (>= 1.24) reserves room for the first axis to grow to 21 digits in place.
  constexpr size_t kGrowthAxisMaxDigits = 21;
  if (!array.shape.empty()) {
    size_t digits = std::to_string(array.shape[0]).size();
    if (digits < kGrowthAxisMaxDigits) dict.append(kGrowthAxisMaxDigits - digits, ' ');
  }

  // Pad with spaces and end with '\n' so the data starts at a multiple of 64 (numpy's formula,
  // which pads a full 64 bytes when already aligned).
  int major = 1;
  size_t length_bytes = 2;
  size_t unpadded = kMagicLen + 2 + length_bytes + dict.size() + 1;
  size_t pad = kAlign - unpadded % kAlign;
  if (dict.size() + 1 + pad > 0xffff) {
    major = 2;
    length_bytes = 4;
    unpadded = kMagicLen + 2 + length_bytes + dict.size() + 1;
    pad = kAlign - unpadded % kAlign;
  }
  const size_t header_len = dict.size() + pad + 1;
  LT_CHECK(header_len <= 0xffffffffu, "write_npy: header of ", header_len, " bytes is too long");

  // Filled by position (one allocation; the data may be large).
  std::vector<uint8_t> out(kMagicLen + 2 + length_bytes + header_len + array.bytes.size(), ' ');
  uint8_t* p = out.data();
  std::memcpy(p, kMagic, kMagicLen);
  p[kMagicLen] = static_cast<uint8_t>(major);
  p[kMagicLen + 1] = 0;
  p += kMagicLen + 2;
  for (size_t i = 0; i < length_bytes; ++i) *p++ = static_cast<uint8_t>(header_len >> (8 * i));
  std::memcpy(p, dict.data(), dict.size());
  p += header_len;  // the padding spaces are already there
  p[-1] = '\n';
  if (!array.bytes.empty()) std::memcpy(p, array.bytes.data(), array.bytes.size());
  return out;
}

void write_npy(const std::string& path, const RawArray& array) {
  std::vector<uint8_t> bytes;
  try {
    bytes = serialize_npy(array);
  } catch (const Error& e) {
    throw Error(detail::concat(path, ": ", e.what()));
  }
  write_file_atomic(path, bytes);
}

}  // namespace longtape::io
