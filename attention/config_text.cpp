#include "attention/config_text.h"

#include <sstream>

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

// The config fields that change what variant `name` computes or how fast, as "field=value" items.
// Unknown variants list every field. Used to label results and to run each distinct setting once.
std::vector<std::string> relevant_config_items(const std::string& name, const attention::AttentionConfig& c) {
  std::vector<std::string> items;
  auto dilated_items = [&] {
    items.push_back("w=" + join_ints(c.segment_lengths));
    items.push_back("r=" + join_ints(c.dilation_rates));
    items.push_back(mixing_name(c.mixing));
  };
  auto block_items = [&](bool adaptive) {
    const std::string pattern = adaptive ? std::string("adaptive") : c.pattern;
    items.push_back(pattern);
    items.push_back("bs=" + std::to_string(c.block_size));
    if (pattern == "local_window" || pattern == "global_local") items.push_back("win=" + std::to_string(c.window));
    if (pattern == "global_local") items.push_back("global=" + std::to_string(c.global_blocks));
    if (pattern == "random" || pattern == "adaptive") items.push_back("density=" + format_number(c.density));
    if (pattern == "random") items.push_back("seed=" + std::to_string(c.seed));
    if (pattern == "dilated") items.push_back("r=" + join_ints(c.dilation_rates));
    if (c.schedule != "natural") items.push_back("schedule=" + c.schedule);
  };
  auto core_items = [&](const std::string& core) {
    if (core == "dense") {
    } else if (core == "dilated") {
      dilated_items();
    } else if (core == "block_sparse") {
      block_items(c.pattern == "adaptive");
    } else if (core == "block_sparse_adaptive") {
      block_items(true);
    } else {
      dilated_items();
      block_items(false);
    }
  };
  if (name == "hilbert" || name == "ring" || name == "head_parallel") {
    items.push_back("inner=" + c.inner_variant);
    core_items(c.inner_variant);
    if (name != "hilbert") items.push_back("P=" + std::to_string(c.ranks));
  } else if (name == "dense" || name == "dilated" || name == "block_sparse" || name == "block_sparse_adaptive") {
    core_items(name);
    if (c.order != "natural") items.push_back("order=" + c.order);
  } else {
    core_items(name);
    items.push_back("order=" + c.order);
    items.push_back("P=" + std::to_string(c.ranks));
    items.push_back("inner=" + c.inner_variant);
  }
  if (c.causal) items.push_back("causal");
  if (c.impl != "auto") items.push_back("impl=" + c.impl);  // a requested implementation changes the cost
  return items;
}

std::string config_label(const std::string& name, const attention::AttentionConfig& c) {
  std::string label;
  for (const std::string& item : relevant_config_items(name, c)) label += (label.empty() ? "" : " ") + item;
  return label.empty() ? "-" : label;
}

}  // namespace longtape::attention
