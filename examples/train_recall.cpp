// Train a small causal language model with dilated attention on the associative-recall task:
// key/value pairs are planted anywhere in a long sequence and queried at its end.
#include <cstdio>

#include "nn/data.h"
#include "nn/language_model.h"
#include "nn/optim.h"

using namespace longtape;

int main() {
  manual_seed(0);
  nn::RecallTask task({.seq_len = 256, .num_keys = 16, .num_values = 8, .num_filler = 8, .num_pairs = 4,
                       .num_queries = 4, .seed = 0});

  nn::LanguageModelConfig config;
  config.vocab_size = task.vocab_size();
  config.max_seq_len = task.seq_len();
  config.embed_dim = 32;
  config.num_layers = 2;
  config.num_heads = 4;
  config.attention = "dilated";                          // any name from the attention registry
  config.attention_config.segment_lengths = {32, 256};   // a local branch and a global one
  config.attention_config.dilation_rates = {1, 2};
  nn::LanguageModel model(config);

  nn::AdamW optimizer(model.named_parameters(), {.lr = 1e-2, .weight_decay = 0.01});
  nn::CosineSchedule schedule{.base_lr = 1e-2, .min_lr = 1e-3, .warmup_steps = 30, .total_steps = 300};

  for (int64_t step = 0; step < 300; ++step) {
    nn::Batch batch = task.batch(/*batch_size=*/16, /*index=*/step);
    Tensor logits = model.forward(batch.inputs);                      // (B, T, V)
    Tensor loss = cross_entropy(logits, batch.targets, nn::kIgnoreIndex);
    optimizer.zero_grad();
    loss.backward();
    nn::clip_grad_norm(model.parameters(), 1.0);
    schedule.apply(optimizer, step);
    optimizer.step();
    if (step % 30 == 0) std::printf("step %3lld  loss %.4f\n", static_cast<long long>(step), loss.item());
  }

  model.eval();
  nn::Batch test = task.batch(64, 0, nn::Split::heldout);
  NoGradGuard no_grad;
  nn::AccuracyCount acc = nn::accuracy(model.forward(test.inputs), test.targets);
  std::printf("held-out recall accuracy: %.3f (chance %.3f)\n", acc.value(), 1.0 / task.config().num_values);
}
