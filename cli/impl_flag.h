#pragma once
// The --impl flag of `longtape attention`, `bench` and `train` (AttentionConfig::impl), the
// --precision flag of `train` and `bench --quality` (tensor/precision.h), and the short account of
// what ran an attention module's last forward.
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

inline const char* precision_help() {
  return "matmul and attention precision: auto (bf16 on CUDA, f32 on the CPU; default), f32, tf32 (CUDA TF32 "
         "products) or bf16 (bf16 operands, f32 accumulation, f32 master weights; the CPU rounds to bf16 and "
         "computes in f32)";
}

// Throws a FlagError (exit status 2) unless `value` is auto, f32, tf32 or bf16.
inline const std::string& checked_precision(const std::string& value, const char* flag = "--precision") {
  if (value != "auto" && value != "f32" && value != "tf32" && value != "bf16")
    throw FlagError(std::string(flag) + " must be auto, f32, tf32 or bf16, got \"" + shown_value(value) + "\"");
  return value;
}

// "implementation composed; precision f32": what ran the module's last forward. Semicolons, as
// precisions have commas ("bf16 tensor cores, f32 accumulation").
inline std::string ran_with(const attention::Attention& module) {
  return "implementation " + module.last_backend() + "; precision " + module.last_precision();
}

}  // namespace longtape::cli
