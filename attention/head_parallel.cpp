#include "attention/head_parallel.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>

#include "attention/composed.h"
#include "attention/head_parallel_pipeline.h"
#include "attention/patterns.h"
#include "attention/registry.h"
#include "attention/ring_attention.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

// The ranks' pieces (rank order) of a head-parallel result joined along `dim` (the sequence).
Tensor join_ranks(const std::vector<Tensor>& pieces, int64_t dim) {
  return pieces.size() == 1 ? pieces[0] : cat(pieces, dim);
}

void check_heads(int64_t num_heads, int64_t ranks, const char* who) {
  LT_CHECK(ranks >= 1, who, ": ranks must be >= 1, got ", ranks);
  LT_CHECK(num_heads % ranks == 0, who, ": num_heads (", num_heads, ") must be divisible by the number of ranks (",
           ranks, "): each rank takes num_heads / ranks heads");
}

// The config of rank `rank`'s inner variant: its H/P heads, told their global position.
AttentionConfig inner_config(const AttentionConfig& config, int64_t rank, int64_t ranks) {
  AttentionConfig inner = config;
  const int64_t local = config.num_heads / ranks;
  inner.num_heads = local;
  inner.total_heads = config.total_heads > 0 ? config.total_heads : config.num_heads;
  inner.head_offset = config.head_offset + rank * local;
  inner.parallel = "none";
  inner.ranks = 1;
  return inner;
}

void check_inner_name(const AttentionConfig& config) {
  LT_CHECK(config.inner_variant != "head_parallel" && config.inner_variant != "ring",
           "attention 'head_parallel': inner_variant must be a single-device variant, got \"", config.inner_variant,
           "\"");
}

void check_shards(const AttentionConfig& config, const Tensor& q, const Tensor& k, const Tensor& v, const char* who) {
  check_qkv_shards(q, k, v, who);
  LT_CHECK(q.size(2) == config.num_heads && q.size(3) == config.head_dim, who, ": expected ", config.num_heads,
           " heads of dim ", config.head_dim, " (config), got q ", describe(q));
  LT_CHECK(q.size(0) > 0 && q.size(1) > 0, who, ": batch and sequence must be non-empty, got q ", describe(q));
}

std::mutex g_last_run_mutex;
HeadParallelRun g_last_run;

// Throws unless pipeline_groups and token_chunks are in range and name at most one pipeline axis.
void check_pipeline_config(const AttentionConfig& config, int64_t local_heads) {
  LT_CHECK(config.pipeline_groups >= 0 && config.pipeline_groups <= local_heads,
           "attention 'head_parallel': pipeline_groups must be 0 (automatic) or 1 to the heads per rank (",
           local_heads, "), got ", config.pipeline_groups);
  LT_CHECK(config.token_chunks >= 0, "attention 'head_parallel': token_chunks must be 0 (automatic), 1 (none) or a "
           "chunk count >= 2, got ", config.token_chunks);
  LT_CHECK(config.token_chunks < 2 || config.pipeline_groups < 2, "attention 'head_parallel': the pipeline runs "
           "over head groups or over token chunks, not both; got pipeline_groups = ", config.pipeline_groups,
           " and token_chunks = ", config.token_chunks);
  LT_CHECK(config.token_chunk_layout == "one_rank" || config.token_chunk_layout == "every_rank",
           "attention 'head_parallel': token_chunk_layout must be one_rank or every_rank, got \"",
           config.token_chunk_layout, "\"");
}

// How many head groups the pipeline runs: config.pipeline_groups, or automatic for 0; one when the
// inner variant has parameters (they are held per rank, for all of its heads).
int64_t pipeline_group_count(const AttentionConfig& config, int64_t local_heads, bool inner_has_parameters) {
  check_pipeline_config(config, local_heads);
  if (inner_has_parameters) {
    LT_CHECK(config.pipeline_groups <= 1, "attention 'head_parallel': the inner variant '", config.inner_variant,
             "' has parameters (held per rank for all of its heads), so its heads run as one group; got "
             "pipeline_groups = ", config.pipeline_groups);
    return 1;
  }
  return config.pipeline_groups > 0 ? config.pipeline_groups : automatic_pipeline_groups(local_heads);
}

