// File formats: npy, safetensors and atomic file replacement, checked against byte layouts built
// by hand from the formats' specifications, malformed inputs, and random corruption.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "io/array_file.h"
#include "io/atomic_file.h"
#include "io/npy.h"
#include "io/safetensors.h"

using namespace longtape;
using namespace longtape::io;
namespace fs = std::filesystem;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 engine{std::random_device{}()};
  return engine;
}

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "longtape_io_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::set<std::string> entries() const {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.insert(e.path().filename().string());
    return names;
  }
};

// Random values of the dtype; `reference` receives each element's exact value as a double.
RawArray random_array(DType dtype, const Shape& shape, std::vector<double>* reference = nullptr) {
  RawArray a;
  a.dtype = dtype;
  a.shape = shape;
  int64_t numel = checked_numel(shape, dtype_size(dtype), "test");
  a.bytes.resize(static_cast<size_t>(numel) * dtype_size(dtype));
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_int_distribution<int64_t> any_i64(INT64_MIN, INT64_MAX);
  std::uniform_int_distribution<int32_t> any_i32(INT32_MIN, INT32_MAX);
  for (int64_t i = 0; i < numel; ++i) {
    uint8_t* dst = a.bytes.data() + i * dtype_size(dtype);
    double value = 0;
    switch (dtype) {
      case DType::f32: {
        float v = static_cast<float>(normal(rng()));
        std::memcpy(dst, &v, 4);
        value = v;
        break;
      }
      case DType::f64: {
        double v = normal(rng());
        std::memcpy(dst, &v, 8);
        value = v;
        break;
      }
      case DType::bf16: {
        bfloat16 v(static_cast<float>(normal(rng())));
        std::memcpy(dst, &v.bits, 2);
        value = static_cast<float>(v);
        break;
      }
      case DType::f16: {
        float16 v(static_cast<float>(normal(rng())));
        std::memcpy(dst, &v.bits, 2);
        value = static_cast<float>(v);
        break;
      }
      case DType::i32: {
        int32_t v = any_i32(rng());
        std::memcpy(dst, &v, 4);
        value = v;
        break;
      }
      case DType::i64: {
        int64_t v = any_i64(rng()) >> 12;  // exactly representable as a double
        std::memcpy(dst, &v, 8);
        value = static_cast<double>(v);
        break;
      }
    }
    if (reference) reference->push_back(value);
  }
  return a;
}

// Element i of a raw array as a double.
double element(const RawArray& a, size_t i) {
  const uint8_t* p = a.bytes.data() + i * dtype_size(a.dtype);
  switch (a.dtype) {
    case DType::f32: { float v; std::memcpy(&v, p, 4); return v; }
    case DType::f64: { double v; std::memcpy(&v, p, 8); return v; }
    case DType::bf16: { bfloat16 v; std::memcpy(&v.bits, p, 2); return static_cast<float>(v); }
    case DType::f16: { float16 v; std::memcpy(&v.bits, p, 2); return static_cast<float>(v); }
    case DType::i32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case DType::i64: { int64_t v; std::memcpy(&v, p, 8); return static_cast<double>(v); }
  }
  return 0;
}

std::vector<uint8_t> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }

void append(std::vector<uint8_t>& out, const std::vector<uint8_t>& more) {
  out.insert(out.end(), more.begin(), more.end());
}

template <typename T>
void append_value(std::vector<uint8_t>& out, T value) {  // little-endian host
  out.resize(out.size() + sizeof(T));
  std::memcpy(out.data() + out.size() - sizeof(T), &value, sizeof(T));
}

// An npy file with the given version and header dict text, padded the way numpy 1.0 did it:
// spaces, then '\n', so that the data starts at a multiple of `align`.
std::vector<uint8_t> npy_by_hand(int major, const std::string& dict, const std::vector<uint8_t>& data,
                                 size_t align = 64) {
  std::vector<uint8_t> out = to_bytes("\x93NUMPY");
  out.push_back(static_cast<uint8_t>(major));
  out.push_back(0);
  size_t length_bytes = major == 1 ? 2 : 4;
  size_t header_len = dict.size() + 1;
  while ((8 + length_bytes + header_len) % align != 0) ++header_len;
  for (size_t i = 0; i < length_bytes; ++i) out.push_back(static_cast<uint8_t>(header_len >> (8 * i)));
  append(out, to_bytes(dict));
  out.insert(out.end(), header_len - dict.size() - 1, ' ');
  out.push_back('\n');
  append(out, data);
  return out;
}

// Asserts that `fn` throws longtape::Error whose message contains every given fragment.
template <typename Fn>
void check_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  std::string message;
  try {
    fn();
  } catch (const Error& e) {
    message = e.what();
  }
  INFO("message: " << message);
  REQUIRE_FALSE(message.empty());
  for (const char* fragment : fragments) {
    INFO("expected fragment: " << fragment);
    CHECK(message.find(fragment) != std::string::npos);
  }
}

const std::vector<Shape> kShapes = {{}, {0}, {1}, {7}, {3, 4}, {2, 0, 3}, {2, 3, 4, 5}, {1, 1, 1}};

}  // namespace

// ---------------------------------------------------------------- npy

TEST_CASE("npy round trip: every dtype, 0-d, empty and n-d shapes") {
  TempDir dir;
  for (DType dtype : {DType::f16, DType::f32, DType::f64, DType::i32, DType::i64}) {
    for (const Shape& shape : kShapes) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(shape_text(shape));
      std::vector<double> reference;
      RawArray original = random_array(dtype, shape, &reference);
      const std::string path = dir.file("a.npy");
      write_npy(path, original);
      std::vector<uint8_t> file = read_file(path);
      // Data starts 64-byte aligned right after the header's '\n'.
      size_t data_start = file.size() - original.bytes.size();
      CHECK(data_start % 64 == 0);
      CHECK(file[data_start - 1] == '\n');
      RawArray back = read_npy(path);
      CHECK(back.dtype == dtype);
      CHECK(back.shape == shape);
      REQUIRE(back.bytes.size() == original.bytes.size());
      CHECK(back.bytes == original.bytes);
      for (size_t i = 0; i < reference.size(); ++i) CHECK(element(back, i) == reference[i]);
    }
  }
  CHECK(dir.entries() == std::set<std::string>{"a.npy"});
}

