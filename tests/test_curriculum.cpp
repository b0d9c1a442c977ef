// The sequence-length curriculum (nn/curriculum.h): which length each step trains on, the parser
// and its errors, batches drawn at each phase's length with held-out batches at the full length,
// and `longtape train --curriculum` end to end (a model trained on short sequences answers at the
// full length, without a positional table).
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "nn/curriculum.h"
#include "nn/data.h"
#include "support/cli_runner.h"
#include "tensor/error.h"

using namespace longtape;
using namespace longtape::nn;

namespace {

// The length of every step of phases + final, written out one step at a time.
std::vector<int64_t> expand(const std::vector<CurriculumPhase>& phases, int64_t final_len, int64_t steps) {
  std::vector<int64_t> lengths;
  for (const CurriculumPhase& p : phases)
    for (int64_t s = 0; s < p.steps; ++s) lengths.push_back(p.seq_len);
  while (static_cast<int64_t>(lengths.size()) < steps) lengths.push_back(final_len);
  return lengths;
}

std::string parse_error(const std::string& text, int64_t final_len) {
  try {
    LengthCurriculum::parse(text, final_len);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("LengthCurriculum: random rising phases parse back from their text and give each step its length") {
  std::mt19937_64 rng(20261127);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<CurriculumPhase> phases;
    int64_t len = 0;
    const int count = static_cast<int>(rng() % 4) + 1;
    for (int i = 0; i < count; ++i) {
      len += 1 + static_cast<int64_t>(rng() % 300);
      phases.push_back({len, 1 + static_cast<int64_t>(rng() % 40)});
    }
    const int64_t final_len = len + 1 + static_cast<int64_t>(rng() % 5000);
    std::string text;
    for (const CurriculumPhase& p : phases)
      text += (text.empty() ? "" : ",") + std::to_string(p.seq_len) + ":" + std::to_string(p.steps);
    const LengthCurriculum c = LengthCurriculum::parse(text, final_len);
    INFO(text << " then " << final_len);
    CHECK(c.str() == text);
    CHECK(c.final_seq_len() == final_len);
    REQUIRE(c.phases().size() == phases.size());
    const std::vector<int64_t> want = expand(phases, final_len, c.phase_steps() + 7);
    for (size_t i = 0; i < want.size(); ++i) CHECK(c.seq_len_at(static_cast<int64_t>(i)) == want[i]);
    for (int pick = 0; pick < 10; ++pick) {
      const int64_t first = static_cast<int64_t>(rng() % want.size());
      const int64_t last = first + static_cast<int64_t>(rng() % (want.size() - first + 1));
      int64_t sum = 0;
      for (int64_t i = first; i < last; ++i) sum += want[i];
      CHECK(c.tokens_between(first, last) == sum);
    }
  }
  const LengthCurriculum none = LengthCurriculum::parse("", 512);
  CHECK(none.empty());
  CHECK(none.phase_steps() == 0);
  CHECK(none.seq_len_at(0) == 512);
  CHECK(none.seq_len_at(12345) == 512);
  CHECK(none.tokens_between(10, 13) == 3 * 512);
}

TEST_CASE("LengthCurriculum: bad phases are rejected with the item and the rule they break") {
  CHECK(parse_error("128", 8192).find("LENGTH:STEPS") != std::string::npos);
  CHECK(parse_error("128:0", 8192).find("got \"128:0\"") != std::string::npos);
  CHECK(parse_error("0:5", 8192).find("got \"0:5\"") != std::string::npos);
  CHECK(parse_error("a:5", 8192).find("got \"a:5\"") != std::string::npos);
  CHECK(parse_error("128:5:3", 8192).find("got \"128:5:3\"") != std::string::npos);
  CHECK(parse_error("128:-5", 8192).find("positive integers") != std::string::npos);
  CHECK(parse_error("128:5,", 8192).find("after the last comma") != std::string::npos);
  CHECK(parse_error("128:5,,256:5", 8192).find("got \"\"") != std::string::npos);
  CHECK(parse_error("512:10,128:10", 8192).find("rise from phase to phase") != std::string::npos);
  CHECK(parse_error("128:10,128:10", 8192).find("rise from phase to phase") != std::string::npos);
  CHECK(parse_error("8192:5", 8192).find("not below the final sequence length 8192") != std::string::npos);
  CHECK_THROWS_AS(LengthCurriculum({{16, 3}}, 0), Error);
  CHECK_THROWS_AS(LengthCurriculum({{16, 0}}, 64), Error);
  CHECK_THROWS_AS(LengthCurriculum(64).seq_len_at(-1), Error);
  CHECK_THROWS_AS(LengthCurriculum(64).tokens_between(5, 4), Error);
}

TEST_CASE("curriculum_batches: training batch i has its phase's length and tokens; held-out batches the full length") {
  const RecallTaskConfig base{.seq_len = 96, .num_keys = 8, .num_values = 4, .num_filler = 4, .num_pairs = 3,
                              .num_queries = 2, .seed = 11};
  const LengthCurriculum c = LengthCurriculum::parse("24:3,48:2", 96);
  std::vector<std::unique_ptr<RecallTask>> tasks;
  std::vector<int64_t> asked;
  const BatchSource data = curriculum_batches(c, [&](int64_t len) {
    asked.push_back(len);
    RecallTaskConfig cfg = base;
    cfg.seq_len = len;
    tasks.push_back(std::make_unique<RecallTask>(cfg));
    return batches_of(*tasks.back());
  });
  CHECK(asked == std::vector<int64_t>{24, 48, 96});
  for (int64_t i = 0; i < 8; ++i) {
    const int64_t len = c.seq_len_at(i);
    const Batch b = data(5, i, Split::train);
    CHECK(b.inputs.shape() == Shape{5, len});
    RecallTaskConfig cfg = base;
    cfg.seq_len = len;
    const Batch direct = RecallTask(cfg).batch(5, i, Split::train);
    CHECK(b.inputs.to_vector() == direct.inputs.to_vector());
    CHECK(b.targets.to_vector() == direct.targets.to_vector());
    const Batch h = data(3, i, Split::heldout);
    CHECK(h.inputs.shape() == Shape{3, 96});
    CHECK(h.targets.to_vector() == RecallTask(base).batch(3, i, Split::heldout).targets.to_vector());
  }
  CHECK_THROWS_AS(curriculum_batches(c, [](int64_t) { return BatchSource{}; }), Error);
}

TEST_CASE("longtape train --curriculum: trained on 64 tokens, the model answers over 256; bad phases are refused" *
          doctest::skip(testing::longtape_binary_missing())) {
  const auto dir = testing::fresh_dir("train_curriculum");
  const std::string bin = "'" + std::filesystem::absolute(testing::longtape_binary()).string() + "'";
  // 150 steps at 64 tokens, then 2 at 256 (measured: held-out accuracy 1.00 over 256 tokens, 7 s
  // of one core).
  const auto r = testing::run_command(
      "cd '" + dir.string() + "' && timeout 300 " + bin +
          " train --device cpu --threads 1 --seq-len 256 --curriculum 64:150 --steps 152 --position-init none "
          "--eval-every 0 --eval-batches 2 --metrics m.json",
      dir / "log.txt");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("seq 256") != std::string::npos);
  CHECK(r.output.find("first 64:150 (length:steps)") != std::string::npos);
  const size_t at = r.output.find("final held-out loss");
  REQUIRE(at != std::string::npos);
  const double accuracy = std::stod(r.output.substr(r.output.find("accuracy", at) + 9));
  MESSAGE("held-out accuracy over 256 tokens after 150 steps at 64: " << accuracy);
  CHECK(accuracy > 0.8);
  std::ifstream in(dir / "m.json");
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str().find("\"curriculum\": \"64:150\"") != std::string::npos);
  CHECK(text.str().find("\"position_init\": \"none\"") != std::string::npos);

  const auto long_phase = testing::run_command(
      "cd '" + dir.string() + "' && " + bin + " train --device cpu --seq-len 128 --curriculum 64:10,128:5 --steps 20",
      dir / "log2.txt");
  INFO(long_phase.output);
  CHECK(long_phase.code != 0);
  CHECK(long_phase.output.find("not below the final sequence length 128") != std::string::npos);
  const auto all_steps = testing::run_command(
      "cd '" + dir.string() + "' && " + bin + " train --device cpu --seq-len 128 --curriculum 64:20 --steps 20",
      dir / "log3.txt");
  INFO(all_steps.output);
  CHECK(all_steps.code == 2);
  CHECK(all_steps.output.find("--steps 20 must be larger") != std::string::npos);
  const auto bad_position = testing::run_command(
      "cd '" + dir.string() + "' && " + bin + " train --device cpu --position-init rope", dir / "log4.txt");
  INFO(bad_position.output);
  CHECK(bad_position.code == 2);
  CHECK(bad_position.output.find("--position-init must be sinusoidal, normal or none, got \"rope\"") !=
        std::string::npos);
  std::filesystem::remove_all(dir);
}
