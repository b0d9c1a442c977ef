#pragma once
// Internal to the NCCL process group (nn/dist/nccl_communicator.cpp): one ncclComm_t with its
// communication stream, the transfers in flight, the buffered sends and the watchdog that aborts
// the communicator when a transfer outlives the timeout or NCCL reports an asynchronous error.
// Only for builds with NCCL (LONGTAPE_WITH_NCCL).
#ifdef LONGTAPE_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensor/cuda/runtime.h"
#include "nn/dist/communicator.h"
#include "tensor/error.h"

namespace longtape::dist::nccl_detail {

using Clock = std::chrono::steady_clock;

inline double seconds(std::chrono::milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }

inline std::string describe(const Tensor& t) {
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

inline ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
  }
  LT_CHECK(false, "dist (NCCL): unsupported dtype ", dtype_name(dtype));
  return ncclFloat32;
}

inline void cuda_ok(cudaError_t status, const char* what) {
  LT_CHECK(status == cudaSuccess, "dist (NCCL): ", what, " failed: ", cudaGetErrorString(status));
}

// One NCCL communicator with its stream, the transfers in flight and the watchdog that aborts it.
class NcclComm {
 public:
  NcclComm(int rank, int size, int device, CommOptions options)
      : rank_(rank), size_(size), device_(device), options_(options) {
    cuda_ok(cudaSetDevice(device_), "cudaSetDevice");
    // The highest priority: a transfer that overlaps compute (start_all_to_all, start_all_reduce)
    // gets its blocks scheduled as soon as SMs free up, instead of after every queued compute block.
    int least = 0, greatest = 0;
    cuda_ok(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
    cuda_ok(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest), "cudaStreamCreate");
  }

  ~NcclComm() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    watch_changed_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (comm_ != nullptr) {
      // A clean shutdown lets the transfers in flight finish; a failed one was aborted already.
      bool clean = !failed_ && std::uncaught_exceptions() == 0;
      if (clean) {
        try {
          wait_in_flight();
          settle(ncclCommFinalize(comm_), "ncclCommFinalize");
        } catch (const std::exception&) {
          clean = false;
        }
      }
      if (clean) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    for (InFlight& f : in_flight_) cudaEventDestroy(f.done);
    cudaStreamDestroy(stream_);
  }