TEST_CASE("npy writer produces numpy's exact bytes") {
  // numpy >= 1.24: np.save(f, np.zeros((2, 3), '<f4')) writes this 128-byte header: the dict,
  // 20 spaces reserved for growing the first axis, padding spaces, '\n'.
  std::vector<double> reference;
  RawArray a = random_array(DType::f32, {2, 3}, &reference);
  std::vector<uint8_t> bytes = serialize_npy(a);
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  REQUIRE(bytes.size() == 128 + 24);
  CHECK(std::memcmp(bytes.data(), "\x93NUMPY\x01\x00", 8) == 0);
  CHECK(bytes[8] == 118);  // header length, little-endian u16: 128 - 10
  CHECK(bytes[9] == 0);
  CHECK(std::string(bytes.begin() + 10, bytes.begin() + 10 + static_cast<long>(dict.size())) == dict);
  for (size_t i = 10 + dict.size(); i < 127; ++i) CHECK(bytes[i] == ' ');
  CHECK(bytes[127] == '\n');
  for (size_t i = 0; i < 6; ++i) {
    float v;
    std::memcpy(&v, bytes.data() + 128 + 4 * i, 4);
    CHECK(v == reference[i]);
  }

  // 1-d shapes are written as the Python tuple "(n,)", 0-d as "()".
  std::vector<uint8_t> one_d = serialize_npy(random_array(DType::i64, {5}));
  CHECK(std::string(one_d.begin(), one_d.end()).find("'shape': (5,), }") != std::string::npos);
  std::vector<uint8_t> scalar = serialize_npy(random_array(DType::f64, {}));
  CHECK(std::string(scalar.begin(), scalar.end()).find("{'descr': '<f8', 'fortran_order': False, 'shape': (), }") != std::string::npos);
  CHECK(scalar.size() == 128 + 8);  // 10 + 55 + 1 header bytes do not fit in 64
  // f16 is numpy's '<f2'.
  std::vector<uint8_t> half = serialize_npy(random_array(DType::f16, {4}));
  CHECK(std::string(half.begin(), half.end()).find("{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }") !=
        std::string::npos);
  CHECK(half.size() == 128 + 8);
}

TEST_CASE("npy reader accepts hand-built files: versions, key orders, spacing, trailing commas") {
  std::vector<double> f64_values;
  RawArray f64 = random_array(DType::f64, {3, 2}, &f64_values);
  std::vector<double> i32_values;
  RawArray i32 = random_array(DType::i32, {4}, &i32_values);
  std::vector<double> f32_values;
  RawArray f32 = random_array(DType::f32, {}, &f32_values);
  std::vector<double> i64_values;
  RawArray i64 = random_array(DType::i64, {2, 1, 2}, &i64_values);

  struct Case {
    int major;
    std::string dict;
    const RawArray* array;
    const std::vector<double>* values;
    size_t align;
  };
  const std::vector<Case> cases = {
      // numpy 1.x layout: v1.0, keys sorted, trailing comma, padded to 64 (16 in old numpy).
      {1, "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }", &f64, &f64_values, 64},
      {1, "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }", &f64, &f64_values, 16},
      // Other key order, no trailing comma, odd spacing, double quotes.
      {1, "{ \"shape\" :(4,) ,'fortran_order':False,'descr':'<i4'}", &i32, &i32_values, 64},
      {1, "{'fortran_order': False, 'descr': '<f4', 'shape': ()}", &f32, &f32_values, 64},
      // Python 2 long suffixes and a list shape; '=' is native (little) order.
      {1, "{'descr': '=i8', 'shape': [2L, 1L, 2L], 'fortran_order': False,}", &i64, &i64_values, 64},
      // Versions 2.0 and 3.0 have a 4-byte header length.
      {2, "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }", &f64, &f64_values, 64},
      {3, "{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", &i32, &i32_values, 64},
  };
  for (const Case& c : cases) {
    CAPTURE(c.dict);
    CAPTURE(c.major);
    RawArray back = parse_npy(npy_by_hand(c.major, c.dict, c.array->bytes, c.align));
    CHECK(back.dtype == c.array->dtype);
    CHECK(back.shape == c.array->shape);
    REQUIRE(back.bytes.size() == c.values->size() * dtype_size(back.dtype));
    for (size_t i = 0; i < c.values->size(); ++i) CHECK(element(back, i) == (*c.values)[i]);
  }

  // A header too long for a 16-bit length is written as version 2.0 and read back.
  RawArray many_dims;
  many_dims.dtype = DType::f32;
  many_dims.shape = Shape(25000, 1);
  many_dims.shape.push_back(3);
  std::vector<double> values;
  RawArray source = random_array(DType::f32, many_dims.shape, &values);
  std::vector<uint8_t> bytes = serialize_npy(source);
  CHECK(bytes[6] == 2);
  RawArray back = parse_npy(bytes);
  CHECK(back.shape == source.shape);
  for (size_t i = 0; i < values.size(); ++i) CHECK(element(back, i) == values[i]);
}

