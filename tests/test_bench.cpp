// Benchmark plumbing: pattern maps read off the variants agree with the oracle's masks and with
// the analytic pair counts behind the FLOP figures; `longtape bench` reports every registered
// variant with its configuration, positive figures and the documented FLOP formula, and its JSON
// validates against benchmarks/bench_schema.json; every row says which implementation ran it and in
// what precision, and --impl (bench, attention, train) is honoured or rejected with a clear message;
// `longtape patterns` writes PNG files.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "attention/block_sparse.h"
#include "attention/pattern_map.h"
#include "attention/registry.h"
#include "io/tensor_io.h"
#include "support/attention_oracle.h"
#include "support/cli_runner.h"
#include "support/test_utils.h"

using namespace longtape;
using namespace longtape::attention;
namespace fs = std::filesystem;
using Json = nlohmann::json;

using testing::CommandResult;
using testing::fresh_dir;
using testing::fresh_seed;
using testing::longtape_binary;
using testing::run_command;

namespace {

int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Random dilated branches for a sequence of about n tokens: 1 to 3 branches, segments in [2, n],
// rates in [1, 4].
AttentionConfig random_dilated_config(std::mt19937_64& rng, int64_t n, int64_t heads) {
  AttentionConfig c;
  c.num_heads = heads;
  const int64_t branches = uniform(rng, 1, 3);
  c.segment_lengths.clear();
  c.dilation_rates.clear();
  for (int64_t i = 0; i < branches; ++i) {
    c.segment_lengths.push_back(uniform(rng, 2, n));
    c.dilation_rates.push_back(uniform(rng, 1, 4));
  }
  return c;
}

void check_map_equals(const PatternMap& map, const oracle::HeadMasks& masks) {
  REQUIRE(static_cast<int64_t>(masks.size()) == map.num_heads);
  for (int64_t h = 0; h < map.num_heads; ++h) {
    INFO("head ", h);
    const std::vector<int> got = map.head_counts(h);
    CHECK(got == masks[static_cast<size_t>(h)].counts);
  }
}

fs::path source_root() { return fs::path(__FILE__).parent_path().parent_path(); }

bool python_available() { return std::system("python3 -c 'import json' > /dev/null 2>&1") == 0; }

// A results row says what ran it: implementation and compute_precision at the top (the forward's)
// and in each phase's figures when measured; "none" only where no forward ran.
void check_ran_fields(const Json& row) {
  INFO("row ", row.dump());
  for (const char* key : {"implementation", "compute_precision"}) {
    REQUIRE(row.contains(key));
    CHECK(row[key].is_string());
    CHECK(!row[key].get<std::string>().empty());
    if (row["status"] != "measured") continue;
    for (const char* phase : {"forward", "forward_backward"}) {
      REQUIRE(row[phase].contains(key));
      CHECK(!row[phase][key].get<std::string>().empty());
    }
  }
  CHECK(row["config"].contains("impl"));
}

}  // namespace

TEST_CASE("pattern map of dense equals the oracle's dense mask, causal and not") {
  const uint64_t seed = fresh_seed();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  const int64_t n = uniform(rng, 5, 40), heads = uniform(rng, 1, 3);
  for (bool causal : {false, true}) {
    INFO("n ", n, " causal ", causal);
    AttentionConfig c;
    c.num_heads = heads;
    c.causal = causal;
    const PatternMap map = attention_pattern_map("dense", c, n);
    check_map_equals(map, oracle::repeat_heads(oracle::dense_mask(n, causal), heads));
    const int64_t per_head = causal ? n * (n + 1) / 2 : n * n;
    CHECK(map.total_pairs() == heads * per_head);
    CHECK(analytic_attended_pairs("dense", c, n) == heads * per_head);
    // Each row of the weights is the uniform distribution over the keys it sees.
    for (int64_t p = 0; p < n; ++p) {
      double row = 0.0;
      for (int64_t k = 0; k < n; ++k) row += map.weight(0, p, k);
      CHECK(row == doctest::Approx(1.0).epsilon(1e-12));
      CHECK(map.weight(0, p, 0) == doctest::Approx(1.0 / static_cast<double>(causal ? p + 1 : n)).epsilon(1e-12));
    }
  }
}

