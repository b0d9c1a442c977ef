// The fuzz targets' seed corpus (fuzz/corpus/<target>/), replayed through the same entry
// functions the libFuzzer targets call (fuzz/entries.h), plus a short deterministic mutation pass
// over every seed: each input must either parse (passing the entry's round-trip and range checks)
// or be refused with the error meant for bad input -- never crash or throw anything else. Under the
// sanitizer build (scripts/sanitize.sh) this also catches memory errors and undefined behaviour.
// Longer runs: scripts/fuzz.sh.
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "cli/numeric_flags.h"
#include "fuzz/entries.h"
#include "support/test_utils.h"
#include "tensor/error.h"

namespace fs = std::filesystem;
using namespace longtape;

namespace {

using Entry = void (*)(const uint8_t*, size_t);

struct Outcome {
  bool parsed = false;
  std::string unexpected;  // non-empty: a failure (what was thrown)
};

Outcome feed(Entry entry, const std::vector<uint8_t>& bytes) {
  Outcome out;
  try {
    entry(bytes.data(), bytes.size());
    out.parsed = true;
  } catch (const Error&) {
  } catch (const cli::FlagError&) {
  } catch (const std::exception& e) {
    out.unexpected = e.what();
  } catch (...) {
    out.unexpected = "a non-standard exception";
  }
  return out;
}

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<fs::path> corpus_files(const std::string& target) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(fs::path(LONGTAPE_FUZZ_CORPUS) / target))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

// One random edit of the kinds that break parsers: bit flips, byte overwrites with edge values,
// truncation, duplication of a slice, insertion of random bytes.
std::vector<uint8_t> mutate(std::vector<uint8_t> bytes, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n ? static_cast<size_t>(rng() % n) : 0; };
  static const uint8_t kEdges[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '-', '9', ',', ')', '}', '"', '\''};
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < edits; ++i) {
    switch (rng() % 5) {
      case 0:
        if (!bytes.empty()) bytes[pick(bytes.size())] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:
        if (!bytes.empty()) bytes[pick(bytes.size())] = kEdges[pick(std::size(kEdges))];
        break;
      case 2: bytes.resize(pick(bytes.size() + 1)); break;
      case 3:
        if (!bytes.empty()) {
          const size_t at = pick(bytes.size()), len = 1 + pick(std::min<size_t>(64, bytes.size() - at));
          std::vector<uint8_t> slice(bytes.begin() + at, bytes.begin() + at + len);
          bytes.insert(bytes.begin() + pick(bytes.size() + 1), slice.begin(), slice.end());
        }
        break;
      case 4: {
        const size_t at = pick(bytes.size() + 1);
        for (size_t k = 0, n = 1 + pick(8); k < n; ++k) bytes.insert(bytes.begin() + at, static_cast<uint8_t>(rng()));
        break;
      }
    }
  }
  return bytes;
}

void replay(const std::string& target, Entry entry) {
  const std::vector<fs::path> files = corpus_files(target);
  REQUIRE(files.size() >= 4);
  int parsed = 0, refused = 0;
  for (const fs::path& file : files) {
    INFO("corpus file: ", file.string());
    const Outcome o = feed(entry, read_bytes(file));
    CHECK(o.unexpected == "");
    (o.parsed ? parsed : refused) += 1;
  }
  // The corpus holds valid and invalid inputs, so both paths of every entry run.
  CHECK(parsed >= 1);
  CHECK(refused >= 1);

  const uint64_t seed = testing::fresh_seed();
  INFO("mutation seed: ", seed);
  std::mt19937_64 rng(seed);
  constexpr int kMutationsPerFile = 150;
  for (const fs::path& file : files) {
    const std::vector<uint8_t> original = read_bytes(file);
    for (int i = 0; i < kMutationsPerFile; ++i) {
      const std::vector<uint8_t> input = mutate(original, rng);
      const Outcome o = feed(entry, input);
      if (!o.unexpected.empty()) {
        INFO("mutant of ", file.string(), " (", input.size(), " bytes) threw: ", o.unexpected);
        CHECK(o.unexpected == "");
      }
    }
  }
  MESSAGE(target, ": ", files.size(), " seeds (", parsed, " parsed, ", refused, " refused), ",
          files.size() * kMutationsPerFile, " mutants");
}

}  // namespace

TEST_CASE("npy corpus: every seed and mutant parses or is refused with longtape::Error") {
  replay("npy", fuzz::npy_entry);
}

TEST_CASE("safetensors corpus: every seed and mutant parses or is refused with longtape::Error") {
  replay("safetensors", fuzz::safetensors_entry);
}

TEST_CASE("flag corpus: every seed and mutant parses or is refused with a flag error") {
  replay("flags", fuzz::flags_entry);
}

TEST_CASE("flag entry: a valid integer parses, garbage and out-of-range values are refused") {
  auto outcome = [](const std::string& value, uint8_t selector) {
    std::vector<uint8_t> bytes{selector};
    bytes.insert(bytes.end(), value.begin(), value.end());
    return feed(fuzz::flags_entry, bytes);
  };
  CHECK(outcome("42", 0).parsed);
  for (const char* bad : {"4x2", "", "nan", "0x10", " 1"}) {
    INFO("value: '", bad, "'");
    const Outcome o = outcome(bad, 0);
    CHECK_FALSE(o.parsed);
    CHECK(o.unexpected == "");
  }
  CHECK_FALSE(outcome("0", 8).parsed);  // selector 8: a count, at least 1
  CHECK(outcome("cuda:3", 5).parsed);
  CHECK_FALSE(outcome("cuda:-3", 5).parsed);
}
