// The longtape command line: `longtape <subcommand> [options]`.
//
// Exit status: 0 success; 2 (kUsageExitCode) a command line refused before any work: an unknown
// or missing option, a flag value that is not a number in the flag's range, sizes too large to
// run (cli/numeric_flags.h, cli/size_limits.h); 1 an error while running. Errors are one line on
// stderr.
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <iostream>

#include "cli/command_registry.h"
#include "cli/numeric_flags.h"
#include "tensor/error.h"

namespace longtape::cli {
std::vector<Command>& commands() {
  static std::vector<Command> all;
  return all;
}
}  // namespace longtape::cli

namespace {
// A fatal signal writes the call stack to stderr (binary offsets: `addr2line -C -f -e longtape`)
// before the process dies of it as it would have, so a crash report says where.
void report_fatal_signal(int sig) {
  const char head[] = "longtape: fatal signal; call stack:\n";
  (void)!write(STDERR_FILENO, head, sizeof head - 1);
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}
}  // namespace

int main(int argc, char** argv) {
  using namespace longtape::cli;
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) signal(sig, report_fatal_signal);
  CLI::App app{"longtape: dilated-attention variants, training and benchmarks"};
  app.require_subcommand(1);
  std::function<int()> run;
  for (auto& cmd : commands()) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.description);
    auto body = std::make_shared<std::function<int()>>(cmd.setup(*sub));
    sub->callback([body, &run] { run = *body; });
  }
  enforce_numeric_checks(app);
  // "longtape train" when argv names a subcommand, for the error line.
  std::string who = "longtape";
  if (argc > 1)
    for (const auto& cmd : commands())
      if (cmd.name == argv[1]) who += " " + cmd.name;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help
    std::cerr << one_line(who + ": error: " + e.what()) << "\n";
    return kUsageExitCode;
  }
  try {
    return run ? run() : 0;
  } catch (const FlagError& e) {
    std::cerr << one_line(who + ": error: " + e.what()) << "\n";
    return kUsageExitCode;
  } catch (const longtape::Error& e) {
    std::cerr << "longtape: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "longtape: unexpected error: " << e.what() << "\n";
    return 1;
  }
}