TEST_CASE("pattern map of dilated equals the oracle's multiplicity masks in both mixing modes") {
  const uint64_t seed = fresh_seed();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 4; ++trial) {
    const int64_t n = uniform(rng, 6, 40), heads = uniform(rng, 3, 6);
    AttentionConfig c = random_dilated_config(rng, n, heads);
    std::vector<DilatedBranch> branches;
    for (size_t i = 0; i < c.segment_lengths.size(); ++i) branches.push_back({c.segment_lengths[i], c.dilation_rates[i]});
    for (bool causal : {false, true}) {
      c.causal = causal;
      INFO("trial ", trial, " n ", n, " heads ", heads, " segments ", shape_str(c.segment_lengths), " dilations ",
           shape_str(c.dilation_rates), " causal ", causal);
      c.mixing = Mixing::lse;
      const PatternMap lse_map = attention_pattern_map("dilated", c, n);
      check_map_equals(lse_map, oracle::dilated_lse_mask(n, heads, branches, causal));
      CHECK(analytic_attended_pairs("dilated", c, n) == lse_map.total_pairs());

      c.mixing = Mixing::head_groups;
      const PatternMap groups_map = attention_pattern_map("dilated", c, n);
      check_map_equals(groups_map, oracle::dilated_head_groups_mask(n, heads, branches, causal));
      CHECK(analytic_attended_pairs("dilated", c, n) == groups_map.total_pairs());
    }
  }
}

TEST_CASE("a key reached by two dilated branches shows multiplicity 2 in the pattern map") {
  AttentionConfig c;
  c.num_heads = 1;
  c.segment_lengths = {8, 8};
  c.dilation_rates = {1, 1};
  const PatternMap map = attention_pattern_map("dilated", c, 16);
  CHECK(map.count(0, 3, 5) == 2);  // same segment of both (identical) branches
  CHECK(map.count(0, 3, 9) == 0);  // other segment
  CHECK(map.max_count() == 2);
}

TEST_CASE("pattern map of block_sparse equals the oracle's block masks") {
  const uint64_t seed = fresh_seed();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  const std::vector<std::string> registered = registered_attention_names();
  if (std::find(registered.begin(), registered.end(), "block_sparse") == registered.end()) {
    MESSAGE("block_sparse is not registered in this build");
    return;
  }
  for (const std::string pattern : {"all", "local_window", "dilated", "global_local", "random"}) {
    AttentionConfig c;
    c.num_heads = 2;
    c.pattern = pattern;
    c.block_size = uniform(rng, 2, 6);
    c.window = c.block_size * uniform(rng, 1, 4);
    c.dilation_rates = {1, 2};
    c.segment_lengths = {8, 8};
    c.density = 0.5;
    c.seed = seed;
    c.causal = uniform(rng, 0, 1) == 1;
    const int64_t n = uniform(rng, 10, 36);
    INFO("pattern ", pattern, " n ", n, " block ", c.block_size, " causal ", c.causal);
    const PatternMap map = attention_pattern_map("block_sparse", c, n);
    check_map_equals(map, oracle::block_pattern_masks(parse_block_pattern(pattern), n, c.num_heads,
                                                      block_pattern_options(c)));
    CHECK(analytic_attended_pairs("block_sparse", c, n) == map.total_pairs());
  }
}

TEST_CASE("every registered variant: analytic pairs, probed pairs and the pattern map agree") {
  const uint64_t seed = fresh_seed();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  const int64_t n = 16 * uniform(rng, 1, 2);  // a square-friendly length: 16 = 4x4, 32 = 4x8
  for (const std::string& name : registered_attention_names()) {
    for (bool causal : {false, true}) {
      AttentionConfig c;
      c.num_heads = 4;
      c.segment_lengths = {4, 8, n};
      c.dilation_rates = {1, 2, uniform(rng, 1, 4)};
      c.block_size = 4;
      c.window = 8;
      c.grid = n == 16 ? "4x4" : "4x8";
      c.ranks = 2;
      c.causal = causal;
      INFO("variant ", name, " n ", n, " causal ", causal);
      const PatternMap map = attention_pattern_map(name, c, n);
      CHECK(map.total_pairs() > 0);
      // Causal masking acts in the order the core variant sees: after a Hilbert reordering a
      // query may see keys that come later in the original order.
      if (causal && name != "hilbert") {
        for (int64_t h = 0; h < map.num_heads; ++h)
          for (int64_t p = 0; p < n; ++p)
            for (int64_t k = p + 1; k < n; ++k) CHECK(map.count(h, p, k) == 0);
      }
      c.head_dim = n;  // the module the map was drawn from
      std::shared_ptr<Attention> module = make_attention(name, c);
      CHECK(probed_attended_pairs(*module, n, DType::f32, Device::cpu()) == map.total_pairs());
      if (const auto analytic = analytic_attended_pairs(name, c, n)) CHECK(*analytic == map.total_pairs());
    }
  }
}

