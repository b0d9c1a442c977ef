// Hostile input to the `longtape` command line: every numeric flag is parsed strictly (no clamping,
// wrapping, empty-as-zero, NaN or garbage) and refused on one printable line with exit code 2;
// sizes whose products overflow are refused up front; `bench` refuses --quality-steps 0 and fails
// when no case could run; `attention` writes its outputs only when the whole command succeeded;
// `train` stops on a non-finite loss without saving, checks its output paths before training and
// refuses a --resume checkpoint with damaged or missing optimizer state.
//
// The tests run the built executable ($LONGTAPE_BIN/longtape) on tiny problems.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "io/safetensors.h"
#include "io/tensor_io.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"
#include "support/cli_runner.h"

using namespace longtape;
namespace fs = std::filesystem;
using testing::CommandResult;
using testing::fresh_dir;
using testing::longtape_binary;
using testing::run_command;

namespace {

// Runs `longtape ARGS` in `dir` with OMP_NUM_THREADS=1 and a time limit (a refused command
// returns at once; a wrongly accepted one must not run a default-sized job), stdout and stderr
// captured through a file.
CommandResult run_longtape(const std::string& args, const fs::path& dir) {
  const fs::path log = dir / "log.txt";
  CommandResult r = run_command("cd '" + dir.string() + "' && OMP_NUM_THREADS=1 timeout 60 '" +
                                    fs::absolute(longtape_binary()).string() + "' " + args,
                                log);
  fs::remove(log);
  return r;
}

std::string quoted(const fs::path& p) { return "'" + p.string() + "'"; }

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The usage-error contract: exit code 2, one line, printable, naming what it should.
void check_usage_error(const CommandResult& r, const std::vector<std::string>& parts) {
  INFO("output: ", r.output);
  CHECK(r.code == 2);
  CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  bool printable = true;
  for (char c : r.output)
    if (c != '\n' && (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f)) printable = false;
  CHECK(printable);
  CHECK(r.output.size() < 400);
  for (const std::string& part : parts) CHECK_MESSAGE(contains(r.output, part), "expected '", part, "'");
}

size_t entries(const fs::path& dir) {
  size_t n = 0;
  for (auto it = fs::directory_iterator(dir); it != fs::directory_iterator(); ++it) ++n;
  return n;
}

// The numeric options of a subcommand, read off its --help: name -> type (INT, UINT, FLOAT).
std::map<std::string, std::string> numeric_options(const std::string& command, const fs::path& dir) {
  const CommandResult help = run_longtape(command + " --help", dir);
  REQUIRE(help.code == 0);
  std::map<std::string, std::string> options;
  std::istringstream lines(help.output);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string name, type;
    if (!(words >> name >> type) || name.rfind("--", 0) != 0) continue;
    if (name.back() == ',') continue;
    name = name.substr(0, name.find(','));  // "--pattern-seed,--seed": the name, then deprecated aliases
    type = type.substr(0, type.find(':'));
    if (type == "INT" || type == "UINT" || type == "FLOAT") options[name] = type;
  }
  return options;
}

// Minimal arguments a command needs besides the flag under test (required options).
std::string required_args(const std::string& command) {
  if (command == "attention") return " --variant dense --q q.npy --k k.npy --v v.npy --out-dir never";
  return "";
}

}  // namespace

TEST_CASE("every numeric flag of every command refuses empty, garbage and non-finite values with exit code 2" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("numeric");
  size_t checked = 0;
  std::set<std::string> seen;  // flags shared by several commands (add_variant_flags) are tried once
  for (const std::string command : {"train", "bench", "attention", "patterns"}) {
    const std::map<std::string, std::string> options = numeric_options(command, dir);
    CHECK(options.size() >= 3);
    for (const auto& [flag, type] : options) {
      if (!seen.insert(flag + " " + type).second) continue;
      std::vector<std::pair<std::string, std::string>> cases{{"''", "empty value"}, {"12abc", "is not a decimal"}};
      if (type == "FLOAT") cases.emplace_back("nan", "is not finite");
      if (type == "UINT") cases.emplace_back("-1", "is negative");
      for (const auto& [value, why] : cases) {
        INFO(command, " ", flag, " ", value);
        const CommandResult r = run_longtape(command + " " + flag + " " + value + required_args(command), dir);
        check_usage_error(r, {flag, why});
        ++checked;
      }
    }
  }
  CHECK(checked > 60);
  CHECK(entries(dir) == 0);  // nothing written (never/, bench-out/, patterns/ ...)
  fs::remove_all(dir);
}

