#pragma once
// Float64 brute-force reference for every attention variant (docs/attention.md, brute-force
// oracle). A variant is reduced to one N x N multiplicity mask per head (how many times query p
// reaches key k), then P = M * exp(S - m) / rowsum(M * exp(S - m)), O = P V, and the gradients
// follow the closed-form softmax backward. Deliberately slow and simple: O(B H N^2 D), no tiling,
// no tensors, so that it can be trusted as the ground truth for the composed and fused paths.
//
// Layouts: q, k, v, out, dout, dq, dk, dv are (B, N, H, D) row-major; lse is (B, H, N);
// bias and dbias are (B, H, N, N). Header-only (needs attention/patterns.cpp from the library).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "attention/patterns.h"
#include "tensor/error.h"

namespace longtape::oracle {

using attention::BlockLists;
using attention::BlockPattern;
using attention::BlockPatternOptions;
using attention::DilatedBranch;

// ---------------------------------------------------------------------------------------------
// Masks

// counts[p * n + k] = how many times query p sees key k (0 = masked).
struct MultiplicityMask {
  int64_t n = 0;
  std::vector<int> counts;

  MultiplicityMask() = default;
  explicit MultiplicityMask(int64_t size) : n(size), counts(static_cast<size_t>(size * size), 0) {
    LT_CHECK(size >= 0, "mask size must be >= 0, got ", size);
  }
  int& at(int64_t p, int64_t k) { return counts[static_cast<size_t>(p * n + k)]; }
  int at(int64_t p, int64_t k) const { return counts[static_cast<size_t>(p * n + k)]; }
  bool row_empty(int64_t p) const {
    for (int64_t k = 0; k < n; ++k)
      if (at(p, k) != 0) return false;
    return true;
  }
  int64_t empty_rows() const {
    int64_t count = 0;
    for (int64_t p = 0; p < n; ++p) count += row_empty(p) ? 1 : 0;
    return count;
  }
  // True when no query sees a later key.
  bool is_causal() const {
    for (int64_t p = 0; p < n; ++p)
      for (int64_t k = p + 1; k < n; ++k)
        if (at(p, k) != 0) return false;
    return true;
  }
  int max_count() const {
    int best = 0;
    for (int c : counts) best = c > best ? c : best;
    return best;
  }
  bool operator==(const MultiplicityMask&) const = default;
};

// One mask per head, or one per (b, h) with index b * H + h.
using HeadMasks = std::vector<MultiplicityMask>;

inline MultiplicityMask dense_mask(int64_t n, bool causal) {
  MultiplicityMask mask(n);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t k = 0; k < n; ++k) mask.at(p, k) = (!causal || k <= p) ? 1 : 0;
  return mask;
}

inline HeadMasks repeat_heads(const MultiplicityMask& mask, int64_t num_heads) {
  LT_CHECK(num_heads >= 1, "number of heads must be >= 1, got ", num_heads);
  return HeadMasks(static_cast<size_t>(num_heads), mask);
}

// Adds 1 for every (query, key) pair inside the same stream (key <= query when causal).
inline void add_streams(MultiplicityMask& mask, const std::vector<std::vector<int64_t>>& streams,
                        bool causal) {
  for (const auto& stream : streams)
    for (int64_t p : stream)
      for (int64_t k : stream)
        if (!causal || k <= p) mask.at(p, k) += 1;
}

// Stream co-membership of one branch at one offset.
inline MultiplicityMask branch_mask(int64_t n, const DilatedBranch& branch, int64_t offset,
                                    bool causal) {
  MultiplicityMask mask(n);
  add_streams(mask, attention::dilated_streams(n, branch.segment, branch.dilation, offset), causal);
  return mask;
}

// mixing = lse: head h sums, over branches, the co-membership of its stream at offset
// h mod r_i. A key reached by two branches counts twice.
inline HeadMasks dilated_lse_mask(int64_t n, int64_t num_heads,
                                  const std::vector<DilatedBranch>& branches, bool causal) {
  attention::validate_branches(branches);
  LT_CHECK(num_heads >= 1, "number of heads must be >= 1, got ", num_heads);
  HeadMasks masks;
  for (int64_t h = 0; h < num_heads; ++h) {
    MultiplicityMask mask(n);
    for (const auto& branch : branches)
      add_streams(mask,
                  attention::dilated_streams(n, branch.segment, branch.dilation,
                                             attention::lse_head_offset(h, branch.dilation)),
                  causal);
    masks.push_back(std::move(mask));
  }
  return masks;
}

