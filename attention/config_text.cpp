#include "attention/config_text.h"

#include <optional>
#include <sstream>

#include "attention/registry.h"

namespace longtape::attention {

// Splits "a,b;c" on `sep`, trimming spaces; empty items are dropped.
std::vector<std::string> split_list(const std::string& text, char sep) {
  std::vector<std::string> items;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, sep)) {
    const size_t a = item.find_first_not_of(" \t");
    const size_t b = item.find_last_not_of(" \t");
    if (a != std::string::npos) items.push_back(item.substr(a, b - a + 1));
  }
  return items;
}

std::string join_ints(const std::vector<int64_t>& values, const char* sep) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? sep : "") + std::to_string(values[i]);
  return out;
}

std::string format_number(double value) {
  std::ostringstream os;
  os << value;
  return os.str();
}

std::vector<std::string> dilated_config_items(const AttentionConfig& c) {
  return {"w=" + join_ints(c.segment_lengths), "r=" + join_ints(c.dilation_rates), mixing_name(c.mixing)};
}

std::vector<std::string> block_sparse_config_items(const AttentionConfig& c, bool adaptive) {
  std::vector<std::string> items;
  const std::string pattern = adaptive ? std::string("adaptive") : c.pattern;
  items.push_back(pattern);
  items.push_back("bs=" + std::to_string(c.block_size));
  if (pattern == "local_window" || pattern == "global_local") items.push_back("win=" + std::to_string(c.window));
  if (pattern == "global_local") items.push_back("global=" + std::to_string(c.global_blocks));
  if (pattern == "random" || pattern == "adaptive") items.push_back("density=" + format_number(c.density));
  if (pattern == "random") items.push_back("seed=" + std::to_string(c.seed));
  if (pattern == "dilated") items.push_back("r=" + join_ints(c.dilation_rates));
  if (c.schedule != "natural") items.push_back("schedule=" + c.schedule);
  return items;
}

namespace {

void append(std::vector<std::string>& items, const std::vector<std::string>& more) {
  items.insert(items.end(), more.begin(), more.end());
}

// The fields of a variant that declares none (or is not registered): every field it might read.
std::vector<std::string> every_core_item(const AttentionConfig& c) {
  std::vector<std::string> items = dilated_config_items(c);
  append(items, block_sparse_config_items(c, false));
  return items;
}

// The fields of the core variant a wrapper runs.
std::vector<std::string> inner_items(const std::string& inner, const AttentionConfig& c) {
  const std::optional<VariantTraits> traits = find_variant_traits(inner);
  if (traits && !traits->wraps_inner_variant && traits->config_items) return traits->config_items(c);
  return every_core_item(c);
}

}  // namespace

std::vector<std::string> relevant_config_items(const std::string& name, const AttentionConfig& c) {
  std::vector<std::string> items;
  const std::optional<VariantTraits> traits = find_variant_traits(name);
  if (traits && traits->wraps_inner_variant) {
    items.push_back("inner=" + c.inner_variant);
    append(items, inner_items(c.inner_variant, c));
    if (traits->splits_over_ranks) items.push_back("P=" + std::to_string(c.ranks));
    if (name == "ring" && c.ring_layout != "contiguous") items.push_back("layout=" + c.ring_layout);
  } else if (traits && traits->config_items) {
    append(items, traits->config_items(c));
    if (c.order != "natural") items.push_back("order=" + c.order);
  } else {
    append(items, every_core_item(c));
    items.push_back("order=" + c.order);
    items.push_back("P=" + std::to_string(c.ranks));
    items.push_back("inner=" + c.inner_variant);
  }
  if (c.causal) items.push_back("causal");
  if (c.impl != "auto") items.push_back("impl=" + c.impl);  // a requested implementation changes the cost
  return items;
}

std::string config_label(const std::string& name, const AttentionConfig& c) {
  std::string label;
  for (const std::string& item : relevant_config_items(name, c)) label += (label.empty() ? "" : " ") + item;
  return label.empty() ? "-" : label;
}

bool uses_token_grid(const std::string& name, const AttentionConfig& c) {
  if (c.order == "hilbert") return true;
  const std::optional<VariantTraits> traits = find_variant_traits(name);
  return traits && traits->uses_token_grid;
}

}  // namespace longtape::attention
