// Block-sparse attention (docs/attention.md, block-sparse) against the float64 oracle: every fixed
// pattern, the adaptive (learned) pattern, fully masked rows, ragged last blocks, and the Hilbert
// block schedule.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/block_sparse.h"
#include "attention/dense.h"
#include "attention/registry.h"
#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/grad_mode.h"
#include "support/attention_oracle.h"
#include "support/test_utils.h"
#include "tensor/allocator.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::attention;
using namespace longtape::testing;

namespace {

void reset_grads(Problem& p) {
  p.q.zero_grad_();
  p.k.zero_grad_();
  p.v.zero_grad_();
}

bool all_finite(const std::vector<double>& values) {
  return std::all_of(values.begin(), values.end(), [](double x) { return std::isfinite(x); });
}

// Small shapes where every pattern is distinct: 6 blocks of 4 tokens (the last one ragged when
// N = 22), a local window of one block each side, one global block, block distance 2 for dilated,
// 2 random blocks per row.
AttentionConfig small_config(const std::string& pattern, bool causal) {
  return {.num_heads = 2, .head_dim = 4, .dilation_rates = {2}, .causal = causal, .pattern = pattern, .block_size = 4,
          .density = 0.4, .window = 8, .global_blocks = 1, .seed = 11};
}

// The oracle's options for small_config, written out independently of block_pattern_options.
BlockPatternOptions small_options(bool causal) {
  return {.block_size = 4, .window = 8, .dilation_rates = {2}, .global_blocks = 1, .density = 0.4, .seed = 11,
          .causal = causal};
}

// Per-(b, h) pattern lists as oracle masks (index b * H + h).
oracle::HeadMasks masks_of(const std::vector<BlockLists>& lists, int64_t block_size, int64_t n, bool causal) {
  return oracle::block_mask(lists, block_size, n, causal);
}

}  // namespace

TEST_CASE("every fixed pattern equals the dense oracle with its block mask (f64, causal and not, ragged)") {
  LT_FRESH_SEED(seed);
  for (int64_t n : {24, 22}) {
    for (bool causal : {false, true}) {
      for (BlockPattern pattern : all_block_patterns()) {
        INFO("N " << n << " causal " << causal << " pattern " << std::string(to_string(pattern)));
        Problem p = make_problem(2, n, 2, 4, seed + static_cast<uint64_t>(n));
        BlockSparseAttention attention(small_config(std::string(to_string(pattern)), causal));
        const double scale = attention.config().scale();
        const oracle::HeadMasks masks = oracle::block_pattern_masks(pattern, n, 2, small_options(causal));
        const auto want = oracle::attention_forward(p.qv, p.kv, p.vv, 2, n, 2, 4, masks, scale);
        AttentionOutput got = attention.forward_with_lse(p.q, p.k, p.v);
        CHECK(got.out.dtype() == DType::f64);
        CHECK(got.lse.shape() == Shape({2, 2, n}));
        CHECK(max_scaled_error(got.out, want.out, 1e-12) <= 1.0);
        CHECK(max_scaled_error(got.lse, want.lse, 1e-12) <= 1.0);
        got.out.backward(p.dout);
        const auto grads = oracle::attention_backward(p.qv, p.kv, p.vv, p.doutv, 2, n, 2, 4, masks, scale);
        CHECK(max_scaled_error(p.q.grad(), grads.dq, 1e-11) <= 1.0);
        CHECK(max_scaled_error(p.k.grad(), grads.dk, 1e-11) <= 1.0);
        CHECK(max_scaled_error(p.v.grad(), grads.dv, 1e-11) <= 1.0);
      }
    }
  }
}