// mixing = head_groups: head h in group i sees only branch i at offset i mod r_i.
// Use with out_scale = head_groups_out_scale(branches); uncovered rows are empty, hence zero.
inline HeadMasks dilated_head_groups_mask(int64_t n, int64_t num_heads,
                                          const std::vector<DilatedBranch>& branches, bool causal) {
  attention::validate_branches(branches);
  const int groups = static_cast<int>(branches.size());
  HeadMasks masks;
  for (int64_t h = 0; h < num_heads; ++h) {
    const int group = attention::head_group_of(static_cast<int>(h), static_cast<int>(num_heads), groups);
    const DilatedBranch& branch = branches[static_cast<size_t>(group)];
    masks.push_back(branch_mask(n, branch, group % branch.dilation, causal));
  }
  return masks;
}

inline double head_groups_out_scale(const std::vector<DilatedBranch>& branches) {
  attention::validate_branches(branches);
  return 1.0 / static_cast<double>(branches.size());
}

// Block-sparse: (p, k) is active when (p / block_size, k / block_size) is a pair of the
// pattern; causal additionally masks k > p inside blocks.
inline MultiplicityMask block_mask(const BlockLists& pattern, int64_t block_size, int64_t n,
                                   bool causal) {
  LT_CHECK(block_size > 0, "block_size must be > 0, got ", block_size);
  const int64_t blocks = attention::num_blocks_for(n, block_size);
  LT_CHECK(static_cast<int64_t>(pattern.size()) == blocks, "block pattern has ", pattern.size(),
           " query blocks but N = ", n, " with block_size ", block_size, " needs ", blocks);
  MultiplicityMask mask(n);
  for (int64_t qi = 0; qi < blocks; ++qi)
    for (int64_t kj : pattern[static_cast<size_t>(qi)]) {
      LT_CHECK(kj >= 0 && kj < blocks, "key block ", kj, " outside [0, ", blocks, ")");
      for (int64_t p = qi * block_size; p < std::min(n, (qi + 1) * block_size); ++p)
        for (int64_t k = kj * block_size; k < std::min(n, (kj + 1) * block_size); ++k)
          if (!causal || k <= p) mask.at(p, k) = 1;
    }
  return mask;
}

inline HeadMasks block_mask(const std::vector<BlockLists>& per_head, int64_t block_size, int64_t n,
                            bool causal) {
  HeadMasks masks;
  for (const auto& pattern : per_head) masks.push_back(block_mask(pattern, block_size, n, causal));
  return masks;
}

// The masks of a named pattern for every head (random draws per head), causal from options.
inline HeadMasks block_pattern_masks(BlockPattern pattern, int64_t n, int64_t num_heads,
                                     const BlockPatternOptions& options) {
  const int64_t blocks = attention::num_blocks_for(n, options.block_size);
  std::vector<BlockLists> per_head;
  for (int64_t h = 0; h < num_heads; ++h)
    per_head.push_back(attention::block_pattern(pattern, blocks, options, h));
  return block_mask(per_head, options.block_size, n, options.causal);
}

// ---------------------------------------------------------------------------------------------
// Forward and backward

struct ForwardResult {
  std::vector<double> out;  // (B, N, H, D), already multiplied by out_scale
  std::vector<double> lse;  // (B, H, N), -inf for rows with no keys
};

struct Gradients {
  std::vector<double> dq, dk, dv;  // (B, N, H, D)
  std::vector<double> dbias;       // (B, H, N, N); empty unless a bias was given
};

