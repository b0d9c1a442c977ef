#pragma once
// Overflow-checked size arithmetic. Every size that comes from a file, a flag or a config is
// multiplied through these helpers: on overflow or a negative operand they throw longtape::Error
// naming the quantity, the values and the limit, instead of wrapping around silently.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "tensor/error.h"

namespace longtape::checked {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

namespace detail {
// Shape as "(2, 3)", at most ~200 characters (hostile shapes can have millions of entries).
inline std::string short_shape(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    if (s.size() > 200) {
      s += "... ";
      s += std::to_string(shape.size() - i);
      s += " more";
      break;
    }
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

[[noreturn, gnu::noinline, gnu::cold]] inline void throw_mul(std::string_view what, int64_t a, int64_t b) {
  if (a < 0 || b < 0)
    throw Error(::longtape::detail::concat(what, ": expected non-negative sizes, got ", a, " * ", b));
  throw Error(::longtape::detail::concat(what, ": ", a, " * ", b, " overflows int64 (limit ", kInt64Max, ")"));
}

[[noreturn, gnu::noinline, gnu::cold]] inline void throw_add(std::string_view what, int64_t a, int64_t b) {
  if (a < 0 || b < 0)
    throw Error(::longtape::detail::concat(what, ": expected non-negative sizes, got ", a, " + ", b));
  throw Error(::longtape::detail::concat(what, ": ", a, " + ", b, " overflows int64 (limit ", kInt64Max, ")"));
}

[[noreturn, gnu::noinline, gnu::cold]] inline void throw_negative_dim(std::string_view what,
                                                                      const std::vector<int64_t>& shape,
                                                                      size_t axis) {
  throw Error(::longtape::detail::concat(what, ": expected non-negative dimensions, got ", shape[axis],
                                         " at axis ", axis, " of shape ", short_shape(shape)));
}

[[noreturn, gnu::noinline, gnu::cold]] inline void throw_shape_overflow(std::string_view what,
                                                                        const std::vector<int64_t>& shape,
                                                                        size_t axis) {
  throw Error(::longtape::detail::concat(
      what, ": shape ", short_shape(shape), " overflows 64 bits: the product of its non-zero dimensions up to axis ",
      axis, " exceeds the limit ", kInt64Max));
}

[[noreturn, gnu::noinline, gnu::cold]] inline void throw_bytes_overflow(std::string_view what,
                                                                        const std::vector<int64_t>& shape,
                                                                        int64_t product, size_t item_size) {
  throw Error(::longtape::detail::concat(what, ": byte size of shape ", short_shape(shape), " (", product,
                                         " elements of ", item_size, " bytes) overflows 64 bits (limit ",
                                         kInt64Max, " bytes)"));
}
}  // namespace detail

// a * b for sizes; throws unless both are >= 0 and the product fits in int64.
inline int64_t mul(int64_t a, int64_t b, std::string_view what) {
  int64_t out;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) detail::throw_mul(what, a, b);
  return out;
}

// a + b for sizes; throws unless both are >= 0 and the sum fits in int64.
inline int64_t add(int64_t a, int64_t b, std::string_view what) {
  int64_t out;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &out)) detail::throw_add(what, a, b);
  return out;
}

// Largest product of the non-zero dimensions of `shape` (the element count if no dim is 0);
// throws on a negative dimension or when any partial product of the non-zero dimensions overflows
// int64. A zero dimension does not excuse the others: (0, 2^62, 2^62) is refused, since its
// strides could not be represented either.
inline int64_t nonzero_product(const std::vector<int64_t>& shape, std::string_view what) {
  int64_t product = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    const int64_t d = shape[i];
    if (d < 0) detail::throw_negative_dim(what, shape, i);
    if (d != 0 && __builtin_mul_overflow(product, d, &product)) detail::throw_shape_overflow(what, shape, i);
  }
  return product;
}

// Element count of `shape` (1 for the empty shape), with the checks of nonzero_product.
inline int64_t numel(const std::vector<int64_t>& shape, std::string_view what) {
  const int64_t product = nonzero_product(shape, what);
  for (int64_t d : shape)
    if (d == 0) return 0;
  return product;
}

// Element count, also requiring that the byte size (non-zero product * item_size) fits in int64.
inline int64_t numel_for_bytes(const std::vector<int64_t>& shape, size_t item_size, std::string_view what) {
  const int64_t product = nonzero_product(shape, what);
  int64_t bytes;
  if (item_size > static_cast<size_t>(kInt64Max) ||
      __builtin_mul_overflow(product, static_cast<int64_t>(item_size), &bytes))
    detail::throw_bytes_overflow(what, shape, product, item_size);
  for (int64_t d : shape)
    if (d == 0) return 0;
  return product;
}

}  // namespace longtape::checked