TEST_CASE("the patterns differ from one another, so the oracle comparison tests each of them") {
  const int64_t blocks = num_blocks_for(22, 4);
  BlockSparseAttention local(small_config("local_window", false));
  BlockSparseAttention dilated(small_config("dilated", false));
  BlockSparseAttention global(small_config("global_local", false));
  BlockSparseAttention all(small_config("all", false));
  const int64_t all_pairs = count_pairs(all.head_patterns(22)[0]);
  CHECK(all_pairs == blocks * blocks);
  CHECK(count_pairs(local.head_patterns(22)[0]) < all_pairs);
  CHECK(count_pairs(global.head_patterns(22)[0]) > count_pairs(local.head_patterns(22)[0]));
  // dilation_rates {2} are block distances: block 2 sees blocks 0, 2 and 4.
  CHECK(dilated.head_patterns(22)[0][2] == std::vector<int64_t>{0, 2, 4});
  BlockSparseAttention random(small_config("random", false));
  const auto heads = random.head_patterns(22);
  REQUIRE(heads.size() == 2);  // one draw per head
  CHECK(heads[0] != heads[1]);
}

TEST_CASE("pattern all equals dense attention (f32 and f64, causal and not)") {
  LT_FRESH_SEED(seed);
  for (DType dtype : {DType::f64, DType::f32}) {
    for (bool causal : {false, true}) {
      INFO("dtype " << std::string(dtype_name(dtype)) << " causal " << causal);
      Problem p = make_problem(2, 21, 2, 4, seed);
      AttentionConfig config = small_config("all", causal);
      BlockSparseAttention sparse(config);
      DenseAttention dense(config);
      Tensor q = p.q.detach().to(dtype), k = p.k.detach().to(dtype), v = p.v.detach().to(dtype);
      AttentionOutput a = sparse.forward_with_lse(q, k, v);
      AttentionOutput b = dense.forward_with_lse(q, k, v);
      CHECK(a.out.dtype() == dtype);
      const double tol = dtype == DType::f64 ? 1e-12 : 2e-5;
      CHECK(max_scaled_error(a.out, b.out.to_vector(), tol) <= 1.0);
      CHECK(max_scaled_error(a.lse, b.lse.to_vector(), tol) <= 1.0);
    }
  }
}

TEST_CASE("density changes the random pattern and the output; the seed fixes the draw") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(1, 64, 2, 4, seed);
  AttentionConfig sparse = small_config("random", false);
  sparse.density = 0.25;
  AttentionConfig denser = sparse;
  denser.density = 0.75;
  BlockSparseAttention a(sparse), b(denser), a_again(sparse);
  const int64_t blocks = num_blocks_for(64, 4);
  CHECK(count_pairs(a.head_patterns(64)[0]) == blocks * random_blocks_per_row(blocks, 0.25));
  CHECK(count_pairs(b.head_patterns(64)[0]) == blocks * random_blocks_per_row(blocks, 0.75));
  CHECK(a.head_patterns(64) == a_again.head_patterns(64));
  const std::vector<double> out_a = a.forward(p.q, p.k, p.v).to_vector();
  const std::vector<double> out_b = b.forward(p.q, p.k, p.v).to_vector();
  CHECK(oracle::max_scaled_error(out_a, out_b, 1e-6, 1e-6) > 1.0);
  CHECK(out_a == a_again.forward(p.q, p.k, p.v).to_vector());
  AttentionConfig other_seed = sparse;
  other_seed.seed = sparse.seed + 1;
  CHECK(BlockSparseAttention(other_seed).head_patterns(64) != a.head_patterns(64));
}

