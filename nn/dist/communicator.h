#pragma once
// Communicator: the point-to-point and collective operations that the parallel variants
// (ring, head_parallel, data parallel; docs/attention.md, parallel variants) are written against,
// and an in-process implementation in which P ranks run as P threads of one process, so the real
// distributed code paths run in tests and CI without several GPUs.
//
// The interface is shaped so that a NCCL implementation (one process or thread per GPU, one
// ncclComm_t per rank) can be added behind it without touching its users:
//   - recv names the shape, dtype and device of what it expects (NCCL moves raw bytes);
//   - all_gather and all_reduce need equal shapes on every rank (checked here too);
//   - all_to_all sizes are known to both sides (a grouped ncclSend/ncclRecv per peer);
//   - every call takes place in the same order on every rank.
// The in-process group is additionally strict about two things NCCL leaves to a watchdog: every
// blocking call waits at most `timeout`, and a rank that fails makes every other rank's pending or
// next call throw, so a broken run raises everywhere instead of hanging or returning zeros.
//
// Raw methods below move data only: their results carry no autograd history. The differentiable
// collectives (whose backward runs the reverse communication) are in nn/dist/functional.h.
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace longtape::dist {

enum class ReduceOp { sum, mean };

struct CommOptions {
  // Longest a blocking call waits for a peer before it throws (and fails the group).
  std::chrono::milliseconds timeout{60000};
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const CommOptions& options() const = 0;

  // ---- point to point ----
  // Sends a copy of `tensor` to rank `dst` (tag >= 0 separates independent message streams).
  // Buffered: returns without waiting for the matching recv.
  virtual void send(const Tensor& tensor, int dst, int tag = 0) = 0;
  // Receives the next message from `src` with `tag`: a new tensor of the given shape and dtype on
  // `device`. Throws when the message does not have that shape and dtype, on timeout, or when the
  // group has failed.
  virtual Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag = 0) = 0;
  // The same, shaped like `like`.
  Tensor recv_like(const Tensor& like, int src, int tag = 0) {
    return recv(like.shape(), like.dtype(), like.device(), src, tag);
  }

  // A receive that is under way; wait() returns the tensor (on a GPU backend without blocking the
  // host: later work on the current stream is ordered after the transfer).
  class PendingRecv {
   public:
    virtual ~PendingRecv() = default;
    virtual Tensor wait() = 0;
  };
  // Sends `tensor` to `dst` and starts receiving a tensor of (shape, dtype, device) from `src`, as
  // one step that every rank of a ring may take at once without deadlock. Backends that can
  // overlap transfers with compute do so until wait(); this default sends, then receives in wait().
  virtual std::unique_ptr<PendingRecv> exchange(const Tensor& tensor, int dst, const Shape& shape, DType dtype,
                                                Device device, int src, int tag = 0);

  // ---- collectives: every rank calls them, in the same order ----
  // result[s] = rank s's tensor (all ranks' tensors must have one shape and dtype).
  virtual std::vector<Tensor> all_gather(const Tensor& tensor) = 0;
  // result[s] = rank s's `value`, on the host (sizes a collective needs before it starts). This
  // default goes through all_gather; backends with a faster host path use it.
  virtual std::vector<int64_t> all_gather_sizes(int64_t value);
  // to_each[d] goes to rank d; result[s] = what rank s sent to this rank. Shapes may differ per
  // pair. result[s] lies on the device of to_each[rank()].
  virtual std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) = 0;
  // Splits `tensor` along split_dim into pieces of split_sizes (one per rank; empty = equal
  // pieces), sends piece d to rank d and concatenates what arrives along concat_dim in rank order.
  Tensor all_to_all(const Tensor& tensor, int64_t split_dim, int64_t concat_dim,
                    const std::vector<int64_t>& split_sizes = {});
  // An all_to_all under way (start_all_to_all); wait() makes what arrived available in `into` (on a
  // GPU backend without blocking the host: later work on the calling thread's current stream is
  // ordered after the transfer).
  class PendingAllToAll {
   public:
    virtual ~PendingAllToAll() = default;
    virtual void wait() = 0;
  };
  // Starts all_to_all(to_each), in the collective order of this call, receiving rank s's tensor
  // into into[s]: a tensor or a view of one on this rank's device, of the shape and dtype rank s
  // sends (the receiver names them, so no shapes travel first and NCCL needs no host round trip;
  // the thread and TCP groups check them, NCCL cannot: run a program there first). Backends that
  // can move the data beside compute do so until wait(): NCCL on its communication stream after
  // the work queued so far, the thread and TCP groups send now and receive in wait(); this
  // default exchanges now. Neither to_each nor into may be changed, nor into read, before wait().
  virtual std::unique_ptr<PendingAllToAll> start_all_to_all(const std::vector<Tensor>& to_each,
                                                            const std::vector<Tensor>& into);
  // Several start_all_to_all as one collective call: exchange i sends to_each[i] and receives into
  // into[i], under the contract above; one wait() covers them all. Backends whose exchanges each
  // cost host round trips (the copy engines') carry the whole group as one; this default starts
  // them one by one.
  virtual std::unique_ptr<PendingAllToAll> start_all_to_all_many(const std::vector<std::vector<Tensor>>& to_each,
                                                                 const std::vector<std::vector<Tensor>>& into);
  // How start_all_to_all moves the data, for reports.
  virtual std::string all_to_all_transport() const { return "this backend's messages"; }
  // Elementwise sum (or mean) over ranks; every rank gets the same values (summed in rank order).
  virtual Tensor all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::sum) = 0;
  // An all_reduce under way; wait() returns its result (on a GPU backend without blocking the host:
  // later work on the calling thread's current stream is ordered after the reduction).
  class PendingReduce {
   public:
    virtual ~PendingReduce() = default;
    virtual Tensor wait() = 0;
  };
  // Starts all_reduce(tensor, op), in the collective order of this call. Backends that can run it
  // beside compute do so until wait() (NCCL: on the communication stream, after the work queued so
  // far); this default reduces now and wait() returns the result. `tensor` must not be changed
  // before wait().
  virtual std::unique_ptr<PendingReduce> start_all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::sum);
  // Rank `root`'s tensor on every rank (`tensor` gives shape, dtype and device on the others).
  virtual Tensor broadcast(const Tensor& tensor, int root) = 0;
  virtual void barrier() = 0;

  // Marks the group failed: every rank's pending or next call throws naming this rank and `why`.
  virtual void abort(const std::string& why) = 0;

  // Collective: a communicator over the ranks that pass the same color, ranked by (key, rank), as
  // MPI_Comm_split. Data and sequence parallel combine on a 2-D grid this way: split by row for
  // one and by column for the other. A failure in any group fails the whole run.
  virtual std::shared_ptr<Communicator> split(int64_t color, int64_t key) = 0;

 protected:
  // For start_all_to_all: throws unless there is one defined `into` tensor per rank and one
  // defined tensor to send to each.
  void check_all_to_all_into(const std::vector<Tensor>& to_each, const std::vector<Tensor>& into) const;
  // The same for each exchange of start_all_to_all_many, and as many lists to receive as to send.
  void check_all_to_all_many(const std::vector<std::vector<Tensor>>& to_each,
                             const std::vector<std::vector<Tensor>>& into) const;
  // Copies what rank `src` sent into `into`, after checking its shape and dtype.
  void receive_into(const Tensor& arrived, const Tensor& into, int src) const;
  // The PendingAllToAll of a backend that has sent already: wait() copies receive(s) into into[s]
  // for every other rank s (this rank's piece is the caller's to place), once.
  std::unique_ptr<PendingAllToAll> receive_later(std::function<Tensor(int src)> receive, std::vector<Tensor> into);
};