TEST_CASE("pattern map rejects bad input") {
  AttentionConfig c;
  c.num_heads = 2;
  c.head_dim = 8;
  std::shared_ptr<Attention> dense = make_attention("dense", c);
  CHECK_THROWS_WITH_AS(attention_pattern_map(*dense, 16), doctest::Contains("head_dim >= N"), Error);
  CHECK_THROWS_WITH_AS(attention_pattern_map("dense", c, 0), doctest::Contains("must be >= 1"), Error);
  CHECK_THROWS_WITH_AS(attention_pattern_map("no_such_variant", c, 8), doctest::Contains("unknown attention variant"),
                       Error);
  CHECK_FALSE(analytic_attended_pairs("no_such_variant", c, 8).has_value());
  const PatternMap map = attention_pattern_map("dense", c, 4);
  CHECK_THROWS_AS(map.count(2, 0, 0), Error);
  CHECK_THROWS_AS(map.count(0, 4, 0), Error);
}

TEST_CASE("longtape bench --quick reports every registered variant with its config and FLOPs" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("bench");
  // Tiny: two lengths, two heads, both causal modes (for the dense FLOP formula), a small
  // max-length search and two training steps per variant.
  const std::string command = "OMP_NUM_THREADS=1 '" + binary.string() +
                              "' bench --quick --device cpu --seq-lens 32,64 --heads 2 --head-dim 8 --segments 8,16,32 "
                              "--dilations 1,2,4 --causal both --warmup 1 --repeats 10 --max-len-budget-gib 0.0005 "
                              "--max-len-granule 32 --max-len-cap 512 --block-size 8 --window 16 --quality "
                              "--quality-steps 2 --quality-seq-len 32 --quality-batch 2 --quality-segments 8,32 "
                              "--quality-dilations 1,2 --out-dir '" +
                              dir.string() + "'";
  const CommandResult run = run_command(command, dir / "log.txt");
  INFO(run.output);
  REQUIRE(run.code == 0);
  for (const char* file : {"bench.json", "bench.csv", "bench.md", "plots.gp"}) CHECK(fs::exists(dir / file));

  std::ifstream in(dir / "bench.json");
  const Json doc = Json::parse(in);
  CHECK(doc["tool"] == "longtape");
  CHECK(doc["schema_version"] == 1);
  CHECK(doc["machine"].contains("cpu"));
  CHECK(doc["config"]["repeats"] == 10);
  CHECK(doc["config"]["device"] == "cpu");

  std::set<std::string> in_results, in_max_len, in_quality;
  std::set<std::string> measured;
  for (const Json& row : doc["results"]) {
    const std::string variant = row["variant"];
    in_results.insert(variant);
    const std::string status = row["status"];
    INFO("row ", row.dump());
    CHECK((status == "measured" || status == "skipped" || status == "failed"));
    for (const char* key : {"config_label", "config", "dtype", "batch", "seq_len", "heads", "head_dim", "causal"})
      CHECK(row.contains(key));
    CHECK(row["config"].contains("segment_lengths"));
    CHECK(row["config"]["num_heads"] == row["heads"]);
    CHECK(row["config"]["head_dim"] == row["head_dim"]);
    CHECK(row["config"]["impl"] == "auto");
    check_ran_fields(row);
    if (status != "measured") {
      CHECK(!row["reason"].get<std::string>().empty());
      continue;
    }
    measured.insert(variant);
    const double pairs = row["attended_pairs"].get<double>();
    const double d = row["head_dim"].get<double>();
    CHECK(pairs > 0);
    CHECK(row["flops"]["forward"].get<double>() == doctest::Approx(4.0 * pairs * d));
    CHECK(row["flops"]["forward_backward"].get<double>() == doctest::Approx(3.5 * 4.0 * pairs * d));
    for (const char* phase : {"forward", "forward_backward"}) {
      const Json& t = row[phase];
      CHECK(t["median_ms"].get<double>() > 0);
      CHECK(t["min_ms"].get<double>() <= t["median_ms"].get<double>());
      CHECK(t["runs"] == 10);
      CHECK(t["tokens_per_s"].get<double>() > 0);
      CHECK(t["peak_allocated_bytes"].get<int64_t>() >= row["inputs_bytes"].get<int64_t>());
      CHECK(t["peak_reserved_bytes"].get<int64_t>() > 0);
      const double seconds = t["median_ms"].get<double>() / 1000.0;
      CHECK(t["tflops"].get<double>() == doctest::Approx(row["flops"][phase].get<double>() / seconds / 1e12));
      CHECK(t["tokens_per_s"].get<double>() ==
            doctest::Approx(row["batch"].get<double>() * row["seq_len"].get<double>() / seconds));
    }
    if (variant == "dense") {
      const double n = row["seq_len"].get<double>(), b = row["batch"].get<double>(), h = row["heads"].get<double>();
      const double expected = b * h * (row["causal"].get<bool>() ? n * (n + 1) / 2 : n * n);
      CHECK(pairs == expected);
      CHECK(row["pairs_method"] == "analytic");
    }
  }
  for (const Json& row : doc["max_seq_len"]) {
    in_max_len.insert(row["variant"].get<std::string>());
    if (row["status"] == "measured") {
      CHECK(row["max_seq_len"].get<int64_t>() > 0);
      CHECK(row["peak_allocated_bytes"].get<int64_t>() <= row["budget_bytes"].get<int64_t>());
      CHECK(row["max_seq_len"].get<int64_t>() % 32 == 0);
    } else {
      CHECK(!row["reason"].get<std::string>().empty());
    }
  }
  for (const Json& row : doc["quality"]) {
    in_quality.insert(row["variant"].get<std::string>());
    if (row["status"] == "measured") {
      CHECK(row["accuracy"].get<double>() >= 0.0);
      CHECK(row["accuracy"].get<double>() <= 1.0);
      CHECK(row["ms_per_step"].get<double>() > 0.0);
    } else {
      CHECK(!row["reason"].get<std::string>().empty());
    }
  }
  for (const std::string& name : registered_attention_names()) {
    INFO("variant ", name);
    CHECK(in_results.count(name) == 1);
    CHECK(in_max_len.count(name) == 1);
    CHECK(in_quality.count(name) == 1);
  }
  CHECK(measured.count("dense") == 1);
  CHECK(measured.count("dilated") == 1);

  std::ifstream csv(dir / "bench.csv");
  std::string header;
  std::getline(csv, header);
  CHECK(header.find("fwdbwd_median_ms") != std::string::npos);
  CHECK(header.find(",implementation,compute_precision,") != std::string::npos);
  size_t lines = 0;
  for (std::string line; std::getline(csv, line);) ++lines;
  CHECK(lines == doc["results"].size());

  if (python_available()) {
    const CommandResult valid =
        run_command("python3 '" + (source_root() / "benchmarks" / "validate.py").string() + "' '" +
                        (dir / "bench.json").string() + "'",
                    dir / "validate.txt");
    INFO(valid.output);
    CHECK(valid.code == 0);
  } else {
    MESSAGE("python3 not found: bench.json not checked against benchmarks/bench_schema.json");
  }
  fs::remove_all(dir);
}