TEST_CASE("rows without keys give 0 and lse -inf, with no NaN in the forward or backward") {
  LT_FRESH_SEED(seed);
  // 5 blocks of 4 tokens (N = 18: the last block holds 2). Causal: block 0 lists only the later
  // block 1 (every row masked), block 1 lists nothing, block 3 lists blocks 2 and 4 (row-wise mix:
  // its first rows see block 2 only), block 4 sees blocks 0 and 4.
  const BlockLists pattern{{1}, {}, {0, 2}, {2, 4}, {0, 4}};
  for (bool causal : {true, false}) {
    INFO("causal " << causal);
    Problem p = make_problem(2, 18, 2, 3, seed);
    BlockSparseOptions options;
    options.block_size = 4;
    options.scale = 0.7;
    options.causal = causal;
    AttentionOutput got = block_sparse_attention(p.q, p.k, p.v, {pattern}, options);
    const oracle::HeadMasks masks = oracle::repeat_heads(oracle::block_mask(pattern, 4, 18, causal), 2);
    CHECK(masks[0].empty_rows() == (causal ? 8 : 4));
    const auto want = oracle::attention_forward(p.qv, p.kv, p.vv, 2, 18, 2, 3, masks, 0.7);
    const std::vector<double> out = got.out.to_vector(), lse = got.lse.to_vector();
    CHECK(all_finite(out));
    CHECK(max_scaled_error(got.out, want.out, 1e-12) <= 1.0);
    CHECK(max_scaled_error(got.lse, want.lse, 1e-12) <= 1.0);
    // Block 1 (positions 4..7) sees no key in either mode: zeros and -inf.
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t pos = 4; pos < 8; ++pos)
        for (int64_t h = 0; h < 2; ++h) {
          CHECK(lse[static_cast<size_t>((b * 2 + h) * 18 + pos)] == -std::numeric_limits<double>::infinity());
          for (int64_t d = 0; d < 3; ++d) CHECK(out[static_cast<size_t>(((b * 18 + pos) * 2 + h) * 3 + d)] == 0.0);
        }
    // The backward through out and through the finite lse entries stays finite and exact.
    Tensor finite_lse = where(eq(got.lse, Tensor::scalar(-std::numeric_limits<double>::infinity(), DType::f64)),
                              Tensor::scalar(0.0, DType::f64), got.lse);
    Tensor loss = add(sum(mul(got.out, p.dout)), sum(finite_lse));
    loss.backward();
    for (const Tensor* t : {&p.q, &p.k, &p.v}) CHECK(all_finite(t->grad().to_vector()));
    const auto grads = oracle::attention_backward(p.qv, p.kv, p.vv, p.doutv, 2, 18, 2, 3, masks, 0.7);
    CHECK(max_scaled_error(p.v.grad(), grads.dv, 1e-11) <= 1.0);  // lse does not depend on v
    // Queries without keys get exactly zero gradient.
    const std::vector<double> dq = p.q.grad().to_vector();
    for (int64_t pos = 4; pos < 8; ++pos)
      for (int64_t d = 0; d < 3; ++d) CHECK(dq[static_cast<size_t>((pos * 2) * 3 + d)] == 0.0);
  }
}

TEST_CASE("a pattern with no key block at all gives zeros and -inf") {
  Problem p = make_problem(1, 8, 2, 3, fresh_seed());
  BlockSparseOptions options;
  options.block_size = 4;
  AttentionOutput got = block_sparse_attention(p.q, p.k, p.v, {BlockLists{{}, {}}}, options);
  for (double x : got.out.to_vector()) CHECK(x == 0.0);
  for (double x : got.lse.to_vector()) CHECK(x == -std::numeric_limits<double>::infinity());
}

TEST_CASE("chunking the query blocks (small score budget) does not change the result") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(2, 30, 2, 4, seed);
  AttentionConfig config = small_config("global_local", true);
  BlockSparseAttention attention(config);
  BlockSparseOptions whole, chunked;
  whole.block_size = chunked.block_size = 4;
  whole.causal = chunked.causal = true;
  whole.scale = chunked.scale = config.scale();
  chunked.max_score_elements = 1;  // one query block per matmul
  const auto patterns = attention.head_patterns(30);
  AttentionOutput a = block_sparse_attention(p.q, p.k, p.v, patterns, whole);
  AttentionOutput b = block_sparse_attention(p.q, p.k, p.v, patterns, chunked);
  CHECK(max_scaled_error(a.out, b.out.to_vector(), 1e-13) <= 1.0);
  CHECK(max_scaled_error(a.lse, b.lse.to_vector(), 1e-13) <= 1.0);
}

