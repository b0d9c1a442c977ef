// `longtape dist-check`: checks the process group of a job started by `longtape launch`.
//
//   longtape launch --nproc 2 -- longtape dist-check [--backend auto|tcp|nccl] [--device auto|cpu|cuda]
//       [--seed S] [--out DIR] [--bench-mb M]
//       [--attention N [--repeats R] [--head-groups G,..] [--token-chunks K,..] [--attention-cores C,..]]
//       [--fail-rank R --fail-how kill|exit|hang]
//
// Every rank runs every operation of the Communicator interface and compares the results with
// float64 references (nn/dist/selftest.h); with --out, rank r writes its results to
// DIR/rank<r>.safetensors (for comparing backends). --bench-mb times all_reduce of M MiB of f32
// and prints the bandwidth on rank 0. --attention N runs ring and head_parallel attention at
// sequence length N over the group against one device (cli/dist_attention.h). --fail-rank
// makes that rank fail after the checks (killed by SIGKILL, an error exit, or hanging) while the
// others run one more all_reduce: the job must end with an error naming it (from the launcher,
// or from the others' timeout), never hang.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "attention/config.h"
#include "attention/config_text.h"
#include "cli/command_registry.h"
#include "cli/dist_attention.h"
#include "cli/numeric_flags.h"
#include "io/safetensors.h"
#include "io/tensor_io.h"
#include "nn/dist/process_group.h"
#include "nn/dist/selftest.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::cli {

namespace {

struct DistCheckArgs {
  std::string backend = "auto";
  std::string device = "auto";
  uint64_t seed = 0;
  std::string out;
  double bench_mb = 0;
  int fail_rank = -1;
  std::string fail_how = "kill";
  int64_t attention_n = 0;
  int repeats = 5;
  std::string head_groups = "0";
  std::string token_chunks = "0";
  std::string chunk_layouts = "one_rank";
  std::string attention_cores = "dense,dilated";
};

void bench_all_reduce(dist::ProcessGroup& group, double mebibytes) {
  dist::Communicator& comm = group.comm();
  const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(mebibytes * 1024 * 1024 / 4));
  const Tensor x = Tensor::randn({n}, DType::f32, group.device());
  Tensor sink = comm.all_reduce(x);  // warm-up (connections, buffers)
  (void)sink.to(Device::cpu()).numel();
  comm.barrier();
  constexpr int kIterations = 10;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kIterations; ++i) sink = comm.all_reduce(x);
  sink.narrow(0, 0, 1).item();  // waits for the device
  comm.barrier();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kIterations;
  if (comm.rank() == 0) {
    const double bytes = static_cast<double>(n) * 4;
    const double p = comm.size();
    std::printf("all_reduce %.1f MiB f32 on %d ranks (%s): %.3f ms, algorithm bandwidth %.2f GB/s, bus bandwidth "
                "%.2f GB/s\n",
                bytes / (1024 * 1024), comm.size(), group.backend().c_str(), seconds * 1e3, bytes / seconds / 1e9,
                bytes / seconds / 1e9 * 2 * (p - 1) / p);
  }
}

