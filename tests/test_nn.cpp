// Layers and the language model: values against float64 references, dotted names, state dicts,
// dtype moves, tied embeddings, train/eval, causality and errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "attention/multihead.h"
#include "tensor/autograd/gradcheck.h"
#include "nn/data.h"
#include "models/language_model.h"
#include "nn/layers.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::models;
using namespace longtape::nn;

namespace {

LanguageModelConfig tiny_config(const std::string& variant = "dilated", bool tied = true) {
  LanguageModelConfig c;
  c.vocab_size = 11;
  c.max_seq_len = 16;
  c.embed_dim = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.attention = variant;
  c.attention_config.segment_lengths = {4, 16};
  c.attention_config.dilation_rates = {1, 2};
  c.tied_embeddings = tied;
  return c;
}

Tensor random_tokens(int64_t b, int64_t t, int64_t vocab, uint64_t seed) {
  std::vector<int64_t> v(b * t);
  uint64_t s = seed;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<int64_t>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  return Tensor::from_vector(v, {b, t});
}

std::set<std::string> names_of(const Module& m) {
  std::set<std::string> out;
  for (auto& [n, t] : m.named_parameters()) out.insert(n);
  return out;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  auto x = a.to_vector(), y = b.to_vector();
  REQUIRE(x.size() == y.size());
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - y[i]));
  return worst;
}

}  // namespace

TEST_CASE("Linear computes x W^T + b like a float64 reference and initialises within its bound") {
  manual_seed(21);
  Linear lin(5, 3);
  const double bound = 1.0 / std::sqrt(5.0);
  for (double w : lin.weight.to_vector()) CHECK(std::abs(w) <= bound);
  CHECK(lin.weight.shape() == Shape{3, 5});
  CHECK(names_of(lin) == std::set<std::string>{"weight", "bias"});
  lin.to(DType::f64);
  Tensor x = Tensor::randn({2, 4, 5}, DType::f64);
  Tensor y = lin.forward(x);
  REQUIRE(y.shape() == Shape{2, 4, 3});
  auto xv = x.to_vector(), wv = lin.weight.to_vector(), bv = lin.bias.to_vector(), yv = y.to_vector();
  for (int r = 0; r < 8; ++r)
    for (int o = 0; o < 3; ++o) {
      double want = bv[o];
      for (int i = 0; i < 5; ++i) want += xv[r * 5 + i] * wv[o * 5 + i];
      CHECK(yv[r * 3 + o] == doctest::Approx(want).epsilon(1e-12));
    }
  Linear no_bias(5, 2, false);
  CHECK_FALSE(no_bias.bias.defined());
  CHECK(names_of(no_bias) == std::set<std::string>{"weight"});
  CHECK_THROWS_WITH_AS(lin.forward(Tensor::randn({2, 4}, DType::f64)), doctest::Contains("Linear: input must be (..., 5)"),
                       Error);
  CHECK_THROWS_AS(Linear(0, 3), Error);
}