TEST_CASE("memory grows with the active block pairs, not N^2 (local_window and global_local)") {
  // Peak host memory of forward + backward at N and 2N: the number of active pairs doubles (the
  // global rows of global_local see every block, but they are few and are not padded into the
  // others), so the peak must roughly double, far from the 4x of N x N scores.
  manual_seed(fresh_seed());
  for (const char* pattern : {"local_window", "global_local"}) {
    INFO(std::string(pattern));
    AttentionConfig config = small_config(pattern, true);
    config.head_dim = 16;
    config.block_size = 32;
    config.window = 128;
    BlockSparseAttention attention(config);
    std::vector<double> peaks;
    for (int64_t n : {1024, 2048}) {
      Tensor q = Tensor::randn({1, n, 2, 16}).requires_grad_(), k = Tensor::randn({1, n, 2, 16}).requires_grad_(),
             v = Tensor::randn({1, n, 2, 16}).requires_grad_();
      const int64_t before = memory_stats(Device::cpu()).allocated_bytes;
      reset_peak_memory(Device::cpu());
      attention.forward(q, k, v).backward(Tensor::randn({1, n, 2, 16}));
      peaks.push_back(static_cast<double>(memory_stats(Device::cpu()).peak_allocated_bytes - before));
    }
    MESSAGE(std::string(pattern) << ": peak bytes at N = 1024: " << peaks[0] << ", at N = 2048: " << peaks[1]);
    CHECK(peaks[1] / peaks[0] > 1.6);
    CHECK(peaks[1] / peaks[0] < 2.5);
  }
}

TEST_CASE("block_bias enters the logits of the active pairs; its gradient is the oracle's dS summed per block") {
  LT_FRESH_SEED(seed);
  const int64_t B = 2, N = 14, H = 2, D = 3, bs = 4, nb = 4;
  Problem p = make_problem(B, N, H, D, seed);
  const std::vector<double> bias_values = oracle::random_values(static_cast<size_t>(B * H * nb * nb), seed + 9);
  Tensor bias = Tensor::from_vector(bias_values, {B, H, nb, nb}).requires_grad_();
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    reset_grads(p);
    bias.zero_grad_();
    std::vector<BlockLists> lists;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      BlockPatternOptions o;
      o.block_size = bs;
      o.density = 0.5;
      o.seed = static_cast<uint64_t>(bh);
      o.causal = causal;
      lists.push_back(block_pattern(BlockPattern::random, nb, o, 0));
    }
    BlockSparseOptions options;
    options.block_size = bs;
    options.scale = 0.6;
    options.causal = causal;
    AttentionOutput got = block_sparse_attention(p.q, p.k, p.v, lists, options, bias);
    const auto full_bias = oracle::expand_block_bias(bias_values, B, H, N, bs);
    const auto masks = masks_of(lists, bs, N, causal);
    const auto want = oracle::attention_forward_with_bias(p.qv, p.kv, p.vv, full_bias, B, N, H, D, masks, 0.6);
    CHECK(max_scaled_error(got.out, want.out, 1e-12) <= 1.0);
    CHECK(max_scaled_error(got.lse, want.lse, 1e-12) <= 1.0);
    got.out.backward(p.dout);
    const auto grads =
        oracle::attention_backward_with_bias(p.qv, p.kv, p.vv, full_bias, p.doutv, B, N, H, D, masks, 0.6);
    CHECK(max_scaled_error(p.q.grad(), grads.dq, 1e-11) <= 1.0);
    CHECK(max_scaled_error(p.k.grad(), grads.dk, 1e-11) <= 1.0);
    CHECK(max_scaled_error(p.v.grad(), grads.dv, 1e-11) <= 1.0);
    const auto dblock = oracle::reduce_to_block_bias(grads.dbias, B, H, N, bs);
    CHECK(max_scaled_error(bias.grad(), dblock, 1e-11) <= 1.0);
  }
}

