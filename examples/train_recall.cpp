// Train a small causal language model with dilated attention on the associative-recall task:
// key/value pairs are planted anywhere in a long sequence and queried at its end.
#include <cstdio>

#include "nn/data.h"
#include "models/language_model.h"
#include "nn/optim.h"
#include "nn/trainer.h"

using namespace longtape;

int main() {
  manual_seed(0);
  nn::RecallTask task({.seq_len = 256, .num_keys = 16, .num_values = 8, .num_filler = 8, .num_pairs = 4,
                       .num_queries = 4, .seed = 0});

  models::LanguageModelConfig config{.vocab_size = task.vocab_size(), .max_seq_len = task.seq_len(), .embed_dim = 32,
                                     .num_layers = 2, .num_heads = 4,
                                     .attention = "dilated"};  // any name from the attention registry
  config.attention_config.segment_lengths = {32, 256};        // a local branch and a global one
  config.attention_config.dilation_rates = {1, 2};
  models::LanguageModel model(config);

  nn::AdamW optimizer(model.named_parameters(), {.lr = 1e-2, .weight_decay = 0.01});
  nn::CosineSchedule schedule{.base_lr = 1e-2, .min_lr = 1e-3, .warmup_steps = 30, .total_steps = 300};

  // Each step: batch -> logits -> cross-entropy -> backward -> clip to norm 1 -> AdamW.
  nn::Trainer trainer(model, optimizer, schedule,
                      {.steps = 300, .batch_size = 16, .clip = 1.0, .eval_batches = 1, .eval_batch_size = 64});
  trainer.on_step = [](const nn::StepResult& r) {
    const int64_t index = r.step - 1;
    if (index % 30 == 0) std::printf("step %3lld  loss %.4f\n", static_cast<long long>(index), r.loss);
  };
  trainer.fit(nn::batches_of(task));

  const nn::EvalResult heldout = trainer.evaluate(nn::batches_of(task));
  std::printf("held-out recall accuracy: %.3f (chance %.3f)\n", heldout.accuracy.value(),
              1.0 / task.config().num_values);
}