TEST_CASE("train --bucket-mb: sizes in MiB above 0, at most two, and only with --parallel data" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("bucket_mb");
  check_usage_error(run_longtape("train --parallel data --bucket-mb 0", dir), {"--bucket-mb '0' is out of range"});
  check_usage_error(run_longtape("train --parallel data --bucket-mb 1,2,3", dir), {"--bucket-mb", "FIRST,REST"});
  check_usage_error(run_longtape("train --parallel data --bucket-mb 1,x", dir), {"--bucket-mb", "not a decimal"});
  check_usage_error(run_longtape("train --bucket-mb 1,25", dir), {"--bucket-mb needs --parallel data"});
  CHECK(entries(dir) == 0);
  fs::remove_all(dir);
}

TEST_CASE("out-of-range integers are refused, not clamped or wrapped, and the message shows the range" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("range");
  const fs::path ck = dir / "ck.safetensors", metrics = dir / "m.csv";
  const std::string outputs = " --checkpoint " + quoted(ck) + " --metrics " + quoted(metrics);
  check_usage_error(run_longtape("train --steps 9223372036854775808" + outputs, dir),
                    {"--steps", "'9223372036854775808' is out of range", "[1, 1099511627776]"});
  check_usage_error(run_longtape("train --steps 1099511627777" + outputs, dir), {"--steps", "out of range"});
  check_usage_error(run_longtape("train --seed -1" + outputs, dir), {"--seed", "'-1' is negative", "[0, 18446744073709551615]"});
  check_usage_error(run_longtape("train --steps ''" + outputs, dir), {"--steps", "empty value"});
  check_usage_error(run_longtape("train --clip nan" + outputs, dir), {"--clip", "'nan' is not finite", ">= 0"});
  check_usage_error(run_longtape("train --lr 1e999" + outputs, dir), {"--lr", "out of range"});
  check_usage_error(run_longtape("train --lr -inf" + outputs, dir), {"--lr", "is not finite"});
  check_usage_error(run_longtape("train --steps 0x10" + outputs, dir), {"--steps", "is not a decimal integer"});
  check_usage_error(run_longtape("train --steps ' 5'" + outputs, dir), {"--steps", "is not a decimal integer"});
  check_usage_error(run_longtape("train --dropout 1" + outputs, dir), {"--dropout", "[0, 1)"});
  check_usage_error(run_longtape("train --threads 99999999999" + outputs, dir), {"--threads", "out of range"});
  // Combinations that cannot train: a schedule rising to its final rate, a decay that flips the weights.
  check_usage_error(run_longtape("train --min-lr -1" + outputs, dir), {"--min-lr", "'-1' is out of range", ">= 0"});
  check_usage_error(run_longtape("train --lr 0.1 --min-lr 0.5" + outputs, dir), {"--min-lr 0.5 is above --lr 0.1"});
  check_usage_error(run_longtape("train --lr 0.5 --weight-decay 4" + outputs, dir),
                    {"--lr 0.5 x --weight-decay 4 = 2", "must be below 1"});
  check_usage_error(run_longtape("bench --warmup -1 --out-dir " + quoted(dir / "b"), dir), {"--warmup", "out of range"});
  check_usage_error(run_longtape("patterns --cell 0 --out-dir " + quoted(dir / "p"), dir), {"--cell", "[1, 64]"});
  // Non-printable bytes are escaped, long values truncated, and the line stays short.
  check_usage_error(run_longtape("train --steps \"$(printf '1\\001\\033[31m')\"" + outputs, dir),
                    {"--steps", "\\x01\\x1b[31m"});
  check_usage_error(run_longtape("train --width " + std::string(5000, '7') + outputs, dir),
                    {"--width", "... (5000 bytes)"});
  CHECK(entries(dir) == 0);
  fs::remove_all(dir);
}

