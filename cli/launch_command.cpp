// `longtape launch`: starts the processes of a multi-process job on this host, as torchrun does.
//
//   longtape launch --nproc N [--nnodes M --node-rank K] [--master-addr A] [--master-port P]
//       [--timeout S] [--grace G] -- COMMAND [ARGS...]
//
// Starts N copies of COMMAND ("longtape" means this executable), each with RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (default 127.0.0.1), MASTER_PORT (a free port unless
// given), LONGTAPE_DIST_TIMEOUT (--timeout: how long a rank waits for a peer, default 60 s),
// NCCL_NVLS_ENABLE=0 and, unless already set, OMP_NUM_THREADS (the cores shared among the
// processes). Rank 0 serves the store (nn/dist/store.h) at MASTER_ADDR:MASTER_PORT.
//
// When every process exits 0, so does the launcher. When one exits non-zero or dies by a signal,
// the launcher names it, sends SIGTERM to the others (their whole process groups), SIGKILL to
// those still running --grace seconds later, and exits non-zero (the failed process's exit
// status, or 128 + its signal). SIGINT/SIGTERM to the launcher stop the job the same way.
//
// Several hosts: run the same command on each host with --nnodes M, its own --node-rank K and
// the same --master-addr (node 0's address on the network) and --master-port; ranks are
// K * N + local rank.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "cli/command_registry.h"
#include "cli/numeric_flags.h"
#include "nn/dist/socket.h"
#include "tensor/error.h"

extern char** environ;

namespace longtape::cli {

namespace {

struct LaunchArgs {
  int nproc = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  double timeout = 60;
  double grace = 5;
  std::vector<std::string> command;
};

volatile sig_atomic_t g_stop_signal = 0;

void on_stop_signal(int sig) { g_stop_signal = sig; }

struct Child {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

std::string signal_text(int sig) {
  const char* name = sigabbrev_np(sig);
  return std::string("signal ") + (name ? std::string("SIG") + name + " " : "") + "(" + std::to_string(sig) + ")";
}

std::string status_text(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "was killed by " + signal_text(WTERMSIG(status));
  return "stopped with wait status " + std::to_string(status);
}

// This executable, for a command that starts with "longtape".
std::string self_path() {
  char path[4096] = {};
  const ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
  return n > 0 ? std::string(path, static_cast<size_t>(n)) : "longtape";
}

std::vector<std::string> child_environment(const LaunchArgs& a, int rank, int local_rank, int port) {
  std::map<std::string, std::string> set = {
      {"RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(a.nproc * a.nnodes)},
      {"LOCAL_RANK", std::to_string(local_rank)},
      {"LOCAL_WORLD_SIZE", std::to_string(a.nproc)},
      {"GROUP_RANK", std::to_string(a.node_rank)},
      {"MASTER_ADDR", a.master_addr},
      {"MASTER_PORT", std::to_string(port)},
      {"LONGTAPE_DIST_TIMEOUT", std::to_string(a.timeout)},
      // NVLink multicast (NVLS) reserves memory and is unavailable on some hosts; plain rings work everywhere.
      {"NCCL_NVLS_ENABLE", "0"},
  };
  if (std::getenv("OMP_NUM_THREADS") == nullptr) {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    set["OMP_NUM_THREADS"] = std::to_string(std::max(1u, cores / static_cast<unsigned>(a.nproc)));
  }
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (set.count(name) == 0) env.push_back(entry);
  }
  for (const auto& [name, value] : set) env.push_back(name + "=" + value);
  return env;
}

pid_t start_child(const std::vector<std::string>& command, const std::vector<std::string>& env) {
  // Everything the child needs is prepared before fork (after it only async-signal-safe calls).
  std::vector<char*> argv, envp;
  for (const std::string& s : command) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);
  for (const std::string& s : env) envp.push_back(const_cast<char*>(s.c_str()));
  envp.push_back(nullptr);
  const std::string failed = "longtape launch: cannot run " + command[0] + "\n";
  const pid_t launcher = getpid();
  const pid_t pid = fork();
  LT_CHECK(pid >= 0, "launch: fork() failed: ", std::strerror(errno));
  if (pid == 0) {
    setpgid(0, 0);  // its own process group, so stopping it also stops what it started
    // A launcher killed outright (SIGKILL) takes its ranks with it.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != launcher) _exit(128 + SIGKILL);
    execvpe(argv[0], argv.data(), envp.data());
    const ssize_t ignored = write(2, failed.data(), failed.size());
    (void)ignored;
    _exit(127);
  }
  setpgid(pid, pid);
  return pid;
}

// Reaps the children that have exited; returns those that failed, in the order reaped.
std::vector<Child*> reap(std::vector<Child>& children, bool pause) {
  std::vector<Child*> failed;
  while (true) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) break;
    for (Child& c : children) {
      if (c.pid != pid || !c.running) continue;
      c.running = false;
      c.status = status;
      if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) failed.push_back(&c);
    }
  }
  if (failed.empty() && pause) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return failed;
}

