#include "attention/registry.h"

#include <map>
#include <mutex>

#include "attention/dense.h"
#include "attention/block_sparse.h"
#include "attention/dilated.h"
#include "attention/head_parallel.h"
#include "attention/hilbert_order.h"
#include "attention/config_text.h"
#include "attention/pattern_map.h"
#include "attention/ring_attention.h"
#include "tensor/error.h"

namespace longtape::attention {

namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, VariantTraits> entries;
};

Registry& registry() {
  static Registry r;
  return r;
}

void add_entry(Registry& r, const std::string& name, VariantTraits traits) {
  LT_CHECK(!name.empty(), "register_attention: the variant name must not be empty");
  LT_CHECK(static_cast<bool>(traits.factory), "register_attention: variant '", name, "' needs a factory");
  LT_CHECK(r.entries.find(name) == r.entries.end(), "register_attention: a variant named '", name,
           "' is already registered");
  r.entries.emplace(name, std::move(traits));
}

VariantTraits described(std::string description, AttentionFactory factory) {
  VariantTraits traits;
  traits.description = std::move(description);
  traits.factory = std::move(factory);
  return traits;
}

// The built-in variants, listed explicitly (a static library would drop self-registering objects
// that nothing references). A new variant adds one entry here.
void register_builtins(Registry& r) {
  VariantTraits dense =
      described("softmax attention over all keys (causal: keys <= query); docs/attention.md, dense",
                [](const AttentionConfig& c) { return std::make_shared<DenseAttention>(c); });
  dense.config_items = [](const AttentionConfig&) { return std::vector<std::string>{}; };
  dense.attended_pairs = dense_attended_pairs;
  add_entry(r, "dense", std::move(dense));

  VariantTraits dilated = described(
      "LongNet dilated attention: segments x dilation rates, branches mixed by lse or head_groups; "
      "docs/attention.md, dilated",
      [](const AttentionConfig& c) { return std::make_shared<DilatedAttention>(c); });
  dilated.config_items = dilated_config_items;
  dilated.attended_pairs = dilated_attended_pairs;
  add_entry(r, "dilated", std::move(dilated));

  VariantTraits block_sparse = described(
      "block-sparse attention, one joint softmax over the active key blocks; config.pattern = all, "
      "local_window, dilated, global_local, random or adaptive; docs/attention.md, block-sparse",
      [](const AttentionConfig& c) { return make_block_sparse(c); });
  block_sparse.config_items = [](const AttentionConfig& c) {
    return block_sparse_config_items(c, c.pattern == "adaptive");
  };
  block_sparse.attended_pairs = block_sparse_attended_pairs;
  add_entry(r, "block_sparse", std::move(block_sparse));

  VariantTraits adaptive = described(
      "block-sparse attention with a learned pattern: top-k blocks of a trained scorer, whose score biases "
      "the kept blocks' logits; docs/attention.md, block-sparse",
      [](const AttentionConfig& c) { return std::make_shared<AdaptiveBlockSparseAttention>(c); });
  adaptive.config_items = [](const AttentionConfig& c) { return block_sparse_config_items(c, true); };
  add_entry(r, "block_sparse_adaptive", std::move(adaptive));  // its pairs depend on the data

  VariantTraits hilbert = described(
      "Hilbert token ordering (config.grid or a square N) around config.inner_variant; "
      "docs/attention.md, Hilbert ordering",
      [](const AttentionConfig& c) { return std::make_shared<HilbertOrderAttention>(c); });
  hilbert.wraps_inner_variant = true;
  hilbert.uses_token_grid = true;
  add_entry(r, "hilbert", std::move(hilbert));

  VariantTraits ring = described(
      "sequence parallel over config.ranks ranks: K/V chunks travel a ring, partials merge by lse; wraps "
      "config.inner_variant (dense or dilated); docs/attention.md, parallel variants",
      [](const AttentionConfig& c) { return std::make_shared<RingAttention>(c); });
  ring.wraps_inner_variant = true;
  ring.splits_over_ranks = true;
  ring.parallel_mode = "ring";
  add_entry(r, "ring", std::move(ring));

  VariantTraits head_parallel = described(
      "Ulysses head parallel over config.ranks ranks: all-to-all to H/P heads of the full sequence, wraps "
      "config.inner_variant with global head indices; docs/attention.md, parallel variants",
      [](const AttentionConfig& c) { return std::make_shared<HeadParallelAttention>(c); });
  head_parallel.wraps_inner_variant = true;
  head_parallel.splits_over_ranks = true;
  head_parallel.parallel_mode = "head";
  add_entry(r, "head_parallel", std::move(head_parallel));
}

// The registry with the built-ins in place; the caller holds the returned lock.
Registry& ready(std::unique_lock<std::mutex>& lock) {
  Registry& r = registry();
  lock = std::unique_lock<std::mutex>(r.mutex);
  static bool builtins_added = false;
  if (!builtins_added) {
    builtins_added = true;
    register_builtins(r);
  }
  return r;
}

std::string joined_names(const Registry& r) {
  std::string names;
  for (const auto& [name, entry] : r.entries) names += (names.empty() ? "" : ", ") + name;
  return names;
}

VariantTraits registered_traits(const std::string& name, const char* who) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  auto it = r.entries.find(name);
  LT_CHECK(it != r.entries.end(), who, ": unknown attention variant '", name, "'; registered: ", joined_names(r));
  return it->second;
}

}  // namespace

std::shared_ptr<Attention> make_attention(const std::string& name, const AttentionConfig& config) {
  AttentionFactory factory;
  {
    std::unique_lock<std::mutex> lock;
    Registry& r = ready(lock);
    auto it = r.entries.find(name);
    LT_CHECK(it != r.entries.end(), "make_attention: unknown attention variant '", name, "'; registered: ",
             joined_names(r));
    factory = it->second.factory;
  }
  // config.order = hilbert puts any variant inside the Hilbert token ordering.
  if (config.order != "natural" && name != "hilbert") return apply_token_order(name, config);
  // Constructed outside the lock: a wrapper variant may itself call make_attention.
  std::shared_ptr<Attention> attention = factory(config);
  LT_CHECK(attention != nullptr, "make_attention: the factory of '", name, "' returned no module");
  return attention;
}

std::vector<std::string> registered_attention_names() {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  std::vector<std::string> names;
  for (const auto& [name, entry] : r.entries) names.push_back(name);
  return names;  // std::map keeps them sorted
}

void register_attention(const std::string& name, VariantTraits traits) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  add_entry(r, name, std::move(traits));
}

void register_attention(const std::string& name, const std::string& description, AttentionFactory factory) {
  register_attention(name, described(description, std::move(factory)));
}

std::string attention_description(const std::string& name) {
  return registered_traits(name, "attention_description").description;
}

VariantTraits variant_traits(const std::string& name) { return registered_traits(name, "variant_traits"); }

std::optional<VariantTraits> find_variant_traits(const std::string& name) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  auto it = r.entries.find(name);
  if (it == r.entries.end()) return std::nullopt;
  return it->second;
}

std::string parallel_variant(const std::string& mode) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  for (const auto& [name, traits] : r.entries)
    if (!mode.empty() && traits.parallel_mode == mode) return name;
  LT_CHECK(false, "parallel_variant: no registered variant runs parallel mode '", mode, "'");
  return {};
}

}  // namespace longtape::attention
