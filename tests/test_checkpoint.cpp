// Checkpoints: bitwise resume on the CPU, the safetensors layout against hand-written bytes, and
// clear errors for corrupt, truncated and mismatched files.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "nn/checkpoint.h"
#include "nn/data.h"
#include "models/language_model.h"
#include "nn/optim.h"
#include "tensor/ops.h"

using namespace longtape;
using namespace longtape::models;
using namespace longtape::nn;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("longtape_ckpt_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(reinterpret_cast<uintptr_t>(this)));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

LanguageModelConfig small_lm(int64_t vocab, int64_t seq_len) {
  // Dilated attention (the default); dropout exercises the generator state across the resume.
  LanguageModelConfig c{.vocab_size = vocab, .max_seq_len = seq_len, .embed_dim = 16, .num_layers = 2, .num_heads = 2,
                        .dropout = 0.1};
  c.attention_config.segment_lengths = {8, 32};
  c.attention_config.dilation_rates = {1, 2};
  return c;
}

struct Run {
  std::unique_ptr<LanguageModel> model;
  std::unique_ptr<AdamW> optimizer;
};

// The recall task of the checkpoint tests: 32 tokens, 3 pairs, 2 queries.
RecallTaskConfig small_task(uint64_t seed) {
  return {.seq_len = 32, .num_keys = 8, .num_values = 4, .num_filler = 4, .num_pairs = 3, .num_queries = 2,
          .seed = seed};
}

Run make_run(const RecallTask& task, uint64_t init_seed) {
  manual_seed(init_seed);
  Run r;
  r.model = std::make_unique<LanguageModel>(small_lm(task.vocab_size(), task.seq_len()));
  AdamWOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0.05;
  o.decays = decay_matrices_only;
  r.optimizer = std::make_unique<AdamW>(r.model->named_parameters(), o);
  return r;
}

void train_steps(Run& r, const RecallTask& task, int64_t from, int64_t to) {
  CosineSchedule schedule{3e-3, 3e-4, 5, 40};
  for (int64_t step = from; step < to; ++step) {
    Batch b = task.batch(4, step);
    Tensor loss = cross_entropy(r.model->forward(b.inputs), b.targets, kIgnoreIndex);
    r.optimizer->zero_grad();
    loss.backward();
    clip_grad_norm(r.model->parameters(), 1.0);
    schedule.apply(*r.optimizer, step);
    r.optimizer->step();
  }
}

// A run from `init_seed` trained `steps` steps and saved as `path` at that step.
Run saved_run(const RecallTask& task, uint64_t init_seed, int64_t steps, const std::string& path) {
  Run r = make_run(task, init_seed);
  train_steps(r, task, 0, steps);
  save_checkpoint(path, *r.model, r.optimizer.get(), steps);
  return r;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

std::vector<uint8_t> read_bytes(const std::string& path) { return io::read_file(path); }

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void append_u64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

void append_f32(std::vector<uint8_t>& out, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(u >> (8 * i)));
}

}  // namespace

TEST_CASE("resume is bitwise: 20 steps + save + load + 20 steps == 40 steps straight (CPU)") {
  TempDir dir;
  RecallTask task(small_task(5));
  Run straight = make_run(task, 1234);
  train_steps(straight, task, 0, 40);

  Run first = make_run(task, 1234);
  train_steps(first, task, 0, 20);
  const std::string path = dir.file("run.safetensors");
  save_checkpoint(path, *first.model, first.optimizer.get(), 20, {{"note", "halfway"}});
  // Disturb the generator: the checkpoint must restore it.
  Tensor::randn({1000});

  Run resumed = make_run(task, 777);  // different initial weights, overwritten by the load
  CheckpointInfo info = load_checkpoint(path, *resumed.model, resumed.optimizer.get());
  CHECK(info.step == 20);
  CHECK(info.metadata.at("note") == "halfway");
  CHECK(resumed.optimizer->step_count() == 20);
  train_steps(resumed, task, info.step, 40);

  auto want = straight.model->named_parameters(), got = resumed.model->named_parameters();
  REQUIRE(want.size() == got.size());
  int differing = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    CHECK(want[i].first == got[i].first);
    if (!bitwise_equal(want[i].second, got[i].second)) {
      ++differing;
      MESSAGE("differs: " << want[i].first);
    }
  }
  CHECK(differing == 0);
  auto sw = straight.optimizer->state(), sg = resumed.optimizer->state();
  REQUIRE(sw.size() == sg.size());
  for (auto& [name, t] : sw) CHECK_MESSAGE(bitwise_equal(t, sg.at(name)), name);
  // And training really moved the weights away from the other initialisation.
  Run fresh = make_run(task, 777);
  CHECK_FALSE(bitwise_equal(fresh.model->tok_emb->weight, resumed.model->tok_emb->weight));
}

