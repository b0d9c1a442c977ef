#include "attention/pattern_map.h"

#include <algorithm>
#include <cmath>

#include "attention/block_sparse.h"
#include "attention/patterns.h"
#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"

namespace longtape::attention {

namespace {

size_t map_index(const PatternMap& map, int64_t head, int64_t query, int64_t key) {
  LT_CHECK(head >= 0 && head < map.num_heads && query >= 0 && query < map.n && key >= 0 && key < map.n,
           "pattern map: (head, query, key) must lie in [0, ", map.num_heads, ") x [0, ", map.n, ") x [0, ", map.n,
           "), got (", head, ", ", query, ", ", key, ")");
  return static_cast<size_t>((head * map.n + query) * map.n + key);
}

// Restores the module's training flag when the probe is done (also on an exception).
class EvalScope {
 public:
  explicit EvalScope(Attention& attention) : attention_(attention), was_training_(attention.is_training()) {
    attention_.eval();
  }
  ~EvalScope() { attention_.train(was_training_); }
  EvalScope(const EvalScope&) = delete;
  EvalScope& operator=(const EvalScope&) = delete;

 private:
  Attention& attention_;
  bool was_training_;
};

// Pairs (p, k) with p in [q0, q1), k in [k0, k1), and k <= p when causal.
int64_t block_pair_count(int64_t q0, int64_t q1, int64_t k0, int64_t k1, bool causal) {
  if (q1 <= q0 || k1 <= k0) return 0;
  if (!causal) return (q1 - q0) * (k1 - k0);
  int64_t total = 0;
  for (int64_t p = q0; p < q1; ++p) total += std::max<int64_t>(0, std::min(k1, p + 1) - k0);
  return total;
}

// Pairs inside one stream of `length` tokens.
int64_t stream_pairs(int64_t length, bool causal) { return causal ? length * (length + 1) / 2 : length * length; }

int64_t branch_pairs(int64_t n, const DilatedBranch& branch, int64_t offset, bool causal) {
  int64_t total = 0;
  for (const auto& stream : dilated_streams(n, branch.segment, branch.dilation, offset))
    total += stream_pairs(static_cast<int64_t>(stream.size()), causal);
  return total;
}

}  // namespace

int PatternMap::count(int64_t head, int64_t query, int64_t key) const { return counts[map_index(*this, head, query, key)]; }

double PatternMap::weight(int64_t head, int64_t query, int64_t key) const {
  return weights[map_index(*this, head, query, key)];
}

std::vector<int> PatternMap::head_counts(int64_t head) const {
  const size_t begin = map_index(*this, head, 0, 0);
  return std::vector<int>(counts.begin() + static_cast<std::ptrdiff_t>(begin),
                          counts.begin() + static_cast<std::ptrdiff_t>(begin + static_cast<size_t>(n * n)));
}

int64_t PatternMap::pairs(int64_t head) const {
  int64_t total = 0;
  for (int c : head_counts(head)) total += c;
  return total;
}

int64_t PatternMap::total_pairs() const {
  int64_t total = 0;
  for (int c : counts) total += c;
  return total;
}

int PatternMap::max_count() const {
  int best = 0;
  for (int c : counts) best = std::max(best, c);
  return best;
}

PatternMap attention_pattern_map(Attention& attention, int64_t n) {
  const AttentionConfig& config = attention.config();
  const int64_t heads = config.num_heads, dim = config.head_dim;
  LT_CHECK(n >= 1, "pattern map: the sequence length must be >= 1, got ", n);
  LT_CHECK(dim >= n, "pattern map: needs head_dim >= N (the values are one-hot positions), got head_dim = ", dim,
           " for N = ", n);
  for (const Tensor& p : attention.parameters())
    LT_CHECK(p.device().is_cpu(), "pattern map: the module's parameters must be on the CPU, found one on ",
             p.device().str());

  std::vector<double> values(static_cast<size_t>(n * heads * dim), 0.0);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t h = 0; h < heads; ++h) values[static_cast<size_t>((p * heads + h) * dim + p)] = 1.0;
  const Tensor v64 = Tensor::from_vector(values, {1, n, heads, dim});
  const Tensor zeros64 = Tensor::zeros({1, n, heads, dim}, DType::f64);

  EvalScope eval(attention);
  NoGradGuard no_grad;
  AttentionOutput result;
  try {
    result = attention.forward_with_lse(zeros64, zeros64, v64);
  } catch (const Error&) {
    // A variant without a float64 path: float32 represents these weights to ~1e-7, enough to
    // tell multiplicities apart.
    const Tensor zeros32 = zeros64.to(DType::f32);
    result = attention.forward_with_lse(zeros32, zeros32, v64.to(DType::f32));
  }
  LT_CHECK(result.out.shape() == Shape({1, n, heads, dim}), "pattern map: expected the output shape ",
           shape_str({1, n, heads, dim}), ", got ", shape_str(result.out.shape()));
  LT_CHECK(result.lse.shape() == Shape({1, heads, n}), "pattern map: expected the lse shape ",
           shape_str({1, heads, n}), ", got ", shape_str(result.lse.shape()));
  const std::vector<double> out = result.out.to(Device::cpu()).to_vector();
  const std::vector<double> lse = result.lse.to(Device::cpu()).to_vector();

