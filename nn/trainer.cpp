#include "nn/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "tensor/autograd/grad_mode.h"
#include "io/atomic_file.h"
#include "tensor/allocator.h"
#include "tensor/capture_retain.h"
#include "tensor/device_checks.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/profiler.h"

#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/graph.h"
#endif

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
  if (options_.cuda_graph) check_graph_options();
}

void Trainer::set_profile_step(int64_t index) {
  LT_CHECK(!options_.cuda_graph || index < 0, "Trainer: cuda_graph cannot profile step ", index + 1,
           " (a replayed graph runs no host code to record); profile without the CUDA graph");
  options_.profile_step = index;
}

StepResult Trainer::run_step(const Batch& batch, int64_t index, const std::function<void()>& before_read) {
  if (options_.cuda_graph) return run_graph_step(batch, index, before_read);
  return run_eager_step(batch, index, before_read, false);
}

StepResult Trainer::run_eager_step(const Batch& batch, int64_t index, const std::function<void()>& before_read,
                                   bool in_place_grads) {
  const auto t0 = Clock::now();
  Tensor loss;
  {
    AutocastScope precision(options_.precision);
    {
      profiler::Scope scope("forward + loss");
      loss = cross_entropy(logits_(batch.inputs), batch.targets, kIgnoreIndex);
    }
    profiler::Scope scope("backward");
    optimizer_.zero_grad(!in_place_grads);
    std::optional<autograd::AccumulateInPlaceGuard> in_place;
    if (in_place_grads) in_place.emplace();
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
  stop_if_norm_diverged(index, loss_value, norm);
  {
    profiler::Scope scope("optimizer step");
    schedule_.apply(optimizer_, index);
    optimizer_.step();
  }
  StepResult r = finish_step(index, loss_value, norm);
  r.seconds = seconds_since(t0);
  return r;
}

void Trainer::stop_if_norm_diverged(int64_t index, double loss_value, double norm) {
  if (!options_.stop_on_non_finite || std::isfinite(norm)) return;
  if (on_diverged) on_diverged();
  LT_CHECK(false, "train: the gradient norm became ", norm, " at step ", index + 1, " (loss ", loss_value,
           "); stopped without saving a checkpoint (", options_.divergence_hint, ")");
}

StepResult Trainer::finish_step(int64_t index, double loss_value, double norm) {
  stop_if_norm_diverged(index, loss_value, norm);  // a replayed graph reaches here with it
  StepResult r;
  r.step = index + 1;
  r.loss = loss_value;
  r.lr = optimizer_.lr();
  r.grad_norm = norm;
  if (options_.stop_on_non_finite && !std::isfinite(r.loss)) {
    if (on_diverged) on_diverged();
    LT_CHECK(false, "train: the loss became ", r.loss, " at step ", index + 1,
             "; stopped without saving a checkpoint (", options_.divergence_hint, ")");
  }
  return r;
}

// ---------------------------------------------------------------- CUDA graph of the step

#ifdef LONGTAPE_WITH_CUDA
struct Trainer::GraphStep {
  Shape input_shape, target_shape;  // the batch shape it was captured for
  DType input_dtype = DType::i64, target_dtype = DType::i64;
  Device input_device, target_device;
  int64_t warm_steps = 0;  // eager steps run at this shape
  Tensor inputs, targets;  // fixed device buffers the graph reads the batch from
  Tensor loss, norm;       // written by every replay
  std::shared_ptr<const DeviceCheckList> checks;
  std::vector<Tensor> retained;  // cached tensors the graph reads (tensor/capture_retain.h)
  std::unique_ptr<cuda::Graph> graph;  // declared last: destroyed (after its replays finish) first
};
#else
struct Trainer::GraphStep {};
#endif

Trainer::~Trainer() = default;

void Trainer::check_graph_options() const {
  const auto parameters = model_.named_parameters();
  LT_CHECK(!parameters.empty(), "Trainer: cuda_graph needs a model with parameters");
  for (const auto& [name, p] : parameters)
    LT_CHECK(p.device().is_cuda(), "Trainer: cuda_graph needs the model on a CUDA device, got parameter '", name,
             "' on ", p.device().str());
#ifndef LONGTAPE_WITH_CUDA
  LT_CHECK(false, "Trainer: cuda_graph needs the CUDA backend, but this build has none");
#endif
  const auto* adamw = dynamic_cast<const AdamW*>(&optimizer_);
  LT_CHECK(adamw, "Trainer: cuda_graph needs the fused AdamW optimizer, got ", optimizer_.type_name());
  LT_CHECK(adamw->options().fused, "Trainer: cuda_graph needs the fused AdamW kernel, got AdamWOptions::fused = false");
  for (const auto& [name, p] : optimizer_.named_parameters())
    LT_CHECK(p.dtype() == DType::f32 && p.is_contiguous(), "Trainer: cuda_graph needs contiguous f32 parameters "
             "(the fused AdamW kernel), got '", name, "' as ", dtype_name(p.dtype()),
             p.is_contiguous() ? "" : " (strided)");
  LT_CHECK(options_.profile_step < 0, "Trainer: cuda_graph cannot profile step ", options_.profile_step + 1,
           " (a replayed graph runs no host code to record); profile without the CUDA graph");
}

StepResult Trainer::run_graph_step(const Batch& batch, int64_t index, const std::function<void()>& before_read) {
#ifndef LONGTAPE_WITH_CUDA
  check_graph_options();  // throws: no CUDA backend
  return run_eager_step(batch, index, before_read, true);
#else
  LT_CHECK(!on_gradients && !reduce_loss, "Trainer: cuda_graph cannot capture data-parallel training (the ",
           on_gradients ? "on_gradients" : "reduce_loss", " hook communicates with other ranks on the host); ",
           "train without the CUDA graph");
  LT_CHECK(batch.inputs.defined() && batch.targets.defined(), "Trainer: expected a batch with inputs and targets");
  GraphStep* g = graph_.get();
  if (g && (g->input_shape != batch.inputs.shape() || g->target_shape != batch.targets.shape() ||
            g->input_dtype != batch.inputs.dtype() || g->target_dtype != batch.targets.dtype())) {
    graph_.reset();  // another shape (a curriculum's next length): warm up and capture again
    g = nullptr;
  }
  if (!g) {
    graph_ = std::make_unique<GraphStep>();
    g = graph_.get();
    g->input_shape = batch.inputs.shape();
    g->target_shape = batch.targets.shape();
    g->input_dtype = batch.inputs.dtype();
    g->target_dtype = batch.targets.dtype();
  }
  // Warm-up: one eager step at this shape allocates the gradients, the optimizer's state and its
  // device tables, cuBLAS's handles and every cache an op fills on first use, outside the graph.
  if (!g->graph && g->warm_steps < 1) {
    ++g->warm_steps;
    return run_eager_step(batch, index, before_read, true);
  }
  const auto t0 = Clock::now();
  auto& adamw = dynamic_cast<AdamW&>(optimizer_);
  if (!g->graph) {
    check_graph_options();
    const Device device = model_.parameters().front().device();
    const std::string blocker = adamw.fused_blocker();
    LT_CHECK(blocker.empty(), "Trainer: cuda_graph needs every parameter on the fused AdamW kernel, but ", blocker);
    adamw.use_device_scalars(true);
    g->inputs = Tensor::empty(batch.inputs.shape(), batch.inputs.dtype(), device);
    g->targets = Tensor::empty(batch.targets.shape(), batch.targets.dtype(), device);
    g->inputs.copy_(batch.inputs);
    g->targets.copy_(batch.targets);
    raise_device_checks();  // the warm-up's, so that only the captured step's are taken below
    // The warm-up's free blocks go back to the device: the graph's pool holds the step's
    // temporaries from now on, and the stream's cache would only double the reserved memory.
    empty_cache(device);
    const PhiloxState rng_before = next_philox(0);
    const int64_t steps_before = optimizer_.step_count();
    g->graph = std::make_unique<cuda::Graph>(device.index);
    g->graph->begin_capture();
    try {
      RetainDuringCapture retain(g->retained);
      Tensor loss;
      {
        AutocastScope precision(options_.precision);
        loss = cross_entropy(logits_(g->inputs), g->targets, kIgnoreIndex);
        optimizer_.zero_grad(false);
        autograd::AccumulateInPlaceGuard in_place;
        loss.backward();
      }
      NoGradGuard no_grad;
      const std::vector<Tensor> parameters = model_.parameters();
      g->norm = grad_norm_tensor(parameters);
      g->loss = loss.detach();
      LT_CHECK(g->norm.defined(), "Trainer: cuda_graph: no parameter received a gradient");
      if (options_.clip > 0) clip_grads_on_device(parameters, g->norm, options_.clip);
      adamw.set_skip_gate(options_.stop_on_non_finite ? g->norm : Tensor());
      optimizer_.step();
      adamw.set_skip_gate(Tensor());
      adamw.use_device_scalars(false);
      g->graph->end_capture();
    } catch (const std::exception& error) {
      g->graph->abort_capture();
      adamw.set_skip_gate(Tensor());
      adamw.use_device_scalars(false);
      take_device_checks();
      optimizer_.set_step_count(steps_before);
      graph_.reset();
      throw Error(detail::concat("Trainer: cuda_graph could not capture step ", index + 1, ": ", error.what()));
    }
    g->checks = take_device_checks();
    optimizer_.set_step_count(steps_before);  // the capture ran nothing; the replays count
    const PhiloxState rng_after = next_philox(0);
    if (rng_after.seed != rng_before.seed || rng_after.offset != rng_before.offset) {
      graph_.reset();
      LT_CHECK(false, "Trainer: cuda_graph cannot capture a step that draws random numbers (dropout > 0 or another ",
               "random op: every replay would repeat the first step's numbers); train with dropout 0 or without "
               "the CUDA graph");
    }
    ++graph_captures_;
  } else {
    g->inputs.copy_(batch.inputs);  // outside the graph: the upload may come from host memory
    g->targets.copy_(batch.targets);
  }
  schedule_.apply(optimizer_, index);
  adamw.stage_device_scalars();
  g->graph->replay();
  ++graph_replays_;
  requeue_device_checks(*g->checks);
  if (before_read) before_read();
  const std::vector<double> read = read_together(g->loss, g->norm);
  const double loss_value = read[0], norm = read[1];
  // The device skipped a diverged update; the host counts only the updates that ran.
  if (!options_.stop_on_non_finite || std::isfinite(norm)) optimizer_.set_step_count(optimizer_.step_count() + 1);
  StepResult r = finish_step(index, loss_value, norm);
  r.seconds = seconds_since(t0);
  return r;
#endif
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
  graph_.reset();  // the optimizer's state tensors are replaced: a captured step would use the old ones
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
