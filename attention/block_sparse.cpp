#include "attention/block_sparse.h"

#include "attention/fused/fused_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "attention/composed.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// Positions are compared as floats of the compute dtype. A key past the end of the sequence sits at
// kPastEnd; a query that may see every real key (not causal) sits at kSeesAll, and a query that sees
// no key at all is moved to kSeesEverything, so that its row stays finite (it is zeroed afterwards).
constexpr double kPastEnd = 1e30;
constexpr double kSeesAll = 1e29;
constexpr double kSeesEverything = 1e31;
// f32 holds every integer position exactly up to 2^24.
constexpr int64_t kMaxExactF32Position = int64_t{1} << 24;

Tensor scalar_like(double value, const Tensor& like) { return Tensor::full({}, value, like.dtype(), like.device()); }

Tensor index_tensor(const std::vector<int64_t>& values, Device device) {
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}, device);
}

Tensor values_tensor(const std::vector<double>& values, const Shape& shape, DType dtype, Device device) {
  return Tensor::from_vector(values, shape).to(dtype).to(device);
}

// x (B, n, H, D) -> (B * H * blocks, block_size, D) in dtype `work`, zero-padded to blocks * block_size.
Tensor to_blocks(const Tensor& x, int64_t blocks, int64_t block_size, DType work) {
  const int64_t B = x.size(0), n = x.size(1), H = x.size(2), D = x.size(3);
  Tensor t = x.to(work).permute({0, 2, 1, 3});
  const int64_t padded = blocks * block_size;
  if (padded > n) t = cat({t, Tensor::zeros({B, H, padded - n, D}, work, x.device())}, 2);
  return t.reshape({B * H * blocks, block_size, D});
}

// Index of a maximum of every row of scores (..., L) as (..., 1) i64; not recorded.
Tensor row_argmax(const Tensor& scores) {
  NoGradGuard no_grad;
  const int64_t keys = scores.shape().back();
  Tensor hit = eq(scores, amax(scores, {-1}, true));
  Tensor pos = Tensor::arange(0, static_cast<double>(keys), 1, scores.dtype(), scores.device());
  return cast(amax(mul(hit, pos), {-1}, true), DType::i64);
}

// One query block to compute: its (batch, head) index and block index.
struct QueryBlock {
  int64_t bh = 0;
  int64_t block = 0;
};

}  // namespace

std::vector<int64_t> query_block_order(const BlockLists& pattern, bool hilbert_schedule) {
  const int64_t blocks = static_cast<int64_t>(pattern.size());
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  if (!hilbert_schedule) return order;
  // Mean position of each query block's pairs along the curve. (The order of first appearance
  // would not do: the curve moves one row at a time, so for any connected pattern it first meets
  // the rows in natural order.)
  std::vector<double> position_sum(static_cast<size_t>(blocks), 0.0);
  int64_t position = 0;
  for (const auto& pair : hilbert_block_schedule(pattern)) position_sum[static_cast<size_t>(pair.first)] += position++;
  std::vector<double> mean(static_cast<size_t>(blocks), std::numeric_limits<double>::infinity());
  for (int64_t row = 0; row < blocks; ++row) {
    const size_t count = pattern[static_cast<size_t>(row)].size();
    if (count > 0) mean[static_cast<size_t>(row)] = position_sum[static_cast<size_t>(row)] / static_cast<double>(count);
  }
  // Rows without pairs (nothing to compute) go last; ties keep the natural order.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return mean[static_cast<size_t>(a)] < mean[static_cast<size_t>(b)]; });
  return order;
}