TEST_CASE("adaptive: output equals the oracle with the scorer's scores as block bias") {
  LT_FRESH_SEED(seed);
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    const int64_t B = 2, N = 22, H = 2, D = 4, bs = 4;
    Problem p = make_problem(B, N, H, D, seed);
    AttentionConfig config = small_config("adaptive", causal);
    config.density = 0.5;
    manual_seed(seed);
    AdaptiveBlockSparseAttention attention(config);
    attention.to(DType::f64);
    AttentionOutput got = attention.forward_with_lse(p.q, p.k, p.v);
    const auto& lists = attention.last_pattern();
    REQUIRE(lists.size() == static_cast<size_t>(B * H));
    const int64_t nb = num_blocks_for(N, bs), keep = random_blocks_per_row(nb, 0.5);
    CHECK(keep == 3);
    for (const BlockLists& pattern : lists)
      for (int64_t i = 0; i < nb; ++i) {
        const auto& row = pattern[static_cast<size_t>(i)];
        CHECK(static_cast<int64_t>(row.size()) == (causal ? std::min(i + 1, keep) : keep));
        CHECK(std::find(row.begin(), row.end(), i) != row.end());  // diagonal always kept
      }
    Tensor scores;
    {
      NoGradGuard no_grad;
      scores = attention.block_scores(p.q, p.k);
    }
    CHECK(scores.shape() == Shape({B, H, nb, nb}));
    CHECK(select_top_blocks(scores, keep, causal) == lists);
    const auto full_bias = oracle::expand_block_bias(scores.to_vector(), B, H, N, bs);
    const auto masks = masks_of(lists, bs, N, causal);
    const auto want =
        oracle::attention_forward_with_bias(p.qv, p.kv, p.vv, full_bias, B, N, H, D, masks, config.scale());
    CHECK(max_scaled_error(got.out, want.out, 1e-12) <= 1.0);
    CHECK(max_scaled_error(got.lse, want.lse, 1e-12) <= 1.0);
    // v does not enter the scorer, so its gradient is the oracle's.
    got.out.backward(p.dout);
    const auto grads = oracle::attention_backward_with_bias(p.qv, p.kv, p.vv, full_bias, p.doutv, B, N, H, D, masks,
                                                            config.scale());
    CHECK(max_scaled_error(p.v.grad(), grads.dv, 1e-11) <= 1.0);
  }
}

TEST_CASE("adaptive: the top-k choice keeps the best-scoring blocks") {
  // One (b, h), 4 blocks; scores chosen so the ranking is known.
  const std::vector<double> values{0.0, 5.0, 1.0, 3.0,   //
                                    2.0, 0.0, 9.0, 4.0,  //
                                    7.0, 8.0, -1.0, 6.0,  //
                                    1.0, 1.0, 1.0, 0.0};
  Tensor scores = Tensor::from_vector(values, {1, 1, 4, 4});
  CHECK(select_top_blocks(scores, 2, false)[0] == BlockLists{{0, 1}, {1, 2}, {1, 2}, {0, 3}});
  CHECK(select_top_blocks(scores, 3, false)[0] == BlockLists{{0, 1, 3}, {1, 2, 3}, {0, 1, 2}, {0, 1, 3}});
  CHECK(select_top_blocks(scores, 2, true)[0] == BlockLists{{0}, {0, 1}, {1, 2}, {0, 3}});
  CHECK_THROWS_WITH_AS(select_top_blocks(scores, 0, false), doctest::Contains("keep must be >= 1"), Error);
}

TEST_CASE("adaptive: the scorer parameters receive a nonzero gradient from the task loss") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(2, 32, 2, 8, seed);
  AttentionConfig config = small_config("adaptive", false);
  config.head_dim = 8;
  config.density = 0.25;
  manual_seed(seed);
  auto attention = make_block_sparse(config);
  auto* adaptive = dynamic_cast<AdaptiveBlockSparseAttention*>(attention.get());
  REQUIRE(adaptive != nullptr);
  attention->to(DType::f64);
  const auto params = attention->named_parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].first == "scorer_q");
  CHECK(params[1].first == "scorer_k");
  Tensor loss = sum(mul(attention->forward(p.q, p.k, p.v), p.dout));
  loss.backward();
  for (const auto& [name, param] : params) {
    INFO(name);
    REQUIRE(param.grad().defined());
    const std::vector<double> g = param.grad().to_vector();
    CHECK(all_finite(g));
    double norm = 0.0;
    for (double x : g) norm += x * x;
    CHECK(norm > 1e-12);
  }
}

