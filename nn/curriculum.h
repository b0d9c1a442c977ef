#pragma once
// A sequence-length curriculum: training starts on short sequences and moves to longer ones at
// fixed steps, ending on the full length. From scratch, attention over thousands of keys is
// nearly uniform, so the gradient that would teach a long-range lookup is spread over all of them;
// on short sequences the same lookup is learned in a few hundred steps, and a content-based lookup
// learned there carries over to longer ones.
//
// Which length a step trains on is a pure function of its index, so a run resumed at step s
// repeats exactly what an uninterrupted run does from s on. Held-out batches always have the full
// length: the reported accuracy is the one at the length that was asked for.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nn/trainer.h"

namespace longtape::nn {

struct CurriculumPhase {
  int64_t seq_len = 0;  // tokens per training sequence in this phase
  int64_t steps = 0;    // optimizer steps the phase lasts
};

class LengthCurriculum {
 public:
  // No phases: every step trains at final_seq_len.
  explicit LengthCurriculum(int64_t final_seq_len);
  // `phases` run in order, then the remaining steps at final_seq_len. Lengths must rise strictly
  // and stay below final_seq_len; every phase lasts at least one step.
  LengthCurriculum(std::vector<CurriculumPhase> phases, int64_t final_seq_len);
  // "128:300,1024:200": 300 steps at 128 tokens, 200 at 1024, the rest at final_seq_len. An
  // empty text is no curriculum. Throws longtape::Error naming `what` and the bad item.
  static LengthCurriculum parse(const std::string& text, int64_t final_seq_len, const char* what = "--curriculum");

  // Tokens per sequence of training step `index` (0-based).
  int64_t seq_len_at(int64_t index) const;
  int64_t final_seq_len() const { return final_seq_len_; }
  const std::vector<CurriculumPhase>& phases() const { return phases_; }
  // Tokens of one sequence summed over steps [first, last): the sum of seq_len_at(i).
  int64_t tokens_between(int64_t first, int64_t last) const;
  // Steps before the final length starts.
  int64_t phase_steps() const;
  bool empty() const { return phases_.empty(); }
  // "128:300,1024:200" (the text parse() reads); "" when empty.
  std::string str() const;

 private:
  std::vector<CurriculumPhase> phases_;
  int64_t final_seq_len_;
};

// Batches for a curriculum: training batch i has curriculum.seq_len_at(i) tokens and comes from
// source_for(that length); held-out batches come from source_for(final_seq_len). source_for is
// called here, once per length, in rising order (the final length last).
BatchSource curriculum_batches(const LengthCurriculum& curriculum,
                               const std::function<BatchSource(int64_t seq_len)>& source_for);

}  // namespace longtape::nn
