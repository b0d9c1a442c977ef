#pragma once
// The training loop of a model that maps token batches to logits, shared by `longtape train`, the
// quality runs of `longtape bench`, the examples and the tests. One step is: batch -> logits ->
// cross-entropy -> zero_grad -> backward -> clip (or measure) the global gradient norm -> the
// schedule's learning rate -> optimizer step. The loss and the gradient norm are read back
// together before the optimizer step: the one point where a step waits for the device. Everything
// the caller shows or records (progress, metrics, what ran) goes through the callbacks, so the
// loop itself prints nothing. TrainerOptions::precision is in force over forward, loss and backward.
//
// Data batch i of a split is a pure function of (seed, i) and checkpoints hold the model, the
// optimizer and the generator, so a run resumed at step s repeats exactly what an uninterrupted
// run does from s on. With stop_on_non_finite, a non-finite gradient norm stops the run before the
// step changes the weights, and a non-finite loss right after it; either throws and no checkpoint
// is written (the last one saved stays as it was).
//
// With cuda_graph, the step (forward, loss, backward, gradient norm and clipping, AdamW update) is
// captured into one CUDA graph after a warm-up step and replayed for every later step at the same
// batch shape; a step of another shape (a curriculum's next length) runs one warm-up step at that
// shape and captures again. Inside the graph nothing waits for the host: the learning rate and
// AdamW's bias corrections are written to device memory before each replay, the clipping factor
// is computed on the device, and a non-finite gradient norm skips the update on the device (the
// moments too), after which the step's one read sees it and throws as without the graph. The
// batch is copied into fixed device buffers before each replay. Gradients keep their memory from
// step to step (zeroed in place). Not capturable, each refused with a longtape::Error naming it:
// a model off CUDA, an optimizer other than fused AdamW on contiguous f32 parameters, a profiled
// step, data-parallel hooks (on_gradients, reduce_loss), random numbers drawn by the step
// (dropout > 0), and ops that copy between host and device inside the step. Work that other
// threads queue for the step (the ranks of ring and head_parallel attention) is not captured:
// such models must not use the graph (`train` refuses them). Evaluation runs without the graph.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nn/checkpoint.h"
#include "nn/data.h"
#include "nn/module.h"
#include "nn/optim.h"
#include "tensor/device.h"
#include "tensor/precision.h"

namespace longtape::nn {

// (batch size, index, split) -> the batch.
using BatchSource = std::function<Batch(int64_t batch_size, int64_t index, Split split)>;

// The batches of a data set such as RecallTask or CharTextDataset, placed on `device`. The data
// set must outlive the source.
template <typename Data>
BatchSource batches_of(const Data& data, Device device = Device::cpu()) {
  return [&data, device](int64_t batch_size, int64_t index, Split split) {
    return data.batch(batch_size, index, split, device);
  };
}

struct TrainerOptions {
  int64_t steps = 1;                 // train until this step (the schedule's total_steps)
  int64_t batch_size = 16;
  double clip = 1.0;                 // global gradient-norm clip; 0 = none (the norm is still measured)
  bool stop_on_non_finite = true;    // a non-finite gradient norm or loss throws longtape::Error
  std::string divergence_hint = "try a lower learning rate";  // ends that error's message
  int64_t eval_every = 0;            // held-out evaluation every N steps, not at the last; 0 = none
  int64_t eval_batches = 8;          // held-out batches per evaluation (indices 0, 1, ...)
  int64_t eval_batch_size = 0;       // 0 = batch_size
  std::string checkpoint;            // where save_checkpoint() writes; empty = nowhere
  int64_t checkpoint_every = 0;      // also save every K steps, not at the last; 0 = only when asked
  std::map<std::string, std::string> checkpoint_metadata;  // extra pairs of every checkpoint
  int64_t profile_step = -1;         // 0-based index of a step to record with tensor/profiler.h; -1 = none
  Precision precision = Precision::f32;  // in force over every forward, loss and backward (tensor/precision.h)
  bool cuda_graph = false;           // capture the step into a CUDA graph and replay it (see the top)
};

// One finished optimizer step.
struct StepResult {
  int64_t step = 0;      // steps done so far (the 0-based index of this step + 1)
  double loss = 0;       // the batch's mean cross-entropy before the step
  double lr = 0;         // the learning rate the step used
  double grad_norm = 0;  // global gradient norm before clipping
  double seconds = 0;    // wall time of the step, the batch included
};

struct EvalResult {
  double loss = 0;  // mean over the batches
  AccuracyCount accuracy;
};

class Trainer {
 public:
  using Logits = std::function<Tensor(const Tensor& tokens)>;

