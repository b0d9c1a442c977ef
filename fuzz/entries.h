#pragma once
// Entry functions of the fuzz targets (fuzz/fuzz_*.cpp) and of the corpus replay test
// (tests/test_fuzz_corpus.cpp). Each parses arbitrary bytes the way a hostile file or command line
// would reach the library, and on success checks what it parsed (round trips, ranges). It returns
// normally or throws one of the errors bad input is meant to produce (longtape::Error, or
// cli::FlagError for flag values); anything else -- a crash, a sanitizer report, another exception
// (FuzzInvariantError when a check fails) -- is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

namespace longtape::fuzz {

// Raised when parsed input breaks an invariant (e.g. a round trip changes the array).
class FuzzInvariantError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// The bytes as a .npy file: parse_npy, then serialize and parse again (must give the same array).
void npy_entry(const uint8_t* data, size_t size);
// The bytes as a .safetensors file (also what a checkpoint is): parse, serialize, parse again.
void safetensors_entry(const uint8_t* data, size_t size);
// The first byte picks a parser of command-line values, the rest is the value text: the strict
// integer and real flag checks (directly and through CLI11 with their validators), integer lists
// (--segments), HxW grids (--grid), device, dtype and mixing names.
void flags_entry(const uint8_t* data, size_t size);

}  // namespace longtape::fuzz