TEST_CASE("checkpoint layout: dotted model names, optim.<param>.<slot>, metadata") {
  TempDir dir;
  RecallTask task(small_task(1));
  const std::string path = dir.file("layout.safetensors");
  Run r = saved_run(task, 3, 2, path);
  io::SafetensorsFile f = io::read_safetensors(path);
  CHECK(f.metadata.at("format") == kCheckpointFormat);
  CHECK(f.metadata.at("step") == "2");
  CHECK(f.metadata.at("optimizer") == "AdamW");
  CHECK(f.metadata.at("optimizer_step") == "2");
  CHECK(f.metadata.count("rng_seed") == 1);
  CHECK(f.metadata.count("rng_offset") == 1);
  for (auto& [name, t] : r.model->named_parameters()) {
    REQUIRE(f.contains(name));
    CHECK(f.at(name).shape == t.shape());
    CHECK(f.contains("optim." + name + ".exp_avg"));
    CHECK(f.contains("optim." + name + ".exp_avg_sq"));
  }
  CHECK(f.tensors.size() == 3 * r.model->named_parameters().size());
  // The atomic writer leaves no temporary files behind.
  int files = 0;
  for (auto& e : fs::directory_iterator(dir.path)) {
    (void)e;
    ++files;
  }
  CHECK(files == 1);
  CHECK_THROWS_WITH_AS(save_checkpoint(path, *r.model, nullptr, 1, {{"step", "9"}}), doctest::Contains("reserved"),
                       Error);
  // Weights-only checkpoint: loading it with an optimizer is refused, without one it loads.
  save_checkpoint(path, *r.model, nullptr, 5);
  CHECK_THROWS_WITH_AS(load_checkpoint(path, *r.model, r.optimizer.get()), doctest::Contains("no optimizer state"),
                       Error);
  CHECK(load_checkpoint(path, *r.model).step == 5);
  CHECK(read_checkpoint_info(path).metadata.at("optimizer") == "none");
}

TEST_CASE("a safetensors file whose bytes are written by hand loads into a model") {
  TempDir dir;
  // A LayerNorm(3) and a Linear(2 -> 3) in one module tree.
  struct Tiny : Module {
    std::shared_ptr<LayerNorm> norm;
    std::shared_ptr<Linear> proj;
    Tiny() {
      norm = register_module("norm", std::make_shared<LayerNorm>(3));
      proj = register_module("proj", std::make_shared<Linear>(2, 3));
    }
  } tiny;
  const float norm_w[3] = {1.5f, -2.0f, 0.25f}, norm_b[3] = {0.125f, 3.0f, -1.0f};
  const float proj_w[6] = {1, 2, 3, 4, 5, 6}, proj_b[3] = {-0.5f, 0.5f, 7.0f};
  std::string header =
      R"({"__metadata__":{"format":"longtape.checkpoint.v1","step":"42","rng_seed":"7","rng_offset":"3",)"
      R"("optimizer":"none"},)"
      R"("norm.bias":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
      R"("norm.weight":{"dtype":"F32","shape":[3],"data_offsets":[12,24]},)"
      R"("proj.bias":{"dtype":"F32","shape":[3],"data_offsets":[24,36]},)"
      R"("proj.weight":{"dtype":"F32","shape":[3,2],"data_offsets":[36,60]}})";
  while (header.size() % 8) header += ' ';
  std::vector<uint8_t> bytes;
  append_u64(bytes, header.size());
  bytes.insert(bytes.end(), header.begin(), header.end());
  for (float v : norm_b) append_f32(bytes, v);
  for (float v : norm_w) append_f32(bytes, v);
  for (float v : proj_b) append_f32(bytes, v);
  for (float v : proj_w) append_f32(bytes, v);
  const std::string path = dir.file("hand.safetensors");
  write_bytes(path, bytes);

  CheckpointInfo info = load_checkpoint(path, tiny);
  CHECK(info.step == 42);
  CHECK(tiny.norm->weight.to_vector() == std::vector<double>{1.5, -2.0, 0.25});
  CHECK(tiny.norm->bias.to_vector() == std::vector<double>{0.125, 3.0, -1.0});
  CHECK(tiny.proj->weight.to_vector() == std::vector<double>{1, 2, 3, 4, 5, 6});
  CHECK(tiny.proj->bias.to_vector() == std::vector<double>{-0.5, 0.5, 7.0});
  // The generator continues from the stored (seed, offset).
  PhiloxState s = next_philox(0);
  CHECK(s.seed == 7);
  CHECK(s.offset == 3);

  // And our writer produces exactly this layout for the same tensors (names sorted, as state_dict is).
  const std::string again = dir.file("again.safetensors");
  save_checkpoint(again, tiny, nullptr, 42);
  io::SafetensorsFile f = io::read_safetensors(again);
  std::vector<std::string> names = f.names();
  CHECK(names == std::vector<std::string>{"norm.bias", "norm.weight", "proj.bias", "proj.weight"});
  std::vector<uint8_t> ours = read_bytes(again);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(ours[i]) << (8 * i);
  CHECK(n % 8 == 0);
  REQUIRE(ours.size() == 8 + n + 60);
  CHECK(std::equal(bytes.end() - 60, bytes.end(), ours.end() - 60));  // identical data section
}

