#pragma once
// The --impl flag of `longtape attention`, `bench` and `train` (AttentionConfig::impl), and the
// short account of what ran an attention module's last forward.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "cli/variant_flags.h"
#include "tensor/error.h"

namespace longtape::cli {

inline const std::vector<std::string>& impl_choices() {
  static const std::vector<std::string> choices{"auto", "fused", "composed"};
  return choices;
}

inline const char* impl_help() {
  return "attention core: auto (fused kernels where supported, else composed; default), fused (fused kernels "
         "or an error saying why not) or composed";
}

// Throws unless `value` is one of impl_choices(), naming the flag and what was given.
inline const std::string& checked_impl(const std::string& value, const char* flag = "--impl") {
  const auto& choices = impl_choices();
  LT_CHECK(std::find(choices.begin(), choices.end(), value) != choices.end(), flag,
           " must be auto, fused or composed, got \"", value, "\"");
  return value;
}

// "fused,composed" -> {"fused", "composed"}: each value checked, repeats dropped, order kept.
inline std::vector<std::string> parse_impl_list(const std::string& text, const char* flag = "--impl") {
  std::vector<std::string> impls;
  for (const std::string& item : split_list(text, ','))
    if (std::find(impls.begin(), impls.end(), checked_impl(item, flag)) == impls.end()) impls.push_back(item);
  LT_CHECK(!impls.empty(), flag, " must be auto, fused or composed (or a comma-separated list of them), got \"",
           text, "\"");
  return impls;
}

// "implementation composed; precision f32": what ran the module's last forward. Semicolons, as
// precisions have commas ("bf16 tensor cores, f32 accumulation").
inline std::string ran_with(const attention::Attention& module) {
  return "implementation " + module.last_backend() + "; precision " + module.last_precision();
}

}  // namespace longtape::cli
