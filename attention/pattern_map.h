#pragma once
// Which (query, key) pairs an attention variant attends, read off the variant's own forward pass
// rather than re-derived from its definition, so a picture or a FLOP count cannot disagree with
// what the code computes.
//
// The probe: Q = K = 0 makes every attended key score 0, so each query spreads its weight
// uniformly over the multiset of keys it sees; with V = one-hot positions (V[k, h, k] = 1,
// head_dim >= N) the output row O[p, h, :] is that distribution itself. The row's lse is then
// log(number of keys counted with multiplicity), which turns weights back into multiplicities:
//   count(p, k) = O[p, k] / sum_k' O[p, k'] * exp(lse[p]).
// (Dividing by the row sum makes it independent of a constant output scale such as the 1/G of
// head_groups mixing.)
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/config.h"
#include "tensor/device.h"
#include "tensor/dtype.h"

namespace longtape::attention {

struct PatternMap {
  int64_t num_heads = 0;
  int64_t n = 0;
  // Index (h * n + p) * n + k: the weight the variant gave key k for query p of head h.
  std::vector<double> weights;
  // Same index: how many times query p attends key k (0 = not attended).
  std::vector<int> counts;

  int count(int64_t head, int64_t query, int64_t key) const;
  double weight(int64_t head, int64_t query, int64_t key) const;
  // The n * n counts of one head, row-major (query, key).
  std::vector<int> head_counts(int64_t head) const;
  // Attended pairs of one head, counted with multiplicity.
  int64_t pairs(int64_t head) const;
  // Attended pairs summed over heads.
  int64_t total_pairs() const;
  int max_count() const;
};

// The pattern of an existing module for a sequence of n tokens: needs head_dim >= n. Runs on the
// CPU without recording (in eval mode, restored afterwards) in float64, or float32 when the
// variant does not take float64. The module's parameters must be on the CPU.
PatternMap attention_pattern_map(Attention& attention, int64_t n);

// Builds variant `name` from `config` with head_dim = n and dropout 0, then as above.
PatternMap attention_pattern_map(const std::string& name, AttentionConfig config, int64_t n);

// Attended (query, key) pairs for one sequence of n tokens, summed over heads and counted with
// multiplicity, computed from the definitions in docs/attention.md (the same index lists the
// variants use), as the variant's registry entry declares them (attention/registry.h): dense,
// dilated (both mixing modes), block_sparse with a fixed pattern, and the wrappers hilbert, ring
// and head_parallel (the pairs of config.inner_variant: reordering and splitting over ranks do not
// change them). nullopt for any other variant or pattern (the adaptive one depends on data).
std::optional<int64_t> analytic_attended_pairs(const std::string& name, const AttentionConfig& config, int64_t n);

// The definitions behind the registry entries: dense, dilated, and block_sparse (nullopt for the
// adaptive pattern).
std::optional<int64_t> dense_attended_pairs(const AttentionConfig& config, int64_t n);
std::optional<int64_t> dilated_attended_pairs(const AttentionConfig& config, int64_t n);
std::optional<int64_t> block_sparse_attended_pairs(const AttentionConfig& config, int64_t n);

// The same counted by running the module once (batch 1, Q = K = V = 0, no recording) on `device`
// in `dtype`: every row's exp(lse) is its number of keys. Works for any variant, at the cost of
// one forward pass; parameters must be on `device`.
int64_t probed_attended_pairs(Attention& attention, int64_t n, DType dtype, Device device);

}  // namespace longtape::attention
