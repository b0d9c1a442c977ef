#pragma once
// Subcommands of the `longtape` executable register themselves here (one file per subcommand).
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace longtape::cli {

struct Command {
  std::string name;
  std::string description;
  // Adds the subcommand's options to `sub` and returns the function that runs it.
  std::function<std::function<int()>(CLI::App& sub)> setup;
};

std::vector<Command>& commands();

struct RegisterCommand {
  RegisterCommand(std::string name, std::string description,
                  std::function<std::function<int()>(CLI::App&)> setup) {
    commands().push_back({std::move(name), std::move(description), std::move(setup)});
  }
};

}  // namespace longtape::cli