TEST_CASE("npy rejects malformed and unsupported input with clear errors") {
  const std::vector<uint8_t> data = random_array(DType::f32, {2, 3}).bytes;
  const std::string good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  auto parse = [](const std::vector<uint8_t>& bytes) { return [bytes] { parse_npy(bytes, "x.npy"); }; };

  std::vector<uint8_t> bad_magic = npy_by_hand(1, good, data);
  bad_magic[1] = 'M';
  check_error(parse(bad_magic), {"x.npy", "magic"});
  check_error(parse(to_bytes("\x93NUM")), {"x.npy", "magic", "only 4 bytes"});
  check_error(parse({}), {"magic"});
  std::vector<uint8_t> bad_version = npy_by_hand(1, good, data);
  bad_version[6] = 4;
  check_error(parse(bad_version), {"version 4.0"});
  check_error(parse(to_bytes(std::string("\x93NUMPY\x02\x00\x10", 9))), {"truncated", "header length"});
  // Header length claims more bytes than the file holds.
  std::vector<uint8_t> long_header = npy_by_hand(1, good, {});
  long_header[8] = 0xff;
  long_header[9] = 0xff;
  check_error(parse(long_header), {"x.npy", "header length 65535", "exceeds"});
  std::vector<uint8_t> huge_v2 = npy_by_hand(2, good, {});
  huge_v2[8] = huge_v2[9] = huge_v2[10] = huge_v2[11] = 0xff;
  check_error(parse(huge_v2), {"header length 4294967295", "exceeds"});

  // Data size mismatches.
  std::vector<uint8_t> truncated = npy_by_hand(1, good, data);
  truncated.resize(truncated.size() - 3);
  check_error(parse(truncated), {"x.npy", "expected 24 bytes", "found 21", "truncated"});
  std::vector<uint8_t> trailing = npy_by_hand(1, good, data);
  trailing.push_back(0);
  check_error(parse(trailing), {"expected 24 bytes", "found 25", "trailing"});

  // Unsupported layouts and dtypes.
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data)),
              {"x.npy", "Fortran"});
  check_error(parse(npy_by_hand(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data)),
              {"big-endian", "'>f4'"});
  check_error(parse(npy_by_hand(1, "{'descr': '>i8', 'fortran_order': False, 'shape': (3,), }", data)),
              {"big-endian"});
  check_error(parse(npy_by_hand(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (24,), }", data)),
              {"unsupported npy dtype '|u1'", "'<f4'"});
  check_error(parse(npy_by_hand(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }", data)),
              {"unsupported npy dtype '<c8'", "'<f2' (float16)"});
  check_error(parse(npy_by_hand(1, "{'descr': '|b1', 'fortran_order': False, 'shape': (24,), }", data)),
              {"unsupported"});
  check_error(parse(npy_by_hand(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", data)),
              {"structured"});

  // Shapes.
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", data)),
              {"x.npy", "overflow"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2305843009213693952,), }", data)),
              {"overflow"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -3), }", data)),
              {"non-negative"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", data)),
              {"64 bits"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 'a'), }", data)),
              {"integers"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': 6, }", data)),
              {"tuple"});

  // Dict structure.
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'shape': (2, 3), }", data)), {"missing 'fortran_order'"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", data)),
              {"unexpected key 'x'"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", data)),
              {"duplicate key 'descr'"});
  check_error(parse(npy_by_hand(1, "['descr', '<f4']", data)), {"expected a dict", "a list"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}", data)),
              {"True or False"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", data)),
              {"expected ',' or '}'"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}", data)),
              {"npy header"});
  check_error(parse(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} junk", data)),
              {"after the header dict"});
  check_error(parse(npy_by_hand(1, std::string(5000, '(') + std::string(5000, ')'), data)), {"nesting"});
  check_error(parse(npy_by_hand(1, "", data)), {"unexpected end of header"});

  // Errors from files name the file.
  TempDir dir;
  const std::string missing = dir.file("missing.npy");
  check_error([&] { read_npy(missing); }, {"missing.npy", "No such file"});
  const std::string path = dir.file("cut.npy");
  write_file_atomic(path, truncated);
  check_error([&] { read_npy(path); }, {"cut.npy", "truncated"});

  // Writer refuses what numpy cannot represent or inconsistent arrays.
  check_error([&] { write_npy(dir.file("b.npy"), random_array(DType::bf16, {3})); }, {"b.npy", "bfloat16"});
  RawArray wrong_size = random_array(DType::f32, {2, 3});
  wrong_size.bytes.pop_back();
  check_error([&] { write_npy(dir.file("w.npy"), wrong_size); }, {"expected 24 bytes", "got 23"});
  RawArray negative = random_array(DType::f32, {2});
  negative.shape = {-1, -2};
  check_error([&] { serialize_npy(negative); }, {"non-negative"});
  CHECK(dir.entries() == std::set<std::string>{"cut.npy"});
}

// Every mutation of a valid file either parses into a consistent array or throws longtape::Error.
template <typename Parse, typename Consistent>
void fuzz(const std::vector<uint8_t>& valid, size_t header_end, Parse parse, Consistent consistent) {
  int parsed = 0;
  int rejected = 0;
  std::uniform_int_distribution<int> byte(0, 255);
  for (int iteration = 0; iteration < 3000; ++iteration) {
    std::vector<uint8_t> bytes = valid;
    int kind = iteration % 4;
    if (kind == 0) {  // truncation
      bytes.resize(std::uniform_int_distribution<size_t>(0, bytes.size() - 1)(rng()));
    } else {
      // 1-4 byte flips, mostly inside the header where the structure is.
      int flips = std::uniform_int_distribution<int>(1, 4)(rng());
      size_t limit = kind == 3 ? bytes.size() : header_end;
      for (int f = 0; f < flips; ++f) {
        size_t at = std::uniform_int_distribution<size_t>(0, limit - 1)(rng());
        bytes[at] = kind == 1 ? static_cast<uint8_t>(bytes[at] ^ (1u << (byte(rng()) % 8)))
                              : static_cast<uint8_t>(byte(rng()));
      }
    }
    try {
      auto result = parse(bytes);
      CHECK(consistent(result));
      ++parsed;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      FAIL("a mutated file raised a non-longtape exception: " << e.what());
    }
  }
  CHECK(parsed > 0);
  CHECK(rejected > 0);
}

TEST_CASE("npy fuzz: truncations and byte flips parse or throw longtape::Error") {
  RawArray a = random_array(DType::f32, {3, 5});
  std::vector<uint8_t> valid = serialize_npy(a);
  fuzz(valid, valid.size() - a.bytes.size(), [](const std::vector<uint8_t>& b) { return parse_npy(b); },
       [](const RawArray& r) {
         return r.bytes.size() == expected_nbytes(r.dtype, r.shape, "fuzz");
       });
  // The old 16-byte-aligned layout with a differently ordered dict, too.
  std::vector<uint8_t> hand = npy_by_hand(1, "{'shape': (15,), 'descr': '<i4', 'fortran_order': False}",
                                          random_array(DType::i32, {15}).bytes, 16);
  fuzz(hand, hand.size() - 60, [](const std::vector<uint8_t>& b) { return parse_npy(b); },
       [](const RawArray& r) {
         return r.bytes.size() == expected_nbytes(r.dtype, r.shape, "fuzz");
       });
}

// ---------------------------------------------------------------- safetensors