TEST_CASE("corrupt, truncated and mismatched checkpoints give clear errors") {
  TempDir dir;
  RecallTask task(small_task(1));
  const std::string good = dir.file("good.safetensors");
  Run r = saved_run(task, 4, 1, good);
  std::vector<uint8_t> bytes = read_bytes(good);
  const Tensor before = r.model->tok_emb->weight.clone();

  const std::string truncated = dir.file("truncated.safetensors");
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.end() - 100));
  CHECK_THROWS_WITH_AS(load_checkpoint(truncated, *r.model, r.optimizer.get()),
                       doctest::Contains("cannot read a checkpoint from"), Error);
  const std::string tiny = dir.file("tiny.safetensors");
  write_bytes(tiny, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 5));
  CHECK_THROWS_WITH_AS(load_checkpoint(tiny, *r.model), doctest::Contains("tiny.safetensors"), Error);

  std::vector<uint8_t> corrupt = bytes;
  corrupt[8] = '[';  // the JSON header no longer parses
  const std::string bad_json = dir.file("corrupt.safetensors");
  write_bytes(bad_json, corrupt);
  CHECK_THROWS_WITH_AS(load_checkpoint(bad_json, *r.model), doctest::Contains("corrupt.safetensors"), Error);

  CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("absent.safetensors"), *r.model), doctest::Contains("absent"), Error);

  // A plain safetensors file without the checkpoint format tag.
  io::SafetensorsFile plain;
  plain.add("x", io::RawArray{DType::f32, {1}, std::vector<uint8_t>(4, 0)});
  const std::string foreign = dir.file("foreign.safetensors");
  io::write_safetensors(foreign, plain);
  CHECK_THROWS_WITH_AS(load_checkpoint(foreign, *r.model), doctest::Contains("not a longtape checkpoint"), Error);

  // A model of another shape: names match, shapes differ.
  manual_seed(5);
  LanguageModelConfig wider = small_lm(task.vocab_size(), task.seq_len());
  wider.embed_dim = 32;
  LanguageModel other(wider);
  CHECK_THROWS_WITH_AS(load_checkpoint(good, other), doctest::Contains("in the file but"), Error);
  // A model with other names.
  LanguageModelConfig untied = small_lm(task.vocab_size(), task.seq_len());
  untied.tied_embeddings = false;
  LanguageModel other_names(untied);
  CHECK_THROWS_WITH_AS(load_checkpoint(good, other_names), doctest::Contains("missing 'head.weight'"), Error);
  // The wrong optimizer type.
  SGD sgd(r.model->named_parameters(), SGDOptions{.lr = 0.1, .momentum = 0.9});
  CHECK_THROWS_WITH_AS(load_checkpoint(good, *r.model, &sgd), doctest::Contains("holds AdamW state"), Error);
  // Nothing was changed by the failed loads.
  CHECK(bitwise_equal(before, r.model->tok_emb->weight));
}
