#include "attention/registry.h"

#include <map>
#include <mutex>

#include "attention/dense.h"
#include "attention/block_sparse.h"
#include "attention/dilated.h"
#include "attention/head_parallel.h"
#include "attention/hilbert_order.h"
#include "attention/ring_attention.h"
#include "tensor/error.h"

namespace longtape::attention {

namespace {

struct Entry {
  std::string description;
  AttentionFactory factory;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, Entry> entries;
};

Registry& registry() {
  static Registry r;
  return r;
}

void add_entry(Registry& r, const std::string& name, const std::string& description, AttentionFactory factory) {
  LT_CHECK(!name.empty(), "register_attention: the variant name must not be empty");
  LT_CHECK(static_cast<bool>(factory), "register_attention: variant '", name, "' needs a factory");
  LT_CHECK(r.entries.find(name) == r.entries.end(), "register_attention: a variant named '", name,
           "' is already registered");
  r.entries.emplace(name, Entry{description, std::move(factory)});
}

// The built-in variants, listed explicitly (a static library would drop self-registering objects
// that nothing references). A new variant adds one line here.
void register_builtins(Registry& r) {
  add_entry(r, "dense", "softmax attention over all keys (causal: keys <= query); docs/attention.md, dense",
            [](const AttentionConfig& c) { return std::make_shared<DenseAttention>(c); });
  add_entry(r, "dilated",
            "LongNet dilated attention: segments x dilation rates, branches mixed by lse or head_groups; "
            "docs/attention.md, dilated",
            [](const AttentionConfig& c) { return std::make_shared<DilatedAttention>(c); });
  add_entry(r, "block_sparse",
            "block-sparse attention, one joint softmax over the active key blocks; config.pattern = all, "
            "local_window, dilated, global_local, random or adaptive; docs/attention.md, block-sparse",
            [](const AttentionConfig& c) { return make_block_sparse(c); });
  add_entry(r, "block_sparse_adaptive",
            "block-sparse attention with a learned pattern: top-k blocks of a trained scorer, whose score biases "
            "the kept blocks' logits; docs/attention.md, block-sparse",
            [](const AttentionConfig& c) { return std::make_shared<AdaptiveBlockSparseAttention>(c); });
  add_entry(r, "hilbert",
            "Hilbert token ordering (config.grid or a square N) around config.inner_variant; "
            "docs/attention.md, Hilbert ordering",
            [](const AttentionConfig& c) { return std::make_shared<HilbertOrderAttention>(c); });
  add_entry(r, "ring",
            "sequence parallel over config.ranks ranks: K/V chunks travel a ring, partials merge by lse; wraps "
            "config.inner_variant (dense or dilated); docs/attention.md, parallel variants",
            [](const AttentionConfig& c) { return std::make_shared<RingAttention>(c); });
  add_entry(r, "head_parallel",
            "Ulysses head parallel over config.ranks ranks: all-to-all to H/P heads of the full sequence, wraps "
            "config.inner_variant with global head indices; docs/attention.md, parallel variants",
            [](const AttentionConfig& c) { return std::make_shared<HeadParallelAttention>(c); });
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

void register_attention(const std::string& name, const std::string& description, AttentionFactory factory) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  add_entry(r, name, description, std::move(factory));
}

std::string attention_description(const std::string& name) {
  std::unique_lock<std::mutex> lock;
  Registry& r = ready(lock);
  auto it = r.entries.find(name);
  LT_CHECK(it != r.entries.end(), "attention_description: unknown attention variant '", name, "'; registered: ",
           joined_names(r));
  return it->second.description;
}

}  // namespace longtape::attention