TEST_CASE("safetensors round trip: every dtype, 0-d and empty tensors, metadata, order") {
  TempDir dir;
  SafetensorsFile file;
  file.metadata = {{"format", "pt"}, {"note", "unicode \xc3\xa9\xe2\x82\xac"}};
  std::vector<std::vector<double>> references;
  int index = 0;
  for (DType dtype : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64}) {
    for (const Shape& shape : kShapes) {
      references.emplace_back();
      // Names in non-sorted order, to check that write order is kept.
      file.add("t" + std::to_string(97 - index++) + "." + dtype_name(dtype),
               random_array(dtype, shape, &references.back()));
    }
  }
  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, file);
  SafetensorsFile back = read_safetensors(path);
  CHECK(back.metadata == file.metadata);
  REQUIRE(back.tensors.size() == file.tensors.size());
  for (size_t t = 0; t < file.tensors.size(); ++t) {
    CAPTURE(file.tensors[t].first);
    CHECK(back.tensors[t].first == file.tensors[t].first);
    const RawArray& b = back.tensors[t].second;
    CHECK(b.dtype == file.tensors[t].second.dtype);
    CHECK(b.shape == file.tensors[t].second.shape);
    CHECK(b.bytes == file.tensors[t].second.bytes);
    REQUIRE(b.bytes.size() == references[t].size() * dtype_size(b.dtype));
    for (size_t i = 0; i < references[t].size(); ++i) CHECK(element(b, i) == references[t][i]);
  }
  // Lookup by name.
  const std::string name = file.tensors[12].first;
  REQUIRE(back.find(name) != nullptr);
  CHECK(back.at(name).bytes == file.tensors[12].second.bytes);
  CHECK(back.contains(name));
  CHECK_FALSE(back.contains("absent"));
  CHECK(back.find("absent") == nullptr);
  check_error([&] { back.at("absent"); }, {"no tensor named 'absent'", name.c_str()});
  check_error([&] { back.add(name, RawArray{}); }, {"duplicate", name.c_str()});
  CHECK(back.names().size() == file.tensors.size());
  CHECK(dir.entries() == std::set<std::string>{"model.safetensors"});

  // No tensors, no metadata: the header is "{}" padded to 8 bytes.
  std::vector<uint8_t> empty = serialize_safetensors({});
  CHECK(empty.size() == 16);
  CHECK(std::string(empty.begin() + 8, empty.end()) == "{}      ");
  CHECK(parse_safetensors(empty).tensors.empty());
}

TEST_CASE("safetensors reader decodes a file laid out by hand from the specification") {
  std::vector<double> a_values, b_values, c_values, d_values;
  RawArray a = random_array(DType::f32, {2, 3}, &a_values);   // 24 bytes at [0, 24)
  RawArray b = random_array(DType::i64, {3}, &b_values);      // 24 bytes at [24, 48)
  RawArray c = random_array(DType::bf16, {}, &c_values);      // 2 bytes at [48, 50)
  RawArray d = random_array(DType::f64, {0, 4}, &d_values);   // 0 bytes at [50, 50)
  // Keys in another order than the data, whitespace as another writer might put it.
  std::string header =
      "{\"b\": {\"dtype\": \"I64\", \"shape\": [3], \"data_offsets\": [24, 48]},\n"
      " \"__metadata__\": {\"format\": \"pt\", \"source\": \"hand\"},\n"
      " \"c\": {\"shape\": [], \"data_offsets\": [48, 50], \"dtype\": \"BF16\"},\n"
      " \"d\": {\"dtype\": \"F64\", \"shape\": [0, 4], \"data_offsets\": [50, 50]},\n"
      " \"a\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 24]}}";
  while (header.size() % 8 != 0) header += ' ';
  std::vector<uint8_t> bytes;
  append_value<uint64_t>(bytes, header.size());
  append(bytes, to_bytes(header));
  append(bytes, a.bytes);
  append(bytes, b.bytes);
  append(bytes, c.bytes);

  TempDir dir;
  const std::string path = dir.file("hand.safetensors");
  write_file_atomic(path, bytes);
  SafetensorsFile file = read_safetensors(path);
  CHECK(file.metadata == std::map<std::string, std::string>{{"format", "pt"}, {"source", "hand"}});
  // Tensors come back in data order.
  CHECK(file.names() == std::vector<std::string>{"a", "b", "c", "d"});
  const RawArray& ra = file.at("a");
  CHECK(ra.dtype == DType::f32);
  CHECK(ra.shape == Shape{2, 3});
  for (size_t i = 0; i < 6; ++i) CHECK(element(ra, i) == a_values[i]);
  const RawArray& rb = file.at("b");
  CHECK(rb.dtype == DType::i64);
  CHECK(rb.shape == Shape{3});
  for (size_t i = 0; i < 3; ++i) CHECK(element(rb, i) == b_values[i]);
  const RawArray& rc = file.at("c");
  CHECK(rc.dtype == DType::bf16);
  CHECK(rc.shape.empty());
  CHECK(element(rc, 0) == c_values[0]);
  CHECK(file.at("d").shape == Shape{0, 4});
  CHECK(file.at("d").bytes.empty());
}

TEST_CASE("safetensors writer produces the specified byte layout") {
  SafetensorsFile file;
  file.metadata["format"] = "pt";
  std::vector<double> w_values, s_values;
  file.add("weight", random_array(DType::f32, {2, 2}, &w_values));  // 16 bytes
  file.add("step", random_array(DType::i32, {}, &s_values));        // 4 bytes
  file.add("bias", random_array(DType::bf16, {3}));                 // 6 bytes
  std::vector<uint8_t> bytes = serialize_safetensors(file);

  REQUIRE(bytes.size() >= 8);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  REQUIRE(8 + n + 26 == bytes.size());
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  CHECK(header.front() == '{');
  // Padding is spaces after the JSON, fewer than 8 of them.
  size_t json_end = header.find_last_not_of(' ') + 1;
  CHECK(header[json_end - 1] == '}');
  CHECK(n - json_end < 8);
  const nlohmann::json expected = nlohmann::json::parse(R"({
      "__metadata__": {"format": "pt"},
      "weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "step": {"dtype": "I32", "shape": [], "data_offsets": [16, 20]},
      "bias": {"dtype": "BF16", "shape": [3], "data_offsets": [20, 26]}})");
  CHECK(nlohmann::json::parse(header) == expected);
  // Data in write order right after the header.
  const uint8_t* data = bytes.data() + 8 + n;
  for (size_t i = 0; i < 4; ++i) {
    float v;
    std::memcpy(&v, data + 4 * i, 4);
    CHECK(v == w_values[i]);
  }
  int32_t step;
  std::memcpy(&step, data + 16, 4);
  CHECK(step == s_values[0]);
  CHECK(std::memcmp(data + 20, file.at("bias").bytes.data(), 6) == 0);
}