AttentionOutput block_sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::vector<BlockLists>& patterns, const BlockSparseOptions& options,
                                       const Tensor& block_bias) {
  const std::string who = "block_sparse_attention";
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who,
           ": q, k, v must be 4-d (batch, sequence, heads, head_dim), got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(), who,
           ": q, k, v must share one floating dtype, got q ", describe_tensor(q), ", k ", describe_tensor(k), ", v ",
           describe_tensor(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(), who, ": q, k, v must be on one device, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(k.shape() == v.shape() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), who,
           ": k and v must be (B, Nk, H, D) with q's B, H and D, got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(options.block_size > 0, who, ": block_size must be > 0, got ", options.block_size);
  LT_CHECK(std::isfinite(options.scale), who, ": scale must be finite, got ", options.scale);
  LT_CHECK(options.dropout >= 0.0 && options.dropout < 1.0, who, ": dropout must be in [0, 1), got ",
           options.dropout);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), Nk = k.size(1);
  const int64_t bs = options.block_size;
  LT_CHECK(!options.causal || N == Nk, who, ": causal attention needs as many queries as keys, got q ",
           describe_tensor(q), ", k ", describe_tensor(k));
  const DType work = compute_dtype(q.dtype());
  LT_CHECK(work == DType::f64 || std::max(N, Nk) + bs <= kMaxExactF32Position, who,
           ": sequences longer than 2^24 tokens need f64 inputs (positions are compared in f32), got N = ", N,
           ", Nk = ", Nk);
  const int64_t nq = num_blocks_for(N, bs), nk = num_blocks_for(Nk, bs);
  const int64_t BH = B * H;
  LT_CHECK(patterns.size() == 1 || static_cast<int64_t>(patterns.size()) == H ||
               static_cast<int64_t>(patterns.size()) == BH,
           who, ": expected 1 pattern, one per head (", H, ") or one per (batch, head) (", BH, "), got ",
           patterns.size());

  // Canonical (ascending) key-block order per query block: the joint softmax then visits the keys
  // in one fixed order whatever the schedule, which is what makes both schedules bitwise equal.
  std::vector<BlockLists> lists = patterns;
  for (size_t p = 0; p < lists.size(); ++p) {
    LT_CHECK(static_cast<int64_t>(lists[p].size()) == nq, who, ": pattern ", p, " has ", lists[p].size(),
             " query blocks, but N = ", N, " with block_size ", bs, " needs ", nq);
    for (size_t i = 0; i < lists[p].size(); ++i) {
      auto& row = lists[p][i];
      std::sort(row.begin(), row.end());
      for (size_t j = 0; j < row.size(); ++j) {
        LT_CHECK(row[j] >= 0 && row[j] < nk, who, ": pattern ", p, ", query block ", i, ": key block ", row[j],
                 " is outside [0, ", nk, ")");
        LT_CHECK(j == 0 || row[j] != row[j - 1], who, ": pattern ", p, ", query block ", i, ": key block ", row[j],
                 " is listed twice");
      }
    }
  }
  auto pattern_of = [&](int64_t bh) -> const BlockLists& {
    if (lists.size() == 1) return lists[0];
    if (static_cast<int64_t>(lists.size()) == BH) return lists[static_cast<size_t>(bh)];
    return lists[static_cast<size_t>(bh % H)];
  };

  Tensor bias_flat;
  if (block_bias.defined()) {
    LT_CHECK(block_bias.shape() == Shape({B, H, nq, nk}), who,
             ": block_bias must be (B, H, nq_blocks, nk_blocks) = ", shape_str({B, H, nq, nk}), ", got ",
             describe_tensor(block_bias));
    LT_CHECK(is_floating(block_bias.dtype()) && block_bias.device() == q.device(), who,
             ": block_bias must be a floating tensor on ", q.device().str(), ", got ", describe_tensor(block_bias));
    bias_flat = block_bias.to(work).reshape({BH * nq * nk});
  }

  // Query blocks grouped by their number of key blocks; inside a group in schedule order.
  std::map<int64_t, std::vector<QueryBlock>> groups;
  {
    std::map<const BlockLists*, std::vector<int64_t>> orders;  // one schedule per distinct pattern
    for (int64_t bh = 0; bh < BH; ++bh) {
      const BlockLists& pattern = pattern_of(bh);
      auto found = orders.find(&pattern);
      if (found == orders.end())
        found = orders.emplace(&pattern, query_block_order(pattern, options.hilbert_schedule)).first;
      for (int64_t block : found->second) {
        const int64_t count = static_cast<int64_t>(pattern[static_cast<size_t>(block)].size());
        if (count > 0) groups[count].push_back({bh, block});
      }
    }
  }

  const Device device = q.device();
  const Tensor qb = mul(to_blocks(q, nq, bs, work), options.scale);
  const Tensor kb = to_blocks(k, nk, bs, work);
  const Tensor vb = to_blocks(v, nk, bs, work);

  std::vector<Tensor> out_pieces, lse_pieces;
  std::vector<int64_t> positions;  // row of (B * H * nq) that each piece row belongs to
  const int64_t budget = std::max<int64_t>(1, options.max_score_elements);
  for (const auto& [count, blocks] : groups) {
    const int64_t keys = count * bs;
    const int64_t chunk = std::max<int64_t>(1, budget / (bs * keys));
    for (size_t first = 0; first < blocks.size(); first += static_cast<size_t>(chunk)) {
      const int64_t R = std::min<int64_t>(chunk, static_cast<int64_t>(blocks.size() - first));
      std::vector<int64_t> query_ids, key_ids, bias_ids;
      std::vector<double> key_pos, query_pos, valid;
      bool any_empty_row = false;
      for (int64_t r = 0; r < R; ++r) {
        const QueryBlock& qblock = blocks[first + static_cast<size_t>(r)];
        const auto& row = pattern_of(qblock.bh)[static_cast<size_t>(qblock.block)];
        query_ids.push_back(qblock.bh * nq + qblock.block);
        for (int64_t j : row) {
          key_ids.push_back(qblock.bh * nk + j);
          if (bias_flat.defined()) bias_ids.push_back((qblock.bh * nq + qblock.block) * nk + j);
          for (int64_t t = 0; t < bs; ++t) {
            const int64_t pos = j * bs + t;
            key_pos.push_back(pos < Nk ? static_cast<double>(pos) : kPastEnd);
          }
        }
        for (int64_t t = 0; t < bs; ++t) {
          const int64_t pos = qblock.block * bs + t;
          // The earliest key of the row is row[0] * bs (< Nk); causal rows before it see nothing.
          const bool has_key = !options.causal || row[0] * bs <= pos;
          any_empty_row = any_empty_row || !has_key;
          valid.push_back(has_key ? 1.0 : 0.0);
          query_pos.push_back(!has_key ? kSeesEverything : options.causal ? static_cast<double>(pos) : kSeesAll);
        }
      }
      Tensor qc = index_select(qb, 0, index_tensor(query_ids, device));                       // (R, bs, D)
      Tensor kc = index_select(kb, 0, index_tensor(key_ids, device)).reshape({R, keys, D});   // (R, keys, D)
      Tensor vc = index_select(vb, 0, index_tensor(key_ids, device)).reshape({R, keys, D});
      Tensor scores = matmul(qc, kc.transpose(1, 2));  // (R, bs, keys)
      {
        Tensor masked;
        {
          NoGradGuard no_grad;
          Tensor kp = values_tensor(key_pos, {R, 1, keys}, work, device);
          Tensor qp = values_tensor(query_pos, {R, bs, 1}, work, device);
          masked = where(gt(kp, qp), scalar_like(kNegInf, kp), scalar_like(0.0, kp));  // (R, bs, keys)
        }
        scores = add(scores, masked);
      }
      if (bias_flat.defined()) {
        Tensor bias = index_select(bias_flat, 0, index_tensor(bias_ids, device)).reshape({R, 1, count, 1});
        scores = add(scores.reshape({R, bs, count, bs}), bias).reshape({R, bs, keys});
      }
      Tensor probs = softmax(scores, -1);
      // lse = S[m] - log P[m] at a row maximum m: exact to rounding, gradient P (that of logsumexp),
      // and the tape keeps no second (R, bs, keys) tensor.
      Tensor at_max = row_argmax(scores.detach());
      Tensor lse = sub(gather(scores, 2, at_max), log(gather(probs, 2, at_max))).reshape({R, bs});
      if (any_empty_row) {
        // Rows without keys were computed over unmasked keys (finite); their output and lse are
        // replaced by 0 and -inf, and the zero factor stops their gradient.
        Tensor row_valid = values_tensor(valid, {R, bs}, work, device);
        probs = mul(probs, row_valid.reshape({R, bs, 1}));
        lse = where(row_valid, lse, scalar_like(kNegInf, lse));
      }
      if (options.dropout > 0.0) probs = dropout(probs, options.dropout, true);
      out_pieces.push_back(matmul(probs, vc));  // (R, bs, D)
      lse_pieces.push_back(lse);
      positions.insert(positions.end(), query_ids.begin(), query_ids.end());
    }
  }

  if (out_pieces.empty()) {
    // No query block has a key block: every row is empty.
    return {Tensor::zeros({B, N, H, D}, q.dtype(), device), Tensor::full({B, H, N}, kNegInf, work, device)};
  }
  Tensor out = scatter_rows(out_pieces, 0, positions, BH * nq, 0.0)  // (B * H * nq, bs, D)
                   .reshape({B, H, nq * bs, D})
                   .narrow(2, 0, N)
                   .permute({0, 2, 1, 3})
                   .contiguous();
  Tensor lse = scatter_rows(lse_pieces, 0, positions, BH * nq, kNegInf).reshape({B, H, nq * bs}).narrow(2, 0, N);
  return {out.to(q.dtype()), lse.contiguous()};
}