TEST_CASE("LayerNorm, Embedding, GELU and MLP against float64 references") {
  manual_seed(22);
  LayerNorm ln(6);
  ln.to(DType::f64);
  {
    NoGradGuard g;
    ln.weight.copy_(Tensor::randn({6}, DType::f64));
    ln.bias.copy_(Tensor::randn({6}, DType::f64));
  }
  Tensor x = Tensor::randn({3, 6}, DType::f64);
  auto y = ln.forward(x).to_vector(), xv = x.to_vector(), w = ln.weight.to_vector(), b = ln.bias.to_vector();
  for (int r = 0; r < 3; ++r) {
    double mean = 0, var = 0;
    for (int i = 0; i < 6; ++i) mean += xv[r * 6 + i] / 6;
    for (int i = 0; i < 6; ++i) var += (xv[r * 6 + i] - mean) * (xv[r * 6 + i] - mean) / 6;
    for (int i = 0; i < 6; ++i)
      CHECK(y[r * 6 + i] == doctest::Approx((xv[r * 6 + i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i]));
  }

  Embedding emb(7, 4);
  Tensor idx = Tensor::from_vector(std::vector<int64_t>{3, 0, 6, 3}, {2, 2});
  Tensor e = emb.forward(idx);
  REQUIRE(e.shape() == Shape{2, 2, 4});
  auto ev = e.to_vector(), table = emb.weight.to_vector();
  const int64_t rows[] = {3, 0, 6, 3};
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 4; ++j) CHECK(ev[k * 4 + j] == table[rows[k] * 4 + j]);
  CHECK_THROWS_AS(emb.forward(Tensor::from_vector(std::vector<int64_t>{7}, {1})), Error);

  GELU gelu_layer;
  Tensor z = Tensor::randn({10}, DType::f64);
  auto gz = gelu_layer.forward(z).to_vector(), zv = z.to_vector();
  for (int i = 0; i < 10; ++i)
    CHECK(gz[i] == doctest::Approx(0.5 * zv[i] * (1 + std::erf(zv[i] / std::sqrt(2.0)))).epsilon(1e-9));

  MLP mlp(8);
  CHECK(mlp.fc1->weight.shape() == Shape{32, 8});
  CHECK(mlp.fc2->weight.shape() == Shape{8, 32});
  CHECK(names_of(mlp) == std::set<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"});
  CHECK(mlp.forward(Tensor::randn({2, 3, 8})).shape() == Shape{2, 3, 8});
}

TEST_CASE("Dropout drops with probability p while training and is the identity in eval") {
  manual_seed(23);
  Dropout drop(0.25);
  Tensor x = add(Tensor::rand({4000}), 1.0);  // strictly positive, so zeros are drops
  auto y = drop.forward(x).to_vector(), xv = x.to_vector();
  int zeros = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (y[i] == 0) ++zeros;
    else CHECK(y[i] == doctest::Approx(xv[i] / 0.75));
  }
  CHECK(zeros > 850);
  CHECK(zeros < 1150);
  drop.eval();
  CHECK(drop.forward(x).to_vector() == xv);
  CHECK_THROWS_AS(Dropout(1.0), Error);
}

TEST_CASE("TransformerBlock: pre-LN residual structure and float64 gradcheck") {
  manual_seed(24);
  TransformerBlockConfig c;
  c.embed_dim = 8;
  attention::AttentionConfig causal;
  causal.causal = true;
  causal.num_heads = 2;
  causal.head_dim = 4;
  TransformerBlock block(c, std::make_shared<attention::MultiheadAttention>(8, 2, "dense", causal));
  std::set<std::string> names = names_of(block);
  for (const char* n : {"ln1.weight", "ln1.bias", "ln2.weight", "mlp.fc1.weight", "mlp.fc2.bias"})
    CHECK(names.count(n) == 1);
  CHECK(std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.rfind("attn.", 0) == 0; }));
  block.to(DType::f64);
  Tensor x = Tensor::randn({1, 5, 8}, DType::f64);
  // Equals x + attn(ln1(x)) + mlp(ln2(x + attn(ln1(x)))) composed from the children.
  Tensor h = add(x, block.attn->forward(block.ln1->forward(x)));
  Tensor want = add(h, block.mlp->forward(block.ln2->forward(h)));
  // The residual enters the branch's last product: the same sum in another rounding order.
  CHECK(max_abs_diff(block.forward(x), want) < 1e-13);
  x.requires_grad_(true);
  auto result = autograd::gradcheck([&](const std::vector<Tensor>& in) { return block.forward(in[0]); }, {x});
  CHECK_MESSAGE(result.passed, result.message);
  CHECK_THROWS_AS(block.forward(Tensor::randn({5, 8}, DType::f64)), Error);
  CHECK_THROWS_WITH_AS(TransformerBlock(c, nullptr), doctest::Contains("needs an attention module"), Error);
  c.embed_dim = 0;
  CHECK_THROWS_WITH_AS(TransformerBlock(c, block.attn), doctest::Contains("embed_dim must be >= 1"), Error);
  CHECK_THROWS_WITH_AS(attention::MultiheadAttention(9, 2, "dense"), doctest::Contains("divisible by num_heads"),
                       Error);
}