namespace {

// A safetensors file from a header JSON text and a data buffer.
std::vector<uint8_t> safetensors_by_hand(std::string header, const std::vector<uint8_t>& data) {
  while (header.size() % 8 != 0) header += ' ';
  std::vector<uint8_t> bytes;
  append_value<uint64_t>(bytes, header.size());
  append(bytes, to_bytes(header));
  append(bytes, data);
  return bytes;
}

}  // namespace

TEST_CASE("safetensors rejects malformed and unsupported input with clear errors") {
  const std::vector<uint8_t> data = random_array(DType::f32, {4}).bytes;  // 16 bytes
  auto parse = [](const std::vector<uint8_t>& bytes) {
    return [bytes] { parse_safetensors(bytes, "m.safetensors"); };
  };
  auto one = [&](const std::string& info) {
    return safetensors_by_hand("{\"x\": " + info + "}", data);
  };

  check_error(parse({1, 2, 3}), {"m.safetensors", "truncated", "found 3"});
  std::vector<uint8_t> long_header = one(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})");
  long_header[6] = 1;  // header length near 2^48
  check_error(parse(long_header), {"m.safetensors", "header length", "exceeds"});
  std::vector<uint8_t> max_header = long_header;
  std::memset(max_header.data(), 0xff, 8);
  check_error(parse(max_header), {"header length 18446744073709551615", "exceeds"});
  check_error(parse(safetensors_by_hand("{\"x\": {\"dtype\": \"F32\",", data)), {"m.safetensors", "not valid JSON"});
  check_error(parse(safetensors_by_hand("[1, 2]", data)), {"expected a JSON object", "array"});
  check_error(parse(safetensors_by_hand("{\"a\": \"\xff\xfe\"}", data)), {"not valid JSON"});
  check_error(parse(safetensors_by_hand(
                  R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                  data)),
              {"duplicate key 'x'"});

  // Offsets.
  check_error(parse(one(R"({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]})")),
              {"tensor 'x'", "exceed the data buffer of 16 bytes"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})")),
              {"data buffer has 16 bytes", "cover only 8"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})")),
              {"tensor 'x'", "gap", "begin at 0"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [2], "data_offsets": [16, 8]})")), {"end before they begin"});
  check_error(parse(safetensors_by_hand(
                  R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                  data)),
              {"tensor 'b'", "overlap tensor 'a'"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 20]})")), {"[begin, end]"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, -16]})")), {"non-negative integer"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16.0]})")), {"non-negative integer"});

  // Sizes, shapes and dtypes.
  check_error(parse(one(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]})")),
              {"tensor 'x'", "span 16 bytes, expected 12"});
  check_error(parse(one(R"({"dtype": "F64", "shape": [4], "data_offsets": [0, 16]})")), {"expected 32"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]})")), {"non-negative integer"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]})")),
              {"overflow"});
  check_error(parse(one(R"({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]})")), {"shape to be an array"});
  check_error(parse(one(R"({"dtype": "I16", "shape": [8], "data_offsets": [0, 16]})")),
              {"tensor 'x'", "unsupported dtype I16", "F32, F64, BF16, F16, I32, I64"});
  check_error(parse(one(R"({"dtype": "U8", "shape": [16], "data_offsets": [0, 16]})")), {"unsupported dtype U8"});
  check_error(parse(one(R"({"dtype": "BOOL", "shape": [16], "data_offsets": [0, 16]})")), {"unsupported dtype BOOL"});
  check_error(parse(one(R"({"dtype": "Q4", "shape": [16], "data_offsets": [0, 16]})")), {"unknown dtype 'Q4'"});
  check_error(parse(one(R"({"dtype": 32, "shape": [4], "data_offsets": [0, 16]})")), {"dtype to be a string"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4]})")), {"expected fields dtype, shape and data_offsets"});
  check_error(parse(one(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1})")),
              {"unexpected field 'extra'"});
  check_error(parse(one("[0, 16]")), {"expected an object"});

  // Metadata must map strings to strings.
  check_error(parse(safetensors_by_hand(
                  R"({"__metadata__": {"epoch": 3}, "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                  data)),
              {"__metadata__ entry 'epoch'", "string"});
  check_error(parse(safetensors_by_hand(
                  R"({"__metadata__": "pt", "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", data)),
              {"__metadata__", "object of strings"});

  // Writer-side checks.
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  SafetensorsFile bad;
  bad.tensors.emplace_back("same", random_array(DType::f32, {2}));
  bad.tensors.emplace_back("same", random_array(DType::f32, {2}));
  check_error([&] { write_safetensors(path, bad); }, {"w.safetensors", "duplicate tensor name 'same'"});
  bad.tensors = {{"__metadata__", random_array(DType::f32, {2})}};
  check_error([&] { write_safetensors(path, bad); }, {"reserved"});
  bad.tensors = {{"", random_array(DType::f32, {2})}};
  check_error([&] { write_safetensors(path, bad); }, {"non-empty"});
  bad.tensors = {{"x", random_array(DType::f64, {2})}};
  bad.tensors[0].second.bytes.resize(15);
  check_error([&] { write_safetensors(path, bad); }, {"tensor 'x'", "expected 16 bytes", "got 15"});
  bad.tensors = {{"bad \xff name", random_array(DType::f32, {2})}};
  check_error([&] { write_safetensors(path, bad); }, {"UTF-8"});
  CHECK(dir.entries().empty());
  check_error([&] { read_safetensors(path); }, {"w.safetensors", "No such file"});
}

TEST_CASE("safetensors fuzz: truncations and byte flips parse or throw longtape::Error") {
  SafetensorsFile file;
  file.metadata["format"] = "pt";
  file.add("a", random_array(DType::f32, {3, 2}));
  file.add("b", random_array(DType::bf16, {5}));
  file.add("c", random_array(DType::i64, {}));
  std::vector<uint8_t> valid = serialize_safetensors(file);
  uint64_t n;
  std::memcpy(&n, valid.data(), 8);
  fuzz(valid, 8 + n, [](const std::vector<uint8_t>& b) { return parse_safetensors(b); },
       [](const SafetensorsFile& f) {
         for (const auto& [name, array] : f.tensors)
           if (array.bytes.size() != expected_nbytes(array.dtype, array.shape, name)) return false;
         return true;
       });
}

// ---------------------------------------------------------------- atomic files

TEST_CASE("write_file_atomic replaces the file and leaves no temporary behind") {
  TempDir dir;
  const std::string path = dir.file("state.bin");
  std::vector<uint8_t> first = random_array(DType::f64, {100}).bytes;
  write_file_atomic(path, first);
  CHECK(read_file(path) == first);
  std::vector<uint8_t> second = random_array(DType::i32, {7}).bytes;
  write_file_atomic(path, second);
  CHECK(read_file(path) == second);
  write_file_atomic(path, nullptr, 0);
  CHECK(read_file(path).empty());
  CHECK(dir.entries() == std::set<std::string>{"state.bin"});

  // Permissions follow the umask, like a file created with fopen.
  mode_t mask = ::umask(0);
  ::umask(mask);
  struct stat info {};
  REQUIRE(::stat(path.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == (0666 & ~mask));

  // Relative path (temporary in the current directory's sibling of the target).
  const fs::path previous = fs::current_path();
  fs::current_path(dir.path);
  write_file_atomic("relative.bin", first);
  fs::current_path(previous);
  CHECK(read_file(dir.file("relative.bin")) == first);
}

TEST_CASE("write_file_atomic keeps the previous file when writing fails midway") {
  TempDir dir;
  const std::string path = dir.file("checkpoint.safetensors");
  std::vector<uint8_t> original = random_array(DType::f32, {64}).bytes;
  write_file_atomic(path, original);

  // The writer throws after writing part of the new content.
  std::vector<uint8_t> replacement = random_array(DType::f32, {64}).bytes;
  bool threw = false;
  try {
    write_file_atomic(path, [&](std::FILE* f) {
      std::fwrite(replacement.data(), 1, replacement.size() / 2, f);
      std::fflush(f);
      throw std::runtime_error("interrupted");
    });
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()) == "interrupted";  // propagated unchanged
  }
  CHECK(threw);
  CHECK(read_file(path) == original);
  CHECK(dir.entries() == std::set<std::string>{"checkpoint.safetensors"});

  // A longtape::Error from the writer propagates as well.
  check_error([&] { write_file_atomic(path, [](std::FILE*) { LT_CHECK(false, "writer gave up"); }); },
              {"writer gave up"});
  CHECK(read_file(path) == original);
  CHECK(dir.entries() == std::set<std::string>{"checkpoint.safetensors"});

  // Target directory missing: nothing is created, the message has the system's reason.
  check_error([&] { write_file_atomic(dir.file("no/such/dir/file.bin"), original); },
              {"no/such/dir/file.bin", "No such file or directory"});
  // Target is a directory: the rename fails and the temporary file is removed.
  fs::create_directory(dir.path / "sub");
  check_error([&] { write_file_atomic(dir.file("sub"), original); }, {"sub", "renam"});
  CHECK(dir.entries() == std::set<std::string>{"checkpoint.safetensors", "sub"});
  CHECK(fs::is_empty(dir.path / "sub"));
  check_error([&] { write_file_atomic("", original); }, {"empty"});
  check_error([&] { write_file_atomic(dir.file("sub") + "/", original); }, {"directory"});

  // Same through the format writers: a failed write_npy keeps the old file.
  RawArray bad = random_array(DType::bf16, {4});
  check_error([&] { write_npy(path, bad); }, {"bfloat16"});
  CHECK(read_file(path) == original);
}

TEST_CASE("write_file_atomic from several threads: readers only ever see a complete file") {
  TempDir dir;
  const std::string path = dir.file("shared.bin");
  std::vector<std::vector<uint8_t>> contents;
  for (int t = 0; t < 4; ++t) contents.push_back(random_array(DType::f64, {2048 + t}).bytes);
  write_file_atomic(path, contents[0]);
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) write_file_atomic(path, contents[static_cast<size_t>(t)]);
    });
  }
  int checks = 0;
  int complete = 0;
  for (int i = 0; i < 40; ++i) {
    std::vector<uint8_t> seen = read_file(path);
    ++checks;
    for (const auto& c : contents) complete += seen == c;
  }
  for (auto& w : writers) w.join();
  CHECK(complete == checks);
  std::vector<uint8_t> last = read_file(path);
  bool is_one = false;
  for (const auto& c : contents) is_one = is_one || last == c;
  CHECK(is_one);
  CHECK(dir.entries() == std::set<std::string>{"shared.bin"});
}