BlockPatternOptions block_pattern_options(const AttentionConfig& config) {
  // Block distances only matter to `dilated`; other patterns must not fail on a token-level setting.
  return {.block_size = config.block_size,
          .window = config.window,
          .dilation_rates = config.pattern == "dilated" ? config.dilation_rates : std::vector<int64_t>{},
          .global_blocks = config.global_blocks,
          .density = config.density,
          .seed = config.seed,
          .causal = config.causal};
}

namespace {

void check_schedule(const AttentionConfig& config, const std::string& who) {
  LT_CHECK(config.schedule == "natural" || config.schedule == "hilbert", who,
           ": schedule must be \"natural\" or \"hilbert\", got \"", config.schedule, "\"");
}

BlockSparseOptions sparse_options(const AttentionConfig& config, bool training) {
  BlockSparseOptions options;
  options.block_size = config.block_size;
  options.scale = config.scale();
  options.causal = config.causal;
  options.hilbert_schedule = config.schedule == "hilbert";
  options.dropout = training ? config.dropout : 0.0;
  return options;
}

// The key set of the attention core for block lists (shared, per head or per (b, h)).
CoreKeys block_core_keys(std::shared_ptr<const std::vector<BlockLists>> patterns, const AttentionConfig& config) {
  CoreKeys keys;
  keys.kind = fused::KeySet::blocks;
  keys.block_lists = std::move(patterns);
  keys.block_size = config.block_size;
  return keys;
}

}  // namespace