TEST_CASE("longtape bench rejects an unknown variant and a bad option with a clear message" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("bench_bad");
  CommandResult r = run_command("'" + binary.string() + "' bench --variants dense,nosuch --out-dir '" + dir.string() + "'",
                                dir / "log1.txt");
  CHECK(r.code != 0);
  CHECK(r.output.find("unknown variant 'nosuch'") != std::string::npos);
  r = run_command("'" + binary.string() + "' bench --variants dense --causal sometimes --out-dir '" + dir.string() + "'",
                  dir / "log2.txt");
  CHECK(r.code != 0);
  CHECK(r.output.find("--causal must be off, on or both") != std::string::npos);
  r = run_command("'" + binary.string() + "' bench --variants dense --segments 8,16 --dilations 1 --out-dir '" +
                      dir.string() + "'",
                  dir / "log3.txt");
  CHECK(r.code != 0);
  CHECK(r.output.find("--dilations") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("longtape bench --time-budget reports the cases it had no time for as skipped (and fails: none ran)" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("bench_budget");
  const CommandResult r = run_command("OMP_NUM_THREADS=1 '" + binary.string() +
                                          "' bench --variants dense,dilated --seq-lens 16,32 --heads 2 --head-dim 4 "
                                          "--segments 8,16 --dilations 1,2 --repeats 10 --warmup 0 --no-plots "
                                          "--time-budget 0.000001 --out-dir '" + dir.string() + "'",
                                      dir / "log.txt");
  INFO(r.output);
  // Nothing was measured: the report is written, and the exit status says that no case ran.
  CHECK(r.code == 1);
  CHECK(r.output.find("no case could run") != std::string::npos);
  std::ifstream in(dir / "bench.json");
  const Json doc = Json::parse(in);
  REQUIRE(doc["results"].size() == 4);
  for (const Json& row : doc["results"]) {
    CHECK(row["status"] == "skipped");
    CHECK(row["reason"].get<std::string>().find("time budget") != std::string::npos);
    CHECK_FALSE(row.contains("forward"));
  }
  CHECK(doc["config"]["time_budget_s"].get<double>() == doctest::Approx(1e-6));
  fs::remove_all(dir);
}

TEST_CASE("longtape bench --impl composed runs the composed path and records it in every view" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("bench_impl");
  const CommandResult r = run_command("OMP_NUM_THREADS=1 '" + binary.string() +
                                          "' bench --variants dense,dilated --device cpu --dtype f32 --seq-lens 16,32 "
                                          "--heads 2 --head-dim 4 --segments 8,16 --dilations 1,2 --warmup 0 "
                                          "--repeats 2 --no-plots --impl composed --out-dir '" + dir.string() + "'",
                                      dir / "log.txt");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("impl=composed") != std::string::npos);  // the progress line's column
  std::ifstream in(dir / "bench.json");
  const Json doc = Json::parse(in);
  CHECK(doc["config"]["impls"] == Json::array({"composed"}));
  REQUIRE(doc["results"].size() == 4);
  for (const Json& row : doc["results"]) {
    INFO("row ", row.dump());
    REQUIRE(row["status"] == "measured");
    check_ran_fields(row);
    CHECK(row["config"]["impl"] == "composed");
    CHECK(row["config_label"].get<std::string>().find("impl=composed") != std::string::npos);
    CHECK(row["implementation"] == "composed");
    CHECK(row["forward_backward"]["implementation"] == "composed");
    // f32 inputs, composed on the CPU: whatever the precision text, it must not claim bf16.
    const std::string precision = row["compute_precision"];
    CHECK(precision.find("f32") != std::string::npos);
    CHECK(precision.find("bf16") == std::string::npos);
  }
  std::ifstream md(dir / "bench.md");
  std::stringstream markdown;
  markdown << md.rdbuf();
  CHECK(markdown.str().find("| implementation | precision |") != std::string::npos);
  CHECK(markdown.str().find("| composed |") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("longtape bench, attention and train reject a bad --impl naming the flag, the choices and the value" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("impl_bad");
  const std::string bin = "'" + binary.string() + "'";
  auto fails_with = [&](const std::string& args, const std::string& text) {
    INFO(args);
    const CommandResult r = run_command(bin + " " + args, dir / "log.txt");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find(text) != std::string::npos);
  };
  const std::string expected = "--impl must be auto, fused or composed, got \"fast\"";
  fails_with("bench --variants dense --seq-lens 16 --impl fast --out-dir '" + dir.string() + "'", expected);
  fails_with("bench --variants dense --seq-lens 16 --impl composed,fast --out-dir '" + dir.string() + "'", expected);
  fails_with("train --steps 1 --seq-len 32 --impl fast", expected);

  // attention: the flag is checked, and a good value prints one line saying what ran.
  const Tensor x = Tensor::randn({1, 8, 2, 4}, DType::f32);
  for (const char* name : {"q.npy", "k.npy", "v.npy"}) io::save_npy((dir / name).string(), x);
  const std::string inputs = " --q '" + (dir / "q.npy").string() + "' --k '" + (dir / "k.npy").string() + "' --v '" +
                             (dir / "v.npy").string() + "' --out-dir '" + (dir / "out").string() + "'";
  fails_with("attention --variant dense --impl fast" + inputs, expected);
  const CommandResult ok = run_command(bin + " attention --variant dense --impl composed" + inputs, dir / "ok.txt");
  INFO(ok.output);
  CHECK(ok.code == 0);
  CHECK(ok.output.find("implementation composed; precision ") != std::string::npos);
  CHECK(ok.output.find("--impl composed") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("longtape patterns writes one PNG per variant" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path binary = longtape_binary();
  const fs::path dir = fresh_dir("patterns");
  const CommandResult r = run_command(
      "'" + binary.string() + "' patterns --n 16 --heads 2 --segments 4,8,16 --dilations 1,2,4 --block-size 4 "
      "--window 8 --out-dir '" + dir.string() + "'",
      dir / "log.txt");
  INFO(r.output);
  if (r.output.find("no PNG writer") != std::string::npos) {
    MESSAGE("longtape was built without stb_image_write.h: patterns not checked");
    CHECK(r.code != 0);
    return;
  }
  REQUIRE(r.code == 0);
  for (const std::string& name : {std::string("dense"), std::string("dilated")}) {
    const fs::path png = dir / (name + ".png");
    REQUIRE(fs::exists(png));
    std::ifstream in(png, std::ios::binary);
    char signature[8] = {};
    in.read(signature, 8);
    CHECK(std::string(signature + 1, 3) == "PNG");
    CHECK(fs::file_size(png) > 100);
  }
  CHECK(fs::exists(dir / "patterns.md"));
  fs::remove_all(dir);
}
