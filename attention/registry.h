#pragma once
// make_attention(name, config): every registered variant is constructible from the config and
// callable the same way. Built-in variants are listed in registry.cpp (explicit calls, because a
// static library drops unreferenced self-registering objects); users may register their own.
//
// Each entry also says what the tools around a variant need to know (VariantTraits): which config
// fields it reads (the labels of tables and plots), how many (query, key) pairs it attends (FLOP
// counts), whether it runs on a token grid or wraps another variant. Nothing outside the registry
// holds a list of variant names.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention/attention.h"

namespace longtape::attention {

using AttentionFactory = std::function<std::shared_ptr<Attention>(const AttentionConfig&)>;

struct VariantTraits {
  std::string description;
  AttentionFactory factory;
  // The config fields the variant reads, as "field=value" items (labels; see config_label). No
  // function: not declared, and a label lists every field.
  std::function<std::vector<std::string>(const AttentionConfig&)> config_items;
  // Attended (query, key) pairs of one sequence of n tokens, summed over heads and counted with
  // multiplicity, from the variant's definition; nullopt (or no function) when only running the
  // variant can tell (attention/pattern_map.h probes it then).
  std::function<std::optional<int64_t>(const AttentionConfig&, int64_t n)> attended_pairs;
  // Runs config.inner_variant on a reordered or split sequence: the inner variant's fields and
  // pairs are its own.
  bool wraps_inner_variant = false;
  bool splits_over_ranks = false;  // reads config.ranks
  bool uses_token_grid = false;    // reads config.grid, which must fit the sequence length
  std::string parallel_mode;       // the AttentionConfig::parallel value it implements, if any
};

std::shared_ptr<Attention> make_attention(const std::string& name, const AttentionConfig& config);
std::vector<std::string> registered_attention_names();  // sorted
void register_attention(const std::string& name, VariantTraits traits);
// A variant that declares nothing beyond its description and factory.
void register_attention(const std::string& name, const std::string& description, AttentionFactory factory);
std::string attention_description(const std::string& name);
// The entry of `name`; throws for a name that is not registered, listing those that are.
VariantTraits variant_traits(const std::string& name);
// The same, or nullopt for a name that is not registered.
std::optional<VariantTraits> find_variant_traits(const std::string& name);
// The registered variant that implements AttentionConfig::parallel `mode` ("ring", "head"),
// wrapping config.inner_variant; throws when none does.
std::string parallel_variant(const std::string& mode);

}  // namespace longtape::attention