TEST_CASE("read_file errors name the file and the reason") {
  TempDir dir;
  check_error([&] { read_file(dir.file("absent.bin")); }, {"absent.bin", "No such file or directory"});
  check_error([&] { read_file(dir.path.string()); }, {"expected a regular file, got a directory"});
  // Devices and FIFOs are refused before a byte is read: they could never end or would block.
  check_error([&] { read_file("/dev/zero"); }, {"/dev/zero", "expected a regular file, got a character device"});
  const std::string fifo = dir.file("pipe");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  check_error([&] { read_file(fifo); }, {"pipe", "expected a regular file, got a FIFO"});
  // A size limit is checked before the content is allocated.
  write_file_atomic(dir.file("ten.bin"), std::vector<uint8_t>(10, 7));
  check_error([&] { read_file(dir.file("ten.bin"), 9); }, {"ten.bin", "10 bytes, over the limit of 9 bytes"});
  CHECK(read_file(dir.file("ten.bin"), 10) == std::vector<uint8_t>(10, 7));
  // Larger than one read chunk.
  std::vector<uint8_t> big = random_array(DType::f64, {100000}).bytes;
  write_file_atomic(dir.file("big.bin"), big);
  CHECK(read_file(dir.file("big.bin")) == big);
}

// ---------------------------------------------------------------- hostile input

