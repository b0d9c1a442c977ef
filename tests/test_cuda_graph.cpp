// The training step captured into a CUDA graph (TrainerOptions::cuda_graph, `train --cuda-graph`):
// on the CPU, the refusals with their messages and the in-place gradients the graph relies on; with
// a GPU (skipped without one), graph-replayed training against the same run without the graph
// (bitwise: the same kernels run on the same values), a diverged replay that leaves the weights
// and the optimizer as they were, the steps that cannot be captured, and cuda::Graph itself (its
// replay on new inputs, its private pool, a host copy inside a capture).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tensor/autograd/grad_mode.h"
#include "models/language_model.h"
#include "nn/data.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "support/cli_runner.h"
#include "tensor/capture_retain.h"
#include "tensor/ops.h"

#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/graph.h"
#endif

using namespace longtape;
using namespace longtape::models;
using namespace longtape::nn;

namespace {

RecallTaskConfig recall_config(int64_t seq_len) {
  return {.seq_len = seq_len, .num_keys = 8, .num_values = 4, .num_filler = 4, .num_pairs = 4, .num_queries = 4,
          .seed = 5};
}

// Head dim 32, which the fused attention kernels take on CUDA (the composed path uploads index
// tables on every call, which a graph cannot hold).
LanguageModelConfig model_config(int64_t vocab, double dropout = 0.0) {
  LanguageModelConfig c{.vocab_size = vocab, .max_seq_len = 64, .embed_dim = 64, .num_layers = 2, .num_heads = 2};
  c.attention_config.segment_lengths = {16, 32};
  c.attention_config.dilation_rates = {1, 2};
  c.attention_config.impl = "fused";
  c.key_shift = true;
  c.dropout = dropout;
  return c;
}

AdamWOptions adamw_options() {
  AdamWOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0.01;
  o.decays = decay_matrices_only;
  return o;
}

std::vector<double> random_values(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> v(n);
  for (double& x : v) x = normal(gen);
  return v;
}

}  // namespace

TEST_CASE("AccumulateInPlaceGuard adds into the existing gradient's memory; zero_grad(false) keeps it") {
  Tensor w = Tensor::from_vector(random_values(12, 1), {3, 4});
  w.requires_grad_();
  const Tensor x = Tensor::from_vector(random_values(12, 2), {3, 4});
  const Tensor y = Tensor::from_vector(random_values(12, 3), {3, 4});
  sum(mul(w, x)).backward();  // d/dw = x
  const void* first = w.grad().raw_data();
  {
    autograd::AccumulateInPlaceGuard in_place;
    sum(mul(w, y)).backward();  // += y, in place
  }
  CHECK(w.grad().raw_data() == first);
  const std::vector<double> xs = x.to_vector(), ys = y.to_vector(), g = w.grad().to_vector();
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == doctest::Approx(xs[i] + ys[i]).epsilon(1e-12));
  // Without the guard the sum is a new tensor, as before.
  sum(mul(w, x)).backward();
  CHECK(w.grad().raw_data() != first);

  SGD sgd({{"w", w}}, SGDOptions{.lr = 0.1});
  const void* kept = w.grad().raw_data();
  sgd.zero_grad(false);
  CHECK(w.grad().raw_data() == kept);
  for (double v : w.grad().to_vector()) CHECK(v == 0.0);
  sgd.zero_grad();
  CHECK_FALSE(w.grad().defined());
}

TEST_CASE("RetainDuringCapture keeps what caches hand it for as long as its list lives, and nothing outside") {
  const Tensor a = Tensor::from_vector(random_values(4, 7), {4});
  const Tensor b = Tensor::from_vector(random_values(4, 8), {4});
  retain_during_capture(a);  // no scope: nothing kept
  CHECK(a.storage().use_count() == 1);
  std::vector<Tensor> outer, inner;
  {
    RetainDuringCapture keep(outer);
    retain_during_capture(a);
    {
      RetainDuringCapture nested(inner);
      retain_during_capture(b);
      retain_during_capture(Tensor());  // undefined: ignored
    }
    retain_during_capture(b);
  }
  retain_during_capture(a);
  REQUIRE(outer.size() == 2);
  REQUIRE(inner.size() == 1);
  CHECK(outer[0].raw_data() == a.raw_data());
  CHECK(outer[1].raw_data() == b.raw_data());
  CHECK(inner[0].raw_data() == b.raw_data());
}

