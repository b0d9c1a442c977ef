// `longtape train`: trains a causal language model on the associative-recall task (default) or on
// the bytes of a text file (--text), with any registered attention variant.
//
//   longtape train [--device auto|cpu|cuda] [--steps N] [--batch B] [--seq-len T] [--layers L]
//       [--width E] [--heads H] [--variant dilated] [--segments 32,128] [--dilations 1,1]
//       [--mixing lse|head_groups] [--impl auto|fused|composed] [--precision auto|f32|tf32|bf16]
//       [--lr 3e-3] [--warmup W] [--eval-every N] [--key-shift|--no-key-shift] [--curriculum 128:300,...]
//       [--position-init sinusoidal|normal|none]
//       [--metrics run.csv|run.json]
//       [--checkpoint PATH] [--checkpoint-every K] [--resume PATH [--fresh-optimizer]] [--seed S] [--threads T]
//       [--profile] [--parallel none|data] [--cuda-graph]
//       [--text FILE]
//
// The defaults are the README's main job on the CPU: a 2-layer, width-64 model with causal dilated
// attention (segments 32 and 128, dilations 1 and 1) and smeared keys learns recall over
// 128-token sequences in 400 steps. Smeared keys (--key-shift, attention/multihead.h) are what
// make it learn: without them the model stalls near 0.55 (it learns which values were planted,
// not which key each belongs to), because finding "the token after this key" then needs a
// previous-token head in one layer feeding a lookup in the next. On CUDA the flags not given
// default to a long-sequence run that first trains on short sequences (--curriculum,
// nn/curriculum.h; apply_cuda_defaults says why); without --segments/--dilations any
// --seq-len gets a local window and a dilation-1 branch over the whole sequence
// (apply_sequence_geometry says why dilation 1).
//
// --parallel data trains one replica per process of a job started by `longtape launch` (the
// gradients averaged over the ranks; cli/train_parallel.h): --batch is then per rank.
//
// Attention is always causal (a language model must not see the future). Data batch i is a pure
// function of (seed, i), and checkpoints hold the model, the optimizer and the generator, so a
// resumed run continues exactly where the saved one was. Progress goes to stderr; held-out
// loss/accuracy lines and the final summary go to stdout.
//
// Before training: sizes are checked against the command line's limits, --checkpoint and --metrics
// are checked writable, and a --resume checkpoint must hold complete optimizer state with a sane
// step count (--fresh-optimizer resumes the weights with fresh AdamW moments instead). A
// non-finite loss or gradient norm stops the run with an error and writes no checkpoint.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention/config.h"
#include "attention/multihead.h"
#include "attention/registry.h"
#include "tensor/autograd/grad_mode.h"
#include "cli/command_registry.h"
#include "cli/impl_flag.h"
#include "cli/numeric_flags.h"
#include "cli/size_limits.h"
#include "cli/train_guards.h"
#include "cli/train_progress.h"
#include "cli/train_parallel.h"
#include "cli/variant_flags.h"
#include "nn/checkpoint.h"
#include "nn/curriculum.h"
#include "nn/data.h"
#include "models/language_model.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "tensor/allocator.h"
#include "tensor/ops.h"
#include "tensor/precision.h"
#include "tensor/profiler.h"