BlockSparseAttention::BlockSparseAttention(AttentionConfig config) : Attention(std::move(config)) {
  const std::string who = "attention 'block_sparse'";
  validate_core_config(config_, "block_sparse");
  LT_CHECK(config_.pattern != "adaptive", who,
           ": the adaptive pattern is learned; build it with make_attention(\"block_sparse_adaptive\", config) "
           "or make_block_sparse(config)");
  bool known = false;
  for (BlockPattern p : all_block_patterns()) known = known || to_string(p) == config_.pattern;
  LT_CHECK(known, who, ": pattern must be one of all, local_window, dilated, global_local, random, adaptive; got \"",
           config_.pattern, "\"");
  pattern_ = parse_block_pattern(config_.pattern);
  validate(block_pattern_options(config_));
  LT_CHECK(pattern_ != BlockPattern::dilated || !config_.dilation_rates.empty(), who,
           ": the dilated pattern needs at least one block distance in dilation_rates");
  check_schedule(config_, who);
}

std::vector<BlockLists> BlockSparseAttention::head_patterns(int64_t n) const {
  const BlockPatternOptions options = block_pattern_options(config_);
  const int64_t blocks = num_blocks_for(n, config_.block_size);
  std::vector<BlockLists> patterns;
  const int64_t heads = pattern_ == BlockPattern::random ? config_.num_heads : 1;
  // Random draws follow the global head index, so a slice of the heads (head_parallel) draws what
  // those heads draw on one device.
  for (int64_t h = 0; h < heads; ++h)
    patterns.push_back(block_pattern(pattern_, blocks, options, config_.head_offset + h));
  return patterns;
}