TEST_CASE("sizes whose products overflow are refused up front, naming the flags" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("sizes");
  const fs::path out = dir / "out";
  const std::string o = " --out-dir " + quoted(out);
  check_usage_error(run_longtape("train --batch 4611686018427387904", dir), {"--batch", "out of range"});
  check_usage_error(run_longtape("train --batch 1099511627776 --seq-len 1099511627776", dir),
                    {"--batch 1099511627776 x --seq-len 1099511627776", "tokens per step", "2^40"});
  check_usage_error(run_longtape("train --width 1048576 --layers 1048576", dir), {"--width", "1 TiB"});
  check_usage_error(run_longtape("train --keys 9223372036854775807", dir), {"--keys", "out of range"});
  check_usage_error(run_longtape("train --dilations 9223372036854775807 --segments 32", dir), {"--dilations", "2^40"});
  check_usage_error(run_longtape("bench --variants dense --head-dim 4611686018427387904 --seq-lens 16" + o, dir),
                    {"--head-dim", "2^40"});
  check_usage_error(run_longtape("bench --variants dense --seq-lens 4611686018427387904" + o, dir), {"--seq-lens"});
  check_usage_error(run_longtape("bench --variants dense --seq-lens 1048576 --batch 1048576 --heads 8 --head-dim 64" + o, dir),
                    {"--seq-lens 1048576", "elements"});
  check_usage_error(run_longtape("bench --variants dense --seq-lens 65536 --batch 64 --heads 64 --head-dim 512" + o, dir),
                    {"--head-dim 512", "1 TiB"});
  check_usage_error(run_longtape("bench --variants dilated --seq-lens 16 --segments 16 --dilations 9223372036854775807" + o, dir),
                    {"--dilations", "2^40"});
  check_usage_error(run_longtape("bench --variants block_sparse --seq-lens 16 --block-size 9223372036854775807" + o, dir),
                    {"--block-size", "out of range"});
  check_usage_error(run_longtape("bench --variants dense --seq-lens 16 --quality --quality-steps 0" + o, dir),
                    {"--quality-steps", "out of range"});
  check_usage_error(run_longtape("patterns --n 1024 --heads 64 --cell 64" + o, dir), {"--cell", "pixels"});

  const Tensor x = Tensor::randn({1, 4, 1, 2}, DType::f32);
  for (const char* name : {"q.npy", "k.npy", "v.npy"}) io::save_npy((dir / name).string(), x);
  const std::string inputs = " --q " + quoted(dir / "q.npy") + " --k " + quoted(dir / "k.npy") + " --v " +
                             quoted(dir / "v.npy") + o;
  check_usage_error(run_longtape("attention --variant dense --order hilbert --grid 4294967296x4294967296" + inputs, dir),
                    {"--grid", "2^40"});
  check_usage_error(run_longtape("attention --variant dense --grid 2x" + inputs, dir), {"--grid", "HxW"});
  check_usage_error(run_longtape("attention --variant dense --ranks 100000" + inputs, dir), {"--ranks", "[1, 1024]"});
  CHECK_FALSE(fs::exists(out));
  fs::remove_all(dir);
}

TEST_CASE("longtape bench fails when no case could run, still writing its report" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("bench_none");
  // One tiny case per variant, its report in dir/out_name.
  auto bench = [&](const std::string& flags, const char* out_name) {
    return run_longtape("bench " + flags + " --seq-lens 8 --heads 1 --head-dim 2 --warmup 0 --repeats 1 --no-plots "
                        "--out-dir " + quoted(dir / out_name), dir);
  };
  // block_sparse rejects an unknown pattern: its only case is skipped.
  const CommandResult r = bench("--variants block_sparse --pattern nosuch", "out");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "no case could run"));
  CHECK(fs::exists(dir / "out" / "bench.json"));
  // One case that runs: success.
  const CommandResult ok = bench("--variants dense --segments 8 --dilations 1", "ok");
  INFO(ok.output);
  CHECK(ok.code == 0);
  fs::remove_all(dir);
}

TEST_CASE("longtape attention writes no output unless the whole command succeeds" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("attention");
  const Tensor x = Tensor::randn({1, 8, 2, 4}, DType::f32);
  for (const char* name : {"q.npy", "k.npy", "v.npy"}) io::save_npy((dir / name).string(), x);
  io::save_npy((dir / "bad_dout.npy").string(), Tensor::randn({1, 8, 2, 3}, DType::f32));
  io::save_npy((dir / "dout.npy").string(), Tensor::randn({1, 8, 2, 4}, DType::f32));
  io::save_npy((dir / "empty.npy").string(), Tensor::zeros({1, 0, 2, 4}, DType::f32));
  auto args = [&](const std::string& q, const std::string& dout, const fs::path& out) {
    return "attention --variant dense --q " + quoted(dir / q) + " --k " + quoted(dir / "k.npy") + " --v " +
           quoted(dir / "v.npy") + (dout.empty() ? "" : " --dout " + quoted(dir / dout)) + " --out-dir " + quoted(out);
  };
  const fs::path out = dir / "out";
  for (const auto& [q, dout, text] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"q.npy", "bad_dout.npy", "--dout"}, {"q.npy", "missing.npy", "missing.npy"}, {"empty.npy", "", ">= 1"}}) {
    INFO(q, " ", dout);
    const CommandResult r = run_longtape(args(q, dout, out), dir);
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, text));
    CHECK_FALSE(fs::exists(out));
  }
  const CommandResult ok = run_longtape(args("q.npy", "dout.npy", out), dir);
  INFO(ok.output);
  REQUIRE(ok.code == 0);
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(out)) files.insert(e.path().filename().string());
  CHECK(files == std::set<std::string>{"o.npy", "lse.npy", "dq.npy", "dk.npy", "dv.npy"});
  // A later failing run leaves the earlier outputs as they were.
  const auto before = fs::last_write_time(out / "o.npy");
  CHECK(run_longtape(args("q.npy", "bad_dout.npy", out), dir).code == 1);
  CHECK(fs::last_write_time(out / "o.npy") == before);
  CHECK(fs::exists(out / "dq.npy"));
  fs::remove_all(dir);
}

