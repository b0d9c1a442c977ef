#pragma once
// Running the built `longtape` command line from tests: a fresh scratch folder, the binary (from
// LONGTAPE_BIN, set by CTest) and a shell command with its exit code and captured output.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace longtape::testing {

// An empty folder under the system temp folder, unique per process and call.
inline std::filesystem::path fresh_dir(const std::string& name) {
  static int counter = 0;
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("longtape_" + name + "_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

inline std::filesystem::path longtape_binary() {
  const char* bin = std::getenv("LONGTAPE_BIN");
  return std::filesystem::path(bin ? bin : "bin") / "longtape";
}

// Tests that run the executable are skipped (doctest's skip), never passed, when it was not built
// (LONGTAPE_BUILD_EXAMPLES=OFF) or LONGTAPE_BIN points elsewhere.
inline bool longtape_binary_missing() { return !std::filesystem::exists(longtape_binary()); }

struct CommandResult {
  int code = -1;
  std::string output;
};

// Runs a shell command, output (stdout and stderr) captured through the file `log`.
inline CommandResult run_command(const std::string& command, const std::filesystem::path& log) {
  const std::string full = command + " > '" + log.string() + "' 2>&1";
  const int status = std::system(full.c_str());
  CommandResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  r.output = text.str();
  return r;
}

}  // namespace longtape::testing
