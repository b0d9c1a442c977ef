#pragma once
// A decoder-only (causal) language model: token embedding + learned positional embedding,
// pre-LN TransformerBlocks (each given an attention::MultiheadAttention of the configured variant:
// this folder is where nn/ layers and attention/ variants are wired together), a final LayerNorm
// and a head to vocabulary logits. The head is either
// tied to the token embedding (one tensor, "tok_emb.weight", used twice) or its own Linear
// ("head.weight"). Attention is always causal here: the config's causal flag is forced on.
#include <cstdint>
#include <memory>
#include <string>

#include "attention/config.h"
#include "attention/multihead.h"
#include "nn/layers.h"
#include "nn/module.h"

namespace longtape::models {

struct LanguageModelConfig {
  int64_t vocab_size = 256;
  int64_t max_seq_len = 1024;  // size of the positional table; 0 = no positional embedding
  int64_t embed_dim = 256;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  std::string attention = "dilated";            // a registered attention variant
  attention::AttentionConfig attention_config;  // heads, head_dim and causal are set by the model
  int64_t mlp_hidden = 0;                       // 0: 4 * embed_dim
  bool tied_embeddings = true;
  double dropout = 0.0;     // after the embeddings and on every residual branch
  double init_std = 0.02;   // embeddings (and the untied head), GPT-2 style
  // Initial values of the (learned) positional table: "sinusoidal" (the fixed encoding of
  // Vaswani et al., scaled to RMS init_std: relative offsets start out linearly readable, which
  // lets attention find "the previous token" in a few steps) or "normal" (N(0, init_std^2)).
  std::string position_init = "sinusoidal";
  // Smeared keys in every attention layer (attention/multihead.h): lets one layer find the token
  // after a given one, so associative recall is learned in hundreds of steps, not thousands.
  bool key_shift = false;
};

class LanguageModel : public nn::Module {
 public:
  explicit LanguageModel(const LanguageModelConfig& config);
  // tokens (B, T) i32/i64 -> logits (B, T, vocab_size); T <= max_seq_len when there is a positional table.
  Tensor forward(const Tensor& tokens);
  const LanguageModelConfig& config() const { return config_; }
  // The weight that maps hidden states to logits: tok_emb->weight when tied, head->weight otherwise.
  Tensor head_weight() const;
  // The attention of block `layer` (throws when out of range).
  std::shared_ptr<attention::MultiheadAttention> attention_layer(size_t layer) const;
  std::string type_name() const override { return "LanguageModel"; }

  std::shared_ptr<nn::Embedding> tok_emb;
  std::shared_ptr<nn::Embedding> pos_emb;  // null when max_seq_len == 0
  std::shared_ptr<nn::Dropout> drop;
  std::shared_ptr<nn::ModuleList> blocks;
  std::shared_ptr<nn::LayerNorm> ln_f;
  std::shared_ptr<nn::Linear> head;  // null when tied

 private:
  LanguageModelConfig config_;
  Tensor positions_;  // 0..T-1 on the tokens' device, kept between calls (an upload waits for the device)
};

}  // namespace longtape::models
