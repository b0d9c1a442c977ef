#pragma once
// Text forms of attention settings: comma-separated lists, numbers as tables print them, and the
// short label that names a configuration in tables, plots and progress lines.
#include <string>
#include <vector>

#include "attention/config.h"

namespace longtape::attention {

// Splits "a,b;c" on `sep`, trimming spaces; empty items are dropped.
std::vector<std::string> split_list(const std::string& text, char sep);

// {1, 2, 4} -> "1,2,4".
std::string join_ints(const std::vector<int64_t>& values, const char* sep = ",");

// A number as an ostream prints it by default ("0.25", "1e+06").
std::string format_number(double value);

// The config fields that change what variant `name` computes or how fast, as "field=value" items.
// Unknown variants list every field. Used to label results and to run each distinct setting once.
std::vector<std::string> relevant_config_items(const std::string& name, const AttentionConfig& c);

// The items above joined by spaces; "-" when there are none.
std::string config_label(const std::string& name, const AttentionConfig& c);

}  // namespace longtape::attention
