#include "models/language_model.h"

#include <cmath>

#include "tensor/capture_retain.h"
#include "tensor/checked_math.h"
#include "tensor/ops.h"

namespace longtape::models {

using nn::Dropout;
using nn::Embedding;
using nn::LayerNorm;
using nn::Linear;
using nn::ModuleList;
using nn::TransformerBlock;
using nn::TransformerBlockConfig;

LanguageModel::LanguageModel(const LanguageModelConfig& config) : config_(config) {
  LT_CHECK(config.vocab_size >= 1, "LanguageModel: vocab_size must be >= 1, got ", config.vocab_size);
  LT_CHECK(config.max_seq_len >= 0, "LanguageModel: max_seq_len must be >= 0 (0 = no positional table), got ",
           config.max_seq_len);
  LT_CHECK(config.num_layers >= 0, "LanguageModel: num_layers must be >= 0, got ", config.num_layers);
  LT_CHECK(config.embed_dim >= 1 && config.num_heads >= 1 && config.embed_dim % config.num_heads == 0,
           "LanguageModel: embed_dim must be a positive multiple of num_heads, got embed_dim ", config.embed_dim,
           " and num_heads ", config.num_heads);
  // Parameter tables, checked before anything is allocated so that the error names the flags.
  checked::mul(checked::mul(config.vocab_size, config.embed_dim, "LanguageModel: vocab_size * embed_dim"),
               static_cast<int64_t>(sizeof(double)), "LanguageModel: bytes of the vocab_size * embed_dim table");
  checked::mul(checked::mul(config.max_seq_len, config.embed_dim, "LanguageModel: max_seq_len * embed_dim"),
               static_cast<int64_t>(sizeof(double)), "LanguageModel: bytes of the max_seq_len * embed_dim table");
  config_.attention_config.causal = true;
  config_.attention_config.num_heads = config.num_heads;
  config_.attention_config.head_dim = config.embed_dim / config.num_heads;

  tok_emb = register_module("tok_emb", std::make_shared<Embedding>(config.vocab_size, config.embed_dim, config.init_std));
  LT_CHECK(config.position_init == "sinusoidal" || config.position_init == "normal",
           "LanguageModel: position_init must be 'sinusoidal' or 'normal', got '", config.position_init, "'");
  if (config.max_seq_len > 0) {
    pos_emb = register_module("pos_emb", std::make_shared<Embedding>(config.max_seq_len, config.embed_dim, config.init_std));
    if (config.position_init == "sinusoidal") {
      // table[p, 2i] = sin(p / 10000^(2i/E)), table[p, 2i+1] = cos(...), times sqrt(2) * init_std.
      const int64_t T = config.max_seq_len, E = config.embed_dim;
      std::vector<double> table(static_cast<size_t>(checked::mul(T, E, "LanguageModel: max_seq_len * embed_dim")));
      const double scale = std::sqrt(2.0) * config.init_std;
      for (int64_t p = 0; p < T; ++p)
        for (int64_t i = 0; i < E; ++i) {
          const double freq = std::pow(10000.0, -static_cast<double>(i - i % 2) / static_cast<double>(E));
          table[p * E + i] = scale * (i % 2 == 0 ? std::sin(p * freq) : std::cos(p * freq));
        }
      NoGradGuard guard;
      pos_emb->weight.copy_(Tensor::from_vector(table, {T, E}));
    }
  }
  drop = register_module("drop", std::make_shared<Dropout>(config.dropout));
  blocks = register_module("blocks", std::make_shared<ModuleList>());
  TransformerBlockConfig bc;
  bc.embed_dim = config.embed_dim;
  bc.mlp_hidden = config.mlp_hidden;
  bc.dropout = config.dropout;
  for (int64_t i = 0; i < config.num_layers; ++i) {
    attention::MultiheadAttentionOptions ao;
    ao.embed_dim = config.embed_dim;
    ao.num_heads = config.num_heads;
    ao.variant = config.attention;
    ao.attention = config_.attention_config;
    ao.key_shift = config.key_shift;
    auto attention = std::make_shared<attention::MultiheadAttention>(ao);
    blocks->push_back(std::make_shared<TransformerBlock>(bc, std::move(attention)));
  }
  ln_f = register_module("ln_f", std::make_shared<LayerNorm>(config.embed_dim));
  if (!config.tied_embeddings) {
    head = register_module("head", std::make_shared<Linear>(config.embed_dim, config.vocab_size, /*bias=*/false));
    NoGradGuard guard;
    head->weight.copy_(mul(Tensor::randn(head->weight.shape()), config.init_std));
  }
}

std::shared_ptr<attention::MultiheadAttention> LanguageModel::attention_layer(size_t layer) const {
  auto attn = std::dynamic_pointer_cast<attention::MultiheadAttention>(blocks->at_as<TransformerBlock>(layer)->attn);
  LT_CHECK(attn != nullptr, "LanguageModel: block ", layer, " has no MultiheadAttention");
  return attn;
}

Tensor LanguageModel::head_weight() const { return head ? head->weight : tok_emb->weight; }

Tensor LanguageModel::forward(const Tensor& tokens) {
  LT_CHECK(tokens.defined() && tokens.dim() == 2 && (tokens.dtype() == DType::i64 || tokens.dtype() == DType::i32),
           "LanguageModel: tokens must be a (B, T) i64 or i32 tensor, got ",
           tokens.defined() ? shape_str(tokens.shape()) + " " + dtype_name(tokens.dtype()) : std::string("undefined"));
  const int64_t T = tokens.shape()[1];
  LT_CHECK(!pos_emb || T <= config_.max_seq_len, "LanguageModel: sequence length ", T,
           " exceeds max_seq_len = ", config_.max_seq_len, " (the size of the positional table)");
  Tensor x = tok_emb->forward(tokens);  // (B, T, E)
  if (pos_emb) {
    if (!positions_.defined() || positions_.numel() != T || positions_.device() != tokens.device())
      positions_ = Tensor::arange(0, static_cast<double>(T), 1.0, DType::i64, tokens.device());
    retain_during_capture(positions_);  // a captured step reads it after a call of another length replaced it
    x = add(x, pos_emb->forward(positions_));  // (T, E) broadcast over the batch
  }
  x = drop->forward(x);
  for (size_t i = 0; i < blocks->size(); ++i) x = blocks->at_as<TransformerBlock>(i)->forward(x);
  x = ln_f->forward(x);
  if (head) return head->forward(x);
  const int64_t B = x.shape()[0], E = x.shape()[2];
  const int64_t rows = checked::mul(B, T, "LanguageModel: batch * sequence length");
  return matmul(x.reshape({rows, E}), tok_emb->weight.transpose(0, 1)).reshape({B, T, config_.vocab_size});
}

}  // namespace longtape::models