// Whether `steps` token chunk steps of `layout` (every rank holding `length` tokens) give exactly
// those rows of the one-device result. Only the dilated variant's result depends on positions
// alone through its segments: segments start at multiples of their length and dilation offsets,
// causal masks and head groups are relative to a segment or follow the (global) head indices. So
// it does when every chunk holds whole segments of every branch, both in the sequence (no segment
// crosses a chunk) and in the core's sequence (each chunk in it starts a segment too); then the
// chunk is a multiple of every segment, so both sequences cut their branches into the same
// segment length. Attention dropout in training would draw differently, so it never does.
//   every_rank: chunks of length / steps tokens; the core's sequence is chunk g of every rank.
//   one_rank: chunks of length * ranks / steps tokens (steps a multiple of ranks), or steps =
//             ranks + 1 (ranks >= 2): one chunk per rank, its own rank taking it in halves; the
//             core's sequence is one chunk or half.
struct ChunkCut {
  int64_t chunks = 0;  // per rank (0: the layout cannot take this many steps)
  bool halved = false;
};

ChunkCut chunk_cut(const std::string& layout, int64_t ranks, int64_t steps) {
  if (layout != "one_rank") return {steps, false};
  if (steps % ranks == 0) return {steps / ranks, false};
  if (ranks >= 2 && steps == ranks + 1) return {1, true};
  return {};
}

bool chunks_hold_whole_segments(const AttentionConfig& config, int64_t ranks, int64_t length, int64_t steps,
                                const std::string& layout, bool training) {
  if (config.inner_variant != "dilated" || (training && config.dropout > 0.0)) return false;
  const ChunkCut cut = chunk_cut(layout, ranks, steps);
  if (steps < 2 || cut.chunks == 0) return false;
  // Halves hold whole segments exactly when two chunks per rank do.
  const int64_t chunks = cut.halved ? 2 : cut.chunks;
  if (length % chunks != 0) return false;
  const int64_t c = length / chunks;
  const bool one_rank = layout == "one_rank";
  const int64_t heads = config.total_heads > 0 ? config.total_heads : config.num_heads;
  AttentionConfig every_head = config;  // every branch's segments, whichever heads this rank holds
  every_head.num_heads = heads;
  every_head.total_heads = heads;
  every_head.head_offset = 0;
  std::vector<TokenRange> in_sequence, in_core;
  for (int64_t r = 0; r < ranks; ++r) {
    if (!one_rank || r == 0) in_core.push_back({r * c, c});
    for (int64_t g = 0; g < chunks; ++g) in_sequence.push_back({r * length + g * c, c});
  }
  return holds_whole_segments(every_head, heads, ranks * length, in_sequence) &&
         holds_whole_segments(every_head, heads, one_rank ? c : ranks * c, in_core);
}

}  // namespace

int64_t automatic_token_chunks(const AttentionConfig& config, int64_t ranks, int64_t length, bool training) {
  constexpr int64_t kMost = 4, kSegmentsPerChunk = 2;
  if (config.segment_lengths.empty()) return 1;
  const int64_t widest = effective_segment(
      ranks * length, *std::max_element(config.segment_lengths.begin(), config.segment_lengths.end()));
  // every_rank: 4, 3, 2 steps. one_rank: multiples of the ranks, the most chunks per rank up to
  // kMost / P first (own halves, P + 1 steps, measured no faster on 4 GPUs: asked for only). Every
  // run of one rank's tokens at least kSegmentsPerChunk of the widest segments.
  std::vector<int64_t> candidates;
  if (config.token_chunk_layout == "one_rank") {
    for (int64_t m = std::max<int64_t>(1, kMost / ranks); m >= 1; --m) candidates.push_back(ranks * m);
  } else {
    for (int64_t steps = kMost; steps >= 2; --steps) candidates.push_back(steps);
  }
  for (int64_t steps : candidates) {
    const ChunkCut cut = chunk_cut(config.token_chunk_layout, ranks, steps);
    const int64_t pieces = cut.halved ? 2 : cut.chunks;
    if (pieces > 0 && length % pieces == 0 && length / pieces >= kSegmentsPerChunk * widest &&
        chunks_hold_whole_segments(config, ranks, length, steps, config.token_chunk_layout, training))
      return steps;
  }
  return 1;
}