TEST_CASE("MultiheadAttention key_shift: smeared keys against a float64 reference, and gradcheck") {
  manual_seed(31);
  const int64_t n = 5, e = 4;  // one head of width 4, causal dense core
  attention::MultiheadAttentionOptions o;
  o.embed_dim = e;
  o.num_heads = 1;
  o.variant = "dense";
  o.attention.causal = true;
  o.sub_layernorm = false;
  o.key_shift = true;
  o.dtype = DType::f64;
  attention::MultiheadAttention mha(o);
  REQUIRE(mha.key_shift.defined());
  CHECK(mha.key_shift.shape() == Shape{e});
  {
    NoGradGuard no_grad;  // random gates and biases instead of the zeros of the initialisation
    mha.key_shift.copy_(Tensor::randn({e}, DType::f64));
    mha.b_k.copy_(Tensor::randn({e}, DType::f64));
    mha.b_out.copy_(Tensor::randn({e}, DType::f64));
  }
  Tensor x = Tensor::randn({1, n, e}, DType::f64);
  // Reference: k'_t = k_t + sigmoid(s) (k_{t-1} - k_t) with k_{-1} = 0, then causal softmax attention.
  auto project = [&](const Tensor& w, const Tensor& b) { return add(matmul(x, w), b).to_vector(); };
  const std::vector<double> q = project(mha.w_q, mha.b_q), k = project(mha.w_k, mha.b_k),
                            v = project(mha.w_v, mha.b_v), gate_logit = mha.key_shift.to_vector();
  std::vector<double> ks(k.size()), merged(k.size(), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < e; ++c) {
      const double g = 1.0 / (1.0 + std::exp(-gate_logit[c]));
      const double previous = t > 0 ? k[(t - 1) * e + c] : 0.0;
      ks[t * e + c] = k[t * e + c] + g * (previous - k[t * e + c]);
    }
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> score(t + 1);
    double top = -1e300, total = 0;
    for (int64_t j = 0; j <= t; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < e; ++c) dot += q[t * e + c] * ks[j * e + c];
      score[j] = dot / std::sqrt(static_cast<double>(e));
      top = std::max(top, score[j]);
    }
    for (double& z : score) total += (z = std::exp(z - top));
    for (int64_t j = 0; j <= t; ++j)
      for (int64_t c = 0; c < e; ++c) merged[t * e + c] += score[j] / total * v[j * e + c];
  }
  Tensor want = add(matmul(Tensor::from_vector(merged, {1, n, e}), mha.w_out), mha.b_out);
  CHECK(max_abs_diff(mha.forward(x), want) < 1e-12);
  // Analytic gradients of the input and of the gate logits against finite differences.
  x.requires_grad_(true);
  auto result = autograd::gradcheck(
      [&](const std::vector<Tensor>& in) { return mha.forward(in[0]); }, {x, mha.key_shift});
  CHECK_MESSAGE(result.passed, result.message);
  CHECK(result.checked_elements == n * e + e);
  // Off by default: no parameter, and the names of existing checkpoints are unchanged.
  attention::MultiheadAttention plain(e, 1, "dense");
  CHECK_FALSE(plain.key_shift.defined());
  CHECK(names_of(plain).count("key_shift") == 0);
  CHECK(names_of(mha).count("key_shift") == 1);
}

