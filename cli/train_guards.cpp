// Checks of `longtape train` before it trains (see train_guards.h).
#include "cli/train_guards.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <vector>

#include "cli/size_limits.h"
#include "tensor/error.h"

namespace longtape::cli {

void check_train_sizes(const TrainSizes& s) {
  const std::vector<SizeTerm> tokens{{"--batch", s.batch}, {"--seq-len", s.seq_len}};
  check_count("tokens per step", tokens);
  const long double width = static_cast<long double>(s.width), vocab = static_cast<long double>(s.vocab);
  // Parameters: token table (and head), position table, 12 width^2 per block; each with its
  // gradient and two AdamW moments, 4 bytes each.
  const long double params = vocab * width * (s.untied ? 2 : 1) + static_cast<long double>(s.seq_len) * width +
                             static_cast<long double>(s.layers) * 12.0L * width * width;
  check_memory("the parameters, gradients and optimizer moments", 16.0L * params,
               {{"--width", s.width}, {"--layers", s.layers}, {"vocabulary", s.vocab}});
  // Activations of one step: ~16 width-sized tensors per block per token, and the logits.
  const long double per_token = static_cast<long double>(s.layers) * 16.0L * width + 2.0L * vocab;
  check_memory("one step's activations", 4.0L * product(tokens) * per_token,
               {{"--batch", s.batch}, {"--seq-len", s.seq_len}, {"--width", s.width}, {"--layers", s.layers}});
}

void check_writable(const std::string& path, const char* flag) {
  if (path.empty()) return;
  namespace fs = std::filesystem;
  const fs::path target(path);
  std::error_code ec;
  LT_CHECK(!fs::is_directory(target, ec), "train: ", flag, " ", path, " is a folder; give a file path");
  const fs::path folder = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fs::create_directories(folder, ec);
  LT_CHECK(!ec, "train: ", flag, " ", path, ": cannot create the folder ", folder.string(), ": ", ec.message());
  const fs::path probe = folder / ("." + target.filename().string() + ".probe." + std::to_string(getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  LT_CHECK(fd >= 0, "train: ", flag, " ", path, ": cannot write in ", folder.string(), ": ", std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

nn::CheckpointInfo check_resume_metadata(const std::string& path, bool fresh_optimizer) {
  nn::CheckpointInfo info = nn::read_checkpoint_info(path);
  LT_CHECK(info.step >= 0 && info.step <= kMaxOptimizerStep, "train: --resume ", path, ": step ", info.step,
           " is out of range [0, ", kMaxOptimizerStep, "]");
  if (fresh_optimizer) return info;
  auto it = info.metadata.find("optimizer");
  const std::string optimizer = it == info.metadata.end() ? "none" : it->second;
  LT_CHECK(optimizer != "none", "train: --resume ", path,
           ": the checkpoint holds no optimizer state (it was saved without its optimizer); pass --fresh-optimizer "
           "to resume with the AdamW moments started from zero");
  it = info.metadata.find("optimizer_step");
  LT_CHECK(it != info.metadata.end(), "train: --resume ", path,
           ": the checkpoint has no optimizer_step in its metadata; pass --fresh-optimizer to start the AdamW "
           "moments from zero");
  int64_t step = 0;
  const std::string& text = it->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), step);
  LT_CHECK(ec == std::errc() && end == text.data() + text.size() && step >= 0 && step <= kMaxOptimizerStep,
           "train: --resume ", path, ": optimizer_step '", text, "' is not an integer in [0, ", kMaxOptimizerStep,
           "]; the checkpoint is damaged (pass --fresh-optimizer to start the AdamW moments from zero)");
  return info;
}

void check_optimizer_state_complete(const std::string& path, const nn::Optimizer& optimizer) {
  if (optimizer.step_count() == 0) return;  // no step taken: no moments yet
  const std::map<std::string, Tensor> state = optimizer.state();
  std::vector<std::string> missing;
  for (const auto& [name, param] : optimizer.named_parameters())
    for (const std::string& slot : optimizer.slot_names())
      if (!state.count(name + "." + slot)) missing.push_back(name + "." + slot);
  if (missing.empty()) return;
  LT_CHECK(false, "train: --resume ", path, ": the checkpoint's ", optimizer.type_name(), " state lacks '",
           missing.front(), "'", missing.size() > 1 ? " and " + std::to_string(missing.size() - 1) + " more" : "",
           " (optimizer_step ", optimizer.step_count(),
           "); pass --fresh-optimizer to resume with the moments started from zero");
}

void warn_schedule_changes(const std::string& path, const nlohmann::ordered_json& saved_optim,
                           const nlohmann::ordered_json& optim) {
  if (!saved_optim.is_object()) return;
  for (const char* key : {"steps", "lr", "min_lr", "warmup"}) {
    if (!saved_optim.contains(key) || !optim.contains(key) || saved_optim[key] == optim[key]) continue;
    const std::string flag = std::string("--") + (std::string(key) == "min_lr" ? "min-lr" : key);
    std::fprintf(stderr,
                 "train: warning: %s %s differs from the %s of the run that wrote %s: the learning-rate schedule "
                 "changes from here on\n",
                 flag.c_str(), optim[key].dump().c_str(), saved_optim[key].dump().c_str(), path.c_str());
  }
}

}  // namespace longtape::cli