AttentionOutput BlockSparseAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(q.size(1) == k.size(1),
           "attention 'block_sparse': block patterns are defined on one sequence, so q and k need the same length, "
           "got q ", describe_tensor(q), ", k ", describe_tensor(k));
  // The pattern depends only on the length: built once per length, shared with the core.
  if (!cached_patterns_ || cached_length_ != q.size(1)) {
    cached_patterns_ = make_block_lists(head_patterns(q.size(1)));
    cached_length_ = q.size(1);
  }
  const std::shared_ptr<const std::vector<BlockLists>> patterns = cached_patterns_;
  const BlockSparseOptions options = sparse_options(config_, is_training());
  CoreRun run;
  AttentionOutput result = attention_core(q, k, v, block_core_keys(patterns, config_),
                                          core_options(config_, is_training()),
                                          [&] { return block_sparse_attention(q, k, v, *patterns, options); }, run);
  note_backend(run.backend, run.precision);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Adaptive pattern

namespace {

// x (B, n, H, D) -> block means (B, H, blocks, D) in dtype `work`; the last block averages its real tokens.
Tensor block_means(const Tensor& x, int64_t block_size, DType work) {
  const int64_t B = x.size(0), n = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t blocks = num_blocks_for(n, block_size);
  Tensor sums = sum(to_blocks(x, blocks, block_size, work).reshape({B, H, blocks, block_size, D}), {3});
  std::vector<double> inverse_lengths;
  for (int64_t i = 0; i < blocks; ++i)
    inverse_lengths.push_back(1.0 / static_cast<double>(std::min(n, (i + 1) * block_size) - i * block_size));
  return mul(sums, values_tensor(inverse_lengths, {blocks, 1}, work, x.device()));
}

}  // namespace

Tensor adaptive_block_scores(const Tensor& q, const Tensor& k, const Tensor& scorer_q, const Tensor& scorer_k,
                             int64_t block_size) {
  const std::string who = "adaptive_block_scores";
  LT_CHECK(q.defined() && k.defined() && q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) &&
               q.size(2) == k.size(2) && q.size(3) == k.size(3),
           who, ": q and k must be (B, N, H, D) with equal B, H, D, got q ", describe_tensor(q), ", k ",
           describe_tensor(k));
  LT_CHECK(block_size > 0, who, ": block_size must be > 0, got ", block_size);
  LT_CHECK(q.size(1) > 0 && k.size(1) > 0, who, ": q and k need at least one token, got q ", describe_tensor(q), ", k ",
           describe_tensor(k));
  const int64_t D = q.size(3);
  LT_CHECK(scorer_q.defined() && scorer_k.defined() && scorer_q.dim() == 2 && scorer_q.shape() == scorer_k.shape() &&
               scorer_q.size(0) == D && scorer_q.size(1) > 0,
           who, ": scorer weights must both be (head_dim = ", D, ", r) with r > 0, got ", describe_tensor(scorer_q),
           " and ", describe_tensor(scorer_k));
  LT_CHECK(scorer_q.device() == q.device() && scorer_k.device() == q.device() && k.device() == q.device(), who,
           ": q, k and the scorer weights must be on one device, got q on ", q.device().str(), ", scorer on ",
           scorer_q.device().str(), " (move the module with .to(device))");
  const DType work = compute_dtype(q.dtype());
  const double norm = 1.0 / std::sqrt(static_cast<double>(scorer_q.size(1)));
  Tensor pq = matmul(block_means(q, block_size, work), scorer_q.to(work));  // (B, H, nq, r)
  Tensor pk = matmul(block_means(k, block_size, work), scorer_k.to(work));  // (B, H, nk, r)
  return mul(matmul(pq, pk.transpose(2, 3)), norm);
}