TEST_CASE("LanguageModel: dotted names, tied head, logits shape, parameter counts") {
  manual_seed(25);
  LanguageModel tied(tiny_config());
  std::set<std::string> names = names_of(tied);
  for (const char* n : {"tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.1.mlp.fc2.bias",
                        "ln_f.weight", "ln_f.bias"})
    CHECK(names.count(n) == 1);
  CHECK(names.count("head.weight") == 0);
  CHECK(tied.head_weight().same(tied.tok_emb->weight));  // one tensor, used twice
  LanguageModel untied(tiny_config("dilated", false));
  CHECK(names_of(untied).count("head.weight") == 1);
  CHECK(untied.num_parameters() - tied.num_parameters() == 11 * 16);
  CHECK_FALSE(untied.head_weight().same(untied.tok_emb->weight));

  Tensor tokens = random_tokens(2, 12, 11, 7);
  Tensor logits = tied.forward(tokens);
  CHECK(logits.shape() == Shape{2, 12, 11});
  // The tied weight receives gradient from the head too: rows of tokens absent from the input
  // get gradient only through the head.
  std::set<int64_t> present;
  for (int64_t t : tokens.to_vector_as<int64_t>()) present.insert(t);
  sum(mul(logits, logits)).backward();
  auto g = tied.tok_emb->weight.grad().to_vector();
  int absent_rows_with_grad = 0;
  for (int64_t v = 0; v < 11; ++v) {
    if (present.count(v)) continue;
    double row = 0;
    for (int j = 0; j < 16; ++j) row += std::abs(g[v * 16 + j]);
    if (row > 0) ++absent_rows_with_grad;
  }
  CHECK(present.size() < 11);
  CHECK(absent_rows_with_grad == static_cast<int>(11 - present.size()));
  tied.zero_grad();
  CHECK_FALSE(tied.tok_emb->weight.grad().defined());

  LanguageModelConfig no_pos = tiny_config();
  no_pos.max_seq_len = 0;
  LanguageModel np(no_pos);
  CHECK(names_of(np).count("pos_emb.weight") == 0);
  CHECK(np.forward(random_tokens(1, 40, 11, 3)).shape() == Shape{1, 40, 11});
}

TEST_CASE("LanguageModel is causal: later tokens never change earlier logits") {
  for (const char* variant : {"dense", "dilated"}) {
    manual_seed(26);
    LanguageModel model(tiny_config(variant));
    model.eval();
    Tensor a = random_tokens(1, 16, 11, 5);
    auto av = a.to_vector_as<int64_t>();
    for (int t = 9; t < 16; ++t) av[t] = (av[t] + 3) % 11;
    Tensor b = Tensor::from_vector(av, {1, 16});
    auto la = model.forward(a).to_vector(), lb = model.forward(b).to_vector();
    bool later_changed = false;
    for (int t = 0; t < 16; ++t)
      for (int v = 0; v < 11; ++v) {
        if (t < 9) CHECK(la[t * 11 + v] == lb[t * 11 + v]);
        else if (la[t * 11 + v] != lb[t * 11 + v]) later_changed = true;
      }
    CHECK(later_changed);
  }
}

