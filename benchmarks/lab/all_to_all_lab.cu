// All-to-all lab: how fast NCCL moves head_parallel's pieces between the GPUs of one host, and how
// much it slows a compute-bound kernel running beside it. One process per GPU (forked here; rank 0
// writes the NCCL id to a file the others read). Built and run by all_to_all_lab.sh.
//   all_to_all_lab --ranks P --piece-mb M --repeats R
// Ways of exchanging (each: every rank sends one piece of M MiB to every other rank):
//   sendrecv      grouped ncclSend/ncclRecv per peer on cudaMalloc buffers (what the NCCL backend does)
//   alltoall      ncclAlltoAll on cudaMalloc buffers
//   alltoall-zero ncclAlltoAll on ncclMemAlloc buffers registered as symmetric windows, on a
//                 communicator created with NCCL_CTA_POLICY_ZERO (copy engines where NCCL can)
//   ipc-copy      cudaMemcpyAsync of each piece straight into the peer's receive buffer (opened
//                 through CUDA IPC), one stream per peer: the copy engines, no SM; the time is the
//                 sender's (the receiver would wait on a flag the sender writes after its copies)
//   ipc-copy2d    the same through cudaMemcpy2DAsync as one row
//   ipc-rows      cudaMemcpy2DAsync of 768-byte rows (6 heads of 64 bf16) at a 1536-byte pitch on
//                 both sides (head slices): half the piece's bytes move
// For each: the time of one exchange alone, and a bf16 GEMM loop alone and with 8 exchanges beside it.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    cudaError_t e = (x);                                                                       \
    if (e != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));   \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)
#define CHECK_NCCL(x)                                                                          \
  do {                                                                                         \
    ncclResult_t r = (x);                                                                      \
    if (r != ncclSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, ncclGetErrorString(r));   \
      std::exit(3);                                                                            \
    }                                                                                          \
  } while (0)