bool any_running(const std::vector<Child>& children) {
  for (const Child& c : children)
    if (c.running) return true;
  return false;
}

// SIGTERM to every running child's process group, SIGKILL after `grace` seconds.
void stop_all(std::vector<Child>& children, double grace) {
  for (const Child& c : children)
    if (c.running) killpg(c.pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace * 1000));
  while (any_running(children) && std::chrono::steady_clock::now() < deadline) reap(children, true);
  for (const Child& c : children)
    if (c.running) killpg(c.pid, SIGKILL);
  while (any_running(children)) reap(children, true);
}

int run_launch(const LaunchArgs& args) {
  LaunchArgs a = args;
  LT_CHECK(!a.command.empty(), "launch: expected a command after --, e.g. `longtape launch --nproc 2 -- longtape train "
                               "--parallel data`");
  if (a.node_rank >= a.nnodes)
    throw FlagError("--node-rank " + std::to_string(a.node_rank) + " must be below --nnodes " + std::to_string(a.nnodes));
  if (a.nnodes > 1 && a.master_port == 0)
    throw FlagError("--nnodes " + std::to_string(a.nnodes) +
                    " needs --master-port (and --master-addr): every host must name the same store");
  const int port = a.master_port > 0 ? a.master_port : dist::net::free_port();
  if (a.command[0] == "longtape") a.command[0] = self_path();

  struct sigaction stop {};
  stop.sa_handler = on_stop_signal;
  sigemptyset(&stop.sa_mask);
  sigaction(SIGINT, &stop, nullptr);
  sigaction(SIGTERM, &stop, nullptr);
  sigaction(SIGHUP, &stop, nullptr);

  std::vector<Child> children(static_cast<size_t>(a.nproc));
  for (int local = 0; local < a.nproc; ++local) {
    Child& c = children[static_cast<size_t>(local)];
    c.rank = a.node_rank * a.nproc + local;
    try {
      c.pid = start_child(a.command, child_environment(a, c.rank, local, port));
      c.running = true;
    } catch (const Error&) {
      stop_all(children, a.grace);
      throw;
    }
  }
  std::fflush(stdout);
  while (any_running(children)) {
    if (g_stop_signal != 0) {
      const int sig = g_stop_signal;
      std::fprintf(stderr, "longtape launch: got %s; stopping all ranks\n", signal_text(sig).c_str());
      stop_all(children, a.grace);
      return 128 + sig;
    }
    std::vector<Child*> failed = reap(children, true);
    if (!failed.empty()) {
      // A rank that fails usually makes its peers fail a moment later (their connections close):
      // collect those too, and name a rank killed by a signal first (it is the likelier cause).
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      for (Child* more : reap(children, false)) failed.push_back(more);
      std::stable_sort(failed.begin(), failed.end(),
                       [](const Child* x, const Child* y) { return WIFSIGNALED(x->status) && !WIFSIGNALED(y->status); });
      for (const Child* f : failed)
        std::fprintf(stderr, "longtape launch: rank %d (pid %d) %s\n", f->rank, static_cast<int>(f->pid),
                     status_text(f->status).c_str());
      if (any_running(children)) std::fprintf(stderr, "longtape launch: stopping the other ranks\n");
      std::fflush(stderr);
      stop_all(children, a.grace);
      const int status = failed.front()->status;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
  }
  return 0;
}

const RegisterCommand kLaunchCommand{
    "launch", "start a multi-process job: N copies of a command with RANK, WORLD_SIZE, MASTER_ADDR/PORT set",
    [](CLI::App& sub) -> std::function<int()> {
      auto a = std::make_shared<LaunchArgs>();
      sub.add_option("--nproc", a->nproc, "processes on this host (one per GPU for NCCL)")->required()
          ->transform(integer_in<int>(1, 1024));
      sub.add_option("--nnodes", a->nnodes, "hosts of the job")->capture_default_str()
          ->transform(integer_in<int>(1, 65536));
      sub.add_option("--node-rank", a->node_rank, "this host's index among them")->capture_default_str()
          ->transform(integer_in<int>(0, 65535));
      sub.add_option("--master-addr", a->master_addr, "address of the host of rank 0 (serves the store)")
          ->capture_default_str();
      sub.add_option("--master-port", a->master_port, "port of the store (default: a free one; required with --nnodes)")
          ->transform(integer_in<int>(1, 65535));
      sub.add_option("--timeout", a->timeout, "seconds a rank waits for a peer before it fails")->capture_default_str()
          ->transform(real_in(0.0, 86400.0 * 365, /*lo_open=*/true));
      sub.add_option("--grace", a->grace, "seconds between SIGTERM and SIGKILL when stopping the ranks")
          ->capture_default_str()
          ->transform(real_in(0.0, 3600.0));
      sub.add_option("command", a->command, "the command each process runs (after --)")->required();
      return [a] { return run_launch(*a); };
    }};

}  // namespace

}  // namespace longtape::cli
