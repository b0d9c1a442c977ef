#include "nn/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "tensor/autograd/grad_mode.h"
#include "io/atomic_file.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/profiler.h"

namespace longtape::nn {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The scalar `loss` and, when defined, the scalar `norm`, read back in one copy.
std::vector<double> read_together(const Tensor& loss, const Tensor& norm) {
  NoGradGuard guard;
  Tensor l = cast(loss.detach(), DType::f64).reshape({1});
  if (!norm.defined()) return l.to_vector();
  Tensor n = cast(norm, DType::f64).reshape({1});
  if (n.device() != l.device()) n = n.to(l.device());
  return cat({l, n}, 0).to_vector();
}

}  // namespace

Trainer::Trainer(Module& model, Logits logits, Optimizer& optimizer, CosineSchedule schedule, TrainerOptions options)
    : model_(model), logits_(std::move(logits)), optimizer_(optimizer), schedule_(schedule),
      options_(std::move(options)) {
  LT_CHECK(static_cast<bool>(logits_), "Trainer: needs a function from tokens to logits");
  LT_CHECK(options_.batch_size >= 1, "Trainer: batch_size must be >= 1, got ", options_.batch_size);
  LT_CHECK(options_.clip >= 0, "Trainer: clip must be >= 0 (0 = no clipping), got ", options_.clip);
  LT_CHECK(options_.eval_every >= 0 && options_.eval_batches >= 1,
           "Trainer: eval_every must be >= 0 and eval_batches >= 1, got ", options_.eval_every, " and ",
           options_.eval_batches);
  LT_CHECK(options_.checkpoint_every == 0 || !options_.checkpoint.empty(),
           "Trainer: checkpoint_every needs a checkpoint path");
}

StepResult Trainer::run_step(const Batch& batch, int64_t index, const std::function<void()>& before_read) {
  const auto t0 = Clock::now();
  Tensor loss;
  {
    AutocastScope precision(options_.precision);
    {
      profiler::Scope scope("forward + loss");
      loss = cross_entropy(logits_(batch.inputs), batch.targets, kIgnoreIndex);
    }
    profiler::Scope scope("backward");
    optimizer_.zero_grad();
    loss.backward();
  }
  if (on_gradients) {
    profiler::Scope scope("gradient exchange");
    on_gradients();
  }
  double norm = 0, loss_value = 0;
  {
    profiler::Scope scope("grad norm + clip");
    // The one device read of the step: the loss and the gradient norm together, before the update
    // (a non-finite step must stop before it changes the weights). It also raises the index
    // checks the step left on the device (tensor/device_checks.h).
    const std::vector<Tensor> parameters = model_.parameters();
    Tensor norm_t = grad_norm_tensor(parameters);
    Tensor reported = loss.detach();
    if (reduce_loss) {
      NoGradGuard guard;
      reported = reduce_loss(reported);
    }
    if (before_read) before_read();
    const std::vector<double> read = read_together(reported, norm_t);
    loss_value = read[0];
    norm = read.size() > 1 ? read[1] : 0.0;
    if (options_.clip > 0) scale_grads_to_norm(parameters, norm, options_.clip);
  }
  // A diverged step stops the run before it changes the weights.
  if (options_.stop_on_non_finite && !std::isfinite(norm)) {
    if (on_diverged) on_diverged();
    LT_CHECK(false, "train: the gradient norm became ", norm, " at step ", index + 1, " (loss ", loss_value,
             "); stopped without saving a checkpoint (", options_.divergence_hint, ")");
  }
  {
    profiler::Scope scope("optimizer step");
    schedule_.apply(optimizer_, index);
    optimizer_.step();
  }
  StepResult r;
  r.step = index + 1;
  r.loss = loss_value;
  r.lr = optimizer_.lr();
  r.grad_norm = norm;
  r.seconds = seconds_since(t0);
  if (options_.stop_on_non_finite && !std::isfinite(r.loss)) {
    if (on_diverged) on_diverged();
    LT_CHECK(false, "train: the loss became ", r.loss, " at step ", index + 1,
             "; stopped without saving a checkpoint (", options_.divergence_hint, ")");
  }
  return r;
}

