#pragma once
// One benchmark case: a fresh module and fresh random inputs, `warmup` untimed runs, then
// `repeats` timed runs of the forward (without recording) and of forward+backward, the peak memory
// of each, and the useful FLOPs from the attended pairs. A case that cannot run becomes a skipped
// row with its reason, an unexpected error a failed one; nothing is thrown.
#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "attention/attention.h"
#include "bench/grid.h"
#include "tensor/device.h"
#include "tensor/tensor.h"

namespace longtape::bench {

struct CaseOptions {
  int warmup = 3;
  int repeats = 10;
  double case_time_limit = 60.0;  // seconds for one forward+backward; 0 = no limit
  uint64_t seed = 0;              // of the random inputs
};

// How an exception becomes a row: out of memory and rejected configurations are skipped (they
// cannot run here), internal errors and anything that is not a longtape::Error are failures.
struct Classified {
  std::string status;
  std::string reason;
  bool out_of_memory = false;
};
Classified classify(const std::exception& e, const std::string& stage);

// The fields every result row has, status "measured" until something says otherwise.
Json case_header(const CaseShape& s, Device device);

// What ran the module's last forward, into a row or a phase's figures.
void record_ran(Json& where, const attention::Attention& module);

// What one series (a variant, setting, dtype and shape over growing sequence lengths) learnt so far.
struct SeriesState {
  std::string stop_reason;  // set once a case ran out of memory or time: longer ones are skipped
  double last_fwdbwd_ms = 0.0;
  int64_t last_seq_len = 0;
};

// Measures one case of `series` (whose lengths come in increasing order).
Json run_case(const CaseShape& s, const CaseOptions& options, Device device, SeriesState& series);

// A fresh module of the case's variant on `device`, in eval mode (no dropout while timing).
std::shared_ptr<attention::Attention> make_case_module(const CaseShape& s, Device device);

// Random q, k, v (recording gradients) and output gradient of the case's shape, from `seed`.
struct CaseInputs {
  Tensor q, k, v, dout;
  int64_t bytes = 0;
};
CaseInputs make_case_inputs(const CaseShape& s, Device device, uint64_t seed);

}  // namespace longtape::bench