  // ncclCommInitRankConfig (id from the store) or ncclCommSplit (from `parent`).
  void init(const ncclUniqueId* id, NcclComm* parent, int color, int key) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    if (parent == nullptr) {
      comm_in_setup_ = true;
      ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, *id, rank_, &config);
      settle(r, "ncclCommInitRank (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ")");
    } else {
      std::lock_guard<std::mutex> lock(parent->call_mutex_);
      parent->flush_check("split");
      ncclResult_t r = ncclCommSplit(parent->comm_, color, key, &comm_, &config);
      parent->settle(r, "ncclCommSplit");
      settle(ncclSuccess, "ncclCommSplit (the new communicator)");
    }
    comm_in_setup_ = false;
    if (comm_ != nullptr) {
      int n = 0, r = 0;
      ncclCommCount(comm_, &n);
      ncclCommUserRank(comm_, &r);
      size_ = n;
      rank_ = r;
    }
    watchdog_ = std::thread([this] { watch(); });
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  const CommOptions& options() const { return options_; }

  // Runs `enqueue` (NCCL calls on stream()) after the compute stream's work so far, as one group
  // with the buffered sends; the compute stream waits for it, or, with `deferred`, whoever waits on
  // the event returned there (owned by the caller). `keep` stays alive until it is done.
  void run(const std::string& what, const std::function<void()>& enqueue, std::vector<Tensor> keep,
           cudaEvent_t* deferred = nullptr) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    check_usable(what);
    reap();
    cudaStream_t compute = static_cast<cudaStream_t>(cuda::current_stream());
    cudaEvent_t ready = nullptr, done = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(ready, compute), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(stream_, ready, 0), "cudaStreamWaitEvent");
    cudaEventDestroy(ready);
    nccl_ok(ncclGroupStart(), what);
    for (const Tensor& t : pending_sends_.tensors) keep.push_back(t);
    for (auto& send : pending_sends_.calls) send();
    pending_sends_ = {};
    enqueue();
    settle(ncclGroupEnd(), what);
    cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(done, stream_), "cudaEventRecord");
    if (deferred != nullptr) {
      cuda_ok(cudaEventCreateWithFlags(deferred, cudaEventDisableTiming), "cudaEventCreate");
      cuda_ok(cudaEventRecord(*deferred, stream_), "cudaEventRecord");
    } else {
      cuda_ok(cudaStreamWaitEvent(compute, done, 0), "cudaStreamWaitEvent");
    }
    {
      std::lock_guard<std::mutex> watch_lock(mutex_);
      in_flight_.push_back({done, Clock::now(), what, std::move(keep), false});
    }
    watch_changed_.notify_all();
  }

  // Queues a send, issued with the next call.
  void queue_send(const Tensor& t, int dst) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    check_usable("send to rank " + std::to_string(dst));
    ncclComm_t comm = comm_;
    cudaStream_t stream = stream_;
    pending_sends_.tensors.push_back(t);
    pending_sends_.calls.push_back([this, t, dst, comm, stream] {
      nccl_ok(ncclSend(t.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), dst, comm, stream),
              "ncclSend");
    });
  }

  bool has_pending_sends() {
    std::lock_guard<std::mutex> lock(call_mutex_);
    return !pending_sends_.calls.empty();
  }

  // Blocks the host until every transfer issued so far has finished (at most the timeout).
  void wait_in_flight() {
    std::unique_lock<std::mutex> lock(mutex_);
    const auto deadline = Clock::now() + options_.timeout + std::chrono::milliseconds(500);
    while (true) {
      LT_CHECK(!failed_, failure_);
      bool all_done = true;
      for (InFlight& f : in_flight_)
        if (!f.finished) all_done = all_done && cudaEventQuery(f.done) == cudaSuccess;
      if (all_done) return;
      watch_changed_.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(1)));
      if (Clock::now() >= deadline && !failed_) {
        // The watchdog fails the communicator before this deadline; this is the backstop.
        lock.unlock();
        const std::string message = "dist (NCCL): rank " + std::to_string(rank_) +
                                    ": the transfers in flight did not finish within the timeout";
        fail_and_abort(message);
        throw Error(message);
      }
    }
  }

  void abort(const std::string& why) { fail_and_abort("rank " + std::to_string(rank_) + " aborted: " + why); }

  void check_usable(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    LT_CHECK(!failed_, "dist (NCCL): rank ", rank_, ": ", what, " cannot run: ", failure_);
  }

  void nccl_ok(ncclResult_t r, const std::string& what) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    const std::string message = "dist (NCCL): rank " + std::to_string(rank_) + ": " + what + " failed: " +
                                ncclGetErrorString(r) + " (" + last_error() + ")";
    fail(message);
    abort_comm();
    throw Error(message);
  }

  // Waits until a non-blocking NCCL call has completed its host side (at most the timeout). A
  // collective's launch takes microseconds: the first polls only yield, so a step's collectives
  // do not each cost the caller a sleep's timer slack; a long wait (connecting) then sleeps.
  void settle(ncclResult_t r, const std::string& what) {
    nccl_ok(r, what);
    if (comm_ == nullptr) return;
    const auto deadline = Clock::now() + options_.timeout;
    const auto spin_until = Clock::now() + std::chrono::microseconds(500);
    ncclResult_t state = ncclInProgress;
    while (true) {
      if (failed_) {
        abort_comm();
        throw Error(failure_);
      }
      nccl_ok(ncclCommGetAsyncError(comm_, &state), what);
      if (state != ncclInProgress) break;
      if (Clock::now() >= deadline) {
        const std::string message = "dist (NCCL): rank " + std::to_string(rank_) + ": " + what + " timed out after " +
                                    std::to_string(seconds(options_.timeout)) +
                                    " s (a peer process did not take part: it failed, died or is stuck)";
        fail(message);
        abort_comm();
        throw Error(message);
      }
      if (Clock::now() < spin_until) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    nccl_ok(state, what);
  }

  void flush_check(const std::string& what) {
    check_usable(what);
    LT_CHECK(pending_sends_.calls.empty(), "dist (NCCL): rank ", rank_, ": ", what,
             " while sends are pending; receive or barrier first");
  }

  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

 private:
  struct InFlight {
    cudaEvent_t done;
    Clock::time_point started;
    std::string what;
    std::vector<Tensor> keep;
    bool finished;
  };
  struct PendingSends {
    std::vector<Tensor> tensors;
    std::vector<std::function<void()>> calls;
  };

  std::string last_error() const {
    const char* text = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
    return text != nullptr && *text ? text : "no further detail";
  }

  // Marks the communicator failed and aborts it once (ending its transfers stuck on the GPU).
  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_) return;
      failed_ = true;
      failure_ = message;
    }
    std::fprintf(stderr, "longtape: error: %s; aborting the NCCL communicator\n", message.c_str());
    watch_changed_.notify_all();
  }

  // ncclCommAbort, once; only by the thread that holds call_mutex_ (so no NCCL call of this
  // communicator runs meanwhile). It also ends this communicator's transfers stuck on the GPU.
  void abort_comm() {
    ncclComm_t to_abort = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      to_abort = comm_;
      comm_ = nullptr;
    }
    if (to_abort != nullptr) ncclCommAbort(to_abort);
    watch_changed_.notify_all();
  }

  // Fails the communicator and aborts it now when no call is under way (else that call aborts it).
  void fail_and_abort(const std::string& message) {
    fail(message);
    if (call_mutex_.try_lock()) {
      abort_comm();
      call_mutex_.unlock();
    }
  }

  // Releases the inputs of finished transfers (on the calling thread, which owns the pool blocks).
  void reap() {
    std::lock_guard<std::mutex> lock(mutex_);
    while (!in_flight_.empty() && (in_flight_.front().finished || cudaEventQuery(in_flight_.front().done) == cudaSuccess)) {
      cudaEventDestroy(in_flight_.front().done);
      in_flight_.pop_front();
    }
  }

  // The watchdog: every transfer in flight must finish within the timeout, and NCCL's asynchronous
  // errors (a peer lost over the network) are noticed while nobody calls the communicator.
  void watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_ && !failed_) {
      watch_changed_.wait_for(lock, std::chrono::milliseconds(50));
      if (stopping_ || failed_) break;
      std::string problem;
      for (InFlight& f : in_flight_) {
        if (f.finished) continue;
        const cudaError_t status = cudaEventQuery(f.done);
        if (status == cudaSuccess) {
          f.finished = true;
        } else if (status != cudaErrorNotReady) {
          problem = f.what + " failed on the GPU: " + cudaGetErrorString(status);
          break;
        } else if (Clock::now() - f.started > options_.timeout) {
          problem = f.what + " did not finish within " + std::to_string(seconds(options_.timeout)) +
                    " s (a peer process failed, died or is stuck)";
          break;
        }
      }
      if (problem.empty() && comm_ != nullptr && !comm_in_setup_) {
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state != ncclSuccess && state != ncclInProgress)
          problem = std::string("NCCL reported an asynchronous error: ") + ncclGetErrorString(state);
      }
      if (!problem.empty()) {
        lock.unlock();
        fail_and_abort("dist (NCCL): rank " + std::to_string(rank_) + ": " + problem);
        lock.lock();
      }
    }
  }

  int rank_, size_;
  const int device_;
  const CommOptions options_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::atomic<bool> comm_in_setup_{false};
  std::mutex call_mutex_;  // one call at a time
  PendingSends pending_sends_;
  std::mutex mutex_;       // failure state and in_flight_, shared with the watchdog
  std::condition_variable watch_changed_;
  std::deque<InFlight> in_flight_;
  std::atomic<bool> failed_{false};
  bool stopping_ = false;
  std::string failure_;
  std::thread watchdog_;
};


}  // namespace longtape::dist::nccl_detail

#endif  // LONGTAPE_WITH_NCCL
