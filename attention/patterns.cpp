#include "attention/patterns.h"

#include <algorithm>
#include <cmath>

#include "attention/hilbert.h"
#include "tensor/error.h"

namespace longtape::attention {

// ---------------------------------------------------------------------------------------------
// Dilated attention

void validate_branches(const std::vector<DilatedBranch>& branches) {
  LT_CHECK(!branches.empty(), "dilated attention needs at least one branch (segment, dilation), ",
           "got none");
  for (size_t i = 0; i < branches.size(); ++i) {
    LT_CHECK(branches[i].segment > 0, "dilated attention: segment length of branch ", i,
             " must be > 0, got ", branches[i].segment);
    LT_CHECK(branches[i].dilation > 0, "dilated attention: dilation rate of branch ", i,
             " must be > 0, got ", branches[i].dilation);
  }
}

int64_t effective_segment(int64_t n, int64_t segment) {
  LT_CHECK(n >= 0, "sequence length must be >= 0, got ", n);
  LT_CHECK(segment > 0, "segment length must be > 0, got ", segment);
  return std::min(segment, n);
}

int64_t num_segments(int64_t n, int64_t segment) {
  const int64_t w = effective_segment(n, segment);
  return w == 0 ? 0 : (n + w - 1) / w;
}

std::vector<std::vector<int64_t>> dilated_streams(int64_t n, int64_t segment, int64_t dilation,
                                                  int64_t offset) {
  LT_CHECK(dilation > 0, "dilation rate must be > 0, got ", dilation);
  LT_CHECK(offset >= 0 && offset < dilation, "stream offset must be in [0, dilation = ", dilation,
           "), got ", offset);
  const int64_t w = effective_segment(n, segment);
  const int64_t count = num_segments(n, segment);
  std::vector<std::vector<int64_t>> streams(static_cast<size_t>(count));
  for (int64_t t = 0; t < count; ++t) {
    const int64_t begin = t * w;
    const int64_t end = std::min(begin + w, n);
    for (int64_t p = begin + offset; p < end; p += dilation) streams[t].push_back(p);
  }
  return streams;
}

int64_t lse_head_offset(int64_t head, int64_t dilation) {
  LT_CHECK(head >= 0, "head index must be >= 0, got ", head);
  LT_CHECK(dilation > 0, "dilation rate must be > 0, got ", dilation);
  return head % dilation;
}

// ---------------------------------------------------------------------------------------------
// Head groups

namespace {
void check_groups(int num_heads, int num_groups) {
  LT_CHECK(num_groups >= 1, "number of head groups must be >= 1, got ", num_groups);
  LT_CHECK(num_heads >= num_groups, "head_groups mixing needs H >= G (number of branches): got H = ",
           num_heads, ", G = ", num_groups);
}
}  // namespace

std::vector<int> head_group_sizes(int num_heads, int num_groups) {
  check_groups(num_heads, num_groups);
  std::vector<int> sizes(static_cast<size_t>(num_groups), num_heads / num_groups);
  for (int g = 0; g < num_heads % num_groups; ++g) ++sizes[g];
  return sizes;
}

int head_group_start(int group, int num_heads, int num_groups) {
  check_groups(num_heads, num_groups);
  LT_CHECK(group >= 0 && group < num_groups, "head group must be in [0, ", num_groups, "), got ",
           group);
  const int base = num_heads / num_groups;
  const int larger = num_heads % num_groups;  // the first `larger` groups have base + 1 heads
  return group * base + std::min(group, larger);
}

int head_group_of(int head, int num_heads, int num_groups) {
  check_groups(num_heads, num_groups);
  LT_CHECK(head >= 0 && head < num_heads, "head must be in [0, ", num_heads, "), got ", head);
  const int base = num_heads / num_groups;
  const int larger = num_heads % num_groups;
  const int heads_in_larger = larger * (base + 1);
  if (head < heads_in_larger) return head / (base + 1);
  return larger + (head - heads_in_larger) / base;
}

// ---------------------------------------------------------------------------------------------
// Block-sparse patterns

std::string_view to_string(BlockPattern pattern) {
  switch (pattern) {
    case BlockPattern::all: return "all";
    case BlockPattern::local_window: return "local_window";
    case BlockPattern::dilated: return "dilated";
    case BlockPattern::global_local: return "global_local";
    case BlockPattern::random: return "random";
  }
  LT_ASSERT(false, "unknown BlockPattern");
  return "";
}

const std::vector<BlockPattern>& all_block_patterns() {
  static const std::vector<BlockPattern> patterns{BlockPattern::all, BlockPattern::local_window,
                                                  BlockPattern::dilated, BlockPattern::global_local,
                                                  BlockPattern::random};
  return patterns;
}

BlockPattern parse_block_pattern(std::string_view name) {
  for (BlockPattern p : all_block_patterns())
    if (to_string(p) == name) return p;
  LT_CHECK(false, "block pattern must be one of all, local_window, dilated, global_local, random; ",
           "got '", name, "'");
  return BlockPattern::all;
}

void validate(const BlockPatternOptions& o) {
  LT_CHECK(o.block_size > 0, "block_size must be > 0, got ", o.block_size);
  LT_CHECK(o.window >= 0, "window (tokens) must be >= 0, got ", o.window);
  LT_CHECK(o.global_blocks >= 0, "global_blocks must be >= 0, got ", o.global_blocks);
  LT_CHECK(std::isfinite(o.density) && o.density > 0.0 && o.density <= 1.0,
           "density must be in (0, 1], got ", o.density);
  for (int64_t r : o.dilation_rates)
    LT_CHECK(r > 0, "block dilation rates must be > 0, got ", r);
}

int64_t num_blocks_for(int64_t n, int64_t block_size) {
  LT_CHECK(n >= 0, "sequence length must be >= 0, got ", n);
  LT_CHECK(block_size > 0, "block_size must be > 0, got ", block_size);
  return (n + block_size - 1) / block_size;
}

int64_t local_window_blocks(const BlockPatternOptions& options) {
  validate(options);
  return options.window / options.block_size / 2;
}

int64_t random_blocks_per_row(int64_t num_blocks, double density) {
  LT_CHECK(num_blocks >= 0, "num_blocks must be >= 0, got ", num_blocks);
  LT_CHECK(std::isfinite(density) && density > 0.0 && density <= 1.0,
           "density must be in (0, 1], got ", density);
  const int64_t kept = std::llround(density * static_cast<double>(num_blocks));
  return std::clamp<int64_t>(kept, 1, std::max<int64_t>(num_blocks, 1));
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t keyed_uniform(uint64_t key, uint64_t counter, uint64_t bound) {
  LT_ASSERT(bound > 0);
  // Mixing the key and the counter in two rounds keeps nearby (key, counter) pairs unrelated.
  return splitmix64(splitmix64(key) ^ (counter * 0xD1B54A32D192ED03ull)) % bound;
}

namespace {

std::vector<int64_t> random_row(int64_t row, int64_t num_blocks, const BlockPatternOptions& o,
                                int64_t head) {
  // Candidates other than the diagonal: J < I when causal, every J != I otherwise.
  std::vector<int64_t> others;
  const int64_t limit = o.causal ? row + 1 : num_blocks;
  for (int64_t j = 0; j < limit; ++j)
    if (j != row) others.push_back(j);
  const int64_t wanted =
      std::min<int64_t>(random_blocks_per_row(num_blocks, o.density) - 1,
                        static_cast<int64_t>(others.size()));
  // Partial Fisher-Yates: the first `wanted` entries become a uniform random subset.
  const uint64_t key = splitmix64(splitmix64(o.seed) ^ static_cast<uint64_t>(head)) ^
                       splitmix64(static_cast<uint64_t>(row) + 0x632BE59BD9B4E019ull);
  for (int64_t i = 0; i < wanted; ++i) {
    const uint64_t remaining = static_cast<uint64_t>(others.size()) - static_cast<uint64_t>(i);
    const int64_t pick = i + static_cast<int64_t>(keyed_uniform(key, static_cast<uint64_t>(i), remaining));
    std::swap(others[i], others[pick]);
  }
  std::vector<int64_t> kept(others.begin(), others.begin() + wanted);
  kept.push_back(row);
  std::sort(kept.begin(), kept.end());
  return kept;
}

}  // namespace

BlockLists block_pattern(BlockPattern pattern, int64_t num_blocks,
                         const BlockPatternOptions& options, int64_t head) {
  validate(options);
  LT_CHECK(num_blocks >= 0, "num_blocks must be >= 0, got ", num_blocks);
  LT_CHECK(head >= 0, "head index must be >= 0, got ", head);
  const int64_t window_blocks = options.window / options.block_size / 2;
  BlockLists lists(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) {
    std::vector<int64_t>& row = lists[i];
    if (pattern == BlockPattern::random) {
      row = random_row(i, num_blocks, options, head);
      continue;
    }
    for (int64_t j = 0; j < num_blocks; ++j) {
      const int64_t distance = i > j ? i - j : j - i;
      bool active = false;
      switch (pattern) {
        case BlockPattern::all: active = true; break;
        case BlockPattern::local_window: active = distance <= window_blocks; break;
        case BlockPattern::dilated:
          active = distance == 0 ||
                   std::find(options.dilation_rates.begin(), options.dilation_rates.end(),
                             distance) != options.dilation_rates.end();
          break;
        case BlockPattern::global_local:
          active = i < options.global_blocks || j < options.global_blocks ||
                   distance <= window_blocks;
          break;
        case BlockPattern::random: break;
      }
      if (active && !(options.causal && j > i)) row.push_back(j);
    }
  }
  return lists;
}

int64_t count_pairs(const BlockLists& pattern) {
  int64_t total = 0;
  for (const auto& row : pattern) total += static_cast<int64_t>(row.size());
  return total;
}

std::vector<std::pair<int64_t, int64_t>> natural_block_schedule(const BlockLists& pattern) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(static_cast<size_t>(count_pairs(pattern)));
  for (size_t i = 0; i < pattern.size(); ++i)
    for (int64_t j : pattern[i]) pairs.emplace_back(static_cast<int64_t>(i), j);
  return pairs;
}

std::vector<std::pair<int64_t, int64_t>> hilbert_block_schedule(const BlockLists& pattern) {
  int64_t extent = static_cast<int64_t>(pattern.size());
  for (const auto& row : pattern)
    for (int64_t j : row) {
      LT_CHECK(j >= 0, "block pattern has a negative key block ", j);
      extent = std::max(extent, j + 1);
    }
  int64_t side = 1;
  while (side < extent) side *= 2;
  std::vector<std::pair<uint64_t, std::pair<int64_t, int64_t>>> keyed;
  for (const auto& pair : natural_block_schedule(pattern))
    keyed.push_back({hilbert_index(side, pair.second, pair.first), pair});
  std::sort(keyed.begin(), keyed.end());
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(keyed.size());
  for (const auto& entry : keyed) pairs.push_back(entry.second);
  return pairs;
}

}  // namespace longtape::attention