namespace {

// The message of the longtape::Error that `fn` throws ("" when it throws nothing).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Short and printable: no control characters, no invalid UTF-8 (so a terminal or log shows it).
void check_printable(const std::string& message, size_t max_size = 1000) {
  INFO("message: " << message);
  CHECK(!message.empty());
  CHECK(message.size() <= max_size);
  size_t i = 0;
  while (i < message.size()) {
    const auto u = static_cast<unsigned char>(message[i]);
    if (u < 0x80) {
      CHECK((u >= 0x20 && u != 0x7f));
      ++i;
      continue;
    }
    const size_t len = u >= 0xf0 ? 4 : u >= 0xe0 ? 3 : u >= 0xc2 ? 2 : 0;
    REQUIRE(len > 0);
    REQUIRE(i + len <= message.size());
    for (size_t k = 1; k < len; ++k) REQUIRE((static_cast<unsigned char>(message[i + k]) & 0xc0) == 0x80);
    i += len;
  }
}

std::string npy_dict(const std::string& descr, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
}

}  // namespace

TEST_CASE("npy and safetensors refuse shapes whose non-zero dimensions overflow, even beside a zero") {
  auto npy = [](const std::string& shape, const std::vector<uint8_t>& data = {}) {
    return [bytes = npy_by_hand(1, npy_dict("<f4", shape), data)] { parse_npy(bytes, "z.npy"); };
  };
  // 2^62 * 2^62 overflows although the element count is 0.
  check_error(npy("(0, 4611686018427387904, 4611686018427387904, 4)"), {"z.npy", "overflow", "axis 2", "9223372036854775807"});
  check_error(npy("(4611686018427387904, 4611686018427387904, 0)"), {"z.npy", "overflow"});
  // Element count fits, byte size (x4) does not.
  check_error(npy("(0, 4611686018427387904)"), {"byte size", "overflow"});
  check_error(npy("(3, 0, -1)"), {"non-negative", "-1", "axis 2"});
  // A zero dimension with modest others is still an empty array.
  RawArray empty = parse_npy(npy_by_hand(1, npy_dict("<f4", "(0, 1048576, 1048576)"), {}), "ok.npy");
  CHECK(empty.bytes.empty());
  CHECK(empty.shape == Shape{0, 1048576, 1048576});
  // Shape far larger than the bytes that follow: refused before any data is allocated.
  check_error(npy("(1099511627776,)", {1, 2, 3, 4}), {"expected 4398046511104 bytes", "found 4", "truncated"});

  const std::string hand = R"({"x": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904, 4], "data_offsets": [0, 0]}})";
  check_error([&] { parse_safetensors(safetensors_by_hand(hand, {}), "z.safetensors"); },
              {"z.safetensors", "tensor 'x'", "overflow"});
  check_error([&] {
    parse_safetensors(safetensors_by_hand(
        R"({"x": {"dtype": "F64", "shape": [0, 2305843009213693952], "data_offsets": [0, 0]}})", {}), "z.safetensors");
  }, {"tensor 'x'", "byte size", "overflow"});

  // checked_numel, used by the writers too.
  check_error([] { checked_numel({0, int64_t{1} << 62, int64_t{1} << 62}, 1, "w"); }, {"w:", "overflow"});
  CHECK(checked_numel({0, int64_t{1} << 40}, 8, "w") == 0);
  RawArray zero_but_huge;
  zero_but_huge.shape = {0, int64_t{1} << 62, int64_t{1} << 62, 4};
  check_error([&] { serialize_npy(zero_but_huge); }, {"overflow"});
  SafetensorsFile sf;
  sf.add("t", zero_but_huge);
  check_error([&] { serialize_safetensors(sf); }, {"tensor 't'", "overflow"});
}

TEST_CASE("safetensors refuses deep nesting, NUL bytes and oversized headers without crashing") {
  auto parse = [](const std::string& header, const std::vector<uint8_t>& data = {}) {
    return [bytes = safetensors_by_hand(header, data)] { parse_safetensors(bytes, "d.safetensors"); };
  };
  // Valid JSON nested a million levels deep in a shape: used to overflow the stack when the value
  // was printed into the error message.
  const size_t deep = 1000000;
  const std::string nested = std::string(deep, '[') + std::string(deep, ']');
  std::string message = error_of(parse(R"({"x": {"dtype": "F32", "shape": )" + nested + R"(, "data_offsets": [0, 0]}})"));
  check_printable(message);
  CHECK(message.find("nesting depth 65") != std::string::npos);
  CHECK(message.find("limit of 64") != std::string::npos);
  check_error(parse(std::string(deep, '{')), {"d.safetensors", "nesting depth 65", "limit of 64"});
  // At the limit the structure is parsed (and then refused for what it is, printed briefly).
  message = error_of(parse(R"({"x": {"dtype": "F32", "shape": )" + std::string(62, '[') + std::string(62, ']') +
                           R"(, "data_offsets": [0, 0]}})"));
  check_printable(message);
  CHECK(message.find("non-negative integer") != std::string::npos);
  // Brackets inside strings (and escaped quotes) do not count as nesting.
  SafetensorsFile ok = parse_safetensors(
      safetensors_by_hand(R"({"__metadata__": {"k": "\")" + std::string(500, '[') + R"("}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                          {0, 0, 0, 0}));
  CHECK(ok.metadata.at("k") == "\"" + std::string(500, '['));

  // A NUL byte used to end the header silently, ignoring the rest.
  std::string with_nul = R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})";
  with_nul += std::string("\0 garbage }", 11);
  check_error(parse(with_nul, {0, 0, 0, 0}), {"d.safetensors", "NUL byte", "offset 61"});

  // Header over 100 MB: refused from its length field, before reading it (sparse file).
  TempDir dir;
  const std::string path = dir.file("big_header.safetensors");
  {
    std::vector<uint8_t> head;
    append_value<uint64_t>(head, 150000000);
    write_file_atomic(path, head);
    fs::resize_file(path, 8 + 150000000 + 64);
  }
  check_error([&] { read_safetensors(path); }, {"big_header.safetensors", "header length 150000000", "limit of 100000000"});
}