namespace {

struct Options {
  int ranks = 2;
  double piece_mb = 96.0;
  int repeats = 10;
  std::string id_file = "/tmp/all_to_all_lab.id";
};

float elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Exchange {
  std::string name;
  ncclComm_t comm = nullptr;
  char* send = nullptr;  // ranks pieces, piece p goes to rank p
  char* recv = nullptr;  // ranks pieces, piece p came from rank p
  bool nccl_memory = false;
  ncclWindow_t send_win = nullptr, recv_win = nullptr;
  std::vector<char*> peer_recv;           // ipc-copy: every rank's receive buffer, opened here
  std::vector<cudaStream_t> peer_streams;  // ipc-copy: one per peer
  std::vector<cudaEvent_t> peer_done;
};

void enqueue(const Exchange& x, int rank, int ranks, size_t piece, cudaStream_t s) {
  if (x.name == "sendrecv") {
    CHECK_NCCL(ncclGroupStart());
    for (int p = 0; p < ranks; ++p) {
      if (p == rank) continue;
      CHECK_NCCL(ncclSend(x.send + p * piece, piece, ncclInt8, p, x.comm, s));
      CHECK_NCCL(ncclRecv(x.recv + p * piece, piece, ncclInt8, p, x.comm, s));
    }
    CHECK_NCCL(ncclGroupEnd());
  } else if (x.name.rfind("ipc-", 0) == 0) {
    cudaEvent_t start = x.peer_done[rank];
    CHECK_CUDA(cudaEventRecord(start, s));
    for (int p = 0; p < ranks; ++p) {
      if (p == rank) continue;
      CHECK_CUDA(cudaStreamWaitEvent(x.peer_streams[p], start, 0));
      char* dst = x.peer_recv[p] + rank * piece;
      const char* src = x.send + p * piece;
      if (x.name == "ipc-copy")
        CHECK_CUDA(cudaMemcpyAsync(dst, src, piece, cudaMemcpyDeviceToDevice, x.peer_streams[p]));
      else if (x.name == "ipc-copy2d")
        CHECK_CUDA(cudaMemcpy2DAsync(dst, piece, src, piece, piece, 1, cudaMemcpyDefault, x.peer_streams[p]));
      else
        CHECK_CUDA(cudaMemcpy2DAsync(dst, 1536, src, 1536, 768, piece / 1536, cudaMemcpyDefault, x.peer_streams[p]));
      CHECK_CUDA(cudaEventRecord(x.peer_done[p], x.peer_streams[p]));
      CHECK_CUDA(cudaStreamWaitEvent(s, x.peer_done[p], 0));
    }
  } else {
    CHECK_NCCL(ncclAlltoAll(x.send, x.recv, piece, ncclInt8, x.comm, s));
  }
}

// Rank r's file `base.r` holds what it publishes; every rank reads every other rank's.
template <typename T>
std::vector<T> publish_all(const std::string& base, int rank, int ranks, const T& mine) {
  const std::string path = base + "." + std::to_string(rank);
  std::ofstream(path + ".tmp", std::ios::binary).write(reinterpret_cast<const char*>(&mine), sizeof mine);
  std::rename((path + ".tmp").c_str(), path.c_str());
  std::vector<T> all(ranks);
  for (int p = 0; p < ranks; ++p)
    for (;;) {
      std::ifstream in(base + "." + std::to_string(p), std::ios::binary);
      if (in && in.read(reinterpret_cast<char*>(&all[p]), sizeof(T))) break;
      usleep(1000);
    }
  return all;
}

void barrier(ncclComm_t comm, float* token, cudaStream_t s) {
  CHECK_NCCL(ncclAllReduce(token, token, 1, ncclFloat32, ncclSum, comm, s));
  CHECK_CUDA(cudaStreamSynchronize(s));
}

int run_rank(const Options& o, int rank) {
  CHECK_CUDA(cudaSetDevice(rank));
  ncclUniqueId id;
  if (rank == 0) {
    CHECK_NCCL(ncclGetUniqueId(&id));
    const std::string tmp = o.id_file + ".tmp";
    std::ofstream(tmp, std::ios::binary).write(reinterpret_cast<const char*>(&id), sizeof id);
    std::rename(tmp.c_str(), o.id_file.c_str());
  } else {
    for (;;) {
      std::ifstream in(o.id_file, std::ios::binary);
      if (in && in.read(reinterpret_cast<char*>(&id), sizeof id)) break;
      usleep(1000);
    }
  }
  const size_t piece = static_cast<size_t>(o.piece_mb * 1048576.0) / 16 * 16;
  const size_t bytes = piece * o.ranks;
  cudaStream_t compute, comm_stream;
  int least = 0, greatest = 0;
  CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CHECK_CUDA(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  CHECK_CUDA(cudaStreamCreateWithPriority(&comm_stream, cudaStreamNonBlocking, greatest));

  std::vector<Exchange> ways;
  for (const char* name : {"sendrecv", "alltoall", "alltoall-zero", "ipc-copy", "ipc-copy2d", "ipc-rows"}) {
    Exchange x;
    x.name = name;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    if (x.name == "alltoall-zero") config.CTAPolicy = NCCL_CTA_POLICY_ZERO;
    CHECK_NCCL(ncclCommInitRankConfig(&x.comm, o.ranks, id, rank, &config));
    if (x.name == "alltoall-zero") {
      x.nccl_memory = true;
      CHECK_NCCL(ncclMemAlloc(reinterpret_cast<void**>(&x.send), bytes));
      CHECK_NCCL(ncclMemAlloc(reinterpret_cast<void**>(&x.recv), bytes));
      CHECK_NCCL(ncclCommWindowRegister(x.comm, x.send, bytes, &x.send_win, NCCL_WIN_COLL_SYMMETRIC));
      CHECK_NCCL(ncclCommWindowRegister(x.comm, x.recv, bytes, &x.recv_win, NCCL_WIN_COLL_SYMMETRIC));
    } else {
      CHECK_CUDA(cudaMalloc(&x.send, bytes));
      CHECK_CUDA(cudaMalloc(&x.recv, bytes));
    }
    if (x.name.rfind("ipc-", 0) == 0) {
      cudaIpcMemHandle_t mine;
      CHECK_CUDA(cudaIpcGetMemHandle(&mine, x.recv));
      const std::vector<cudaIpcMemHandle_t> all = publish_all(o.id_file + ".ipc" + x.name, rank, o.ranks, mine);
      x.peer_recv.assign(o.ranks, nullptr);
      x.peer_streams.assign(o.ranks, nullptr);
      x.peer_done.assign(o.ranks, nullptr);
      for (int p = 0; p < o.ranks; ++p) {
        CHECK_CUDA(cudaStreamCreateWithFlags(&x.peer_streams[p], cudaStreamNonBlocking));
        CHECK_CUDA(cudaEventCreateWithFlags(&x.peer_done[p], cudaEventDisableTiming));
        if (p == rank) x.peer_recv[p] = x.recv;
        else CHECK_CUDA(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&x.peer_recv[p]), all[p],
                                             cudaIpcMemLazyEnablePeerAccess));
      }
    }
    CHECK_CUDA(cudaMemset(x.send, rank + 1, bytes));
    ways.push_back(x);
    // Each communicator needs its own id after the first: derive by re-reading is not possible, so
    // rank 0 publishes a fresh id for the next one.
    if (ways.size() < 6) {
      CHECK_CUDA(cudaDeviceSynchronize());
      const std::string next = o.id_file + "." + std::to_string(ways.size());
      if (rank == 0) {
        CHECK_NCCL(ncclGetUniqueId(&id));
        const std::string tmp = next + ".tmp";
        std::ofstream(tmp, std::ios::binary).write(reinterpret_cast<const char*>(&id), sizeof id);
        std::rename(tmp.c_str(), next.c_str());
      } else {
        for (;;) {
          std::ifstream in(next, std::ios::binary);
          if (in && in.read(reinterpret_cast<char*>(&id), sizeof id)) break;
          usleep(1000);
        }
      }
    }
  }
  float* token = nullptr;
  CHECK_CUDA(cudaMalloc(&token, sizeof(float)));

