#include "nn/dist/nccl_communicator.h"

#include "tensor/error.h"

#ifdef LONGTAPE_WITH_NCCL
#include <cstring>

#include "tensor/autograd/grad_mode.h"
#include "nn/dist/nccl_comm.h"
#include "nn/dist/peer_copy.h"
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
using namespace nccl_detail;

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<NcclComm> comm, std::unique_ptr<PeerCopyExchange> peer_copy)
      : comm_(std::move(comm)), peer_copy_(std::move(peer_copy)) {}
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

  std::vector<int64_t> all_gather_sizes(int64_t value) override {
    if (peer_copy_ && peer_copy_->posts_in_shared_memory()) return peer_copy_->all_gather_sizes(value);
    return Communicator::all_gather_sizes(value);
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
    std::vector<Tensor> desc_rows_in, desc_rows_out;  // row p goes to and comes from rank p
    for (int p = 0; p < size(); ++p) {
      desc_rows_in.push_back(desc_in.select(0, p));
      desc_rows_out.push_back(desc_out.select(0, p));
    }
    comm_->run("all_to_all (shapes)", [&] { send_and_receive_each(desc_rows_in, desc_rows_out, -1); },
               {desc_in, desc_out});
    const std::vector<int64_t> theirs = desc_out.to(Device::cpu()).to_vector_as<int64_t>();  // waits for it
    std::vector<Tensor> ins, outs;
    for (int p = 0; p < size(); ++p) {
      ins.push_back(on_gpu(to_each[static_cast<size_t>(p)]));
      const int64_t* row = theirs.data() + kDesc * p;
      outs.push_back(Tensor::empty(Shape(row + 2, row + 2 + row[1]), static_cast<DType>(row[0]), gpu()));
    }
    std::vector<Tensor> keep = ins;
    keep.insert(keep.end(), outs.begin(), outs.end());
    comm_->run("all_to_all", [&] { send_and_receive_each(ins, outs, -1); }, keep);
    const Device device = to_each[static_cast<size_t>(rank())].device();
    std::vector<Tensor> result;
    for (const Tensor& out : outs) result.push_back(back(out, device));
    return result;
  }

  std::string all_to_all_transport() const override {
    if (!peer_copy_) return "NCCL send/recv";
    return peer_copy_->posts_in_shared_memory() ? "copy engines (CUDA IPC, no SM; posts in shared memory)"
                                                : "copy engines (CUDA IPC, no SM; posts through the TCP store)";
  }

  // On one host, the copy engines (nn/dist/peer_copy.h). Otherwise one group of ncclSend/ncclRecv
  // on the communication stream, after the compute stream's work so
  // far; no shapes travel first (the caller names them) and the host never waits. Contiguous
  // `into` tensors on this GPU receive directly, others through a buffer copied in wait().
  std::unique_ptr<PendingAllToAll> start_all_to_all_many(const std::vector<std::vector<Tensor>>& to_each,
                                                         const std::vector<std::vector<Tensor>>& into) override {
    check_all_to_all_many(to_each, into);
    if (peer_copy_) return peer_copy_->start_many(to_each, into);
    return Communicator::start_all_to_all_many(to_each, into);
  }

  std::unique_ptr<PendingAllToAll> start_all_to_all(const std::vector<Tensor>& to_each,
                                                    const std::vector<Tensor>& into) override {
    check_all_to_all_into(to_each, into);
    if (peer_copy_) return peer_copy_->start(to_each, into);
    std::vector<Tensor> ins, outs, keep;
    std::vector<std::pair<Tensor, Tensor>> copy_after;  // (buffer, into)
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) {
        ins.emplace_back();
        outs.emplace_back();
        continue;
      }
      const Tensor& target = into[static_cast<size_t>(p)];
      ins.push_back(on_gpu(to_each[static_cast<size_t>(p)]));
      if (target.device() == gpu() && target.is_contiguous()) {
        outs.push_back(target);
      } else {
        outs.push_back(Tensor::empty(target.shape(), target.dtype(), gpu()));
        copy_after.emplace_back(outs.back(), target);
      }
    }
    keep = ins;
    keep.insert(keep.end(), outs.begin(), outs.end());
    cudaEvent_t arrived = nullptr;
    comm_->run("all_to_all", [&] { send_and_receive_each(ins, outs, rank()); }, keep, &arrived);
    // This rank's own piece is one copy on the compute stream (views of any layout on both sides),
    // not a transfer through NCCL; queued after the transfer, which therefore does not wait for it.
    const Tensor& mine = to_each[static_cast<size_t>(rank())];
    receive_into(mine.device() == gpu() ? mine.detach() : mine.detach().to(gpu()), into[static_cast<size_t>(rank())],
                 rank());
    return std::make_unique<ArrivingAllToAll>(arrived, std::move(copy_after));
  }

  Tensor all_reduce(const Tensor& tensor, ReduceOp op) override {
    Tensor out = sum_over_ranks(tensor, op, nullptr);
    NoGradGuard no_grad;
    if (op == ReduceOp::mean) out = mul(out, 1.0 / size());
    return back(out, tensor.device());
  }

  // The reduction runs on the communication stream; wait() orders the compute stream after it and
  // applies the mean's scale there.
  std::unique_ptr<PendingReduce> start_all_reduce(const Tensor& tensor, ReduceOp op) override {
    cudaEvent_t reduced = nullptr;
    Tensor out = sum_over_ranks(tensor, op, &reduced);
    return std::make_unique<Reducing>(out, tensor.device(), reduced, op == ReduceOp::mean ? 1.0 / size() : 1.0);
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
    return std::make_shared<NcclCommunicator>(std::move(child), nullptr);
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

  // The sum of `tensor` over the ranks into a new tensor on this GPU, by one ncclAllReduce through
  // run() (`deferred` as there); `op` is only checked here, the callers apply the mean's scale.
  Tensor sum_over_ranks(const Tensor& tensor, ReduceOp op, cudaEvent_t* deferred) {
    LT_CHECK(tensor.defined(), "dist all_reduce: rank ", rank(), " was given an undefined tensor");
    LT_CHECK(op == ReduceOp::sum || is_floating(tensor.dtype()), "dist all_reduce: mean needs a floating tensor, got ",
             describe(tensor));
    const Tensor in = on_gpu(tensor);
    Tensor out = Tensor::empty(tensor.shape(), tensor.dtype(), gpu());
    comm_->run("all_reduce", [&] {
      comm_->nccl_ok(ncclAllReduce(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()),
                                   nccl_type(in.dtype()), ncclSum, comm_->comm(), comm_->stream()), "ncclAllReduce");
    }, {in, out}, deferred);
    return out;
  }

  // Inside run()'s group: for every rank p but `skip` (-1: none), the send of ins[p] to p, then the
  // receive of outs[p] from p, both on the communication stream; an empty tensor is not sent.
  void send_and_receive_each(const std::vector<Tensor>& ins, const std::vector<Tensor>& outs, int skip) {
    for (int p = 0; p < size(); ++p) {
      if (p == skip) continue;
      const Tensor& in = ins[static_cast<size_t>(p)];
      const Tensor& out = outs[static_cast<size_t>(p)];
      if (in.numel() > 0)
        comm_->nccl_ok(ncclSend(in.raw_data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()), p,
                                comm_->comm(), comm_->stream()), "ncclSend");
      if (out.numel() > 0)
        comm_->nccl_ok(ncclRecv(out.raw_data(), static_cast<size_t>(out.numel()), nccl_type(out.dtype()), p,
                                comm_->comm(), comm_->stream()), "ncclRecv");
    }
  }

  // The event run() records after a deferred transfer (owned): the calling thread's compute stream
  // waits for it in the pending operation's wait(), with no host sync.
  class TransferDone {
   public:
    explicit TransferDone(cudaEvent_t event) : event_(event) {}
    ~TransferDone() { cudaEventDestroy(event_); }
    TransferDone(const TransferDone&) = delete;
    TransferDone& operator=(const TransferDone&) = delete;
    void order_current_stream() const {
      cuda_ok(cudaStreamWaitEvent(static_cast<cudaStream_t>(cuda::current_stream()), event_, 0),
              "cudaStreamWaitEvent");
    }

   private:
    cudaEvent_t event_;
  };

  // The receive of exchange()/recv(): wait() orders the calling thread's compute stream after the
  // transfer (an event, no host sync), so work queued between exchange() and wait() overlaps it.
  class Pending final : public PendingRecv {
   public:
    Pending(Tensor out, Device device, cudaEvent_t arrived) : out_(std::move(out)), device_(device), arrived_(arrived) {}
    Tensor wait() override {
      arrived_.order_current_stream();
      return back(out_, device_);
    }

   private:
    Tensor out_;
    Device device_;
    TransferDone arrived_;
  };

  class Reducing final : public PendingReduce {
   public:
    Reducing(Tensor out, Device device, cudaEvent_t reduced, double scale)
        : out_(std::move(out)), device_(device), reduced_(reduced), scale_(scale) {}
    Tensor wait() override {
      reduced_.order_current_stream();
      NoGradGuard no_grad;
      return back(scale_ == 1.0 ? out_ : mul(out_, scale_), device_);
    }

   private:
    Tensor out_;
    Device device_;
    TransferDone reduced_;
    double scale_;
  };

  class ArrivingAllToAll final : public PendingAllToAll {
   public:
    ArrivingAllToAll(cudaEvent_t arrived, std::vector<std::pair<Tensor, Tensor>> copy_after)
        : arrived_(arrived), copy_after_(std::move(copy_after)) {}
    void wait() override {
      arrived_.order_current_stream();
      NoGradGuard no_grad;
      for (auto& [buffer, into] : copy_after_) into.copy_(buffer);
      copy_after_.clear();
    }

   private:
    TransferDone arrived_;
    std::vector<std::pair<Tensor, Tensor>> copy_after_;
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
  std::unique_ptr<PeerCopyExchange> peer_copy_;  // null: NCCL moves start_all_to_all's data too
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
  return std::make_shared<NcclCommunicator>(std::move(comm),
                                            PeerCopyExchange::connect(store, rank, size, device, prefix + "/peer"));
}

#endif  // LONGTAPE_WITH_NCCL

}  // namespace longtape::dist