  // `logits` runs the model: tokens (B, T) -> logits (B, T, vocab).
  Trainer(Module& model, Logits logits, Optimizer& optimizer, CosineSchedule schedule, TrainerOptions options);
  // A model with forward(tokens) -> logits.
  template <typename Model>
  Trainer(Model& model, Optimizer& optimizer, CosineSchedule schedule, TrainerOptions options)
      : Trainer(static_cast<Module&>(model), [&model](const Tensor& tokens) { return model.forward(tokens); },
                optimizer, schedule, std::move(options)) {}
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Called after backward, before the gradient norm is measured (data parallel training averages
  // the gradients over the ranks here, so the norm, the clipping and the step agree everywhere).
  std::function<void()> on_gradients;
  // Maps the step's loss (a scalar tensor on the model's device, no history) to the loss the step
  // reports and checks, on the device before the step's one read (data parallel training: its mean
  // over the ranks, so every rank reads the same value without a read of its own).
  std::function<Tensor(const Tensor& loss)> reduce_loss;
  // Called after every step (after the non-finite checks).
  std::function<void(const StepResult&)> on_step;
  // Called after each periodic evaluation, with the step it followed.
  std::function<void(int64_t step, const EvalResult&)> on_eval;
  // Called just before a non-finite loss or gradient norm throws (to end a progress line).
  std::function<void()> on_diverged;
  // Called after the step of options.profile_step with its number (1-based); profiler::table()
  // holds its rows.
  std::function<void(int64_t step)> on_profile;

  // Runs steps [first_step, options.steps) on `data`'s training split, with the periodic
  // evaluations on its held-out split and the periodic checkpoints.
  void fit(const BatchSource& data, int64_t first_step = 0);
  // One step on `batch` as step number `index` (0-based; it picks the learning rate).
  StepResult step(const Batch& batch, int64_t index) { return run_step(batch, index, {}); }
  // Held-out loss and accuracy over options.eval_batches batches, in eval mode without recording;
  // the model is back in training mode afterwards.
  EvalResult evaluate(const BatchSource& data);
  // Writes the checkpoint (model, optimizer, generator) at `step` to options.checkpoint.
  void save_checkpoint(int64_t step) const;
  // Loads a checkpoint into the model, the generator and, unless `fresh_optimizer`, the optimizer;
  // fit() from the returned info's step continues the saved run.
  CheckpointInfo load_checkpoint(const std::string& path, bool fresh_optimizer = false);

  const TrainerOptions& options() const { return options_; }
  // Which step to profile, once the first step is known (after a resume).
  void set_profile_step(int64_t index);
  // With cuda_graph: how many steps replayed a captured graph, and how many captures were made.
  int64_t graph_replays() const { return graph_replays_; }
  int64_t graph_captures() const { return graph_captures_; }

 private:
  // One step; `before_read` runs after backward and the gradient exchange are queued, just before
  // the step's device read (fit() fetches the next batch there, while the device finishes the
  // step, so that the next step's upload does not wait for an idle device).
  StepResult run_step(const Batch& batch, int64_t index, const std::function<void()>& before_read);
  // The step without a graph; `in_place_grads` keeps the gradients' memory (graph warm-up).
  StepResult run_eager_step(const Batch& batch, int64_t index, const std::function<void()>& before_read,
                            bool in_place_grads);
  // The step with cuda_graph: warm-up, capture or replay.
  StepResult run_graph_step(const Batch& batch, int64_t index, const std::function<void()>& before_read);
  // Throws (after on_diverged) when stop_on_non_finite and the gradient norm is not finite.
  void stop_if_norm_diverged(int64_t index, double loss_value, double norm);
  // The loss and norm of a finished step, checked for non-finite values.
  StepResult finish_step(int64_t index, double loss_value, double norm);
  void check_graph_options() const;

  Module& model_;
  Logits logits_;
  Optimizer& optimizer_;
  CosineSchedule schedule_;
  TrainerOptions options_;
  struct GraphStep;
  std::unique_ptr<GraphStep> graph_;  // with cuda_graph: the captured step of the current shape
  int64_t graph_replays_ = 0;
  int64_t graph_captures_ = 0;
};

// One row of a run's metrics file.
struct MetricsRow {
  int64_t step;
  double loss, lr, grad_norm, tokens_per_s, elapsed_s;
  std::optional<double> eval_loss, eval_accuracy;
};

// Writes the rows to `path` atomically: a JSON document (`run` with the rows under "rows") when
// the path ends in .json, else CSV with a header line (and a precision column when `run` names
// one).
void write_metrics(const std::string& path, const nlohmann::ordered_json& run, const std::vector<MetricsRow>& rows);

}  // namespace longtape::nn