TEST_CASE("adaptive: a few SGD steps on a task loss change the selected pattern") {
  LT_FRESH_SEED(seed);
  const int64_t B = 1, N = 32, H = 2, D = 8;
  Problem p = make_problem(B, N, H, D, seed);
  AttentionConfig config = small_config("adaptive", false);
  config.head_dim = D;
  config.density = 0.25;  // 8 blocks: the diagonal and one more per query block
  manual_seed(seed);
  AdaptiveBlockSparseAttention attention(config);
  attention.to(DType::f64);
  // Target: attention over all blocks. Each query block keeps only one extra block, so the loss
  // pushes the kept block's score (hence the scorer) towards the blocks that matter most.
  Tensor target;
  {
    NoGradGuard no_grad;
    target = DenseAttention(config).forward(p.q, p.k, p.v);
  }
  auto loss_of = [&]() {
    Tensor diff = sub(attention.forward(p.q, p.k, p.v), target);
    return mean(mul(diff, diff));
  };
  const std::vector<BlockLists> initial = [&] {
    NoGradGuard no_grad;
    attention.forward(p.q, p.k, p.v);
    return attention.last_pattern();
  }();

  // The scorer gradient is a descent direction of the task loss: a small step along it lowers the
  // loss (the pattern stays put for such a step).
  {
    attention.zero_grad();
    Tensor loss = loss_of();
    const double before = loss.item();
    loss.backward();
    double norm2 = 0.0;
    for (const Tensor& w : attention.parameters())
      for (double g : w.grad().to_vector()) norm2 += g * g;
    REQUIRE(norm2 > 0.0);
    const double step = 1e-3 * before / norm2;  // predicted decrease: 0.1% of the loss
    const std::vector<Tensor> saved{attention.scorer_q().detach().clone(), attention.scorer_k().detach().clone()};
    NoGradGuard no_grad;
    for (Tensor& w : attention.parameters()) w.copy_(sub(w, mul(w.grad(), step)));
    const double after = loss_of().item();
    if (attention.last_pattern() == initial) CHECK(after < before);
    attention.parameters()[0].copy_(saved[0]);
    attention.parameters()[1].copy_(saved[1]);
  }

  // A short run of plain SGD moves the scores enough to change which blocks are kept.
  bool changed = false;
  for (int step = 0; step < 20 && !changed; ++step) {
    attention.zero_grad();
    Tensor loss = loss_of();
    CHECK(std::isfinite(loss.item()));
    loss.backward();
    NoGradGuard no_grad;
    for (Tensor& w : attention.parameters()) w.copy_(sub(w, mul(w.grad(), 20.0)));
    attention.forward(p.q, p.k, p.v);
    changed = attention.last_pattern() != initial;
  }
  CHECK(changed);
}

TEST_CASE("hilbert schedule gives the same output as the natural schedule, bit for bit") {
  LT_FRESH_SEED(seed);
  for (DType dtype : {DType::f64, DType::f32}) {
    for (bool causal : {false, true}) {
      for (const char* name : {"all", "local_window", "dilated", "global_local", "random", "adaptive"}) {
        INFO("dtype " << std::string(dtype_name(dtype)) << " causal " << causal << " pattern " << std::string(name));
        Problem p = make_problem(2, 62, 2, 4, seed);
        AttentionConfig config = small_config(name, causal);
        config.window = 16;
        config.dilation_rates = {1, 3};
        std::vector<BlockLists> patterns;
        Tensor bias;
        const Tensor q = p.q.detach().to(dtype).requires_grad_(), k = p.k.detach().to(dtype).requires_grad_(),
                     v = p.v.detach().to(dtype).requires_grad_();
        if (config.pattern == "adaptive") {
          manual_seed(seed);
          AdaptiveBlockSparseAttention adaptive(config);
          bias = adaptive.block_scores(q, k);
          patterns = adaptive.select(bias);
        } else {
          patterns = BlockSparseAttention(config).head_patterns(62);
        }
        // The schedule really reorders the query blocks (for the full non-causal grid the mean rank
        // along the curve grows with the row, so that one order is the natural one).
        if (!(config.pattern == "all" && !causal))
          CHECK(query_block_order(patterns[0], true) != query_block_order(patterns[0], false));
        BlockSparseOptions natural;
        natural.block_size = 4;
        natural.causal = causal;
        natural.scale = config.scale();
        natural.max_score_elements = 3 * 4 * 4 * 4;  // several chunks per group of query blocks
        BlockSparseOptions hilbert = natural;
        hilbert.hilbert_schedule = true;
        AttentionOutput a = block_sparse_attention(q, k, v, patterns, natural, bias);
        AttentionOutput b = block_sparse_attention(q, k, v, patterns, hilbert, bias);
        CHECK(a.out.to_vector() == b.out.to_vector());
        CHECK(a.lse.to_vector() == b.lse.to_vector());
        // Gradients: sums over chunks in another order, equal to rounding.
        const std::vector<Tensor> inputs{q, k, v};
        const Tensor dout = p.dout.to(dtype);
        sum(mul(a.out, dout)).backward(Tensor(), true);  // the adaptive bias is shared by both graphs
        std::vector<std::vector<double>> grads_a;
        for (const Tensor& t : inputs) grads_a.push_back(t.grad().to_vector());
        for (Tensor t : inputs) t.zero_grad_();
        sum(mul(b.out, dout)).backward();
        const double tol = dtype == DType::f64 ? 1e-12 : 1e-5;
        for (size_t i = 0; i < inputs.size(); ++i)
          CHECK(oracle::max_scaled_error(inputs[i].grad().to_vector(), grads_a[i], tol, tol) <= 1.0);
      }
    }
  }
}