namespace detail {

struct Dims {
  int64_t B, N, H, D;
  size_t index(int64_t b, int64_t n, int64_t h, int64_t d) const {
    return static_cast<size_t>(((b * N + n) * H + h) * D + d);
  }
  size_t pair(int64_t b, int64_t h, int64_t p, int64_t k) const {
    return static_cast<size_t>(((b * H + h) * N + p) * N + k);
  }
};

inline void check_inputs(const Dims& s, const std::vector<double>& q, const std::vector<double>& k,
                         const std::vector<double>& v, const HeadMasks& masks,
                         const std::vector<double>* bias, double scale, double out_scale) {
  LT_CHECK(s.B >= 1 && s.N >= 0 && s.H >= 1 && s.D >= 1, "oracle: need B, H, D >= 1 and N >= 0, got B=",
           s.B, " N=", s.N, " H=", s.H, " D=", s.D);
  const size_t size = static_cast<size_t>(s.B * s.N * s.H * s.D);
  LT_CHECK(q.size() == size && k.size() == size && v.size() == size,
           "oracle: q, k, v must hold B*N*H*D = ", size, " values, got ", q.size(), ", ", k.size(),
           ", ", v.size());
  LT_CHECK(masks.size() == static_cast<size_t>(s.H) || masks.size() == static_cast<size_t>(s.B * s.H),
           "oracle: need one mask per head (", s.H, ") or per (batch, head) (", s.B * s.H, "), got ",
           masks.size());
  for (const auto& mask : masks)
    LT_CHECK(mask.n == s.N && mask.counts.size() == static_cast<size_t>(s.N * s.N),
             "oracle: every mask must be ", s.N, "x", s.N, ", got n = ", mask.n);
  if (bias)
    LT_CHECK(bias->size() == static_cast<size_t>(s.B * s.H * s.N * s.N),
             "oracle: bias must hold B*H*N*N = ", s.B * s.H * s.N * s.N, " values, got ", bias->size());
  LT_CHECK(std::isfinite(scale) && std::isfinite(out_scale), "oracle: scale and out_scale must be finite");
}

inline const MultiplicityMask& mask_for(const HeadMasks& masks, int64_t b, int64_t h, int64_t H) {
  return masks.size() == static_cast<size_t>(H) ? masks[static_cast<size_t>(h)]
                                                : masks[static_cast<size_t>(b * H + h)];
}

// Softmax probabilities P (N x N, zero where masked) and row lse of one (b, h).
inline void probabilities(const Dims& s, const std::vector<double>& q, const std::vector<double>& k,
                          const MultiplicityMask& mask, const std::vector<double>* bias, double scale,
                          int64_t b, int64_t h, std::vector<double>& prob, std::vector<double>& lse) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  prob.assign(static_cast<size_t>(s.N * s.N), 0.0);
  lse.assign(static_cast<size_t>(s.N), neg_inf);
  std::vector<double> logits(static_cast<size_t>(s.N));
  for (int64_t p = 0; p < s.N; ++p) {
    double row_max = neg_inf;
    for (int64_t j = 0; j < s.N; ++j) {
      if (mask.at(p, j) == 0) continue;
      double dot = 0.0;
      for (int64_t d = 0; d < s.D; ++d) dot += q[s.index(b, p, h, d)] * k[s.index(b, j, h, d)];
      double logit = dot * scale;
      if (bias) logit += (*bias)[s.pair(b, h, p, j)];
      logits[j] = logit;
      row_max = std::max(row_max, logit);
    }
    if (row_max == neg_inf) continue;  // no keys: P row stays 0, lse stays -inf
    double total = 0.0;
    for (int64_t j = 0; j < s.N; ++j)
      if (mask.at(p, j) != 0) total += mask.at(p, j) * std::exp(logits[j] - row_max);
    for (int64_t j = 0; j < s.N; ++j)
      if (mask.at(p, j) != 0) prob[static_cast<size_t>(p * s.N + j)] = mask.at(p, j) * std::exp(logits[j] - row_max) / total;
    lse[static_cast<size_t>(p)] = row_max + std::log(total);
  }
}

inline ForwardResult forward(const Dims& s, const std::vector<double>& q, const std::vector<double>& k,
                             const std::vector<double>& v, const HeadMasks& masks,
                             const std::vector<double>* bias, double scale, double out_scale) {
  check_inputs(s, q, k, v, masks, bias, scale, out_scale);
  ForwardResult result;
  result.out.assign(q.size(), 0.0);
  result.lse.assign(static_cast<size_t>(s.B * s.H * s.N), 0.0);
  std::vector<double> prob, lse;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      probabilities(s, q, k, mask_for(masks, b, h, s.H), bias, scale, b, h, prob, lse);
      for (int64_t p = 0; p < s.N; ++p) {
        result.lse[static_cast<size_t>((b * s.H + h) * s.N + p)] = lse[static_cast<size_t>(p)];
        for (int64_t j = 0; j < s.N; ++j) {
          const double weight = prob[static_cast<size_t>(p * s.N + j)];
          if (weight == 0.0) continue;
          for (int64_t d = 0; d < s.D; ++d)
            result.out[s.index(b, p, h, d)] += out_scale * weight * v[s.index(b, j, h, d)];
        }
      }
    }
  return result;
}

