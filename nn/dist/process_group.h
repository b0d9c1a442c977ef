#pragma once
// One process per rank: the job's environment as `longtape launch` (or torchrun) sets it, and
// the process group built from it (the store, then the NCCL group for CUDA or the TCP group for
// CPU tensors).
//
//   RANK, WORLD_SIZE          this process's rank among all processes, and their number
//   LOCAL_RANK, LOCAL_WORLD_SIZE   the same on this host (LOCAL_RANK picks the GPU)
//   MASTER_ADDR, MASTER_PORT  where rank 0 serves the store (nn/dist/store.h)
//   LONGTAPE_DIST_TIMEOUT     seconds any rank waits for a peer before failing (default 60)
//
// Without WORLD_SIZE the process is a group of one (a store on a free local port).
#include <chrono>
#include <memory>
#include <string>

#include "nn/dist/communicator.h"
#include "nn/dist/store.h"

namespace longtape::dist {

struct LaunchEnvironment {
  int rank = 0, world_size = 1;
  int local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: none given (a group of one serves a free port)
  bool launched = false;  // WORLD_SIZE was set
  std::chrono::milliseconds timeout{60000};
};

// Reads and checks the variables above (a malformed or inconsistent value throws, naming it).
LaunchEnvironment launch_environment();

struct ProcessGroupOptions {
  std::string backend = "auto";  // auto (nccl for a CUDA device, else tcp), tcp or nccl
  Device device = Device::cpu();  // where this rank computes; CUDA: its index is replaced by LOCAL_RANK
};

// The store, the communicator of all ranks and what they were made from. The communicator is
// destroyed before the store (rank 0's store outlives every peer's set-up).
class ProcessGroup {
 public:
  ProcessGroup(LaunchEnvironment env, std::unique_ptr<TcpStore> store, std::shared_ptr<Communicator> comm,
               std::string backend, Device device);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  Communicator& comm() { return *comm_; }
  std::shared_ptr<Communicator> shared_comm() { return comm_; }
  const LaunchEnvironment& env() const { return env_; }
  const std::string& backend() const { return backend_; }
  // This rank's device (cuda:LOCAL_RANK for the NCCL group).
  Device device() const { return device_; }
  TcpStore& store() { return *store_; }

 private:
  LaunchEnvironment env_;
  std::unique_ptr<TcpStore> store_;
  std::shared_ptr<Communicator> comm_;
  std::string backend_;
  Device device_;
};

// Collective over the job's processes: connects to the store (rank 0 serves it) and builds the
// group. The result can be made current for the process (set_process_communicator) so that
// modules with a rank-local mode (ring, head_parallel) run over it.
std::unique_ptr<ProcessGroup> init_process_group(const ProcessGroupOptions& options = {});

}  // namespace longtape::dist