TEST_CASE("cuda_graph refuses a model on the CPU, and AdamW's device scalars refuse CPU parameters") {
  RecallTask task(recall_config(32));
  LanguageModel model(model_config(task.vocab_size()));
  AdamW optimizer(model.named_parameters(), adamw_options());
  TrainerOptions o;
  o.steps = 2;
  o.cuda_graph = true;
  CHECK_THROWS_WITH_AS(Trainer(model, optimizer, CosineSchedule{}, o),
                       doctest::Contains("cuda_graph needs the model on a CUDA device, got parameter"), Error);
  CHECK_THROWS_WITH_AS(Trainer(model, optimizer, CosineSchedule{}, o), doctest::Contains("on cpu"), Error);
  // A step to give the parameters gradients, so the fused kernel's requirements are checked.
  TrainerOptions plain;
  plain.steps = 1;
  plain.batch_size = 2;
  Trainer trainer(model, optimizer, CosineSchedule{}, plain);
  trainer.fit(batches_of(task));
  CHECK_FALSE(optimizer.fused_blocker().empty());
  CHECK_THROWS_WITH_AS(optimizer.use_device_scalars(true), doctest::Contains("device scalars need every parameter"),
                       Error);
  CHECK_THROWS_WITH_AS(optimizer.stage_device_scalars(), doctest::Contains("device scalars are off"), Error);
}