  PatternMap map;
  map.num_heads = heads;
  map.n = n;
  map.weights.assign(static_cast<size_t>(heads * n * n), 0.0);
  map.counts.assign(static_cast<size_t>(heads * n * n), 0);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t p = 0; p < n; ++p) {
      const double row_lse = lse[static_cast<size_t>(h * n + p)];
      auto out_at = [&](int64_t k) { return out[static_cast<size_t>((p * heads + h) * dim + k)]; };
      double row_sum = 0.0;
      for (int64_t k = 0; k < n; ++k) row_sum += out_at(k);
      const double keys = std::isfinite(row_lse) ? std::exp(row_lse) : 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const double w = out_at(k);
        const size_t at = static_cast<size_t>((h * n + p) * n + k);
        map.weights[at] = w;
        // Weights below 1e-6 of the row are numerical noise, not an attended key (a key counted
        // once among N has weight 1/N of the row).
        if (keys > 0.0 && row_sum != 0.0 && std::abs(w) > 1e-6 * std::abs(row_sum))
          map.counts[at] = std::max(1, static_cast<int>(std::lround(w / row_sum * keys)));
      }
    }
  }
  return map;
}

PatternMap attention_pattern_map(const std::string& name, AttentionConfig config, int64_t n) {
  LT_CHECK(n >= 1, "pattern map: the sequence length must be >= 1, got ", n);
  config.head_dim = n;
  config.dropout = 0.0;
  std::shared_ptr<Attention> attention = make_attention(name, config);
  return attention_pattern_map(*attention, n);
}

std::optional<int64_t> dense_attended_pairs(const AttentionConfig& config, int64_t n) {
  return config.num_heads * stream_pairs(n, config.causal);
}

std::optional<int64_t> dilated_attended_pairs(const AttentionConfig& config, int64_t n) {
  LT_CHECK(config.segment_lengths.size() == config.dilation_rates.size(),
           "attended pairs: segment_lengths and dilation_rates must have the same length, got ",
           config.segment_lengths.size(), " and ", config.dilation_rates.size());
  std::vector<DilatedBranch> branches;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i)
    branches.push_back({config.segment_lengths[i], config.dilation_rates[i]});
  validate_branches(branches);
  int64_t total = 0;
  if (config.mixing == Mixing::lse) {
    for (int64_t h = 0; h < config.num_heads; ++h)
      for (const DilatedBranch& b : branches) total += branch_pairs(n, b, lse_head_offset(h, b.dilation), config.causal);
  } else {
    const int groups = static_cast<int>(branches.size());
    for (int64_t h = 0; h < config.num_heads; ++h) {
      const int g = head_group_of(static_cast<int>(h), static_cast<int>(config.num_heads), groups);
      const DilatedBranch& b = branches[static_cast<size_t>(g)];
      total += branch_pairs(n, b, g % b.dilation, config.causal);
    }
  }
  return total;
}

std::optional<int64_t> block_sparse_attended_pairs(const AttentionConfig& config, int64_t n) {
  if (config.pattern == "adaptive") return std::nullopt;  // the kept blocks depend on the data
  BlockSparseAttention attention(config);
  const std::vector<BlockLists> patterns = attention.head_patterns(n);
  LT_CHECK(!patterns.empty(), "attended pairs: block_sparse returned no pattern");
  const int64_t bs = config.block_size;
  int64_t total = 0;
  for (int64_t h = 0; h < config.num_heads; ++h) {
    const BlockLists& lists = patterns.size() == 1 ? patterns[0] : patterns[static_cast<size_t>(h)];
    for (size_t qi = 0; qi < lists.size(); ++qi) {
      const int64_t q0 = static_cast<int64_t>(qi) * bs, q1 = std::min(n, q0 + bs);
      for (int64_t kj : lists[qi]) total += block_pair_count(q0, q1, kj * bs, std::min(n, (kj + 1) * bs), config.causal);
    }
  }
  return total;
}

std::optional<int64_t> analytic_attended_pairs(const std::string& name, const AttentionConfig& config, int64_t n) {
  LT_CHECK(n >= 0, "attended pairs: the sequence length must be >= 0, got ", n);
  const std::optional<VariantTraits> traits = find_variant_traits(name);
  if (!traits) return std::nullopt;
  if (traits->wraps_inner_variant) {
    // These run the inner variant on a reordered or split sequence: the same pairs.
    if (config.inner_variant == name) return std::nullopt;
    return analytic_attended_pairs(config.inner_variant, config, n);
  }
  if (!traits->attended_pairs) return std::nullopt;
  return traits->attended_pairs(config, n);
}

int64_t probed_attended_pairs(Attention& attention, int64_t n, DType dtype, Device device) {
  const AttentionConfig& config = attention.config();
  LT_CHECK(n >= 1, "attended pairs: the sequence length must be >= 1, got ", n);
  const Tensor zeros = Tensor::zeros({1, n, config.num_heads, config.head_dim}, dtype, device);
  EvalScope eval(attention);
  NoGradGuard no_grad;
  const std::vector<double> lse = attention.forward_with_lse(zeros, zeros, zeros).lse.to(Device::cpu()).to_vector();
  int64_t total = 0;
  for (double row : lse)
    if (std::isfinite(row)) total += std::llround(std::exp(row));
  return total;
}

}  // namespace longtape::attention