// ---- the in-process group ----

// Runs body(comm) on `size` threads, one per rank, each with its own communicator of one group,
// its own autograd tape, the caller's grad mode and its own random stream (a ThreadGeneratorScope
// seeded from the caller's generator state and the rank: manual_seed before run_ranks makes every
// rank's draws reproducible, whatever the thread interleaving; manual_seed inside a rank reseeds
// only that rank's stream, as in a process of its own); returns when every rank has returned. When a
// rank throws, the group is marked failed (so the other ranks throw too instead of waiting), and
// once all have stopped run_ranks throws longtape::Error naming the first failed rank and its
// original message. Ranks may exchange CPU and CUDA tensors (several ranks may share one GPU).
void run_ranks(int size, const std::function<void(Communicator&)>& body, const CommOptions& options = {});

// The communicator of the rank the calling thread runs (inside run_ranks, or set by a
// CommunicatorScope), else the process's communicator (set_process_communicator), else nullptr.
// Modules with a rank-local mode (ring, head_parallel) use it.
Communicator* current_communicator();

// Makes `comm` current for every thread of this process that has no communicator of its own (one
// process per rank: the process group of nn/dist/process_group.h); nullptr clears it. The process
// keeps `comm` alive until it is replaced.
void set_process_communicator(std::shared_ptr<Communicator> comm);

// Makes `comm` the calling thread's current communicator for its lifetime (e.g. a sub-group from
// split(), so that a ring module runs over the sequence-parallel ranks), then restores the previous.
class CommunicatorScope {
 public:
  explicit CommunicatorScope(Communicator& comm);
  ~CommunicatorScope();
  CommunicatorScope(const CommunicatorScope&) = delete;
  CommunicatorScope& operator=(const CommunicatorScope&) = delete;

 private:
  Communicator* previous_;
};

// A shared handle to `comm`, for autograd nodes whose backward communicates later: it keeps the
// communicator alive, and a call after run_ranks has returned throws instead of hanging.
std::shared_ptr<Communicator> keep_alive(Communicator& comm);

}  // namespace longtape::dist