TEST_CASE("state_dict round trip, to(dtype), train/eval and load errors") {
  manual_seed(27);
  LanguageModelConfig c = tiny_config();
  c.dropout = 0.2;
  LanguageModel a(c);
  manual_seed(99);
  LanguageModel b(c);
  Tensor tokens = random_tokens(2, 16, 11, 9);
  a.eval();
  b.eval();
  CHECK(max_abs_diff(a.forward(tokens), b.forward(tokens)) > 0);
  auto state = a.state_dict();
  CHECK(state.size() == a.named_parameters().size() + a.named_buffers().size());
  b.load_state_dict(state);
  CHECK(max_abs_diff(a.forward(tokens), b.forward(tokens)) == 0.0);
  // The copy is by value: changing a does not change b.
  {
    NoGradGuard g;
    a.ln_f->bias.fill_(0.5);
  }
  CHECK(max_abs_diff(a.forward(tokens), b.forward(tokens)) > 0);

  // train(): dropout makes two forwards differ; eval(): identical.
  b.train();
  CHECK(b.blocks->at(1)->is_training());
  CHECK(max_abs_diff(b.forward(tokens), b.forward(tokens)) > 0);
  b.eval();
  CHECK_FALSE(b.blocks->at(1)->is_training());
  CHECK(max_abs_diff(b.forward(tokens), b.forward(tokens)) == 0.0);

  // to(f64): every parameter is f64 and the logits agree with f32 to float precision.
  Tensor l32 = b.forward(tokens);
  b.to(DType::f64);
  for (auto& [n, t] : b.named_parameters()) CHECK_MESSAGE(t.dtype() == DType::f64, n);
  Tensor l64 = b.forward(tokens);
  CHECK(l64.dtype() == DType::f64);
  CHECK(max_abs_diff(l32, l64) < 1e-4);
  CHECK(b.head_weight().same(b.tok_emb->weight));  // still one tensor after the move

  auto missing = state;
  missing.erase("ln_f.weight");
  CHECK_THROWS_WITH_AS(a.load_state_dict(missing), doctest::Contains("missing key 'ln_f.weight'"), Error);
  auto wrong = state;
  wrong["ln_f.weight"] = Tensor::zeros({3});
  CHECK_THROWS_WITH_AS(a.load_state_dict(wrong), doctest::Contains("has shape"), Error);
}

TEST_CASE("LanguageModel rejects bad configs and inputs") {
  manual_seed(28);
  LanguageModel model(tiny_config());
  CHECK_THROWS_WITH_AS(model.forward(random_tokens(1, 17, 11, 1)), doctest::Contains("exceeds max_seq_len = 16"), Error);
  CHECK_THROWS_WITH_AS(model.forward(Tensor::zeros({1, 4})), doctest::Contains("i64 or i32"), Error);
  CHECK_THROWS_AS(model.forward(Tensor::from_vector(std::vector<int64_t>{1, 2, 11}, {1, 3})), Error);
  LanguageModelConfig c = tiny_config();
  c.embed_dim = 18;
  CHECK_THROWS_WITH_AS(LanguageModel{c}, doctest::Contains("multiple of num_heads"), Error);
  c = tiny_config("no_such_variant");
  CHECK_THROWS_AS(LanguageModel{c}, Error);
  c = tiny_config();
  c.vocab_size = 0;
  CHECK_THROWS_AS(LanguageModel{c}, Error);
  // Sizes from a config are multiplied through checked arithmetic: 4 * dim past int64 is refused by
  // name, before any allocation.
  CHECK_THROWS_WITH_AS(MLP(int64_t{1} << 62), doctest::Contains("MLP: hidden size 4 * dim"), Error);
  CHECK_THROWS_WITH_AS(MLP(0), doctest::Contains("MLP: dim must be >= 1, got 0"), Error);
  CHECK_THROWS_WITH_AS(Linear(int64_t{1} << 40, int64_t{1} << 40), doctest::Contains("overflows"), Error);
  ModuleList list;
  list.push_back(std::make_shared<Linear>(2, 2));
  CHECK_THROWS_WITH_AS(list.at(1), doctest::Contains("out of range"), Error);
  CHECK_THROWS_AS(list.at_as<LayerNorm>(0), Error);
}

