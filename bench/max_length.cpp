#include "bench/max_length.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "attention/config_text.h"
#include "bench/cases.h"
#include "bench/timing.h"
#include "tensor/allocator.h"

namespace longtape::bench {

using attention::format_number;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Probe {
  bool fits = false;
  bool out_of_memory = false;
  Peak peak;
  double ms = 0.0;
};

Probe probe_length(CaseShape s, const SearchOptions& a, int64_t budget) {
  s.config = config_for_length(s.variant, s.config, s.seq_len, a.grid_given);
  Probe p;
  try {
    const auto t0 = std::chrono::steady_clock::now();
    p.peak = measure_peak(a.device, [&] {
      std::shared_ptr<attention::Attention> module = make_case_module(s, a.device);
      CaseInputs in = make_case_inputs(s, a.device, a.seed);
      Tensor out = module->forward(in.q, in.k, in.v);
      out.backward(in.dout);
    });
    p.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    p.fits = p.peak.allocated <= budget;
  } catch (const std::exception& e) {
    const Classified c = classify(e, "forward+backward");
    empty_cache(a.device);
    if (!c.out_of_memory) throw;
    p.out_of_memory = true;
    p.fits = false;
  }
  empty_cache(a.device);
  return p;
}

Json search_header(const CaseShape& s, const SearchOptions& a) {
  Json row;
  row["variant"] = s.variant;
  row["status"] = "measured";
  row["reason"] = "";
  row["config_label"] = attention::config_label(s.variant, s.config);
  row["device"] = a.device.str();
  row["dtype"] = dtype_name(s.dtype);
  row["batch"] = s.batch;
  row["heads"] = s.config.num_heads;
  row["head_dim"] = s.config.head_dim;
  row["causal"] = s.config.causal;
  row["config"] = config_json(s.config);
  row["budget_bytes"] = static_cast<int64_t>(a.budget_gib * kGiB);
  row["granule"] = a.granule;
  row["cap"] = a.cap;
  return row;
}
}  // namespace

Json search_skipped(const CaseShape& s, const SearchOptions& a, const std::string& reason) {
  Json row = search_header(s, a);
  row["status"] = "skipped";
  row["reason"] = reason;
  row["max_seq_len"] = 0;
  row["peak_allocated_bytes"] = 0;
  row["peak_reserved_bytes"] = 0;
  row["reached_cap"] = false;
  row["note"] = "";
  row["probes"] = Json::array();
  row["seconds"] = 0.0;
  return row;
}

Json search_max_len(CaseShape s, const SearchOptions& a) {
  const int64_t budget = static_cast<int64_t>(a.budget_gib * kGiB);
  const int64_t granule = a.granule, cap = a.cap;
  Json row = search_header(s, a);
  Json probes = Json::array();
  const auto t0 = std::chrono::steady_clock::now();
  const double limit_ms = a.case_time_limit * 1000.0;

  int64_t lo = 0, hi = 0;  // lo fits (0 = none yet), hi does not (0 = unknown)
  Probe lo_probe;
  std::string stopped;
  auto run = [&](int64_t n) {
    if (a.deadline && std::chrono::steady_clock::now() > *a.deadline) {
      stopped = "stopped early: the time budget (--time-budget) ran out during the search";
      return Probe{};
    }
    s.seq_len = n;
    Probe p = probe_length(s, a, budget);
    probes.push_back({{"seq_len", n},
                      {"fits", p.fits},
                      {"out_of_memory", p.out_of_memory},
                      {"peak_allocated_bytes", p.peak.allocated},
                      {"peak_reserved_bytes", p.peak.reserved},
                      {"ms", p.ms}});
    if (p.fits) {
      lo = n;
      lo_probe = p;
    } else {
      hi = n;
    }
    if (a.case_time_limit > 0 && p.ms > limit_ms)
      stopped = "stopped early: one forward+backward took " + format_number(p.ms / 1000.0) + " s at N = " +
                std::to_string(n) + " (--case-time-limit " + format_number(a.case_time_limit) + " s)";
    return p;
  };
  try {
    int64_t n = std::min(cap, std::max(granule, a.first_seq_len / granule * granule));
    run(n);
    while (lo > 0 && hi == 0 && lo < cap && stopped.empty()) {
      // Grow by at most 2x, and by no more than memory that grows quadratically in N allows, so
      // that no probe asks for far more than the budget (the CPU has no out-of-memory error).
      const double room = std::sqrt(static_cast<double>(budget) / std::max<double>(1.0, static_cast<double>(lo_probe.peak.allocated)));
      int64_t next = std::min<int64_t>(2 * lo, static_cast<int64_t>(static_cast<double>(lo) * room));
      next = next / granule * granule;
      if (next <= lo) next = lo + granule;
      next = std::min(next, cap);
      if (a.case_time_limit > 0) {
        const double ratio = static_cast<double>(next) / static_cast<double>(lo);
        if (lo_probe.ms * ratio * ratio > 4.0 * limit_ms) {
          stopped = "stopped early: a forward+backward at N = " + std::to_string(next) + " is predicted to take over " +
                    format_number(4.0 * a.case_time_limit) + " s (--case-time-limit)";
          break;
        }
      }
      run(next);
    }
    while (lo > 0 && hi > 0 && hi - lo > granule && stopped.empty()) {
      const int64_t mid = (lo + hi) / 2 / granule * granule;
      if (mid <= lo || mid >= hi) break;
      run(mid);
    }
    if (lo == 0 && hi > 0) {
      row["status"] = "skipped";
      row["reason"] = "even N = " + std::to_string(hi) + " does not fit the budget of " +
                      format_number(a.budget_gib) + " GiB";
    } else if (lo == 0) {
      row["status"] = "skipped";
      row["reason"] = stopped.empty() ? std::string("no sequence length was measured") : stopped;
    }
  } catch (const std::exception& e) {
    const Classified c = classify(e, "max length search");
    row["status"] = c.status;
    row["reason"] = c.reason;
  }
  row["max_seq_len"] = lo;
  row["peak_allocated_bytes"] = lo > 0 ? lo_probe.peak.allocated : 0;
  row["peak_reserved_bytes"] = lo > 0 ? lo_probe.peak.reserved : 0;
  row["reached_cap"] = lo >= cap;
  row["note"] = stopped;
  row["probes"] = probes;
  row["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}
}  // namespace longtape::bench