namespace longtape::cli {

namespace {

using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
constexpr double kMaxReal = std::numeric_limits<double>::max();

// A flag's real value as given ("0.003", "1e+20").
std::string format_real(double v) {
  char text[40];
  std::snprintf(text, sizeof text, "%.6g", v);
  return text;
}

struct TrainArgs {
  std::string device = "auto";
  int64_t steps = 400;
  int64_t batch = 16;
  int64_t seq_len = 128;
  int64_t layers = 2;
  int64_t width = 64;
  int64_t heads = 4;
  std::string variant = "dilated";
  std::string segments = "32,128";
  std::string dilations = "1,1";
  std::string mixing = "lse";
  std::string impl = "auto";
  std::string precision = "auto";  // bf16 on CUDA, f32 on the CPU
  VariantFlags variant_flags;
  double lr = 3e-3;
  double min_lr = -1;  // < 0: lr / 10
  int64_t warmup = 100;
  double weight_decay = 0.01;
  double clip = 1.0;
  double dropout = 0.0;
  bool untied = false;
  std::string position_init = "sinusoidal";  // or normal, or none (no positional table)
  bool key_shift = true;
  std::string curriculum;  // LENGTH:STEPS phases before --seq-len (nn/curriculum.h); empty = none
  // recall task
  int64_t keys = 16, values = 8, filler = 8, pairs = 4, queries = 4;
  std::string text;
  int64_t eval_every = 100;
  int64_t eval_batches = 8;
  std::string metrics;
  std::string checkpoint;
  int64_t checkpoint_every = 0;
  std::string resume;
  bool fresh_optimizer = false;
  uint64_t seed = 0;
  int threads = 0;
  bool profile = false;
  bool cuda_graph = false;
  std::string parallel = "none";
  std::string bucket_mb = "1,25";  // --parallel data: gradient buckets, first then the rest (MiB)
  std::set<std::string> given;  // flags given on the command line (the rest may take device defaults)
};

// On a CUDA device the flags not given describe a long-sequence run: 8192 tokens with the pairs
// anywhere in them, the same recipe at twice the width, and the dilated geometry of
// apply_sequence_geometry(). Trained from scratch on 8192 tokens the model stays at chance
// (0.13 after 1000 steps): attention over thousands of keys starts out uniform, so the gradient
// towards the planted key is diluted by the sequence length. It first learns the lookup on
// 128-token sequences (kCudaCurriculum), which carries over to the full length, with no
// positional table: the lookup is by content, and the rows of a table past 128 would be
// untrained.
constexpr const char* kCudaCurriculum = "128:400";
void apply_cuda_defaults(TrainArgs& a) {
  auto unset = [&](const char* flag) { return a.given.count(flag) == 0; };
  if (unset("--seq-len")) a.seq_len = 8192;
  if (unset("--batch")) a.batch = 16;
  if (unset("--width")) a.width = 128;
  if (unset("--heads")) a.heads = 4;
  if (unset("--steps")) a.steps = 600;
  if (unset("--position-init")) a.position_init = "none";
  // Only where it fits: a run over more than 128 tokens with steps left after it.
  if (unset("--curriculum") && a.seq_len > 128 &&
      a.steps > nn::LengthCurriculum::parse(kCudaCurriculum, a.seq_len).phase_steps())
    a.curriculum = kCudaCurriculum;
}

// Segments and dilations for a sequence of n tokens when the flags are not given: a dense local
// window (32 tokens up to n = 256, else 256) and one branch over the whole sequence, both at
// dilation 1. The long branch must reach every planted pair in one hop: the queried keys sit at
// even positions, and a dilation-2 branch would show them only even positions, so half of the
// values would need a second layer to be copied over (measured: slower learning).
void apply_sequence_geometry(TrainArgs& a) {
  if (a.variant != "dilated") return;
  const int64_t local = std::min<int64_t>(a.seq_len, a.seq_len <= 256 ? 32 : 256);
  if (a.given.count("--segments") == 0) a.segments = std::to_string(local) + "," + std::to_string(a.seq_len);
  if (a.given.count("--dilations") == 0) a.dilations = "1,1";
}

Device pick_device(const std::string& name) {
  if (name == "auto") return cuda_available() ? Device::cuda() : Device::cpu();
  Device d = Device::parse(name);
  LT_CHECK(!d.is_cuda() || cuda_available(), "train: --device ", name,
           " was asked for, but no CUDA device is available in this build or on this machine");
  return d;
}

// What a captured training step (nn/trainer.h, cuda_graph) cannot hold, refused before anything runs.
void check_cuda_graph_flags(const TrainArgs& a, const Device& device) {
  if (a.parallel != "none")
    throw FlagError("--cuda-graph cannot be combined with --parallel " + a.parallel +
                    " (the gradient exchange runs on the host between backward and the update)");
  if (a.profile)
    throw FlagError("--cuda-graph cannot be combined with --profile (a replayed step runs no host code to time)");
  if (a.dropout != 0)
    throw FlagError("--cuda-graph needs --dropout 0, got " + format_real(a.dropout) +
                    " (every replay would repeat the captured step's dropout mask)");
  if (a.variant == "ring" || a.variant == "head_parallel")
    throw FlagError("--cuda-graph cannot capture --variant " + a.variant +
                    " (its ranks run on threads of their own, whose work a graph of this thread's stream misses)");
  if (!device.is_cuda())
    throw FlagError("--cuda-graph needs a CUDA device, got --device " + a.device + " (" + device.str() + ")");
}

int run_train(const TrainArgs& args) {
  TrainArgs a = args;
  if (a.parallel != "none" && a.parallel != "data")
    throw FlagError("--parallel must be none or data, got \"" + a.parallel + "\"");
  if (a.given.count("--bucket-mb") && a.parallel != "data") throw FlagError("--bucket-mb needs --parallel data");
  parse_bucket_mb(a.bucket_mb);  // a bad value is refused before the process group forms
  Device device = pick_device(a.device);
  if (a.cuda_graph) check_cuda_graph_flags(a, device);
  std::unique_ptr<DataParallelRun> dp;
  if (a.parallel == "data") {
    dp = std::make_unique<DataParallelRun>(device);
    device = dp->device();
    // Rank 0 speaks for the job; the others report only errors.
    if (!dp->is_writer()) LT_CHECK(std::freopen("/dev/null", "w", stdout) != nullptr, "train: cannot silence rank ",
                                   dp->rank(), "'s standard output");
  }
  const bool writer = !dp || dp->is_writer();
  const int64_t ranks = dp ? dp->size() : 1;
  if (device.is_cuda()) apply_cuda_defaults(a);
  apply_sequence_geometry(a);
#ifdef _OPENMP
  if (a.threads > 0) {
    omp_set_num_threads(a.threads);
  } else if (device.is_cpu() && std::getenv("OMP_NUM_THREADS") == nullptr) {
    // On cores other programs keep busy, every fork/join waits for a time slice (measured: 2
    // threads at 5.8k tokens/s against 13k on 1 at load 5): when the load average says the
    // machine is saturated, use half the cores.
    double load = 0;
    const int cores = omp_get_max_threads();
    if (getloadavg(&load, 1) == 1 && load >= cores) {
      const int free_cores = std::max(1, cores / 2);
      if (free_cores < cores) {
        omp_set_num_threads(free_cores);
        std::fprintf(stderr, "train: load average %.1f on %d cores: using %d thread%s (--threads overrides)\n",
                     load, cores, free_cores, free_cores == 1 ? "" : "s");
      }
    }
  }
#endif
  LT_CHECK(a.steps >= 1 && a.batch >= 1 && a.seq_len >= 1, "train: --steps, --batch and --seq-len must be >= 1");
  LT_CHECK(a.eval_every >= 0 && a.eval_batches >= 1, "train: --eval-every must be >= 0 and --eval-batches >= 1");
  LT_CHECK(a.checkpoint_every >= 0, "train: --checkpoint-every must be >= 0");
  LT_CHECK(a.checkpoint_every == 0 || !a.checkpoint.empty(), "train: --checkpoint-every needs --checkpoint PATH");
  checked_impl(a.impl);
  const Precision precision = precision_for(checked_precision(a.precision), device);
  // A schedule that rises towards its "final" rate, or a decay step that flips or zeroes the
  // weights (AdamW multiplies them by 1 - lr * weight_decay), cannot be what was meant.
  if (a.min_lr > a.lr)
    throw FlagError("--min-lr " + format_real(a.min_lr) + " is above --lr " + format_real(a.lr) +
                    "; the cosine schedule decays from --lr to --min-lr");
  if (a.lr * a.weight_decay >= 1.0)
    throw FlagError("--lr " + format_real(a.lr) + " x --weight-decay " + format_real(a.weight_decay) + " = " +
                    format_real(a.lr * a.weight_decay) +
                    " must be below 1: each step multiplies the weights by 1 - lr * weight_decay");
  check_train_sizes({a.batch, a.seq_len, a.layers, a.width, a.heads,
                     a.text.empty() ? a.keys + a.values + a.filler + 8 : nn::CharTextDataset::vocab_size(), a.untied});
  check_list_bound(attention::parse_int_list(a.segments, "--segments"), "--segments");
  check_list_bound(attention::parse_int_list(a.dilations, "--dilations"), "--dilations");
  if (a.position_init != "sinusoidal" && a.position_init != "normal" && a.position_init != "none")
    throw FlagError("--position-init must be sinusoidal, normal or none, got \"" + a.position_init + "\"");
  const nn::LengthCurriculum curriculum = nn::LengthCurriculum::parse(a.curriculum == "none" ? "" : a.curriculum,
                                                                       a.seq_len);
  if (curriculum.phase_steps() >= a.steps)
    throw FlagError("--curriculum " + a.curriculum + " lasts " + std::to_string(curriculum.phase_steps()) +
                    " steps; --steps " + std::to_string(a.steps) +
                    " must be larger so that training ends at --seq-len " + std::to_string(a.seq_len));
  if (writer) {
    check_writable(a.checkpoint, "--checkpoint");
    check_writable(a.metrics, "--metrics");
  }
  LT_CHECK(!a.fresh_optimizer || !a.resume.empty(), "train: --fresh-optimizer needs --resume PATH");
  if (!a.resume.empty()) check_resume_metadata(a.resume, a.fresh_optimizer);
  manual_seed(a.seed);

  // Data: the recall task unless a text file is named; one data set per curriculum length, the
  // last (`task` or `text`) at --seq-len. With --parallel data the batches are made on the CPU and
  // each rank uploads only its rows (DataParallelRun::shard).
  const Device data_device = dp ? Device::cpu() : device;
  std::vector<std::unique_ptr<nn::RecallTask>> tasks;
  std::vector<std::unique_ptr<nn::CharTextDataset>> texts;
  const auto source_for = [&](int64_t len) {
    if (a.text.empty()) {
      tasks.push_back(std::make_unique<nn::RecallTask>(
          nn::RecallTaskConfig{len, a.keys, a.values, a.filler, a.pairs, a.queries, a.seed}));
      return nn::batches_of(*tasks.back(), data_device);
    }
    texts.push_back(std::make_unique<nn::CharTextDataset>(a.text, len, a.seed));
    return nn::batches_of(*texts.back(), data_device);
  };
  const nn::BatchSource all_data = nn::curriculum_batches(curriculum, source_for);
  const nn::RecallTask* task = tasks.empty() ? nullptr : tasks.back().get();
  const int64_t vocab = task ? task->vocab_size() : nn::CharTextDataset::vocab_size();
  const nn::BatchSource data = dp ? dp->shard(all_data, a.batch) : all_data;

  models::LanguageModelConfig mc;
  mc.vocab_size = vocab;
  mc.max_seq_len = a.position_init == "none" ? 0 : a.seq_len;
  mc.embed_dim = a.width;
  mc.num_layers = a.layers;
  mc.num_heads = a.heads;
  mc.attention = a.variant;
  mc.attention_config.segment_lengths = attention::parse_int_list(a.segments, "--segments");
  mc.attention_config.dilation_rates = attention::parse_int_list(a.dilations, "--dilations");
  mc.attention_config.mixing = attention::parse_mixing(a.mixing);
  apply_variant_flags(a.variant_flags, mc.attention_config);
  mc.attention_config.impl = a.impl;
  mc.tied_embeddings = !a.untied;
  mc.dropout = a.dropout;
  if (a.position_init != "none") mc.position_init = a.position_init;
  mc.key_shift = a.key_shift;
  models::LanguageModel model(mc);
  model.to(device);

  nn::AdamWOptions ao;
  ao.lr = a.lr;
  ao.weight_decay = a.weight_decay;
  ao.decays = nn::decay_matrices_only;
  nn::AdamW optimizer(model.named_parameters(), ao);
  const nn::CosineSchedule schedule{a.lr, a.min_lr >= 0 ? a.min_lr : a.lr / 10, a.warmup, a.steps};

  Json run;
  run["command"] = "train";
  run["device"] = device.str();
  run["task"] = task ? Json{{"kind", "recall"}, {"keys", a.keys}, {"values", a.values}, {"filler", a.filler},
                            {"pairs", a.pairs}, {"queries", a.queries}}
                     : Json{{"kind", "text"}, {"file", a.text}};
  run["model"] = {{"vocab", vocab}, {"seq_len", a.seq_len}, {"layers", a.layers}, {"width", a.width},
                  {"heads", a.heads}, {"variant", a.variant}, {"segments", a.segments}, {"dilations", a.dilations},
                  {"mixing", a.mixing}, {"tied", !a.untied}, {"position_init", a.position_init},
                  {"key_shift", a.key_shift}, {"dropout", a.dropout},
                  {"parameters", model.num_parameters()}};
  run["optim"] = {{"lr", a.lr}, {"min_lr", schedule.min_lr}, {"warmup", a.warmup}, {"weight_decay", a.weight_decay},
                  {"clip", a.clip}, {"batch", a.batch}, {"steps", a.steps}, {"seed", a.seed}};
  if (!curriculum.empty()) run["optim"]["curriculum"] = curriculum.str();
  if (dp) run["parallel"] = {{"mode", "data"}, {"ranks", ranks}, {"backend", dp->backend()}};
  run["impl"] = a.impl;  // not part of "model": a checkpoint resumes under any implementation
  run["precision"] = precision_name(precision);  // nor is this: master weights are f32 in every precision
  run["compute_precision"] = precision_compute_label(precision, device);
  if (a.cuda_graph) run["cuda_graph"] = true;

  nn::TrainerOptions to;
  to.steps = a.steps;
  to.batch_size = a.batch;
  to.clip = a.clip;
  to.divergence_hint = "try a lower --lr";
  to.eval_every = a.eval_every;
  to.eval_batches = a.eval_batches;
  to.checkpoint = writer ? a.checkpoint : "";
  to.checkpoint_every = writer ? a.checkpoint_every : 0;
  to.checkpoint_metadata = {{"train_run", run.dump()}};
  to.precision = precision;
  to.cuda_graph = a.cuda_graph;
  nn::Trainer trainer(model, optimizer, schedule, to);

  int64_t start_step = 0;
  if (!a.resume.empty()) {
    nn::CheckpointInfo info = trainer.load_checkpoint(a.resume, a.fresh_optimizer);
    if (!a.fresh_optimizer) check_optimizer_state_complete(a.resume, optimizer);
    start_step = info.step;
    auto saved = info.metadata.find("train_run");
    if (saved != info.metadata.end()) {
      Json before = Json::parse(saved->second, nullptr, false);
      if (!before.is_discarded() && (before["task"] != run["task"] || before["model"] != run["model"]))
        std::fprintf(stderr, "train: warning: %s was written with a different task or model setting\n",
                     a.resume.c_str());
      if (!before.is_discarded() && before.is_object() && before.contains("optim"))
        warn_schedule_changes(a.resume, before["optim"], run["optim"]);
      const int64_t saved_ranks = !before.is_discarded() && before.is_object() && before.contains("parallel")
                                      ? before["parallel"].value("ranks", int64_t{1}) : 1;
      LT_CHECK(saved_ranks == ranks, "train: ", a.resume, " was written by a run on ", saved_ranks,
               " rank(s), but this run has ", ranks, " (resume on the same number of ranks: --batch is per rank)");
    }
    if (a.fresh_optimizer)
      std::fprintf(stderr, "train: --fresh-optimizer: the AdamW moments start from zero at step %lld\n",
                   static_cast<long long>(info.step));
    std::printf("resumed from %s at step %lld\n", a.resume.c_str(), static_cast<long long>(start_step));
    LT_CHECK(start_step <= a.steps, "train: the checkpoint is at step ", start_step, ", beyond --steps ", a.steps);
  }
  if (dp) {
    dp->prepare(model, a.seed, start_step, a.bucket_mb);
    trainer.on_gradients = [&] { dp->average_gradients(); };
    trainer.reduce_loss = [&](const Tensor& loss) { return dp->mean(loss); };
    std::printf("data parallel: %lld ranks (%s), %lld sequences per rank, %zu gradient buckets (--bucket-mb %s)\n",
                static_cast<long long>(ranks), dp->backend().c_str(), static_cast<long long>(a.batch),
                dp->bucket_count(), a.bucket_mb.c_str());
  }
  std::printf("training %s: %s parameters, %s attention (%s), %lld layers, width %lld, %lld heads, seq %lld, "
              "batch %lld, %lld steps on %s, precision %s%s\n",
              task ? "recall" : "text", human_count(static_cast<double>(model.num_parameters())).c_str(),
              a.variant.c_str(), config_label(a.variant, mc.attention_config).c_str(),
              static_cast<long long>(a.layers), static_cast<long long>(a.width), static_cast<long long>(a.heads),
              static_cast<long long>(a.seq_len), static_cast<long long>(a.batch * ranks), static_cast<long long>(a.steps),
              device.str().c_str(), precision_compute_label(precision, device).c_str(),
              curriculum.empty() ? "" : (", first " + curriculum.str() + " (length:steps)").c_str());
  std::fflush(stdout);

  reset_peak_memory(device);
  std::vector<nn::MetricsRow> rows;
  ProgressBar bar(start_step, a.steps);
  const auto t_start = Clock::now();
  // What ran the first block's attention in training (read after the first step), for the summary.
  std::shared_ptr<attention::MultiheadAttention> first_attention;
  if (model.blocks->size() > 0) first_attention = model.attention_layer(0);
  std::string attention_ran;
  Json attention_json;
  double window_tokens = 0, window_seconds = 0;  // recent throughput, for tokens/s and the ETA
  double tokens_trained = 0;
  // --profile records the third step of this run at --seq-len (after warm-up), or its last when shorter.
  if (a.profile) trainer.set_profile_step(std::min(std::max(start_step, curriculum.phase_steps()) + 2, a.steps - 1));
  trainer.on_diverged = [&] { bar.break_line(); };
  trainer.on_profile = [&](int64_t step) {
    bar.break_line();
    std::printf("profile of step %lld (self time excludes nested rows; phases nest ops, backward nodes nest "
                "their kernels):\n%s", static_cast<long long>(step), profiler::table().c_str());
    std::fflush(stdout);
  };
  trainer.on_step = [&](const nn::StepResult& r) {  // with dp, r.loss is the mean over the ranks (reduce_loss)
    if (first_attention && attention_ran.empty()) {
      const attention::Attention& core = first_attention->core();
      attention_ran = ran_with(core);
      attention_json = {{"implementation", core.last_backend()}, {"compute_precision", core.last_precision()}};
    }
    const double tokens = static_cast<double>(a.batch * ranks * curriculum.seq_len_at(r.step - 1));
    tokens_trained += tokens;
    window_tokens = 0.9 * window_tokens + tokens;
    window_seconds = 0.9 * window_seconds + r.seconds;
    const double tokens_per_s = window_tokens / std::max(window_seconds, 1e-9);
    const double eta =
        static_cast<double>(a.batch * ranks * curriculum.tokens_between(r.step, a.steps)) / tokens_per_s;
    rows.push_back({r.step, r.loss, r.lr, r.grad_norm, tokens_per_s,
                    std::chrono::duration<double>(Clock::now() - t_start).count(), {}, {}});
    if (writer) bar.update(r.step, r.loss, tokens_per_s, eta);
  };
  trainer.on_eval = [&](int64_t step, const nn::EvalResult& local) {
    const nn::EvalResult e = dp ? dp->combine(local) : local;
    if (!std::isfinite(e.loss)) {
      bar.break_line();
      LT_CHECK(false, "train: the held-out loss became ", e.loss, " at step ", step,
               "; stopped without saving a checkpoint (try a lower --lr or --weight-decay)");
    }
    rows.back().eval_loss = e.loss;
    rows.back().eval_accuracy = e.accuracy.value();
    bar.break_line();
    std::printf("step %lld: held-out loss %.4f, accuracy %.4f (%lld/%lld)\n", static_cast<long long>(step), e.loss,
                e.accuracy.value(), static_cast<long long>(e.accuracy.correct),
                static_cast<long long>(e.accuracy.total));
    std::fflush(stdout);
  };
  trainer.fit(data, start_step);
  bar.break_line();
  const double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();

  const nn::EvalResult final_eval = dp ? dp->combine(trainer.evaluate(data)) : trainer.evaluate(data);
  LT_CHECK(std::isfinite(final_eval.loss), "train: the held-out loss became ", final_eval.loss, " after step ",
           a.steps, "; stopped without saving a checkpoint (the weights are no longer finite: try a lower --lr or ",
           "--weight-decay)");
  if (!rows.empty()) {
    rows.back().eval_loss = final_eval.loss;
    rows.back().eval_accuracy = final_eval.accuracy.value();
  }
  if (!to.checkpoint.empty()) trainer.save_checkpoint(a.steps);
  const MemoryStats mem = memory_stats(device);
  std::printf("final held-out loss %.4f, accuracy %.4f (%lld/%lld)", final_eval.loss, final_eval.accuracy.value(),
              static_cast<long long>(final_eval.accuracy.correct), static_cast<long long>(final_eval.accuracy.total));
  if (task) std::printf(", chance %.4f", 1.0 / static_cast<double>(a.values));
  std::printf("\ntrained %lld steps in %s (%s tok/s)\n", static_cast<long long>(a.steps - start_step),
              human_duration(elapsed).c_str(),
              human_count(elapsed > 0 ? tokens_trained / elapsed : 0).c_str());
  std::printf("peak memory on %s: allocated %s, reserved %s\n", device.str().c_str(),
              human_bytes(mem.peak_allocated_bytes).c_str(), human_bytes(mem.peak_reserved_bytes).c_str());
  if (!attention_ran.empty()) std::printf("attention in training: %s\n", attention_ran.c_str());
  if (a.cuda_graph)
    std::printf("cuda graph: %lld capture(s), %lld of %lld steps replayed\n",
                static_cast<long long>(trainer.graph_captures()), static_cast<long long>(trainer.graph_replays()),
                static_cast<long long>(a.steps - start_step));
  if (!a.checkpoint.empty()) std::printf("checkpoint written to %s\n", a.checkpoint.c_str());
  if (!a.metrics.empty() && writer) {
    if (!attention_json.is_null()) run["attention"] = attention_json;
    run["final"] = {{"eval_loss", final_eval.loss}, {"eval_accuracy", final_eval.accuracy.value()},
                    {"elapsed_s", elapsed}, {"peak_allocated_bytes", mem.peak_allocated_bytes},
                    {"peak_reserved_bytes", mem.peak_reserved_bytes}};
    nn::write_metrics(a.metrics, run, rows);
    std::printf("metrics written to %s\n", a.metrics.c_str());
  }
  return 0;
}

const RegisterCommand kTrainCommand{
    "train", "train a causal language model on associative recall (or a text file) with any attention variant",
    [](CLI::App& sub) -> std::function<int()> {
      auto a = std::make_shared<TrainArgs>();
      sub.footer("On CUDA the flags not given default to --seq-len 8192 --batch 16 --width 128 --heads 4 --steps 600 "
                 "--position-init none --curriculum 128:400 (the defaults shown are the CPU's).");
      sub.add_option("--device", a->device, "auto (cuda when available), cpu, cuda or cuda:N");
      sub.add_option("--steps", a->steps, "optimizer steps")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--batch", a->batch, "sequences per step")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--seq-len", a->seq_len, "tokens per sequence")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--layers", a->layers, "transformer blocks")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--width", a->width, "embedding width")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--heads", a->heads, "attention heads")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--variant", a->variant, "attention variant (see `longtape attention --list`)")
          ->capture_default_str();
      sub.add_option("--segments", a->segments, "dilated: segment lengths, comma-separated")->capture_default_str();
      sub.add_option("--dilations", a->dilations, "dilated: dilation rates, comma-separated")->capture_default_str();
      sub.add_option("--mixing", a->mixing, "dilated: lse or head_groups")->capture_default_str();
      sub.add_option("--impl", a->impl, impl_help());
      sub.add_option("--precision", a->precision, precision_help());
      add_variant_flags(sub, a->variant_flags);
      sub.add_option("--lr", a->lr, "peak learning rate (AdamW)")->capture_default_str()
          ->transform(real_in(0.0, kMaxReal));
      sub.add_option("--min-lr", a->min_lr, "final learning rate of the cosine schedule (default lr / 10)")
          ->transform(real_in(0.0, kMaxReal));
      sub.add_option("--warmup", a->warmup, "linear warmup steps")->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--weight-decay", a->weight_decay, "AdamW decoupled weight decay (matrices only)")
          ->capture_default_str()
          ->transform(real_in(0.0, kMaxReal));
      sub.add_option("--clip", a->clip, "global gradient-norm clip (0 = off)")->capture_default_str()
          ->transform(real_in(0.0, kMaxReal));
      sub.add_option("--dropout", a->dropout, "dropout on embeddings and residual branches")->capture_default_str()
          ->transform(real_in(0.0, 1.0, false, /*hi_open=*/true));
      sub.add_flag("--untied", a->untied, "separate output head instead of the tied token embedding");
      sub.add_option("--position-init", a->position_init,
                     "initial positional table: sinusoidal, normal, or none (no positional table; the default on CUDA)")
          ->capture_default_str();
      sub.add_option("--curriculum", a->curriculum,
                     "sequence-length curriculum: LENGTH:STEPS phases on shorter sequences before --seq-len, e.g. "
                     "128:300,1024:200 (held-out batches always have --seq-len tokens); none = no curriculum "
                     "(default on the CPU; on CUDA 128:400 when --seq-len is over 128 and --steps over 400)");
      sub.add_flag("--key-shift,!--no-key-shift", a->key_shift,
                   "smeared keys: each attention key mixes in the previous position's key by a learned gate "
                   "(default on)");
      sub.add_option("--keys", a->keys, "recall: key tokens")->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--values", a->values, "recall: value tokens (chance accuracy = 1 / values)")
          ->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--filler", a->filler, "recall: noise tokens")->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--pairs", a->pairs, "recall: key/value pairs planted per sequence")->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--queries", a->queries, "recall: queried keys at the end of each sequence")
          ->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--text", a->text, "train a byte-level model on this file instead of the recall task");
      sub.add_option("--eval-every", a->eval_every, "held-out evaluation every N steps (0 = only at the end)")
          ->capture_default_str()
          ->transform(count_in<int64_t>(0));
      sub.add_option("--eval-batches", a->eval_batches, "held-out batches per evaluation")->capture_default_str()
          ->transform(count_in<int64_t>(1));
      sub.add_option("--metrics", a->metrics, "write per-step metrics to PATH (.json, else CSV)");
      sub.add_option("--checkpoint", a->checkpoint, "safetensors checkpoint written at the end (and every K steps)");
      sub.add_option("--checkpoint-every", a->checkpoint_every, "also write the checkpoint every K steps")
          ->transform(count_in<int64_t>(0));
      sub.add_option("--resume", a->resume, "continue from this checkpoint (same flags as the run that wrote it)");
      sub.add_flag("--fresh-optimizer", a->fresh_optimizer,
                   "with --resume: load the weights only and start the AdamW moments from zero (for a checkpoint "
                   "without optimizer state)");
      sub.add_option("--seed", a->seed, "seed of the initialisation, dropout and data")->capture_default_str()
          ->transform(integer_in<uint64_t>());
      sub.add_option("--threads", a->threads,
                     "CPU threads (default: all, or half when the 1-minute load average shows the cores saturated; "
                     "OMP_NUM_THREADS also sets it)")
          ->transform(integer_in<int>(0, 4096));
      sub.add_option("--parallel", a->parallel,
                     "none, or data: one replica per process of `longtape launch` (gradients averaged; --batch per "
                     "rank)")
          ->capture_default_str();
      sub.add_option("--bucket-mb", a->bucket_mb,
                     "with --parallel data: gradient bucket sizes in MiB, the first (reduced during the last "
                     "layers' backward) then the rest, FIRST,REST or one size")
          ->capture_default_str();
      sub.add_flag("--profile", a->profile,
                   "print a per-op table (calls, self and total time, bytes) of one training step after warm-up");
      sub.add_flag("--cuda-graph", a->cuda_graph,
                   "capture the training step into a CUDA graph after a warm-up step and replay it (CUDA only; "
                   "not with --profile, --parallel data, --variant ring|head_parallel or --dropout > 0)");
      return [a, &sub] {
        for (const CLI::Option* o : sub.get_options())
          if (o->count() > 0) a->given.insert(o->get_name());
        return run_train(*a);
      };
    }};

}  // namespace

}  // namespace longtape::cli