namespace {

// The token chunk steps the pipeline runs on these shards and their layout (1 = it runs over head
// groups): see AttentionConfig::token_chunks. Every rank decides alike (from the config and every
// rank's length). one_rank falls back to every_rank where its chunks would not hold whole segments.
HeadParallelRun token_chunk_plan(const AttentionConfig& config, const std::vector<int64_t>& lengths, bool training,
                                 bool inner_has_parameters) {
  const HeadParallelRun none{0, 1, ""};
  if (config.token_chunks == 1 || (config.token_chunks == 0 && config.pipeline_groups > 0) || inner_has_parameters)
    return none;
  const int64_t length = lengths[0];
  if (!std::all_of(lengths.begin(), lengths.end(), [&](int64_t n) { return n == length; })) return none;
  const int64_t ranks = static_cast<int64_t>(lengths.size());
  std::vector<std::string> layouts{config.token_chunk_layout};
  if (config.token_chunk_layout != "every_rank") layouts.push_back("every_rank");
  for (const std::string& layout : layouts) {
    AttentionConfig asked = config;
    asked.token_chunk_layout = layout;
    const int64_t steps = config.token_chunks == 0 ? automatic_token_chunks(asked, ranks, length, training)
                          : chunks_hold_whole_segments(asked, ranks, length, config.token_chunks, layout, training)
                              ? config.token_chunks
                              : 1;
    if (steps > 1) return {1, steps, layout};
  }
  return none;
}

// The name under which HeadParallelAttention registers rank r's inner module.
std::string inner_name(int64_t rank) { return "rank" + std::to_string(rank); }

// The parameters of an inner module that take gradients (the adaptive scorer; none for most).
std::vector<Tensor> trainable(const Attention& inner) {
  std::vector<Tensor> out;
  for (const Tensor& t : inner.parameters())
    if (t.requires_grad()) out.push_back(t);
  return out;
}

// head_parallel_attention with the inner module given: `inner` (the caller's, persistent) or, when
// null, one built from the config for this call (fine for the variants without parameters).
AttentionOutput head_parallel_with(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                                   const Tensor& k, const Tensor& v, bool training, CoreRun* run,
                                   std::shared_ptr<Attention> inner);

}  // namespace

AttentionOutput head_parallel_attention(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                                        const Tensor& k, const Tensor& v, bool training, CoreRun* run) {
  return head_parallel_with(comm, config, q, k, v, training, run, nullptr);
}