inline Gradients backward(const Dims& s, const std::vector<double>& q, const std::vector<double>& k,
                          const std::vector<double>& v, const std::vector<double>& dout,
                          const HeadMasks& masks, const std::vector<double>* bias, double scale,
                          double out_scale) {
  check_inputs(s, q, k, v, masks, bias, scale, out_scale);
  LT_CHECK(dout.size() == q.size(), "oracle: dout must hold B*N*H*D = ", q.size(), " values, got ",
           dout.size());
  Gradients grads;
  grads.dq.assign(q.size(), 0.0);
  grads.dk.assign(q.size(), 0.0);
  grads.dv.assign(q.size(), 0.0);
  if (bias) grads.dbias.assign(bias->size(), 0.0);
  std::vector<double> prob, lse, out_row(static_cast<size_t>(s.D)), grad_row(static_cast<size_t>(s.D));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      probabilities(s, q, k, mask_for(masks, b, h, s.H), bias, scale, b, h, prob, lse);
      for (int64_t p = 0; p < s.N; ++p) {
        // g = d loss / d (unscaled O) = out_scale * dO;  delta = rowsum(g * O).
        double delta = 0.0;
        for (int64_t d = 0; d < s.D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < s.N; ++j) o += prob[static_cast<size_t>(p * s.N + j)] * v[s.index(b, j, h, d)];
          grad_row[d] = out_scale * dout[s.index(b, p, h, d)];
          delta += grad_row[d] * o;
        }
        for (int64_t j = 0; j < s.N; ++j) {
          const double weight = prob[static_cast<size_t>(p * s.N + j)];
          if (weight == 0.0) continue;
          double dp = 0.0;  // dP = g . v_j
          for (int64_t d = 0; d < s.D; ++d) {
            dp += grad_row[d] * v[s.index(b, j, h, d)];
            grads.dv[s.index(b, j, h, d)] += weight * grad_row[d];
          }
          const double ds = weight * (dp - delta);
          for (int64_t d = 0; d < s.D; ++d) {
            grads.dq[s.index(b, p, h, d)] += ds * k[s.index(b, j, h, d)] * scale;
            grads.dk[s.index(b, j, h, d)] += ds * q[s.index(b, p, h, d)] * scale;
          }
          if (bias) grads.dbias[s.pair(b, h, p, j)] = ds;
        }
      }
    }
  return grads;
}

}  // namespace detail

// O = out_scale * softmax-with-multiplicities(Q K^T * scale) V per (b, h); lse of the unscaled
// softmax. Rows with no keys give O = 0 and lse = -inf.
inline ForwardResult attention_forward(const std::vector<double>& q, const std::vector<double>& k,
                                       const std::vector<double>& v, int64_t B, int64_t N, int64_t H,
                                       int64_t D, const HeadMasks& masks, double scale,
                                       double out_scale = 1.0) {
  return detail::forward({B, N, H, D}, q, k, v, masks, nullptr, scale, out_scale);
}

// Same with an additive logit bias (B, H, N, N): logit = q.k * scale + bias[b, h, p, k].
inline ForwardResult attention_forward_with_bias(const std::vector<double>& q, const std::vector<double>& k,
                                                 const std::vector<double>& v, const std::vector<double>& bias,
                                                 int64_t B, int64_t N, int64_t H, int64_t D,
                                                 const HeadMasks& masks, double scale,
                                                 double out_scale = 1.0) {
  return detail::forward({B, N, H, D}, q, k, v, masks, &bias, scale, out_scale);
}

// Gradients of sum(O * dout) with respect to q, k, v. Rows with no keys get zero.
inline Gradients attention_backward(const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, const std::vector<double>& dout,
                                    int64_t B, int64_t N, int64_t H, int64_t D, const HeadMasks& masks,
                                    double scale, double out_scale = 1.0) {
  return detail::backward({B, N, H, D}, q, k, v, dout, masks, nullptr, scale, out_scale);
}

// Same with a bias; also returns dbias (B, H, N, N) = dS (zero where masked).
inline Gradients attention_backward_with_bias(const std::vector<double>& q, const std::vector<double>& k,
                                              const std::vector<double>& v, const std::vector<double>& bias,
                                              const std::vector<double>& dout, int64_t B, int64_t N,
                                              int64_t H, int64_t D, const HeadMasks& masks, double scale,
                                              double out_scale = 1.0) {
  return detail::backward({B, N, H, D}, q, k, v, dout, masks, &bias, scale, out_scale);
}