TEST_CASE("the schedule setting of the module selects the Hilbert schedule and keeps the output") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(1, 40, 2, 4, seed);
  AttentionConfig config = small_config("random", true);
  BlockSparseAttention natural(config);
  config.schedule = "hilbert";
  BlockSparseAttention hilbert(config);
  CHECK(natural.forward(p.q, p.k, p.v).to_vector() == hilbert.forward(p.q, p.k, p.v).to_vector());
}

TEST_CASE("gradcheck of block-sparse attention in f64 (fixed and adaptive patterns)") {
  LT_FRESH_SEED(seed);
  Problem p = make_problem(1, 10, 2, 3, seed);
  BlockSparseOptions options;
  options.block_size = 3;
  options.scale = 0.8;
  options.causal = true;
  // 4 blocks, the last holding one token; a row with no key (block 0 sees only block 1).
  const BlockLists pattern{{1}, {0, 1}, {1, 2}, {0, 3}};
  autograd::check_gradcheck(
      [&](const std::vector<Tensor>& x) { return block_sparse_attention(x[0], x[1], x[2], {pattern}, options).out; },
      {p.q, p.k, p.v});
  autograd::check_gradcheck(
      [&](const std::vector<Tensor>& x) {
        // Rows without keys have lse = -inf; they are replaced by 0 so the finite differences stay finite.
        Tensor lse = block_sparse_attention(x[0], x[1], x[2], {pattern}, options).lse;
        return where(eq(lse, Tensor::scalar(-std::numeric_limits<double>::infinity(), DType::f64)),
                     Tensor::scalar(0.0, DType::f64), lse);
      },
      {p.q, p.k, p.v});

  // Adaptive: through the scorer weights and through q, k into the block scores.
  manual_seed(seed);
  Tensor wq = Tensor::randn({3, 2}, DType::f64).requires_grad_();
  Tensor wk = Tensor::randn({3, 2}, DType::f64).requires_grad_();
  options.causal = false;
  autograd::check_gradcheck(
      [&](const std::vector<Tensor>& x) {
        Tensor scores = adaptive_block_scores(x[0], x[1], x[3], x[4], 3);
        return block_sparse_attention(x[0], x[1], x[2], select_top_blocks(scores, 2, false), options, scores).out;
      },
      {p.q, p.k, p.v, wq, wk});
}

