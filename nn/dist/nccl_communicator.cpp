#include "nn/dist/nccl_communicator.h"

#include "tensor/error.h"

#ifdef LONGTAPE_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "autograd/grad_mode.h"
#include "cuda/runtime.h"
#include "tensor/ops.h"
#endif

namespace longtape::dist {

#ifndef LONGTAPE_WITH_NCCL

bool nccl_built() { return false; }

std::shared_ptr<Communicator> make_nccl_process_group(TcpStore&, int, int, int, const CommOptions&,
                                                      const std::string&) {
  LT_CHECK(false, "dist: this build has no NCCL process group (it needs the CUDA backend and NCCL: nccl.h and "
                  "libnccl found at configure time); use the TCP group for CPU tensors");
  return nullptr;
}

#else

bool nccl_built() { return true; }

namespace {

using Clock = std::chrono::steady_clock;

double seconds(std::chrono::milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }

std::string describe(const Tensor& t) {
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
  }
  LT_CHECK(false, "dist (NCCL): unsupported dtype ", dtype_name(dtype));
  return ncclFloat32;
}

void cuda_ok(cudaError_t status, const char* what) {
  LT_CHECK(status == cudaSuccess, "dist (NCCL): ", what, " failed: ", cudaGetErrorString(status));
}

// One NCCL communicator with its stream, the transfers in flight and the watchdog that aborts it.
class NcclComm {
 public:
  NcclComm(int rank, int size, int device, CommOptions options)
      : rank_(rank), size_(size), device_(device), options_(options) {
    cuda_ok(cudaSetDevice(device_), "cudaSetDevice");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
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

  // Waits until a non-blocking NCCL call has completed its host side (at most the timeout).
  void settle(ncclResult_t r, const std::string& what) {
    nccl_ok(r, what);
    if (comm_ == nullptr) return;
    const auto deadline = Clock::now() + options_.timeout;
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
      std::this_thread::sleep_for(std::chrono::microseconds(50));
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

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::unique_ptr<NcclComm> comm) : comm_(std::move(comm)) {}
  ~NcclCommunicator() override {
    if (comm_->has_pending_sends() && std::uncaught_exceptions() == 0) {
      try {
        comm_->run("the buffered sends", [] {}, {});  // issues them
        comm_->wait_in_flight();
      } catch (const std::exception&) {
      }
    }
  }

  int rank() const override { return comm_->rank(); }
  int size() const override { return comm_->size(); }
  const CommOptions& options() const override { return comm_->options(); }

  void send(const Tensor& tensor, int dst, int tag) override {
    check_peer(dst, "send", "destination");
    check_tag(tag, "send");
    LT_CHECK(tensor.defined(), "dist send: rank ", rank(), " was given an undefined tensor to send to rank ", dst);
    comm_->queue_send(private_device_copy(tensor), dst);
  }

  Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag) override {
    return start_recv(shape, dtype, device, src, tag, nullptr, -1)->wait();
  }

  std::unique_ptr<PendingRecv> exchange(const Tensor& tensor, int dst, const Shape& shape, DType dtype, Device device,
                                        int src, int tag) override {
    check_peer(dst, "exchange", "destination");
    LT_CHECK(tensor.defined(), "dist exchange: rank ", rank(), " was given an undefined tensor to send to rank ", dst);
    return start_recv(shape, dtype, device, src, tag, &tensor, dst);
  }