// ---------------------------------------------------------------------------------------------
// Helpers for tests

// Per-(query block, key block) bias (B, H, nb, nb) -> per-pair bias (B, H, N, N).
inline std::vector<double> expand_block_bias(const std::vector<double>& block_bias, int64_t B, int64_t H,
                                             int64_t N, int64_t block_size) {
  const int64_t nb = attention::num_blocks_for(N, block_size);
  LT_CHECK(block_bias.size() == static_cast<size_t>(B * H * nb * nb), "block bias must hold B*H*nb*nb = ",
           B * H * nb * nb, " values, got ", block_bias.size());
  std::vector<double> full(static_cast<size_t>(B * H * N * N));
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t p = 0; p < N; ++p)
      for (int64_t k = 0; k < N; ++k)
        full[static_cast<size_t>((bh * N + p) * N + k)] =
            block_bias[static_cast<size_t>((bh * nb + p / block_size) * nb + k / block_size)];
  return full;
}

// Gradient of a per-pair bias summed back to its blocks: (B, H, N, N) -> (B, H, nb, nb).
inline std::vector<double> reduce_to_block_bias(const std::vector<double>& dbias, int64_t B, int64_t H,
                                                int64_t N, int64_t block_size) {
  const int64_t nb = attention::num_blocks_for(N, block_size);
  LT_CHECK(dbias.size() == static_cast<size_t>(B * H * N * N), "bias gradient must hold B*H*N*N = ",
           B * H * N * N, " values, got ", dbias.size());
  std::vector<double> blocks(static_cast<size_t>(B * H * nb * nb), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t p = 0; p < N; ++p)
      for (int64_t k = 0; k < N; ++k)
        blocks[static_cast<size_t>((bh * nb + p / block_size) * nb + k / block_size)] +=
            dbias[static_cast<size_t>((bh * N + p) * N + k)];
  return blocks;
}

// Reorders tokens: y[b, i, :] = x[b, perm[i], :] for x of shape (B, N, inner).
inline std::vector<double> permute_tokens(const std::vector<double>& x, int64_t B, int64_t N, int64_t inner,
                                          const std::vector<int64_t>& perm) {
  LT_CHECK(static_cast<int64_t>(perm.size()) == N, "permutation has ", perm.size(), " entries, N = ", N);
  LT_CHECK(x.size() == static_cast<size_t>(B * N * inner), "tensor must hold B*N*inner = ", B * N * inner,
           " values, got ", x.size());
  std::vector<double> y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      LT_CHECK(perm[i] >= 0 && perm[i] < N, "permutation entry ", perm[i], " outside [0, ", N, ")");
      for (int64_t e = 0; e < inner; ++e)
        y[static_cast<size_t>((b * N + i) * inner + e)] = x[static_cast<size_t>((b * N + perm[i]) * inner + e)];
    }
  return y;
}

// Reproducible values in [lo, hi) from a seed (splitmix64), the same on every platform.
inline std::vector<double> random_values(size_t count, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::vector<double> values(count);
  for (size_t i = 0; i < count; ++i) {
    const uint64_t bits = attention::splitmix64(seed * 0x9E3779B97F4A7C15ull + i);
    values[i] = lo + (hi - lo) * static_cast<double>(bits >> 11) * 0x1.0p-53;
  }
  return values;
}

// Central differences d f / d x_i = (f(x + eps e_i) - f(x - eps e_i)) / (2 eps) for every i.
inline std::vector<double> central_difference(const std::function<double(const std::vector<double>&)>& f,
                                              std::vector<double> x, double eps = 1e-6) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double plus = f(x);
    x[i] = saved - eps;
    const double minus = f(x);
    x[i] = saved;
    grad[i] = (plus - minus) / (2.0 * eps);
  }
  return grad;
}

// Largest |a - b| / (atol + rtol * |b|) over all entries: <= 1 means close. Sizes must match.
inline double max_scaled_error(const std::vector<double>& a, const std::vector<double>& b, double atol,
                               double rtol) {
  LT_CHECK(a.size() == b.size(), "compared vectors differ in size: ", a.size(), " vs ", b.size());
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) && std::isinf(b[i]) && (a[i] > 0) == (b[i] > 0)) continue;  // equal infinities
    const double err = std::abs(a[i] - b[i]) / (atol + rtol * std::abs(b[i]));
    worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : std::max(worst, err);
  }
  return worst;
}

}  // namespace longtape::oracle