TEST_CASE("RecallTask: documented layout, answers planted earlier, seeded batches") {
  RecallTaskConfig c{.seq_len = 40, .num_keys = 10, .num_values = 5, .num_filler = 3, .num_pairs = 4,
                     .num_queries = 3, .seed = 9};
  RecallTask task(c);
  CHECK(task.vocab_size() == 10 + 5 + 3 + 1);
  Batch b = task.batch(6, 2);
  REQUIRE(b.inputs.shape() == Shape{6, 40});
  auto in = b.inputs.to_vector_as<int64_t>(), tg = b.targets.to_vector_as<int64_t>();
  const int64_t context = 40 - 1 - 2 * 3;
  for (int64_t s = 0; s < 6; ++s) {
    const int64_t* x = in.data() + s * 40;
    const int64_t* y = tg.data() + s * 40;
    std::map<int64_t, int64_t> planted;  // key -> value token
    for (int64_t t = 0; t < context; ++t) {
      if (x[t] < 10) {
        CHECK(planted.count(x[t]) == 0);  // distinct keys
        REQUIRE(t + 1 < context);
        CHECK(x[t + 1] >= 10);
        CHECK(x[t + 1] < 15);
        planted[x[t]] = x[t + 1];
      } else if (x[t] >= 15) {
        CHECK(x[t] < 18);  // filler, never the query marker inside the context
      }
    }
    CHECK(planted.size() == 4);
    CHECK(x[context] == task.query_token());
    int scored = 0;
    for (int64_t t = 0; t < 40; ++t) {
      if (y[t] == kIgnoreIndex) continue;
      ++scored;
      REQUIRE(planted.count(x[t]) == 1);  // a scored position holds a planted key...
      CHECK(y[t] == planted[x[t]]);       // ...and its target is that key's value
      CHECK(t > context);
      CHECK(x[t + 1] == y[t]);            // the answer is fed back as the next input
    }
    CHECK(scored == 3);
  }
  // Same (seed, index) -> same batch; other index or split -> different.
  CHECK(task.batch(6, 2).inputs.to_vector() == b.inputs.to_vector());
  CHECK(task.batch(6, 3).inputs.to_vector() != b.inputs.to_vector());
  CHECK(task.batch(6, 2, Split::heldout).inputs.to_vector() != b.inputs.to_vector());
  CHECK_THROWS_WITH_AS(RecallTask({.seq_len = 12, .num_pairs = 4, .num_queries = 4}), doctest::Contains("too short"),
                       Error);
  CHECK_THROWS_AS(RecallTask({.num_keys = 3, .num_pairs = 4}), Error);
  CHECK_THROWS_AS(RecallTask({.num_pairs = 2, .num_queries = 3}), Error);
}

TEST_CASE("CharTextDataset windows and accuracy on scored positions") {
  std::vector<uint8_t> bytes;
  for (int i = 0; i < 500; ++i) bytes.push_back(static_cast<uint8_t>('a' + (i * 7) % 26));
  CharTextDataset data(bytes, 16, 1, 0.2);
  Batch b = data.batch(3, 0);
  auto in = b.inputs.to_vector_as<int64_t>(), tg = b.targets.to_vector_as<int64_t>();
  for (int s = 0; s < 3; ++s)
    for (int t = 0; t < 15; ++t) CHECK(tg[s * 16 + t] == in[s * 16 + t + 1]);  // shifted by one
  for (int64_t v : in) CHECK((v >= 'a' && v <= 'z'));
  CHECK(data.batch(3, 0).inputs.to_vector() == b.inputs.to_vector());
  CHECK_THROWS_WITH_AS(CharTextDataset(std::vector<uint8_t>(10, 'x'), 16), doctest::Contains("too short"), Error);
  CHECK_THROWS_AS(CharTextDataset("/nonexistent/longtape.txt", 8), Error);

  // accuracy(): argmax per scored row; ignored rows do not count.
  Tensor logits = Tensor::from_vector(std::vector<float>{0.1f, 0.9f, 0.0f,  // argmax 1
                                                         2.0f, 0.0f, 1.0f,  // argmax 0
                                                         0.0f, 0.0f, 3.0f},
                                      {1, 3, 3});
  Tensor targets = Tensor::from_vector(std::vector<int64_t>{1, 2, kIgnoreIndex}, {1, 3});
  AccuracyCount acc = accuracy(logits, targets);
  CHECK(acc.correct == 1);
  CHECK(acc.total == 2);
  CHECK(acc.value() == doctest::Approx(0.5));
  CHECK_THROWS_AS(accuracy(logits, Tensor::from_vector(std::vector<int64_t>{1, 2}, {1, 2})), Error);
}