TEST_CASE("file-format errors are short and printable, never raw header bytes") {
  const std::vector<uint8_t> data(16, 0);
  auto st = [&](const std::string& header) {
    return error_of([bytes = safetensors_by_hand(header, data)] { parse_safetensors(bytes, "p.safetensors"); });
  };
  const std::string junk = std::string("\x01\x02\x1b[31m\x7f", 8) + std::string(5000, 'A');
  const std::string junk_json = R"(\u0001\u0002\u001b[31m\u007f)" + std::string(5000, 'A');  // the same, as JSON
  // Long and non-printable values are escaped and cut.
  std::string message = st(R"({"x": {"dtype": ")" + junk_json + R"(", "shape": [4], "data_offsets": [0, 16]}})");
  check_printable(message);
  CHECK(message.find("\\x01\\x02\\x1b[31m\\x7f") != std::string::npos);
  CHECK(message.find("...") != std::string::npos);
  message = st(R"({"x": {"dtype": "F32", "shape": [")" + junk_json + R"("], "data_offsets": [0, 16]}})");
  check_printable(message);
  CHECK(message.find("tensor 'x' shape: expected a non-negative integer, found string") != std::string::npos);
  std::string many = "1";
  for (int i = 0; i < 9999; ++i) many += ", 1";
  message = st(R"({"x": {"dtype": "F32", "shape": [)" + many + R"(], "data_offsets": [0, 16]}})");
  CHECK(message.find("span 16 bytes, expected 4") != std::string::npos);
  check_printable(message);  // a 10000-entry shape is shown in brief
  // Names with control characters or invalid UTF-8, keys of metadata.
  message = st(R"({"a)" + std::string("\x01", 1) + R"(b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})");
  check_printable(message);
  CHECK(message.find("tensor 'a\\x01b'") == std::string::npos);  // raw control bytes are not even valid JSON
  message = st(R"({"a\u0001b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}})");
  check_printable(message);
  CHECK(message.find("tensor 'a\\x01b'") != std::string::npos);
  message = st(R"({"__metadata__": {"k\u001b": 1}, "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})");
  check_printable(message);
  CHECK(message.find("entry 'k\\x1b'") != std::string::npos);
  // Invalid UTF-8 and parse errors: the reason, escaped, with the byte offset; no library prefix.
  message = st("{\"a\": \"\xff\xfe\"}");
  check_printable(message);
  CHECK(message.find("not valid JSON at byte") != std::string::npos);
  CHECK(message.find("[json.exception") == std::string::npos);
  message = st(R"({"x": )" + std::string(3000, '"'));
  check_printable(message);
  // Valid UTF-8 stays readable.
  message = st(R"({"é": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}})");
  check_printable(message);
  CHECK(message.find("tensor 'é'") != std::string::npos);

  // npy: descr and keys are escaped too.
  message = error_of([&] { parse_npy(npy_by_hand(1, npy_dict(junk, "(4,)"), data), "p.npy"); });
  check_printable(message);
  CHECK(message.find("\\x01\\x02") != std::string::npos);
  message = error_of([&] {
    parse_npy(npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), '" + junk + "': 1}", data), "p.npy");
  });
  check_printable(message);
  CHECK(message.find("unexpected key") != std::string::npos);

  CHECK(printable("ok") == "ok");
  CHECK(printable(std::string("a\0b", 3)) == "a\\x00b");
  CHECK(printable("\xc3\xa9\xff") == "\xc3\xa9\\xff");
  CHECK(printable("\xed\xa0\x80") == "\\xed\\xa0\\x80");  // a UTF-16 surrogate is not UTF-8
  CHECK(printable(std::string(300, 'x')) == std::string(200, 'x') + "...");
}

TEST_CASE("readers accept only regular files and check the size before reading the data") {
  TempDir dir;
  // Devices and FIFOs are refused without reading (reading /dev/zero never ends; opening a FIFO
  // blocks until a writer comes).
  check_error([] { read_npy("/dev/zero"); }, {"/dev/zero", "expected a regular file", "character device"});
  check_error([] { read_safetensors("/dev/zero"); }, {"/dev/zero", "expected a regular file", "character device"});
  const std::string fifo = dir.file("pipe.npy");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  check_error([&] { read_npy(fifo); }, {"pipe.npy", "expected a regular file", "FIFO"});
  check_error([&] { read_safetensors(fifo); }, {"pipe.npy", "FIFO"});
  check_error([&] { read_npy(dir.path.string()); }, {"expected a regular file", "directory"});
  check_error([&] { read_safetensors(dir.file("absent.safetensors")); }, {"absent.safetensors", "No such file"});

  // A header promising far more data than the file has is refused from the header alone.
  const std::string npy_path = dir.file("huge.npy");
  write_file_atomic(npy_path, npy_by_hand(1, npy_dict("<f8", "(1099511627776, 1024)"), {1, 2, 3}));
  check_error([&] { read_npy(npy_path); }, {"huge.npy", "expected 9007199254740992 bytes", "found 3", "truncated"});
  const std::string st_path = dir.file("huge.safetensors");
  write_file_atomic(st_path, safetensors_by_hand(
      R"({"x": {"dtype": "F64", "shape": [1099511627776, 1024], "data_offsets": [0, 9007199254740992]}})", {1, 2, 3}));
  check_error([&] { read_safetensors(st_path); }, {"huge.safetensors", "exceed the data buffer of 3 bytes"});

  // Valid files read from disk are identical to what was written, in every format path.
  RawArray a = random_array(DType::f64, {3, 5});
  write_npy(dir.file("a.npy"), a);
  RawArray back = read_npy(dir.file("a.npy"));
  CHECK(back.shape == a.shape);
  CHECK(back.bytes == a.bytes);
  SafetensorsFile f;
  f.metadata["m"] = "v";
  f.add("b", random_array(DType::bf16, {4, 2}));
  f.add("e", random_array(DType::i32, {0, 3}));
  f.add("s", random_array(DType::i64, {}));
  write_safetensors(dir.file("f.safetensors"), f);
  SafetensorsFile g = read_safetensors(dir.file("f.safetensors"));
  CHECK(g.metadata == f.metadata);
  REQUIRE(g.tensors.size() == 3);
  for (size_t i = 0; i < 3; ++i) {
    CHECK(g.tensors[i].first == f.tensors[i].first);
    CHECK(g.tensors[i].second.shape == f.tensors[i].second.shape);
    CHECK(g.tensors[i].second.bytes == f.tensors[i].second.bytes);
  }
}