  // A compute-bound stand-in for the attention core: bf16 GEMMs on every SM.
  const int g = 8192;
  __nv_bfloat16 *a = nullptr, *b = nullptr, *c = nullptr;
  CHECK_CUDA(cudaMalloc(&a, size_t(g) * g * 2));
  CHECK_CUDA(cudaMalloc(&b, size_t(g) * g * 2));
  CHECK_CUDA(cudaMalloc(&c, size_t(g) * g * 2));
  CHECK_CUDA(cudaMemset(a, 0x3c, size_t(g) * g * 2));
  CHECK_CUDA(cudaMemset(b, 0x3c, size_t(g) * g * 2));
  cublasHandle_t blas;
  cublasCreate(&blas);
  cublasSetStream(blas, compute);
  const float one = 1.0f, zero = 0.0f;
  const int gemms = 10;
  auto gemm_loop = [&] {
    for (int i = 0; i < gemms; ++i)
      cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, g, g, g, &one, a, CUDA_R_16BF, g, b, CUDA_R_16BF, g, &zero, c,
                   CUDA_R_16BF, g, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };

  cudaEvent_t e0, e1, e2;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  CHECK_CUDA(cudaEventCreate(&e2));
  for (const Exchange& x : ways) {
    for (int w = 0; w < 3; ++w) enqueue(x, rank, o.ranks, piece, comm_stream);
    std::vector<float> alone, gemm_alone, gemm_beside, comm_beside;
    for (int r = 0; r < o.repeats; ++r) {
      barrier(ways[0].comm, token, comm_stream);
      CHECK_CUDA(cudaEventRecord(e0, comm_stream));
      enqueue(x, rank, o.ranks, piece, comm_stream);
      CHECK_CUDA(cudaEventRecord(e1, comm_stream));
      CHECK_CUDA(cudaEventSynchronize(e1));
      alone.push_back(elapsed_ms(e0, e1));

      barrier(ways[0].comm, token, comm_stream);
      CHECK_CUDA(cudaEventRecord(e0, compute));
      gemm_loop();
      CHECK_CUDA(cudaEventRecord(e1, compute));
      CHECK_CUDA(cudaEventSynchronize(e1));
      gemm_alone.push_back(elapsed_ms(e0, e1));

      barrier(ways[0].comm, token, comm_stream);
      CHECK_CUDA(cudaEventRecord(e0, compute));
      CHECK_CUDA(cudaStreamWaitEvent(comm_stream, e0, 0));
      gemm_loop();
      for (int i = 0; i < 8; ++i) enqueue(x, rank, o.ranks, piece, comm_stream);
      CHECK_CUDA(cudaEventRecord(e1, compute));
      CHECK_CUDA(cudaEventRecord(e2, comm_stream));
      CHECK_CUDA(cudaEventSynchronize(e1));
      CHECK_CUDA(cudaEventSynchronize(e2));
      gemm_beside.push_back(elapsed_ms(e0, e1));
      comm_beside.push_back(elapsed_ms(e0, e2));
    }
    barrier(ways[0].comm, token, comm_stream);
    // Check what arrived: piece p came from rank p, whose bytes are p + 1.
    std::vector<unsigned char> got(o.ranks);
    for (int p = 0; p < o.ranks; ++p)
      CHECK_CUDA(cudaMemcpy(&got[p], x.recv + p * piece + piece / 2, 1, cudaMemcpyDeviceToHost));
    bool ok = true;
    for (int p = 0; p < o.ranks; ++p) ok = ok && (p == rank || got[p] == p + 1);
    if (rank == 0) {
      const double moved = double(piece) * (o.ranks - 1);
      const float t = median(alone);
      std::printf("| %s | %d | %.1f | %.3f | %.0f | %.2f | %.2f | %.2f | %.2f | %s |\n", x.name.c_str(), o.ranks,
                  piece / 1048576.0, t, moved / (t * 1e-3) / 1e9, 8 * t, median(gemm_alone), median(gemm_beside),
                  median(comm_beside), ok ? "ok" : "WRONG DATA");
      std::fflush(stdout);
    }
    if (!ok) return 4;
  }
  for (Exchange& x : ways) {
    if (x.nccl_memory) {
      CHECK_NCCL(ncclCommWindowDeregister(x.comm, x.send_win));
      CHECK_NCCL(ncclCommWindowDeregister(x.comm, x.recv_win));
      ncclMemFree(x.send);
      ncclMemFree(x.recv);
    } else {
      for (int p = 0; p < static_cast<int>(x.peer_recv.size()); ++p)
        if (p != rank) cudaIpcCloseMemHandle(x.peer_recv[p]);
      cudaFree(x.send);
      cudaFree(x.recv);
    }
    ncclCommDestroy(x.comm);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--ranks") o.ranks = std::atoi(argv[i + 1]);
    else if (k == "--piece-mb") o.piece_mb = std::atof(argv[i + 1]);
    else if (k == "--repeats") o.repeats = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "all_to_all_lab: unknown option %s (expected --ranks, --piece-mb, --repeats)\n", k.c_str());
      return 1;
    }
  }
  o.id_file += "." + std::to_string(getpid());
  auto remove_files = [&] {
    for (int i = 0; i < 6; ++i) std::remove((o.id_file + (i ? "." + std::to_string(i) : "")).c_str());
    for (const char* w : {"ipc-copy", "ipc-copy2d", "ipc-rows"})
      for (int r = 0; r < o.ranks; ++r) std::remove((o.id_file + ".ipc" + w + "." + std::to_string(r)).c_str());
  };
  remove_files();
  if (getenv("NCCL_NVLS_ENABLE") == nullptr) setenv("NCCL_NVLS_ENABLE", "0", 1);
  std::printf("| way | ranks | piece MiB | one exchange ms | GB/s out of each rank | 8 exchanges alone ms | "
              "10 GEMMs alone ms | 10 GEMMs beside 8 exchanges ms | 8 exchanges beside GEMMs ms | data |\n"
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
  std::fflush(stdout);
  std::vector<pid_t> kids;
  for (int r = 0; r < o.ranks; ++r) {
    pid_t pid = fork();
    if (pid == 0) _exit(run_rank(o, r));
    kids.push_back(pid);
  }
  int worst = 0;
  for (pid_t pid : kids) {
    int status = 0;
    waitpid(pid, &status, 0);
    worst = std::max(worst, WIFEXITED(status) ? WEXITSTATUS(status) : 9);
  }
  remove_files();
  return worst;
}
