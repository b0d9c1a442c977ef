#include "nn/curriculum.h"

#include <algorithm>
#include <charconv>
#include <map>
#include <memory>
#include <sstream>

#include "tensor/checked_math.h"
#include "tensor/error.h"

namespace longtape::nn {

LengthCurriculum::LengthCurriculum(int64_t final_seq_len) : LengthCurriculum({}, final_seq_len) {}

LengthCurriculum::LengthCurriculum(std::vector<CurriculumPhase> phases, int64_t final_seq_len)
    : phases_(std::move(phases)), final_seq_len_(final_seq_len) {
  LT_CHECK(final_seq_len >= 1, "length curriculum: the final sequence length must be >= 1, got ", final_seq_len);
  int64_t previous = 0, total = 0;
  for (size_t i = 0; i < phases_.size(); ++i) {
    const CurriculumPhase& p = phases_[i];
    LT_CHECK(p.seq_len > previous, "length curriculum: phase ", i, " has length ", p.seq_len,
             "; lengths must be >= 1 and rise from phase to phase (the one before was ", previous, ")");
    LT_CHECK(p.seq_len < final_seq_len, "length curriculum: phase ", i, " has length ", p.seq_len,
             ", not below the final sequence length ", final_seq_len);
    LT_CHECK(p.steps >= 1, "length curriculum: phase ", i, " (length ", p.seq_len, ") must last >= 1 step, got ",
             p.steps);
    total = checked::add(total, p.steps, "length curriculum: total phase steps");
    previous = p.seq_len;
  }
}

namespace {
// The whole of `text` as a positive integer, or -1.
int64_t positive_integer(const std::string& text) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, v);
  return ec == std::errc() && ptr == end && v >= 1 ? v : -1;
}
}  // namespace

LengthCurriculum LengthCurriculum::parse(const std::string& text, int64_t final_seq_len, const char* what) {
  std::vector<CurriculumPhase> phases;
  if (text.empty()) return LengthCurriculum(final_seq_len);
  std::stringstream items(text);
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t colon = item.find(':');
    const int64_t len = colon == std::string::npos ? -1 : positive_integer(item.substr(0, colon));
    const int64_t steps = colon == std::string::npos ? -1 : positive_integer(item.substr(colon + 1));
    LT_CHECK(len >= 1 && steps >= 1, what, ": expected comma-separated LENGTH:STEPS items with positive integers ",
             "(e.g. 128:300,1024:200), got \"", item, "\" in \"", text, "\"");
    phases.push_back({len, steps});
  }
  LT_CHECK(text.back() != ',', what, ": expected LENGTH:STEPS after the last comma in \"", text, "\"");
  try {
    return LengthCurriculum(std::move(phases), final_seq_len);
  } catch (const Error& e) {
    throw Error(std::string(what) + " \"" + text + "\": " + e.what());
  }
}

int64_t LengthCurriculum::seq_len_at(int64_t index) const {
  LT_CHECK(index >= 0, "length curriculum: step index must be >= 0, got ", index);
  for (const CurriculumPhase& p : phases_) {
    if (index < p.steps) return p.seq_len;
    index -= p.steps;
  }
  return final_seq_len_;
}

int64_t LengthCurriculum::tokens_between(int64_t first, int64_t last) const {
  LT_CHECK(0 <= first && first <= last, "length curriculum: need 0 <= first <= last, got ", first, " and ", last);
  int64_t tokens = 0, begin = 0;  // begin: the first step of the phase at hand
  const auto add = [&](int64_t len, int64_t end) {  // steps [begin, end) at len
    const int64_t n = std::max<int64_t>(0, std::min(end, last) - std::max(begin, first));
    tokens = checked::add(tokens, checked::mul(n, len, "length curriculum: tokens"), "length curriculum: tokens");
    begin = end;
  };
  for (const CurriculumPhase& p : phases_) add(p.seq_len, begin + p.steps);
  add(final_seq_len_, std::max(begin, last));
  return tokens;
}

int64_t LengthCurriculum::phase_steps() const {
  int64_t total = 0;
  for (const CurriculumPhase& p : phases_) total += p.steps;
  return total;
}

std::string LengthCurriculum::str() const {
  std::string out;
  for (const CurriculumPhase& p : phases_)
    out += (out.empty() ? "" : ",") + std::to_string(p.seq_len) + ":" + std::to_string(p.steps);
  return out;
}

BatchSource curriculum_batches(const LengthCurriculum& curriculum,
                               const std::function<BatchSource(int64_t seq_len)>& source_for) {
  LT_CHECK(static_cast<bool>(source_for), "curriculum_batches: needs a source for each length");
  auto sources = std::make_shared<std::map<int64_t, BatchSource>>();
  for (const CurriculumPhase& p : curriculum.phases()) (*sources)[p.seq_len] = source_for(p.seq_len);
  (*sources)[curriculum.final_seq_len()] = source_for(curriculum.final_seq_len());
  for (const auto& [len, source] : *sources)
    LT_CHECK(static_cast<bool>(source), "curriculum_batches: no batch source for length ", len);
  return [curriculum, sources](int64_t batch_size, int64_t index, Split split) {
    const int64_t len = split == Split::heldout ? curriculum.final_seq_len() : curriculum.seq_len_at(index);
    return sources->at(len)(batch_size, index, split);
  };
}

}  // namespace longtape::nn
