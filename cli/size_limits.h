#pragma once
// Up-front limits on sizes built from several flags, so that a product such as batch x sequence
// length x width cannot overflow (or ask for absurd memory) inside the library: each count is at
// most kMaxCount = 2^40 (numeric_flags.h), element counts of one tensor at most 2^40, and rough
// memory estimates at most kMaxBytes = 1 TiB. Products are formed in long double, so they cannot
// overflow themselves. Violations throw FlagError (exit code 2) naming the flags and the limit.
#include <cstdint>
#include <string>
#include <vector>

#include "cli/numeric_flags.h"

namespace longtape::cli {

constexpr long double kMaxBytes = 1024.0L * 1024.0L * 1024.0L * 1024.0L;  // 1 TiB

// One factor of a product: the flag it comes from and its value.
struct SizeTerm {
  std::string flag;
  int64_t value;
};

long double product(const std::vector<SizeTerm>& terms);
// "--batch 4 x --seq-len 256"
std::string terms_text(const std::vector<SizeTerm>& terms);
// "1.5 TiB", "3.2e+21 bytes"
std::string human_size(long double bytes);

// `what` (e.g. "tokens per step") = the product of `terms` must be at most kMaxCount.
void check_count(const std::string& what, const std::vector<SizeTerm>& terms);
// A memory estimate (`bytes`, derived from `terms`) must be at most kMaxBytes.
void check_memory(const std::string& what, long double bytes,
                  const std::vector<SizeTerm>& terms);

// Inputs of `longtape bench` (q, k, v and the output gradient, each batch x seq_len x heads x
// head_dim of `dtype_bytes`) for the largest value of every list: elements at most 2^40 and
// bytes at most 1 TiB.
void check_input_sizes(const std::vector<int64_t>& batches, const std::vector<int64_t>& seq_lens,
                       const std::vector<int64_t>& heads, const std::vector<int64_t>& head_dims, size_t dtype_bytes);

// Every value of a comma-separated integer list flag (already parsed) must be at most kMaxCount.
void check_list_bound(const std::vector<int64_t>& values, const std::string& flag);
// "HxW" of --grid: when given, H and W must be integers in [1, kMaxCount] with H * W <= kMaxCount.
void check_grid_text(const std::string& text, const std::string& flag);

}  // namespace longtape::cli