std::vector<BlockLists> select_top_blocks(const Tensor& scores, int64_t keep, bool causal) {
  LT_CHECK(scores.defined() && scores.dim() == 4, "select_top_blocks: scores must be (B, H, nq, nk), got ",
           describe_tensor(scores));
  LT_CHECK(keep >= 1, "select_top_blocks: keep must be >= 1, got ", keep);
  const int64_t BH = scores.size(0) * scores.size(1), nq = scores.size(2), nk = scores.size(3);
  std::vector<double> values;
  {
    NoGradGuard no_grad;
    values = scores.detach().to(Device::cpu()).to_vector();
  }
  std::vector<BlockLists> lists(static_cast<size_t>(BH), BlockLists(static_cast<size_t>(nq)));
  std::vector<int64_t> others;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < nq; ++i) {
      const double* row = values.data() + (bh * nq + i) * nk;
      const int64_t limit = causal ? std::min(i + 1, nk) : nk;
      const bool has_diagonal = i < limit;
      others.clear();
      for (int64_t j = 0; j < limit; ++j)
        if (j != i) others.push_back(j);
      const int64_t wanted = std::min<int64_t>(keep - (has_diagonal ? 1 : 0), static_cast<int64_t>(others.size()));
      std::partial_sort(others.begin(), others.begin() + wanted, others.end(), [&](int64_t a, int64_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      std::vector<int64_t>& kept = lists[static_cast<size_t>(bh)][static_cast<size_t>(i)];
      kept.assign(others.begin(), others.begin() + wanted);
      if (has_diagonal) kept.push_back(i);
      std::sort(kept.begin(), kept.end());
    }
  return lists;
}

AdaptiveBlockSparseAttention::AdaptiveBlockSparseAttention(AttentionConfig config, int64_t scorer_dim)
    : Attention(std::move(config)) {
  const std::string who = "attention 'block_sparse_adaptive'";
  validate_core_config(config_, "block_sparse_adaptive");
  config_.pattern = "adaptive";  // the variant decides the pattern
  validate(block_pattern_options(config_));
  check_schedule(config_, who);
  LT_CHECK(scorer_dim > 0, who, ": scorer_dim must be > 0, got ", scorer_dim);
  // Small random projections (std 1/sqrt(head_dim)) so that the initial scores are O(1) and distinct.
  const double init_std = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  Tensor wq, wk;
  {
    NoGradGuard no_grad;
    wq = mul(Tensor::randn({config_.head_dim, scorer_dim}), init_std);
    wk = mul(Tensor::randn({config_.head_dim, scorer_dim}), init_std);
  }
  scorer_q_ = register_parameter("scorer_q", wq);
  scorer_k_ = register_parameter("scorer_k", wk);
}

Tensor AdaptiveBlockSparseAttention::block_scores(const Tensor& q, const Tensor& k) const {
  return adaptive_block_scores(q, k, scorer_q_, scorer_k_, config_.block_size);
}

int64_t AdaptiveBlockSparseAttention::blocks_kept(int64_t nk) const {
  return random_blocks_per_row(num_blocks_for(nk, config_.block_size), config_.density);
}

std::vector<BlockLists> AdaptiveBlockSparseAttention::select(const Tensor& scores) const {
  LT_CHECK(scores.defined() && scores.dim() == 4,
           "attention 'block_sparse_adaptive': scores must be (B, H, nq, nk), got ", describe_tensor(scores));
  return select_top_blocks(scores, random_blocks_per_row(scores.size(3), config_.density), config_.causal);
}

AttentionOutput AdaptiveBlockSparseAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  LT_CHECK(q.size(1) == k.size(1),
           "attention 'block_sparse_adaptive': block patterns are defined on one sequence, so q and k need the same "
           "length, got q ", describe_tensor(q), ", k ", describe_tensor(k));
  if (q.size(1) == 0) return block_sparse_attention(q, k, v, {BlockLists{}}, sparse_options(config_, is_training()));
  Tensor scores = block_scores(q, k);
  last_pattern_ = select(scores);
  const BlockSparseOptions options = sparse_options(config_, is_training());
  CoreKeys keys = block_core_keys(make_block_lists(last_pattern_), config_);
  keys.block_bias = scores;
  CoreRun run;
  AttentionOutput result = attention_core(q, k, v, keys, core_options(config_, is_training()),
                                          [&] { return block_sparse_attention(q, k, v, last_pattern_, options, scores); },
                                          run);
  note_backend(run.backend, run.precision);
  return result;
}

std::shared_ptr<Attention> make_block_sparse(const AttentionConfig& config) {
  if (config.pattern == "adaptive") return std::make_shared<AdaptiveBlockSparseAttention>(config);
  return std::make_shared<BlockSparseAttention>(config);
}

}  // namespace longtape::attention
