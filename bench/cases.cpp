#include "bench/cases.h"

#include <vector>

#include "attention/config_text.h"
#include "attention/pattern_map.h"
#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "bench/timing.h"
#include "tensor/allocator.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/tensor.h"

namespace longtape::bench {

using attention::format_number;

Classified classify(const std::exception& e, const std::string& stage) {
  const std::string what = e.what();
  const bool oom = dynamic_cast<const OutOfMemoryError*>(&e) != nullptr || what.find("out of memory") != std::string::npos;
  if (oom) return {"skipped", "out of memory (" + stage + "): " + what, true};
  if (dynamic_cast<const Error*>(&e) != nullptr && what.rfind("internal error", 0) != 0)
    return {"skipped", "cannot run (" + stage + "): " + what, false};
  return {"failed", "error (" + stage + "): " + what, false};
}

CaseInputs make_case_inputs(const CaseShape& s, Device device, uint64_t seed) {
  manual_seed(seed);
  const Shape shape{s.batch, s.seq_len, s.config.num_heads, s.config.head_dim};
  auto random = [&] { return Tensor::randn(shape, DType::f32, device).to(s.dtype).detach(); };
  CaseInputs in;
  in.q = random().requires_grad_();
  in.k = random().requires_grad_();
  in.v = random().requires_grad_();
  in.dout = random();
  in.bytes = 4 * shape_numel(shape) * static_cast<int64_t>(dtype_size(s.dtype));
  return in;
}

std::shared_ptr<attention::Attention> make_case_module(const CaseShape& s, Device device) {
  std::shared_ptr<attention::Attention> module = attention::make_attention(s.variant, s.config);
  module->to(device);
  module->eval();  // no dropout while timing
  return module;
}

namespace {

void clear_grads(CaseInputs& in, attention::Attention& module) {
  in.q.set_grad(Tensor());
  in.k.set_grad(Tensor());
  in.v.set_grad(Tensor());
  module.zero_grad();
}

}  // namespace

Json case_header(const CaseShape& s, Device device) {
  Json row;
  row["variant"] = s.variant;
  row["status"] = "measured";
  row["reason"] = "";
  row["config_label"] = attention::config_label(s.variant, s.config);
  row["device"] = device.str();
  row["dtype"] = dtype_name(s.dtype);
  row["batch"] = s.batch;
  row["seq_len"] = s.seq_len;
  row["heads"] = s.config.num_heads;
  row["head_dim"] = s.config.head_dim;
  row["causal"] = s.config.causal;
  row["config"] = config_json(s.config);
  row["implementation"] = "none";  // until a forward has run
  row["compute_precision"] = "none";
  return row;
}

void record_ran(Json& where, const attention::Attention& module) {
  where["implementation"] = module.last_backend();
  where["compute_precision"] = module.last_precision();
}

Json run_case(const CaseShape& s, const CaseOptions& a, Device device, SeriesState& series) {
  Json row = case_header(s, device);
  auto skip = [&](const std::string& status, const std::string& reason) {
    row["status"] = status;
    row["reason"] = reason;
    return row;
  };
  if (!series.stop_reason.empty()) return skip("skipped", series.stop_reason);
  const double limit_ms = a.case_time_limit * 1000.0;
  if (a.case_time_limit > 0 && series.last_seq_len > 0) {
    // Attention cost grows at most quadratically in N: refuse a case predicted far over the limit.
    const double ratio = static_cast<double>(s.seq_len) / static_cast<double>(series.last_seq_len);
    const double predicted = series.last_fwdbwd_ms * ratio * ratio;
    if (predicted > 4.0 * limit_ms) {
      series.stop_reason = "too slow: forward+backward predicted to take about " + format_number(predicted / 1000.0) +
                           " s at N = " + std::to_string(s.seq_len) + " (--case-time-limit " +
                           format_number(a.case_time_limit) + " s)";
      return skip("skipped", series.stop_reason);
    }
  }

  std::string stage = "construct";
  try {
    std::shared_ptr<attention::Attention> module = make_case_module(s, device);
    stage = "inputs";
    CaseInputs in = make_case_inputs(s, device, a.seed);
    row["inputs_bytes"] = in.bytes;

    stage = "attended pairs";
    int64_t pairs = 0;
    if (auto analytic = attention::analytic_attended_pairs(s.variant, s.config, s.seq_len)) {
      pairs = *analytic;
      row["pairs_method"] = "analytic";
    } else {
      pairs = attention::probed_attended_pairs(*module, s.seq_len, s.dtype, device);
      row["pairs_method"] = "probe";
    }
    pairs *= s.batch;
    const double forward_flops = 4.0 * static_cast<double>(pairs) * static_cast<double>(s.config.head_dim);
    const double fwdbwd_flops = forward_flops * 3.5;
    row["attended_pairs"] = pairs;
    row["flops"] = {{"forward", forward_flops}, {"forward_backward", fwdbwd_flops}};

    CaseTimer timer(device);
    auto forward_once = [&] {
      NoGradGuard no_grad;
      attention::AttentionOutput result = module->forward_with_lse(in.q, in.k, in.v);
      (void)result;
    };
    auto fwdbwd_once = [&] {
      Tensor out = module->forward(in.q, in.k, in.v);
      out.backward(in.dout);
    };
    auto timed_fwdbwd = [&] {
      clear_grads(in, *module);
      return timer.milliseconds(fwdbwd_once);
    };

    stage = "forward+backward";
    // The first run doubles as the time-limit check.
    const double first_ms = timed_fwdbwd();
    record_ran(row, *module);
    if (a.case_time_limit > 0 && first_ms > limit_ms) {
      series.stop_reason = "too slow: one forward+backward took " + format_number(first_ms / 1000.0) + " s at N = " +
                           std::to_string(s.seq_len) + " (--case-time-limit " + format_number(a.case_time_limit) + " s)";
      return skip("skipped", series.stop_reason);
    }
    for (int i = 1; i < a.warmup; ++i) timed_fwdbwd();
    std::vector<double> fwdbwd_ms;
    for (int i = 0; i < a.repeats; ++i) fwdbwd_ms.push_back(timed_fwdbwd());
    clear_grads(in, *module);
    Json fwdbwd_ran;
    record_ran(fwdbwd_ran, *module);

    stage = "forward";
    for (int i = 0; i < a.warmup; ++i) timer.milliseconds(forward_once);
    std::vector<double> forward_ms;
    for (int i = 0; i < a.repeats; ++i) forward_ms.push_back(timer.milliseconds(forward_once));
    Json forward_ran;
    record_ran(forward_ran, *module);

    stage = "memory";
    const Peak forward_peak = measure_peak(device, forward_once);
    const Peak fwdbwd_peak = measure_peak(device, [&] {
      clear_grads(in, *module);
      fwdbwd_once();
    });
    clear_grads(in, *module);

    const double tokens = static_cast<double>(s.batch * s.seq_len);
    auto figures = [&](const std::vector<double>& ms, double flops, const Peak& peak, const Json& ran) {
      Json t = timing_json(ms);
      const double seconds = t["median_ms"].get<double>() / 1000.0;
      t["tokens_per_s"] = tokens / seconds;
      t["tflops"] = flops / seconds / 1e12;
      t["peak_allocated_bytes"] = peak.allocated;
      t["peak_reserved_bytes"] = peak.reserved;
      t.update(ran);
      return t;
    };
    row.update(forward_ran);
    row["forward"] = figures(forward_ms, forward_flops, forward_peak, forward_ran);
    row["forward_backward"] = figures(fwdbwd_ms, fwdbwd_flops, fwdbwd_peak, fwdbwd_ran);
    series.last_fwdbwd_ms = median(fwdbwd_ms);
    series.last_seq_len = s.seq_len;
  } catch (const std::exception& e) {
    const Classified c = classify(e, stage);
    row.erase("forward");
    row.erase("forward_backward");
    if (c.out_of_memory)
      series.stop_reason = "a shorter sequence (N = " + std::to_string(s.seq_len) + ") already ran out of memory";
    empty_cache(device);
    return skip(c.status, c.reason);
  }
  return row;
}

}  // namespace longtape::bench
