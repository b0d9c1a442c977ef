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

// The "field=value" items of the dilated fields (segments, rates, mixing) and of the block-sparse
// ones (pattern, block size and what the pattern reads; `adaptive` names the learned pattern).
std::vector<std::string> dilated_config_items(const AttentionConfig& c);
std::vector<std::string> block_sparse_config_items(const AttentionConfig& c, bool adaptive);

// The config fields that change what variant `name` computes or how fast, as "field=value" items:
// what the registry says the variant reads (a wrapper: its inner variant's fields), a non-natural
// token order, causal and a requested implementation. A variant that declares nothing, or an
// unknown name, lists every field. Used to label results and to run each distinct setting once.
std::vector<std::string> relevant_config_items(const std::string& name, const AttentionConfig& c);

// The items above joined by spaces; "-" when there are none.
std::string config_label(const std::string& name, const AttentionConfig& c);

// Whether variant `name` with config `c` runs on a 2-d token grid (config.grid), which must then
// fit the sequence length: a variant that says so, or any variant in the Hilbert token order.
bool uses_token_grid(const std::string& name, const AttentionConfig& c);

}  // namespace longtape::attention