void Trainer::fit(const BatchSource& data, int64_t first_step) {
  LT_CHECK(static_cast<bool>(data), "Trainer: needs a batch source");
  LT_CHECK(first_step >= 0 && first_step <= options_.steps, "Trainer: the first step must lie in [0, ",
           options_.steps, "], got ", first_step);
  std::optional<Batch> next;  // the next step's batch, fetched during this step
  for (int64_t index = first_step; index < options_.steps; ++index) {
    const bool profiling = index == options_.profile_step;
    if (profiling) profiler::start();
    const auto t0 = Clock::now();
    StepResult r;
    {
      profiler::Scope whole("train step");
      auto fetch = [&](int64_t i) {
        profiler::Scope scope("data batch");
        return data(options_.batch_size, i, Split::train);
      };
      Batch batch = next ? std::move(*next) : fetch(index);
      next.reset();
      r = run_step(batch, index, [&] {
        if (index + 1 < options_.steps) next = fetch(index + 1);
      });
    }
    r.seconds = seconds_since(t0);  // the batch included
    if (profiling) {
      profiler::stop();
      if (on_profile) on_profile(r.step);
    }
    if (on_step) on_step(r);
    const int64_t done = index + 1;
    if (options_.eval_every > 0 && done % options_.eval_every == 0 && done < options_.steps) {
      const EvalResult e = evaluate(data);
      if (on_eval) on_eval(done, e);
    }
    if (options_.checkpoint_every > 0 && done % options_.checkpoint_every == 0 && done < options_.steps)
      save_checkpoint(done);
  }
}

EvalResult Trainer::evaluate(const BatchSource& data) {
  LT_CHECK(static_cast<bool>(data), "Trainer: needs a batch source");
  const int64_t size = options_.eval_batch_size > 0 ? options_.eval_batch_size : options_.batch_size;
  model_.eval();
  EvalResult r;
  {
    NoGradGuard no_grad;
    AutocastScope precision(options_.precision);
    for (int64_t i = 0; i < options_.eval_batches; ++i) {
      Batch b = data(size, i, Split::heldout);
      Tensor logits = logits_(b.inputs);
      r.loss += cross_entropy(logits, b.targets, kIgnoreIndex).item() / static_cast<double>(options_.eval_batches);
      const AccuracyCount c = accuracy(logits, b.targets);
      r.accuracy.correct += c.correct;
      r.accuracy.total += c.total;
    }
  }
  model_.train();
  return r;
}

void Trainer::save_checkpoint(int64_t step) const {
  LT_CHECK(!options_.checkpoint.empty(), "Trainer: no checkpoint path to save step ", step, " to");
  nn::save_checkpoint(options_.checkpoint, model_, &optimizer_, step, options_.checkpoint_metadata);
}

CheckpointInfo Trainer::load_checkpoint(const std::string& path, bool fresh_optimizer) {
  return nn::load_checkpoint(path, model_, fresh_optimizer ? nullptr : &optimizer_);
}

void write_metrics(const std::string& path, const nlohmann::ordered_json& run, const std::vector<MetricsRow>& rows) {
  using Json = nlohmann::ordered_json;
  const bool json = std::filesystem::path(path).extension() == ".json";
  std::string text;
  if (json) {
    Json doc = run;
    Json list = Json::array();
    for (const auto& r : rows) {
      Json row;
      row["step"] = r.step;
      row["loss"] = r.loss;
      row["lr"] = r.lr;
      row["grad_norm"] = r.grad_norm;
      row["tokens_per_s"] = r.tokens_per_s;
      row["elapsed_s"] = r.elapsed_s;
      row["eval_loss"] = r.eval_loss ? Json(*r.eval_loss) : Json(nullptr);
      row["eval_accuracy"] = r.eval_accuracy ? Json(*r.eval_accuracy) : Json(nullptr);
      list.push_back(row);
    }
    doc["rows"] = list;
    text = doc.dump(2) + "\n";
  } else {
    // The run's precision, when it names one, on every row (a CSV has no header document).
    const bool named = run.is_object() && run.contains("precision") && run["precision"].is_string();
    const std::string precision = named ? run["precision"].get<std::string>() : "";
    text = std::string("step,loss,lr,grad_norm,tokens_per_s,elapsed_s,eval_loss,eval_accuracy") +
           (precision.empty() ? "" : ",precision") + "\n";
    char line[256];
    for (const auto& r : rows) {
      std::snprintf(line, sizeof line, "%lld,%.6g,%.6g,%.6g,%.6g,%.4f,", static_cast<long long>(r.step), r.loss, r.lr,
                    r.grad_norm, r.tokens_per_s, r.elapsed_s);
      text += line;
      if (r.eval_loss) text += std::to_string(*r.eval_loss);
      text += ",";
      if (r.eval_accuracy) text += std::to_string(*r.eval_accuracy);
      if (!precision.empty()) text += "," + precision;
      text += "\n";
    }
  }
  io::write_file_atomic(path, text.data(), text.size());
}

}  // namespace longtape::nn
