#pragma once
// Errors: LT_CHECK for user errors (message says what was expected and what was given),
// LT_ASSERT for internal invariants. Never abort: callers and tests can catch these.
#include <sstream>
#include <stdexcept>
#include <string>

namespace longtape {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class OutOfMemoryError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace longtape

#define LT_CHECK(cond, ...)                                                     \
  do {                                                                          \
    if (!(cond)) throw ::longtape::Error(::longtape::detail::concat(__VA_ARGS__)); \
  } while (0)

#define LT_ASSERT(cond, ...)                                                              \
  do {                                                                                    \
    if (!(cond))                                                                          \
      throw ::longtape::Error(::longtape::detail::concat("internal error at ", __FILE__, ":", \
                                                         __LINE__, ": " #cond " ", ##__VA_ARGS__)); \
  } while (0)