TEST_CASE("longtape train --cuda-graph: what cannot be captured exits 2 naming the flag" *
          doctest::skip(testing::longtape_binary_missing())) {
  const auto dir = testing::fresh_dir("train_cuda_graph_flags");
  const std::string bin = "'" + std::filesystem::absolute(testing::longtape_binary()).string() + "'";
  struct Case {
    const char* flags;
    const char* message;
  };
  const Case cases[] = {
      {"--device cpu", "--cuda-graph needs a CUDA device, got --device cpu"},
      {"--device cpu --profile", "--cuda-graph cannot be combined with --profile"},
      {"--device cpu --parallel data", "--cuda-graph cannot be combined with --parallel data"},
      {"--device cpu --dropout 0.1", "--cuda-graph needs --dropout 0, got 0.1"},
      {"--device cpu --variant ring --inner dense --ranks 2", "--cuda-graph cannot capture --variant ring"},
  };
  for (const Case& c : cases) {
    const auto r = testing::run_command("cd '" + dir.string() + "' && OMP_NUM_THREADS=1 timeout 60 " + bin +
                                            " train --steps 2 --batch 2 --seq-len 32 --cuda-graph " + c.flags,
                                        dir / "log.txt");
    INFO(c.flags, "\n", r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find(c.message) != std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

namespace {

struct Run {
  std::vector<double> losses, norms;
  std::vector<std::vector<double>> weights;
  int64_t captures = 0, replays = 0;
};

// `steps` steps of the recall model on cuda:0 from a fixed seed; with `two_lengths`, the first 3
// steps train on 32 tokens and the rest on 64 (a shape change: warm-up and capture again).
Run train_on_cuda(bool graph, Precision precision, int64_t steps, bool two_lengths) {
  manual_seed(2025);
  RecallTask short_task(recall_config(32)), long_task(recall_config(64));
  LanguageModel model(model_config(long_task.vocab_size()));
  model.to(Device::cuda(0));
  AdamW optimizer(model.named_parameters(), adamw_options());
  TrainerOptions o;
  o.steps = steps;
  o.batch_size = 4;
  o.clip = 0.5;  // small enough that the clipping happens
  o.eval_every = 3;
  o.eval_batches = 1;
  o.precision = precision;
  o.cuda_graph = graph;
  Trainer trainer(model, optimizer, CosineSchedule{3e-3, 3e-4, 2, steps}, o);
  Run run;
  trainer.on_step = [&](const StepResult& r) {
    run.losses.push_back(r.loss);
    run.norms.push_back(r.grad_norm);
  };
  const BatchSource short_batches = batches_of(short_task, Device::cuda(0));
  const BatchSource long_batches = batches_of(long_task, Device::cuda(0));
  trainer.fit([&](int64_t size, int64_t index, Split split) {
    return two_lengths && index < 3 && split == Split::train ? short_batches(size, index, split)
                                                             : long_batches(size, index, split);
  });
  for (const auto& [name, p] : model.named_parameters()) run.weights.push_back(p.to_vector());
  for (const auto& [name, t] : optimizer.state()) run.weights.push_back(t.to_vector());
  run.captures = trainer.graph_captures();
  run.replays = trainer.graph_replays();
  return run;
}

double max_difference(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, a[i] == b[i] ? 0.0 : std::abs(a[i] - b[i]));
  return worst;
}

}  // namespace

TEST_CASE("GPU: training replayed from a CUDA graph equals training without it, bitwise, in f32 and bf16" *
          doctest::skip(!cuda_available())) {
  for (Precision precision : {Precision::f32, Precision::bf16}) {
    for (bool two_lengths : {false, true}) {
      INFO("precision ", precision_name(precision), two_lengths ? ", 32 then 64 tokens" : ", 64 tokens");
      constexpr int64_t kSteps = 7;
      const Run eager = train_on_cuda(false, precision, kSteps, two_lengths);
      const Run graph = train_on_cuda(true, precision, kSteps, two_lengths);
      // One warm-up step per shape, the rest replayed (the capture step included).
      CHECK(graph.captures == (two_lengths ? 2 : 1));
      CHECK(graph.replays == kSteps - graph.captures);
      CHECK(eager.captures == 0);
      REQUIRE(eager.losses.size() == static_cast<size_t>(kSteps));
      // Tolerance 0: the same kernels run on the same values in the same order.
      CHECK(max_difference(eager.losses, graph.losses) == 0.0);
      CHECK(max_difference(eager.norms, graph.norms) == 0.0);
      CHECK(eager.losses.back() < eager.losses.front());
      REQUIRE(eager.weights.size() == graph.weights.size());
      double worst = 0;
      for (size_t i = 0; i < eager.weights.size(); ++i) worst = std::max(worst, max_difference(eager.weights[i], graph.weights[i]));
      CHECK(worst == 0.0);
    }
  }
}

TEST_CASE("GPU: a non-finite gradient under graph replay leaves weights and optimizer unchanged and throws" *
          doctest::skip(!cuda_available())) {
  manual_seed(11);
  RecallTask task(recall_config(64));
  LanguageModel model(model_config(task.vocab_size()));
  model.to(Device::cuda(0));
  AdamW optimizer(model.named_parameters(), adamw_options());
  // The logits are scaled by a device value the graph reads on every replay; after step 3 it
  // becomes NaN, so step 4 (a replay) has a NaN loss and gradient norm.
  Tensor scale = Tensor::ones({}, DType::f32, Device::cuda(0));
  TrainerOptions o;
  o.steps = 6;
  o.batch_size = 4;
  o.cuda_graph = true;
  Trainer trainer(
      model, [&](const Tensor& tokens) { return mul(model.forward(tokens), scale); }, optimizer,
      CosineSchedule{3e-3, 3e-4, 0, 6}, o);
  std::vector<std::vector<double>> after_three;
  int64_t replays_before = 0;
  trainer.on_step = [&](const StepResult& r) {
    if (r.step != 3) return;
    for (const auto& [name, p] : model.named_parameters()) after_three.push_back(p.to_vector());
    for (const auto& [name, t] : optimizer.state()) after_three.push_back(t.to_vector());
    replays_before = trainer.graph_replays();
    scale.fill_(std::nan(""));
  };
  int diverged = 0;
  trainer.on_diverged = [&] { ++diverged; };
  CHECK_THROWS_WITH_AS(trainer.fit(batches_of(task, Device::cuda(0))),
                       doctest::Contains("at step 4 (loss"), Error);
  CHECK(diverged == 1);
  CHECK(replays_before == 2);
  CHECK(trainer.graph_replays() == 3);  // step 4 was a replay
  CHECK(optimizer.step_count() == 3);
  std::vector<std::vector<double>> now;
  for (const auto& [name, p] : model.named_parameters()) now.push_back(p.to_vector());
  for (const auto& [name, t] : optimizer.state()) now.push_back(t.to_vector());
  REQUIRE(now.size() == after_three.size());
  for (size_t i = 0; i < now.size(); ++i) CHECK(now[i] == after_three[i]);
}

TEST_CASE("GPU: cuda_graph refuses an optimizer, a profile, hooks, dropout and host copies it cannot capture" *
          doctest::skip(!cuda_available())) {
  RecallTask task(recall_config(32));
  const Device gpu = Device::cuda(0);
  TrainerOptions o;
  o.steps = 3;
  o.batch_size = 2;
  o.cuda_graph = true;
  {
    LanguageModel model(model_config(task.vocab_size()));
    model.to(gpu);
    SGD sgd(model.named_parameters(), SGDOptions{.lr = 0.1});
    CHECK_THROWS_WITH_AS(Trainer(model, sgd, CosineSchedule{}, o),
                         doctest::Contains("cuda_graph needs the fused AdamW optimizer, got SGD"), Error);
    AdamWOptions unfused = adamw_options();
    unfused.fused = false;
    AdamW adamw_unfused(model.named_parameters(), unfused);
    CHECK_THROWS_WITH_AS(Trainer(model, adamw_unfused, CosineSchedule{}, o), doctest::Contains("fused = false"), Error);
    AdamW adamw(model.named_parameters(), adamw_options());
    TrainerOptions profiled = o;
    profiled.profile_step = 1;
    CHECK_THROWS_WITH_AS(Trainer(model, adamw, CosineSchedule{}, profiled), doctest::Contains("cannot profile step 2"),
                         Error);
    Trainer trainer(model, adamw, CosineSchedule{}, o);
    CHECK_THROWS_WITH_AS(trainer.set_profile_step(0), doctest::Contains("cannot profile step 1"), Error);
    trainer.on_gradients = [] {};
    CHECK_THROWS_WITH_AS(trainer.fit(batches_of(task, gpu)), doctest::Contains("cannot capture data-parallel"), Error);
  }
  {
    LanguageModel model(model_config(task.vocab_size(), /*dropout=*/0.1));
    model.to(gpu);
    AdamW adamw(model.named_parameters(), adamw_options());
    Trainer trainer(model, adamw, CosineSchedule{}, o);
    CHECK_THROWS_WITH_AS(trainer.fit(batches_of(task, gpu)), doctest::Contains("draws random numbers"), Error);
    CHECK(trainer.graph_captures() == 0);
  }
  {
    // An op that uploads a host value inside the step.
    LanguageModel model(model_config(task.vocab_size()));
    model.to(gpu);
    AdamW adamw(model.named_parameters(), adamw_options());
    Trainer trainer(
        model,
        [&](const Tensor& tokens) {
          return mul(model.forward(tokens), Tensor::from_vector(std::vector<float>{1.0f}, {1}, tokens.device()));
        },
        adamw, CosineSchedule{}, o);
    try {
      trainer.fit(batches_of(task, gpu));
      FAIL("fit() captured a step that copies from the host");
    } catch (const Error& e) {
      const std::string what = e.what();
      CHECK(what.find("could not capture step 2") != std::string::npos);
      CHECK(what.find("expected no copy between host and device") != std::string::npos);
    }
    // The thread's stream is usable again: an ordinary step runs.
    TrainerOptions plain = o;
    plain.cuda_graph = false;
    Trainer eager(model, adamw, CosineSchedule{}, plain);
    const StepResult r = eager.step(batches_of(task, gpu)(2, 0, Split::train), 0);
    CHECK(std::isfinite(r.loss));
  }
}

#ifdef LONGTAPE_WITH_CUDA
TEST_CASE("GPU: cuda::Graph replays captured ops on new inputs, and its pool's blocks stay its own" *
          doctest::skip(!cuda_available())) {
  const Device gpu = Device::cuda(0);
  const std::vector<double> first = random_values(5000, 21), second = random_values(5000, 22);
  Tensor x = Tensor::from_vector(first, {5000}, gpu).to(DType::f32);
  Tensor y;
  cuda::Graph graph(0);
  graph.begin_capture();
  {
    const Tensor doubled = mul(x, 2.0);  // a temporary, freed inside the capture
    y = add(doubled, 1.0);
  }
  graph.end_capture();
  REQUIRE(graph.ready());
  graph.replay();
  std::vector<double> got = y.to_vector();
  for (size_t i = 0; i < got.size(); ++i)
    REQUIRE(got[i] == doctest::Approx(2.0 * static_cast<float>(first[i]) + 1.0).epsilon(1e-6));
  // Ordinary work after the capture never receives the temporary's block: if it did, the next
  // replay would overwrite it.
  std::vector<Tensor> outside;
  for (int i = 0; i < 4; ++i) outside.push_back(Tensor::full({5000}, 5.0 + i, DType::f32, gpu));
  x.copy_(Tensor::from_vector(second, {5000}, gpu));
  graph.replay();
  got = y.to_vector();
  for (size_t i = 0; i < got.size(); ++i)
    REQUIRE(got[i] == doctest::Approx(2.0 * static_cast<float>(second[i]) + 1.0).epsilon(1e-6));
  for (int i = 0; i < 4; ++i)
    for (double v : outside[static_cast<size_t>(i)].to_vector()) REQUIRE(v == 5.0 + i);
}

TEST_CASE("GPU: a host copy inside a capture raises a clear error and the stream works afterwards" *
          doctest::skip(!cuda_available())) {
  const Device gpu = Device::cuda(0);
  cuda::Graph graph(0);
  graph.begin_capture();
  CHECK(cuda::stream_capturing());
  CHECK_THROWS_WITH_AS(Tensor::from_vector(random_values(8, 3), {8}, gpu),
                       doctest::Contains("expected no copy between host and device inside the captured step"), Error);
  graph.abort_capture();
  CHECK_FALSE(cuda::stream_capturing());
  CHECK_FALSE(graph.ready());
  CHECK_THROWS_WITH_AS(graph.replay(), doctest::Contains("not captured"), Error);
  const std::vector<double> values = random_values(8, 4);
  CHECK(Tensor::from_vector(values, {8}, gpu).to_vector() == values);
}
#endif
