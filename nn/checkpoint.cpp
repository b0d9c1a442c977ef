#include "nn/checkpoint.h"

#include <charconv>
#include <cstring>
#include <set>

#include "tensor/autograd/grad_mode.h"
#include "io/safetensors.h"
#include "io/tensor_io.h"

namespace longtape::nn {

namespace {

constexpr const char* kOptimPrefix = "optim.";

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

const std::set<std::string>& reserved_keys() {
  static const std::set<std::string> keys = {"format", "step", "optimizer", "optimizer_step",
                                             "lr", "rng_seed", "rng_offset"};
  return keys;
}

template <typename Int>
Int parse_int(const std::map<std::string, std::string>& metadata, const std::string& key, const std::string& path) {
  auto it = metadata.find(key);
  LT_CHECK(it != metadata.end(), "load_checkpoint: '", path, "' has no '", key, "' in its __metadata__");
  Int value{};
  const std::string& text = it->second;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  LT_CHECK(err == std::errc() && end == text.data() + text.size(), "load_checkpoint: '", path,
           "': __metadata__ entry '", key, "' must be an integer, got '", text, "'");
  return value;
}

std::string list_names(const std::vector<std::string>& names) {
  std::string out;
  const size_t shown = std::min<size_t>(names.size(), 8);
  for (size_t i = 0; i < shown; ++i) out += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > shown) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

struct ParsedCheckpoint {
  io::SafetensorsFile file;
  CheckpointInfo info;
};

ParsedCheckpoint read_and_check(const std::string& path) {
  ParsedCheckpoint parsed;
  try {
    parsed.file = io::read_safetensors(path);
  } catch (const Error& e) {
    throw Error(std::string("load_checkpoint: cannot read a checkpoint from '") + path + "': " + e.what());
  }
  auto& meta = parsed.file.metadata;
  auto format = meta.find("format");
  LT_CHECK(format != meta.end() && format->second == kCheckpointFormat, "load_checkpoint: '", path,
           "' is a safetensors file but not a longtape checkpoint (expected __metadata__ format = '",
           kCheckpointFormat, "', got ", format == meta.end() ? std::string("none") : "'" + format->second + "'", ")");
  parsed.info.step = parse_int<int64_t>(meta, "step", path);
  LT_CHECK(parsed.info.step >= 0, "load_checkpoint: '", path, "': step must be >= 0, got ", parsed.info.step);
  parsed.info.metadata = meta;
  return parsed;
}

}  // namespace

void save_checkpoint(const std::string& path, const Module& model, const Optimizer* optimizer, int64_t step,
                     const std::map<std::string, std::string>& extra_metadata) {
  LT_CHECK(step >= 0, "save_checkpoint: step must be >= 0, got ", step);
  io::SafetensorsFile file;
  for (auto& [key, value] : extra_metadata)
    LT_CHECK(!reserved_keys().count(key), "save_checkpoint: extra metadata key '", key,
             "' is reserved for the checkpoint itself");
  file.metadata = extra_metadata;
  const PhiloxState rng = next_philox(0);  // reserving 0 blocks reads the state without changing it
  file.metadata["format"] = kCheckpointFormat;
  file.metadata["step"] = std::to_string(step);
  file.metadata["rng_seed"] = std::to_string(rng.seed);
  file.metadata["rng_offset"] = std::to_string(rng.offset);
  file.metadata["optimizer"] = optimizer ? optimizer->type_name() : "none";
  if (optimizer) {
    file.metadata["optimizer_step"] = std::to_string(optimizer->step_count());
    char lr[64];
    std::snprintf(lr, sizeof lr, "%.17g", optimizer->lr());
    file.metadata["lr"] = lr;
  }
  for (auto& [name, tensor] : model.state_dict()) {
    LT_CHECK(!starts_with(name, kOptimPrefix), "save_checkpoint: model tensor '", name, "' starts with '",
             kOptimPrefix, "', which checkpoints reserve for optimizer state");
    file.add(name, io::raw_from_tensor(tensor));
  }
  if (optimizer)
    for (auto& [name, tensor] : optimizer->state()) file.add(kOptimPrefix + name, io::raw_from_tensor(tensor));
  io::write_safetensors(path, file);
}

CheckpointInfo read_checkpoint_info(const std::string& path) { return read_and_check(path).info; }

CheckpointInfo load_checkpoint(const std::string& path, Module& model, Optimizer* optimizer, bool restore_rng) {
  ParsedCheckpoint parsed = read_and_check(path);
  const auto& meta = parsed.info.metadata;

  // Split the tensors and validate everything before anything changes.
  std::map<std::string, Tensor> model_state, optim_state;
  for (auto& [name, raw] : parsed.file.tensors) {
    if (starts_with(name, kOptimPrefix)) optim_state[name.substr(std::strlen(kOptimPrefix))] = io::tensor_from_raw(raw);
    else model_state[name] = io::tensor_from_raw(raw);
  }
  const std::map<std::string, Tensor> own = model.state_dict();
  std::vector<std::string> missing, unexpected;
  for (auto& [name, t] : own)
    if (!model_state.count(name)) missing.push_back(name);
  for (auto& [name, t] : model_state)
    if (!own.count(name)) unexpected.push_back(name);
  LT_CHECK(missing.empty() && unexpected.empty(), "load_checkpoint: '", path, "' does not match the model (",
           model.type_name(), "): ", missing.empty() ? "" : "missing " + list_names(missing),
           !missing.empty() && !unexpected.empty() ? "; " : "",
           unexpected.empty() ? "" : "unexpected " + list_names(unexpected));
  for (auto& [name, t] : own) {
    const Tensor& saved = model_state.at(name);
    LT_CHECK(saved.shape() == t.shape(), "load_checkpoint: '", path, "': tensor '", name, "' has shape ",
             shape_str(saved.shape()), " in the file but ", shape_str(t.shape()), " in the model");
    LT_CHECK(is_floating(saved.dtype()) == is_floating(t.dtype()), "load_checkpoint: '", path, "': tensor '", name,
             "' is ", dtype_name(saved.dtype()), " in the file but ", dtype_name(t.dtype()), " in the model");
  }
  int64_t optimizer_step = 0;
  if (optimizer) {
    const std::string saved_type = meta.count("optimizer") ? meta.at("optimizer") : "none";
    LT_CHECK(saved_type != "none", "load_checkpoint: '", path, "' holds no optimizer state, but an ",
             optimizer->type_name(), " was given to restore");
    LT_CHECK(saved_type == optimizer->type_name(), "load_checkpoint: '", path, "' holds ", saved_type,
             " state, but the optimizer given is ", optimizer->type_name());
    optimizer_step = parse_int<int64_t>(meta, "optimizer_step", path);
    LT_CHECK(optimizer_step >= 0, "load_checkpoint: '", path, "': optimizer_step must be >= 0, got ", optimizer_step);
    try {
      optimizer->check_state(optim_state);
    } catch (const Error& e) {
      throw Error(std::string("load_checkpoint: '") + path + "': " + e.what());
    }
  }
  PhiloxState rng{};
  if (restore_rng) {
    rng.seed = parse_int<uint64_t>(meta, "rng_seed", path);
    rng.offset = parse_int<uint64_t>(meta, "rng_offset", path);
  }

  model.load_state_dict(model_state, /*strict=*/true);
  if (optimizer) optimizer->load_state(optim_state, optimizer_step);
  if (restore_rng) {
    manual_seed(rng.seed);
    next_philox(rng.offset);
  }
  return parsed.info;
}

}  // namespace longtape::nn
