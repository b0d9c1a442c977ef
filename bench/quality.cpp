#include "bench/quality.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "attention/config_text.h"
#include "attention/multihead.h"
#include "bench/cases.h"
#include "bench/grid.h"
#include "bench/timing.h"
#include "nn/data.h"
#include "models/language_model.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "tensor/allocator.h"
#include "tensor/ops.h"
#include "tensor/precision.h"

namespace longtape::bench {

using attention::AttentionConfig;

Json quality_skipped(const std::string& variant, const QualityOptions& a, const std::string& reason) {
  Json row;
  row["variant"] = variant;
  row["status"] = "skipped";
  row["reason"] = reason;
  row["config_label"] = attention::config_label(variant, a.attention);
  row["steps"] = a.steps;
  row["seq_len"] = a.seq_len;
  row["batch"] = a.batch;
  return row;
}

Json run_quality(const std::string& variant, const QualityOptions& a, Device device) {
  Json row;
  row["variant"] = variant;
  row["status"] = "measured";
  row["reason"] = "";
  const AttentionConfig& attention_config = a.attention;
  row["config_label"] = attention::config_label(variant, attention_config);
  row["steps"] = a.steps;
  row["seq_len"] = a.seq_len;
  row["batch"] = a.batch;
  std::string stage = "setup";
  try {
    const Precision precision = precision_for(a.precision, device);
    row["precision"] = precision_name(precision);  // the training policy; compute_precision is attention's
    row["matmul_precision"] = precision_compute_label(precision, device);
    nn::RecallTaskConfig task_config;
    task_config.seq_len = a.seq_len;
    task_config.num_pairs = 8;
    task_config.num_queries = 4;
    task_config.seed = a.seed;
    nn::RecallTask task(task_config);

    models::LanguageModelConfig mc{.vocab_size = task.vocab_size(), .max_seq_len = task.seq_len(), .embed_dim = 64,
                                   .num_layers = 2, .num_heads = 4, .attention = variant,
                                   .attention_config = attention_config};
    if (attention::uses_token_grid(variant, attention_config))
      mc.attention_config.grid = near_square_grid(task.seq_len());
    row["config"] = config_json([&] {
      AttentionConfig shown = mc.attention_config;
      shown.num_heads = mc.num_heads;
      shown.head_dim = mc.embed_dim / mc.num_heads;
      return shown;
    }());
    row["model"] = {{"embed_dim", mc.embed_dim},
                    {"num_layers", mc.num_layers},
                    {"num_heads", mc.num_heads},
                    {"vocab_size", mc.vocab_size},
                    {"optimizer", "AdamW lr 3e-3 cosine to 3e-4, weight decay 0.01, clip 1.0"}};
    manual_seed(a.seed);
    models::LanguageModel model(mc);
    model.to(device);
    nn::AdamW optimizer(model.named_parameters(),
                        {.lr = 3e-3, .weight_decay = 0.01, .decays = nn::decay_matrices_only});
    const nn::CosineSchedule schedule{3e-3, 3e-4, std::max<int64_t>(1, a.steps / 10), a.steps};
    nn::TrainerOptions options;
    options.steps = a.steps;
    options.batch_size = a.batch;
    options.clip = 1.0;
    options.stop_on_non_finite = false;  // a diverged model still gets its (poor) accuracy
    options.eval_batches = 4;
    options.eval_batch_size = 32;
    options.precision = precision;
    nn::Trainer trainer(model, optimizer, schedule, options);
    const nn::BatchSource data = nn::batches_of(task, device);

    stage = "training";
    std::vector<double> step_ms, losses;
    trainer.on_step = [&](const nn::StepResult& r) {
      losses.push_back(r.loss);
      if (r.step == 1) record_ran(row, model.attention_layer(0)->core());
      step_ms.push_back(r.seconds * 1000.0);
    };
    const auto t0 = std::chrono::steady_clock::now();
    trainer.fit(data);
    const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    stage = "evaluation";
    const nn::AccuracyCount total = trainer.evaluate(data).accuracy;
    const size_t tail = std::min<size_t>(10, losses.size());
    double tail_loss = 0.0;
    for (size_t i = losses.size() - tail; i < losses.size(); ++i) tail_loss += losses[i];
    row["accuracy"] = total.value();
    row["scored_positions"] = total.total;
    row["chance"] = 1.0 / static_cast<double>(task.config().num_values);
    row["final_loss"] = tail > 0 ? tail_loss / static_cast<double>(tail) : 0.0;
    row["ms_per_step"] = median(step_ms);
    row["train_seconds"] = train_seconds;
    row["tokens_per_s"] = static_cast<double>(a.batch * a.seq_len) / (median(step_ms) / 1000.0);
    row["parameters"] = model.num_parameters();
  } catch (const std::exception& e) {
    const Classified c = classify(e, stage);
    row["status"] = c.status;
    row["reason"] = c.reason;
    empty_cache(device);
  }
  return row;
}

}  // namespace longtape::bench