int run_dist_check(const DistCheckArgs& a) {
  if (a.fail_how != "kill" && a.fail_how != "exit" && a.fail_how != "hang")
    throw FlagError("--fail-how must be kill, exit or hang, got \"" + a.fail_how + "\"");
  Device device = Device::cpu();
  if (a.device == "cuda" || (a.device == "auto" && cuda_available())) device = Device::cuda();
  else if (a.device != "cpu" && a.device != "auto")
    throw FlagError("--device must be auto, cpu or cuda, got \"" + a.device + "\"");
  LT_CHECK(!device.is_cuda() || cuda_available(), "dist-check: --device cuda was asked for, but no CUDA device is "
                                                  "available in this build or on this machine");
  if (!a.out.empty()) std::filesystem::create_directories(a.out);

  auto group = dist::init_process_group({a.backend, device});
  dist::Communicator& comm = group->comm();
  LT_CHECK(a.fail_rank < comm.size(), "dist-check: --fail-rank ", a.fail_rank, " is not a rank of this job (",
           comm.size(), " ranks)");
  const auto t0 = std::chrono::steady_clock::now();
  const auto results = dist::check_collectives(comm, group->device(), a.seed);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!a.out.empty()) {
    io::SafetensorsFile file;
    file.metadata = {{"rank", std::to_string(comm.rank())}, {"world_size", std::to_string(comm.size())},
                     {"backend", group->backend()}};
    for (const auto& [name, t] : results) file.add(name, io::raw_from_tensor(t));
    io::write_safetensors((std::filesystem::path(a.out) / ("rank" + std::to_string(comm.rank()) + ".safetensors")).string(),
                          file);
  }
  if (comm.rank() == 0) {
    std::printf("dist-check: %zu results on each of %d ranks match their float64 references (backend %s, %s, %.3f s; "
                "start_all_to_all over %s)\n",
                results.size(), comm.size(), group->backend().c_str(), group->device().str().c_str(), seconds,
                comm.all_to_all_transport().c_str());
    std::fflush(stdout);
  }
  if (a.bench_mb > 0) bench_all_reduce(*group, a.bench_mb);
  // bf16 attention on tensor cores: the group's result and one device's differ by rounding.
  if (a.attention_n > 0)
    check_parallel_attention(*group, a.attention_n, a.seed, a.repeats, group->device().is_cuda() ? 3e-2 : 1e-4,
                             attention::parse_int_list(a.head_groups, "--head-groups"),
                             attention::split_list(a.attention_cores, ','),
                             a.token_chunks.empty() ? std::vector<int64_t>{}
                                                    : attention::parse_int_list(a.token_chunks, "--token-chunks"),
                             attention::split_list(a.chunk_layouts, ','));

  if (a.fail_rank >= 0) {
    if (comm.rank() == a.fail_rank) {
      std::fprintf(stderr, "dist-check: rank %d fails on purpose (%s)\n", comm.rank(), a.fail_how.c_str());
      std::fflush(stderr);
      if (a.fail_how == "kill") raise(SIGKILL);
      if (a.fail_how == "hang")
        while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
      LT_CHECK(false, "dist-check: rank ", comm.rank(), " failed on purpose (--fail-rank)");
    }
    // The others wait for the failed rank in a collective: it must end with an error, not hang.
    Tensor after = comm.all_reduce(Tensor::ones({1024}, DType::f32, group->device()));
    after.narrow(0, 0, 1).item();
    comm.barrier();
    LT_CHECK(false, "dist-check: rank ", comm.rank(), " completed a collective without rank ", a.fail_rank);
  }
  return 0;
}

const RegisterCommand kDistCheckCommand{
    "dist-check", "check the process group of a job started by `longtape launch` (every collective, failures)",
    [](CLI::App& sub) -> std::function<int()> {
      auto a = std::make_shared<DistCheckArgs>();
      sub.add_option("--backend", a->backend, "auto (nccl on CUDA, else tcp), tcp or nccl")->capture_default_str();
      sub.add_option("--device", a->device, "auto (cuda when available), cpu or cuda")->capture_default_str();
      sub.add_option("--seed", a->seed, "seed of the ranks' inputs")->capture_default_str()
          ->transform(integer_in<uint64_t>());
      sub.add_option("--out", a->out, "write each rank's results to DIR/rank<r>.safetensors");
      sub.add_option("--bench-mb", a->bench_mb, "also time all_reduce of this many MiB of f32")
          ->transform(real_in(0.0, 65536.0));
      sub.add_option("--attention", a->attention_n,
                     "also run ring and head_parallel attention at this sequence length against one device")
          ->check(CLI::PositiveNumber);
      sub.add_option("--repeats", a->repeats, "timed repetitions of --attention")->capture_default_str()
          ->check(CLI::PositiveNumber);
      sub.add_option("--head-groups", a->head_groups,
                     "--attention: run head_parallel once per pipeline group count in this list (0 = automatic, "
                     "1 = all-to-alls not overlapped), e.g. 1,0")
          ->capture_default_str();
      sub.add_option("--token-chunks", a->token_chunks,
                     "--attention: then run head_parallel once per token chunk count in this list (0 = automatic; "
                     "head groups where the pattern allows no token chunks; empty = none), e.g. 0,2")
          ->capture_default_str();
      sub.add_option("--chunk-layouts", a->chunk_layouts,
                     "--attention: run each --token-chunks entry once per token chunk layout in this list "
                     "(one_rank, every_rank), e.g. one_rank,every_rank")
          ->capture_default_str();
      sub.add_option("--attention-cores", a->attention_cores,
                     "--attention: the single-device variants to run inside ring and head_parallel (dense, dilated)")
          ->capture_default_str();
      sub.add_option("--fail-rank", a->fail_rank, "this rank fails after the checks (to test failure handling)")
          ->transform(integer_in<int>(0, 1 << 20));
      sub.add_option("--fail-how", a->fail_how, "kill (SIGKILL), exit (an error) or hang")->capture_default_str();
      return [a] { return run_dist_check(*a); };
    }};

}  // namespace

}  // namespace longtape::cli