namespace {

AttentionOutput head_parallel_with(dist::Communicator& comm, const AttentionConfig& config, const Tensor& q,
                                   const Tensor& k, const Tensor& v, bool training, CoreRun* run,
                                   std::shared_ptr<Attention> inner) {
  check_shards(config, q, k, v, "head_parallel_attention");
  check_inner_name(config);
  const int64_t ranks = comm.size(), rank = comm.rank();
  check_heads(q.size(2), ranks, "head_parallel_attention");
  // Sequence lengths of every rank: the sizes of the return all-to-all.
  const auto entry = std::chrono::steady_clock::now();
  const std::vector<int64_t> lengths = comm.all_gather_sizes(q.size(1));
  const auto gathered = std::chrono::steady_clock::now();

  if (!inner) inner = make_attention(config.inner_variant, inner_config(config, rank, ranks));
  const int64_t local = q.size(2) / ranks;
  const bool has_parameters = !inner->parameters().empty();
  const int64_t groups = pipeline_group_count(config, local, has_parameters);
  const HeadParallelRun chunking = token_chunk_plan(config, lengths, training, has_parameters);
  const int64_t chunks = chunking.token_chunks;
  // Token chunks or one group: this rank's module, on every step. Several groups: a module per
  // group, told the group's global heads (the inner variant has no parameters, so a fresh one
  // computes what the rank's module would).
  std::vector<PipelineStep> steps;
  std::vector<std::shared_ptr<Attention>> cores;
  if (chunks > 1) {
    const ChunkCut cut = chunk_cut(chunking.chunk_layout, ranks, chunks);
    steps = chunking.chunk_layout == "one_rank" ? one_rank_chunk_steps(local, ranks, lengths[0], cut.chunks, cut.halved)
                                                : every_rank_chunk_steps(local, ranks, lengths[0], chunks);
    cores.assign(steps.size(), inner);
  } else {
    steps = head_group_steps(split_heads(local, groups), lengths);
    if (groups == 1) {
      cores.push_back(inner);
    } else {
      for (const PipelineStep& step : steps) {
        AttentionConfig group_config = inner_config(config, rank, ranks);
        group_config.num_heads = step.heads.count;
        group_config.head_offset += step.heads.first;
        cores.push_back(make_attention(config.inner_variant, group_config));
      }
    }
  }
  for (const auto& core : cores) core->train(training);
  if (head_parallel_timeline_enabled()) {
    auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
    std::fprintf(stderr, "head_parallel rank %lld host ms: the lengths' all_gather %.3f, the steps and cores %.3f\n",
                 static_cast<long long>(comm.rank()), ms(gathered - entry), ms(std::chrono::steady_clock::now() - gathered));
  }
  AttentionOutput result = pipelined_head_parallel(comm, q, k, v, steps, cores, run);
  {
    std::lock_guard<std::mutex> lock(g_last_run_mutex);
    g_last_run = chunks > 1 ? chunking : HeadParallelRun{groups, 1, ""};
  }
  return result;
}

}  // namespace

HeadParallelRun last_head_parallel_run() {
  std::lock_guard<std::mutex> lock(g_last_run_mutex);
  return g_last_run;
}

HeadParallelAttention::HeadParallelAttention(AttentionConfig config) : Attention(std::move(config)) {
  validate_core_config(config_, "head_parallel");
  check_heads(config_.num_heads, config_.ranks, "attention 'head_parallel'");
  check_inner_name(config_);
  check_pipeline_config(config_, config_.num_heads / config_.ranks);
  // One inner module per rank (their configs differ only in the head offset), registered as
  // submodules "rank0", "rank1", ...: variants with parameters (the adaptive scorer) keep them
  // across calls, train them, save and move them with this module. Each checks its own config.
  for (int64_t r = 0; r < config_.ranks; ++r)
    register_module(inner_name(r), make_attention(config_.inner_variant, inner_config(config_, r, config_.ranks)));
}