  std::vector<Tensor> all_gather(const Tensor& tensor) override {
    LT_CHECK(tensor.defined(), "dist all_gather: rank ", rank(), " was given an undefined tensor");
    const Tensor in = on_gpu(tensor);
    Shape out_shape{size()};
    out_shape.insert(out_shape.end(), tensor.shape().begin(), tensor.shape().end());
    Tensor out = Tensor::empty(out_shape, tensor.dtype(), gpu());
    comm_->run("all_gather", [&] {
      comm_->nccl_ok(ncclAllGather(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()),
                                   nccl_type(in.dtype()), comm_->comm(), comm_->stream()), "ncclAllGather");
    }, {in, out});
    std::vector<Tensor> result;
    for (int s = 0; s < size(); ++s) result.push_back(back(out.select(0, s), tensor.device()));
    return result;
  }

  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override {
    LT_CHECK(static_cast<int>(to_each.size()) == size(), "dist all_to_all: rank ", rank(),
             " must give one tensor per rank (", size(), "), got ", to_each.size());
    for (size_t d = 0; d < to_each.size(); ++d)
      LT_CHECK(to_each[d].defined(), "dist all_to_all: rank ", rank(), " gave an undefined tensor for rank ", d);
    // What arrives from each rank: its shapes, exchanged first (one small all_to_all).
    constexpr int64_t kDesc = 18;
    std::vector<int64_t> mine(static_cast<size_t>(kDesc * size()), 0);
    for (int d = 0; d < size(); ++d) {
      const Tensor& t = to_each[static_cast<size_t>(d)];
      LT_CHECK(t.dim() <= kDesc - 2, "dist all_to_all: at most ", kDesc - 2, " dims, got ", describe(t));
      int64_t* row = mine.data() + kDesc * d;
      row[0] = static_cast<int64_t>(t.dtype());
      row[1] = t.dim();
      for (int64_t i = 0; i < t.dim(); ++i) row[2 + i] = t.size(i);
    }
    const Tensor desc_in = Tensor::from_vector(mine, {size(), kDesc}).to(gpu());
    Tensor desc_out = Tensor::empty({size(), kDesc}, DType::i64, gpu());
    comm_->run("all_to_all (shapes)", [&] {
      for (int p = 0; p < size(); ++p) {
        comm_->nccl_ok(ncclSend(desc_in.select(0, p).raw_data(), kDesc, ncclInt64, p, comm_->comm(), comm_->stream()),
                       "ncclSend");
        comm_->nccl_ok(ncclRecv(desc_out.select(0, p).raw_data(), kDesc, ncclInt64, p, comm_->comm(), comm_->stream()),
                       "ncclRecv");
      }
    }, {desc_in, desc_out});
    const std::vector<int64_t> theirs = desc_out.to(Device::cpu()).to_vector_as<int64_t>();  // waits for it
    std::vector<Tensor> ins, outs;
    for (int p = 0; p < size(); ++p) {
      ins.push_back(on_gpu(to_each[static_cast<size_t>(p)]));
      const int64_t* row = theirs.data() + kDesc * p;
      outs.push_back(Tensor::empty(Shape(row + 2, row + 2 + row[1]), static_cast<DType>(row[0]), gpu()));
    }
    std::vector<Tensor> keep = ins;
    keep.insert(keep.end(), outs.begin(), outs.end());
    comm_->run("all_to_all", [&] {
      for (int p = 0; p < size(); ++p) {
        const Tensor& in = ins[static_cast<size_t>(p)];
        const Tensor& out = outs[static_cast<size_t>(p)];
        if (in.numel() > 0)
          comm_->nccl_ok(ncclSend(in.raw_data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()), p,
                                  comm_->comm(), comm_->stream()), "ncclSend");
        if (out.numel() > 0)
          comm_->nccl_ok(ncclRecv(out.raw_data(), static_cast<size_t>(out.numel()), nccl_type(out.dtype()), p,
                                  comm_->comm(), comm_->stream()), "ncclRecv");
      }
    }, keep);
    const Device device = to_each[static_cast<size_t>(rank())].device();
    std::vector<Tensor> result;
    for (const Tensor& out : outs) result.push_back(back(out, device));
    return result;
  }

  Tensor all_reduce(const Tensor& tensor, ReduceOp op) override {
    LT_CHECK(tensor.defined(), "dist all_reduce: rank ", rank(), " was given an undefined tensor");
    LT_CHECK(op == ReduceOp::sum || is_floating(tensor.dtype()), "dist all_reduce: mean needs a floating tensor, got ",
             describe(tensor));
    const Tensor in = on_gpu(tensor);
    Tensor out = Tensor::empty(tensor.shape(), tensor.dtype(), gpu());
    comm_->run("all_reduce", [&] {
      comm_->nccl_ok(ncclAllReduce(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()),
                                   nccl_type(in.dtype()), ncclSum, comm_->comm(), comm_->stream()), "ncclAllReduce");
    }, {in, out});
    NoGradGuard no_grad;
    if (op == ReduceOp::mean) out = mul(out, 1.0 / size());
    return back(out, tensor.device());
  }

  Tensor broadcast(const Tensor& tensor, int root) override {
    check_peer(root, "broadcast", "root");
    LT_CHECK(tensor.defined(), "dist broadcast: rank ", rank(), " was given an undefined tensor");
    const Tensor in = on_gpu(tensor);
    Tensor out = Tensor::empty(tensor.shape(), tensor.dtype(), gpu());
    comm_->run("broadcast", [&] {
      comm_->nccl_ok(ncclBroadcast(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()),
                                   nccl_type(in.dtype()), root, comm_->comm(), comm_->stream()), "ncclBroadcast");
    }, {in, out});
    return back(out, tensor.device());
  }

  void barrier() override {
    Tensor token = Tensor::ones({1}, DType::f32, gpu());
    comm_->run("barrier", [&] {
      comm_->nccl_ok(ncclAllReduce(token.raw_data(), token.raw_data(), 1, ncclFloat32, ncclSum, comm_->comm(),
                                   comm_->stream()), "ncclAllReduce");
    }, {token});
    comm_->wait_in_flight();
  }

  void abort(const std::string& why) override { comm_->abort(why); }

  std::shared_ptr<Communicator> split(int64_t color, int64_t key) override {
    LT_CHECK(color >= 0 && color <= INT32_MAX && key >= INT32_MIN && key <= INT32_MAX, "dist split (NCCL): color must "
             "be in [0, 2^31) and key a 32-bit integer, got color ", color, " and key ", key);
    auto child = std::make_unique<NcclComm>(rank(), size(), comm_->device(), options());
    child->init(nullptr, comm_.get(), static_cast<int>(color), static_cast<int>(key));
    return std::make_shared<NcclCommunicator>(std::move(child));
  }

 private:
  Device gpu() const { return Device::cuda(comm_->device()); }

  void check_peer(int peer, const char* op, const char* role) const {
    LT_CHECK(peer >= 0 && peer < size(), "dist ", op, ": ", role, " rank must be in [0, ", size(), "), got ", peer);
  }
  static void check_tag(int tag, const char* op) {
    // NCCL matches messages between two ranks in order; tags only separate streams in other backends.
    LT_CHECK(tag >= 0, "dist ", op, ": tag must be >= 0, got ", tag);
  }

  // A contiguous copy on this rank's GPU that nobody else writes (inputs of the transfer).
  Tensor on_gpu(const Tensor& t) const {
    NoGradGuard no_grad;
    Tensor d = t.detach();
    if (d.device() != gpu()) d = d.to(gpu());
    return d.contiguous();
  }
  Tensor private_device_copy(const Tensor& t) const {
    NoGradGuard no_grad;
    Tensor d = t.detach();
    return d.device() != gpu() ? d.to(gpu()).contiguous() : d.clone();
  }
  static Tensor back(const Tensor& t, Device device) {
    NoGradGuard no_grad;
    return t.device() == device ? t : t.to(device);
  }

  // The receive of exchange()/recv(): wait() orders the calling thread's compute stream after the
  // transfer (an event, no host sync), so work queued between exchange() and wait() overlaps it.
  class Pending final : public PendingRecv {
   public:
    Pending(Tensor out, Device device, cudaEvent_t arrived) : out_(std::move(out)), device_(device), arrived_(arrived) {}
    ~Pending() override { cudaEventDestroy(arrived_); }
    Pending(const Pending&) = delete;
    Pending& operator=(const Pending&) = delete;
    Tensor wait() override {
      cuda_ok(cudaStreamWaitEvent(static_cast<cudaStream_t>(cuda::current_stream()), arrived_, 0),
              "cudaStreamWaitEvent");
      return back(out_, device_);
    }

   private:
    Tensor out_;
    Device device_;
    cudaEvent_t arrived_;
  };

  std::unique_ptr<PendingRecv> start_recv(const Shape& shape, DType dtype, Device device, int src, int tag,
                                          const Tensor* to_send, int dst) {
    check_peer(src, "recv", "source");
    check_tag(tag, "recv");
    Tensor out = Tensor::empty(shape, dtype, gpu());
    std::vector<Tensor> keep{out};
    Tensor in;
    if (to_send != nullptr) {
      in = private_device_copy(*to_send);  // the caller's stream may change its tensor before wait()
      keep.push_back(in);
    }
    cudaEvent_t arrived = nullptr;
    comm_->run(to_send ? "exchange with ranks " + std::to_string(dst) + " and " + std::to_string(src)
                       : "recv from rank " + std::to_string(src),
               [&] {
                 if (to_send != nullptr && in.numel() > 0)
                   comm_->nccl_ok(ncclSend(in.raw_data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()), dst,
                                           comm_->comm(), comm_->stream()), "ncclSend");
                 if (out.numel() > 0)
                   comm_->nccl_ok(ncclRecv(out.raw_data(), static_cast<size_t>(out.numel()), nccl_type(dtype), src,
                                           comm_->comm(), comm_->stream()), "ncclRecv");
               },
               keep, &arrived);
    return std::make_unique<Pending>(out, device, arrived);
  }

  std::unique_ptr<NcclComm> comm_;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_process_group(TcpStore& store, int rank, int size, int device,
                                                      const CommOptions& options, const std::string& prefix) {
  LT_CHECK(size >= 1 && rank >= 0 && rank < size, "dist: expected 0 <= rank < size, got rank ", rank, " and size ",
           size);
  int devices = 0;
  cuda_ok(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  LT_CHECK(device >= 0 && device < devices, "dist (NCCL): rank ", rank, " was given GPU ", device, " but this host has ",
           devices, " (LOCAL_RANK picks the GPU: run at most one process per GPU)");
  cuda::set_device(device);
  ncclUniqueId id;
  if (rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    LT_CHECK(r == ncclSuccess, "dist (NCCL): ncclGetUniqueId failed: ", ncclGetErrorString(r));
    store.set(prefix + "/id", std::string(reinterpret_cast<const char*>(&id), sizeof id));
  } else {
    const std::string bytes = store.get(prefix + "/id");
    LT_CHECK(bytes.size() == sizeof id, "dist (NCCL): the unique id in the store has ", bytes.size(),
             " bytes, expected ", sizeof id);
    std::memcpy(&id, bytes.data(), sizeof id);
  }
  // Every rank is alive and has the id before NCCL starts connecting (a rank that never came
  // would otherwise only show up as an initialisation timeout).
  store.add(prefix + "/ready", 1);
  const auto deadline = Clock::now() + options.timeout;
  while (store.add(prefix + "/ready", 0) < size) {
    LT_CHECK(Clock::now() < deadline, "dist (NCCL): rank ", rank, " timed out after ", seconds(options.timeout),
             " s waiting for all ", size, " ranks to join (", store.add(prefix + "/ready", 0), " did)");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto comm = std::make_unique<NcclComm>(rank, size, device, options);
  comm->init(&id, nullptr, 0, 0);
  return std::make_shared<NcclCommunicator>(std::move(comm));
}

#endif  // LONGTAPE_WITH_NCCL

}  // namespace longtape::dist
