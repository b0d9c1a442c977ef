// The longtape command line: `longtape <subcommand> [options]`.
#include <iostream>

#include "cli/command_registry.h"
#include "tensor/error.h"

namespace longtape::cli {
std::vector<Command>& commands() {
  static std::vector<Command> all;
  return all;
}
}  // namespace longtape::cli

int main(int argc, char** argv) {
  using namespace longtape::cli;
  CLI::App app{"longtape: dilated-attention variants, training and benchmarks"};
  app.require_subcommand(1);
  std::function<int()> run;
  for (auto& cmd : commands()) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.description);
    auto body = std::make_shared<std::function<int()>>(cmd.setup(*sub));
    sub->callback([body, &run] { run = *body; });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run ? run() : 0;
  } catch (const longtape::Error& e) {
    std::cerr << "longtape: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "longtape: unexpected error: " << e.what() << "\n";
    return 1;
  }
}