TEST_CASE("block-sparse configuration and input errors are clear") {
  AttentionConfig config = small_config("diagonal", false);
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("pattern must be one of"), Error);
  config.pattern = "adaptive";
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("block_sparse_adaptive"), Error);
  config.pattern = "local_window";
  config.block_size = 0;
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("block_size must be > 0"), Error);
  config.block_size = 4;
  config.schedule = "zigzag";
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("schedule must be"), Error);
  config.schedule = "natural";
  config.pattern = "random";
  config.density = 0.0;
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("density must be in (0, 1]"), Error);
  CHECK_THROWS_WITH_AS(AdaptiveBlockSparseAttention{config}, doctest::Contains("density must be in (0, 1]"), Error);
  config.density = 0.5;
  config.pattern = "dilated";
  config.dilation_rates = {2, 0};
  CHECK_THROWS_WITH_AS(BlockSparseAttention{config}, doctest::Contains("dilation rates must be > 0"), Error);

  Problem p = make_problem(1, 8, 2, 4, 5);
  BlockSparseOptions options;
  options.block_size = 4;
  CHECK_THROWS_WITH_AS(block_sparse_attention(p.q, p.k, p.v, {BlockLists{{0}}}, options),
                       doctest::Contains("needs 2"), Error);
  CHECK_THROWS_WITH_AS(block_sparse_attention(p.q, p.k, p.v, {BlockLists{{0}, {2}}}, options),
                       doctest::Contains("outside [0, 2)"), Error);
  CHECK_THROWS_WITH_AS(block_sparse_attention(p.q, p.k, p.v, {BlockLists{{0, 0}, {1}}}, options),
                       doctest::Contains("listed twice"), Error);
  CHECK_THROWS_WITH_AS(block_sparse_attention(p.q, p.k, p.v, {BlockLists{{0}, {1}}, BlockLists{{0}, {1}},
                                                               BlockLists{{0}, {1}}},
                                              options),
                       doctest::Contains("one per head (2)"), Error);
  CHECK_THROWS_WITH_AS(
      block_sparse_attention(p.q, p.k, p.v, {BlockLists{{0}, {1}}}, options, Tensor::zeros({1, 2, 2, 3}, DType::f64)),
      doctest::Contains("block_bias must be (B, H, nq_blocks, nk_blocks)"), Error);
  Tensor short_k = p.k.detach().narrow(1, 0, 4).contiguous();
  options.causal = true;
  CHECK_THROWS_WITH_AS(block_sparse_attention(p.q, short_k, short_k, {BlockLists{{0}, {0}}}, options),
                       doctest::Contains("as many queries as keys"), Error);
  BlockSparseAttention attention(small_config("local_window", false));
  CHECK_THROWS_WITH_AS(attention.forward(p.q, short_k, short_k), doctest::Contains("same length"), Error);
  CHECK_THROWS_WITH_AS(attention.forward(p.q.detach().narrow(3, 0, 2), p.k, p.v), doctest::Contains("head_dim"), Error);
}

TEST_CASE("block_sparse and block_sparse_adaptive are registered variants") {
  const auto names = registered_attention_names();
  for (const char* name : {"block_sparse", "block_sparse_adaptive", "hilbert"})
    CHECK(std::find(names.begin(), names.end(), name) != names.end());
  AttentionConfig config = small_config("dilated", true);
  CHECK(make_attention("block_sparse", config)->variant_name() == "block_sparse");
  config.pattern = "adaptive";
  CHECK(make_attention("block_sparse", config)->variant_name() == "block_sparse_adaptive");
  config.pattern = "random";  // the adaptive variant ignores config.pattern
  auto adaptive = make_attention("block_sparse_adaptive", config);
  CHECK(adaptive->variant_name() == "block_sparse_adaptive");
  CHECK(adaptive->config().pattern == "adaptive");
  CHECK_FALSE(attention_description("block_sparse").empty());
  Problem p = make_problem(1, 12, 2, 4, fresh_seed());
  CHECK(adaptive->forward(p.q.detach().to(DType::f32), p.k.detach().to(DType::f32), p.v.detach().to(DType::f32))
            .shape() == Shape({1, 12, 2, 4}));
}

TEST_CASE("block_sparse: one layer called with several lengths gives what a fresh layer gives at each") {
  // The layer keeps the pattern of the last length it saw; a different length must rebuild it.
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  for (const char* pattern : {"local_window", "random"}) {
    const AttentionConfig config = small_config(pattern, false);
    auto reused = make_attention("block_sparse", config);
    for (int64_t n : {int64_t{24}, int64_t{13}, int64_t{24}}) {
      INFO(pattern << " N " << n);
      Tensor q = Tensor::randn({1, n, 2, 4}, DType::f64), k = Tensor::randn({1, n, 2, 4}, DType::f64),
             v = Tensor::randn({1, n, 2, 4}, DType::f64);
      const std::vector<double> got = reused->forward(q, k, v).to_vector();
      const std::vector<double> want = make_attention("block_sparse", config)->forward(q, k, v).to_vector();
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == want[i]);
    }
  }
}