namespace {

const std::string kTinyTrain =
    "train --batch 2 --seq-len 32 --layers 1 --width 8 --heads 2 --segments 16,32 --dilations 1,2 --eval-batches 1 "
    "--eval-every 0 --threads 1";

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("longtape train stops on a non-finite loss without writing over the checkpoint" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("train_nan");
  const fs::path ck = dir / "ck.safetensors";
  { std::ofstream(ck) << "the last good checkpoint"; }
  const CommandResult r =
      run_longtape(kTinyTrain + " --steps 20 --warmup 0 --lr 1e38 --weight-decay 0 --checkpoint " + quoted(ck) + " --metrics " +
                       quoted(dir / "m.csv"),
                   dir);
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "became"));
  CHECK(contains(r.output, "stopped without saving a checkpoint"));
  CHECK(read_text(ck) == "the last good checkpoint");
  CHECK_FALSE(fs::exists(dir / "m.csv"));
  fs::remove_all(dir);
}

TEST_CASE("longtape train finds unwritable --checkpoint and --metrics paths before training" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("train_paths");
  { std::ofstream(dir / "file") << "a file, not a folder"; }
  for (const std::string flag : {"--checkpoint", "--metrics"}) {
    INFO(flag);
    const CommandResult r = run_longtape(kTinyTrain + " --steps 1 " + flag + " " + quoted(dir / "file" / "x.out"), dir);
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, flag));
    CHECK(contains(r.output, "cannot create the folder"));
    CHECK_FALSE(contains(r.output, "training recall"));
    const CommandResult folder = run_longtape(kTinyTrain + " --steps 1 " + flag + " " + quoted(dir), dir);
    CHECK(folder.code == 1);
    CHECK(contains(folder.output, "is a folder"));
  }
  fs::remove_all(dir);
}

TEST_CASE("longtape train --resume refuses damaged optimizer state and warns when --steps changes" *
          doctest::skip(testing::longtape_binary_missing())) {
  const fs::path dir = fresh_dir("train_resume");
  const fs::path good = dir / "good.safetensors";
  const CommandResult made = run_longtape(kTinyTrain + " --steps 2 --checkpoint " + quoted(good), dir);
  INFO(made.output);
  REQUIRE(made.code == 0);

  // Rewrites the checkpoint with `edit` applied to its contents.
  auto tampered = [&](const std::string& name, const std::function<void(io::SafetensorsFile&)>& edit) {
    io::SafetensorsFile file = io::read_safetensors(good.string());
    edit(file);
    const fs::path path = dir / name;
    io::write_safetensors(path.string(), file);
    return path;
  };
  auto resume = [&](const fs::path& ck, const std::string& extra = " --steps 2") {
    return run_longtape(kTinyTrain + " --resume " + quoted(ck) + extra, dir);
  };
  for (const std::string step : {"-3", "2000000000000", "12x"}) {
    INFO("optimizer_step ", step);
    const fs::path ck = tampered("step.safetensors", [&](io::SafetensorsFile& f) { f.metadata["optimizer_step"] = step; });
    const CommandResult r = resume(ck);
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, "optimizer_step '" + step + "' is not an integer in [0, 1099511627776]"));
  }
  auto drop_optim = [](io::SafetensorsFile& f) {
    std::vector<std::pair<std::string, io::RawArray>> kept;
    for (auto& entry : f.tensors)
      if (entry.first.rfind("optim.", 0) != 0) kept.push_back(entry);
    f.tensors = kept;
  };
  const fs::path no_moments = tampered("no_moments.safetensors", drop_optim);
  CommandResult r = resume(no_moments);
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "AdamW state lacks"));
  CHECK(contains(r.output, "--fresh-optimizer"));
  const fs::path no_optimizer = tampered("no_optimizer.safetensors", [&](io::SafetensorsFile& f) {
    drop_optim(f);
    f.metadata["optimizer"] = "none";
    f.metadata.erase("optimizer_step");
  });
  r = resume(no_optimizer);
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "holds no optimizer state"));
  r = resume(no_moments, " --fresh-optimizer --steps 3");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(contains(r.output, "moments start from zero"));

  r = resume(good, " --steps 3");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(contains(r.output, "warning: --steps 3 differs from the 2"));
  CHECK(contains(r.output, "schedule changes"));
  r = resume(good);  // same --steps: no warning
  CHECK(r.code == 0);
  CHECK_FALSE(contains(r.output, "schedule changes"));
  fs::remove_all(dir);
}
