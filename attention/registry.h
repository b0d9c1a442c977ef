#pragma once
// make_attention(name, config): every registered variant is constructible from the config and
// callable the same way. Built-in variants are listed in registry.cpp (explicit calls, because a
// static library drops unreferenced self-registering objects); users may register their own.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attention/attention.h"

namespace longtape::attention {

using AttentionFactory = std::function<std::shared_ptr<Attention>(const AttentionConfig&)>;

std::shared_ptr<Attention> make_attention(const std::string& name, const AttentionConfig& config);
std::vector<std::string> registered_attention_names();  // sorted
void register_attention(const std::string& name, const std::string& description, AttentionFactory factory);
std::string attention_description(const std::string& name);

}  // namespace longtape::attention