AttentionOutput HeadParallelAttention::forward_with_lse(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_inputs(q, k, v);
  auto inner_of = [this](int64_t r) { return std::dynamic_pointer_cast<Attention>(child(inner_name(r))); };
  if (dist::Communicator* comm = dist::current_communicator()) {
    std::shared_ptr<Attention> inner;
    if (comm->size() == config_.ranks) {
      inner = inner_of(comm->rank());
    } else {
      // A group of another size than config.ranks: rank r's registered module is for other heads.
      LT_CHECK(trainable(*inner_of(0)).empty(), "attention 'head_parallel': the inner variant '",
               config_.inner_variant, "' has parameters, held per rank for config.ranks = ", config_.ranks,
               " ranks, but the communicator has ", comm->size(), " ranks; set config.ranks to the group size");
    }
    CoreRun run;
    AttentionOutput result = head_parallel_with(*comm, config_, q, k, v, is_training(), &run, inner);
    note_backend(run.backend, run.precision);
    return result;
  }

  // Outside a rank: run config.ranks ranks as threads on the full tensors.
  check_shards(config_, q, k, v, "attention 'head_parallel'");
  const bool training = is_training();
  LT_CHECK(!(training && config_.dropout > 0.0),
           "attention 'head_parallel': attention dropout is not supported when the ranks are simulated (dropout = ",
           config_.dropout, "); set it to 0 or use eval mode");
  const int64_t ranks = config_.ranks;
  const std::vector<int64_t> starts = sequence_chunk_starts(q.size(1), ranks);
  // Token chunk r of a (B, N, H, D) tensor (dim 1) or of a (B, H, N) lse (dim 2).
  auto chunk = [starts](const Tensor& x, int64_t r, int64_t dim) {
    const size_t i = static_cast<size_t>(r);
    return x.narrow(dim, starts[i], starts[i + 1] - starts[i]).contiguous();
  };
  const Tensor qd = q.detach(), kd = k.detach(), vd = v.detach();
  const AttentionConfig config = config_;
  // Rank r runs the registered module "rank<r>" (its own, so the ranks never share a module), and
  // the parameters of those modules take gradients through the recomputing backward below.
  std::vector<std::shared_ptr<Attention>> inners;
  std::vector<std::vector<Tensor>> params;  // per rank, the ones that take gradients
  for (int64_t r = 0; r < ranks; ++r) {
    inners.push_back(inner_of(r));
    params.push_back(trainable(*inners.back()));
  }
  std::vector<AttentionOutput> parts(static_cast<size_t>(ranks));
  CoreRun run;  // written by rank 0 only
  {
    NoGradGuard no_grad;
    dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
      const int64_t r = comm.rank();
      parts[static_cast<size_t>(r)] =
          head_parallel_with(comm, config, chunk(qd, r, 1), chunk(kd, r, 1), chunk(vd, r, 1), training,
                             r == 0 ? &run : nullptr, inners[static_cast<size_t>(r)]);
    });
  }
  note_backend(run.backend, run.precision);
  Tensor out, lse;
  {
    NoGradGuard no_grad;
    out = join_ranks(each_rank(parts, &AttentionOutput::out), 1);
    lse = join_ranks(each_rank(parts, &AttentionOutput::lse), 2);
  }
  std::vector<Tensor> inputs{q, k, v}, saved{qd, kd, vd};
  for (const auto& ps : params)
    for (const Tensor& p : ps) {
      inputs.push_back(p);
      saved.push_back(p);
    }
  if (autograd::any_requires_grad(inputs)) {
    // The backward runs the ranks again: each recomputes its forward with autograd (with its own
    // inner module) and takes the gradients of its shards and of its module's parameters (the
    // all-to-alls' backward communicates inside that run). q, k, v and the parameters are saved:
    // modified in place before the backward, they make it throw instead of giving wrong gradients.
    autograd::record(
        "head_parallel_attention", inputs, {out, lse},
        [config, qd, kd, vd, ranks, chunk, training, inners, params](const std::vector<Tensor>& g) {
          std::vector<std::vector<Tensor>> grads(static_cast<size_t>(ranks));
          dist::run_ranks(static_cast<int>(ranks), [&](dist::Communicator& comm) {
            autograd::set_grad_enabled(true);  // this rank's thread only
            const int64_t r = comm.rank();
            std::vector<Tensor> leaves;
            for (const Tensor& x : {qd, kd, vd}) leaves.push_back(chunk(x, r, 1).detach().requires_grad_());
            AttentionOutput res = head_parallel_with(comm, config, leaves[0], leaves[1], leaves[2], training, nullptr,
                                                     inners[static_cast<size_t>(r)]);
            std::vector<Tensor> wrt = leaves;
            for (const Tensor& p : params[static_cast<size_t>(r)]) wrt.push_back(p);
            std::vector<Tensor> d = autograd::grad({res.out, res.lse}, wrt, {chunk(g[0], r, 1), chunk(g[1], r, 2)});
            for (size_t i = 0; i < leaves.size(); ++i)
              if (!d[i].defined()) d[i] = Tensor::zeros(leaves[i].shape(), leaves[i].dtype(), leaves[i].device());
            grads[static_cast<size_t>(r)] = d;
          });
          std::vector<Tensor> result;
          for (size_t i = 0; i < 3; ++i) {
            std::vector<Tensor> pieces;
            for (const auto& d : grads) pieces.push_back(d[i]);
            result.push_back(join_ranks(pieces, 1));
          }
          // Then each rank's parameter gradients, in the order of `inputs` (undefined = none).
          for (const auto& d : grads)
            for (size_t i = 3; i < d.size(); ++i) result.push_back(d[i]);
          return result;
        },
        saved);
  }
  return {out, lse};
}

}  // namespace longtape::attention
