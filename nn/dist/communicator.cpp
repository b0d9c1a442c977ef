#include "nn/dist/communicator.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tensor/autograd/grad_mode.h"
#include "tensor/cuda/runtime.h"
#include "nn/dist/message_communicator.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

thread_local Communicator* g_current = nullptr;

double seconds(std::chrono::milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }

// Waits until the device has finished the work queued so far by every thread, so a tensor
// written on one rank's stream is complete before another rank's stream reads it, and memory a
// rank received is no longer in use when it is freed.
void finish_device_work(Device device) {
#ifdef LONGTAPE_WITH_CUDA
  if (device.is_cuda()) cuda::synchronize(device.index);
#else
  (void)device;
#endif
}

// A private, contiguous, history-free copy (what travels through a mailbox).
Tensor private_copy(const Tensor& t) {
  NoGradGuard no_grad;
  Tensor copy = t.detach().clone();
  finish_device_work(copy.device());
  return copy;
}

using detail::Message;

struct Group;

// What every group of one run_ranks call shares: one lock and condition variable, the failure
// state and which ranks have returned (by global rank), so that a failure anywhere wakes every
// waiter of every group, sub-groups included.
struct World {
  explicit World(int n) : finished(static_cast<size_t>(n), false) {}

  std::mutex mutex;
  std::condition_variable changed;
  bool failed = false;
  int failed_rank = -1;  // global
  std::string failed_message;
  std::vector<bool> finished;  // the rank's body has returned
  bool closed = false;         // run_ranks has returned
  // Sub-groups being formed by split(): (parent group, split number, color) -> the group and how
  // many of its members still have to pick it up.
  std::map<std::tuple<const void*, int64_t, int64_t>, std::pair<std::shared_ptr<Group>, int>> forming;

  void fail(int global_rank, const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!failed) {
        failed = true;
        failed_rank = global_rank;
        failed_message = message;
      }
    }
    changed.notify_all();
  }

  void finish(int global_rank) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      finished[static_cast<size_t>(global_rank)] = true;
    }
    changed.notify_all();
  }

  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      closed = true;
    }
    changed.notify_all();
  }
};

// The mailboxes of one group (all ranks, or a sub-group made by split); collective number c
// travels on tag -1 - c, user tags are >= 0. Ranks are local to the group; members maps them to
// the global ranks of run_ranks.
struct Group {
  Group(std::shared_ptr<World> w, std::vector<int> m, CommOptions o)
      : world(std::move(w)), members(std::move(m)), options(o) {}

  std::shared_ptr<World> world;
  const std::vector<int> members;
  const CommOptions options;
  std::map<std::tuple<int, int, int64_t>, std::deque<Message>> mailbox;  // (src, dst, tag), under world->mutex

  int size() const { return static_cast<int>(members.size()); }
  int global(int rank) const { return members[static_cast<size_t>(rank)]; }
  bool is_world() const { return static_cast<int>(members.size()) == static_cast<int>(world->finished.size()); }

  // "rank 1", or for a sub-group "rank 1 of sub-group [0, 2] (global rank 2)".
  std::string who(int rank) const {
    std::string text = "rank " + std::to_string(rank);
    if (is_world()) return text;
    text += " of sub-group [";
    for (size_t i = 0; i < members.size(); ++i) text += (i ? ", " : "") + std::to_string(members[i]);
    return text + "] (global rank " + std::to_string(global(rank)) + ")";
  }

  // Throws when the group can no longer communicate. Caller holds world->mutex.
  void check_usable(int rank, const std::string& what) const {
    LT_CHECK(!world->failed, "dist: ", who(rank), ": ", what, " aborted because rank ", world->failed_rank,
             " failed: ", world->failed_message);
    LT_CHECK(!world->closed, "dist: ", who(rank), ": ", what,
             " called after run_ranks returned (a backward that communicates must run inside the rank's body)");
  }

  void ensure_usable(int rank, const std::string& what) {
    std::lock_guard<std::mutex> lock(world->mutex);
    check_usable(rank, what);
  }

  void post(int src, int dst, int64_t tag, Message message, const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(world->mutex);
      check_usable(src, what);
      mailbox[{src, dst, tag}].push_back(std::move(message));
    }
    world->changed.notify_all();
  }

  Message take(int src, int dst, int64_t tag, const std::string& what) {
    std::unique_lock<std::mutex> lock(world->mutex);
    const auto deadline = std::chrono::steady_clock::now() + options.timeout;
    auto& queue = mailbox[{src, dst, tag}];
    while (true) {
      check_usable(dst, what);
      if (!queue.empty()) {
        Message m = std::move(queue.front());
        queue.pop_front();
        if (queue.empty()) mailbox.erase({src, dst, tag});  // one key per collective: do not keep them
        return m;
      }
      LT_CHECK(!world->finished[static_cast<size_t>(global(src))], "dist: ", who(dst), " waits for ", what,
               " from rank ", src, ", but rank ", src, " has already returned from its body without sending it");
      if (world->changed.wait_until(lock, deadline) == std::cv_status::timeout) {
        check_usable(dst, what);
        if (!queue.empty()) continue;
        LT_CHECK(false, "dist: ", who(dst), " timed out after ", seconds(options.timeout), " s waiting for ", what,
                 " from rank ", src);
      }
    }
  }

  // The sub-group of `members` formed by the split number `seq` of this group for `color`: the
  // first member to arrive creates it, the last one to pick it up removes it from the registry.
  std::shared_ptr<Group> sub_group(int64_t seq, int64_t color, const std::vector<int>& sub_members) {
    std::lock_guard<std::mutex> lock(world->mutex);
    auto key = std::make_tuple(static_cast<const void*>(this), seq, color);
    auto it = world->forming.find(key);
    if (it == world->forming.end())
      it = world->forming
               .emplace(key, std::make_pair(std::make_shared<Group>(world, sub_members, options),
                                            static_cast<int>(sub_members.size())))
               .first;
    std::shared_ptr<Group> group = it->second.first;
    if (--it->second.second == 0) world->forming.erase(it);
    return group;
  }
};

class InProcessCommunicator final : public detail::MessageCommunicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank) : MessageCommunicator(rank), group_(std::move(group)) {}

  int size() const override { return group_->size(); }
  const CommOptions& options() const override { return group_->options; }

  Tensor all_reduce(const Tensor& tensor, ReduceOp op) override {
    LT_CHECK(tensor.defined(), "dist all_reduce: rank ", rank_, " was given an undefined tensor");
    LT_CHECK(op == ReduceOp::sum || is_floating(tensor.dtype()), "dist all_reduce: mean needs a floating tensor, got ",
             describe_tensor(tensor));
    const int64_t tag = next_collective("all_reduce");
    post_to_others(tag, tensor, "all_reduce");
    std::vector<Tensor> parts(static_cast<size_t>(size()));
    for (int s = 0; s < size(); ++s)
      parts[static_cast<size_t>(s)] =
          s == rank_ ? tensor.detach() : arrive(expect_like(s, tag, "all_reduce", tensor).tensor, tensor.device());
    // The same order of additions on every rank, so every rank holds bitwise the same result.
    NoGradGuard no_grad;
    Tensor total = parts[0].clone();
    for (size_t s = 1; s < parts.size(); ++s) total = add(total, parts[s]);
    if (op == ReduceOp::mean) total = mul(total, 1.0 / size());
    return total;
  }

  void abort(const std::string& why) override { group_->world->fail(group_->global(rank_), why); }

 private:
  void post(int dst, int64_t tag, const Tensor& tensor, const char* op, const std::string& what) override {
    group_->post(rank_, dst, tag, {private_copy(tensor), op}, what);
  }

  detail::Message take(int src, int64_t tag, const std::string& what) override {
    return group_->take(src, rank_, tag, what);
  }

  void ensure_usable(const std::string& what) override { group_->ensure_usable(rank_, what); }

  Tensor own_copy(const Tensor& tensor) override { return private_copy(tensor); }

  // The received copy as a tensor this rank owns, on `device`.
  Tensor arrive(const Tensor& message, Device device) override {
    NoGradGuard no_grad;
    if (message.device() == device && device.is_cpu()) return message;
    // A CUDA tensor is copied on this rank's own stream (same GPU) or across devices, and the
    // work is finished before the sender's buffer is released.
    Tensor out = message.device() == device ? message.clone() : message.to(device);
    finish_device_work(device);
    finish_device_work(message.device());
    return out;
  }

  // Sub-groups are keyed by the split's collective number, which every member shares.
  std::shared_ptr<Communicator> make_sub_group(int64_t tag, int64_t color, const std::vector<int>& ranks,
                                               int new_rank) override {
    std::vector<int> members;
    for (int r : ranks) members.push_back(group_->global(r));
    return std::make_shared<InProcessCommunicator>(group_->sub_group(-1 - tag, color, members), new_rank);
  }

  std::shared_ptr<Group> group_;
};

}  // namespace

namespace {
// The default exchange: the send is buffered, so receiving later cannot deadlock.
class DeferredRecv final : public Communicator::PendingRecv {
 public:
  DeferredRecv(Communicator& comm, Shape shape, DType dtype, Device device, int src, int tag)
      : comm_(comm.shared_from_this()), shape_(std::move(shape)), dtype_(dtype), device_(device), src_(src), tag_(tag) {}
  Tensor wait() override { return comm_->recv(shape_, dtype_, device_, src_, tag_); }

 private:
  std::shared_ptr<Communicator> comm_;
  Shape shape_;
  DType dtype_;
  Device device_;
  int src_, tag_;
};
}  // namespace

namespace {
class ReducedNow final : public Communicator::PendingReduce {
 public:
  explicit ReducedNow(Tensor result) : result_(std::move(result)) {}
  Tensor wait() override { return result_; }

 private:
  Tensor result_;
};
}  // namespace

std::unique_ptr<Communicator::PendingReduce> Communicator::start_all_reduce(const Tensor& tensor, ReduceOp op) {
  return std::make_unique<ReducedNow>(all_reduce(tensor, op));
}

std::unique_ptr<Communicator::PendingRecv> Communicator::exchange(const Tensor& tensor, int dst, const Shape& shape,
                                                                  DType dtype, Device device, int src, int tag) {
  send(tensor, dst, tag);
  return std::make_unique<DeferredRecv>(*this, shape, dtype, device, src, tag);
}

Tensor Communicator::all_to_all(const Tensor& tensor, int64_t split_dim, int64_t concat_dim,
                                const std::vector<int64_t>& split_sizes) {
  LT_CHECK(tensor.defined(), "dist all_to_all: rank ", rank(), " was given an undefined tensor");
  const int64_t sd = normalize_dim(split_dim, tensor.dim(), "dist all_to_all (split_dim)");
  const int64_t cd = normalize_dim(concat_dim, tensor.dim(), "dist all_to_all (concat_dim)");
  std::vector<int64_t> sizes = split_sizes;
  if (sizes.empty()) {
    LT_CHECK(tensor.size(sd) % size() == 0, "dist all_to_all: dim ", sd, " of ", describe_tensor(tensor),
             " must divide evenly into ", size(), " ranks, or split sizes must be given");
    sizes.assign(static_cast<size_t>(size()), tensor.size(sd) / size());
  }
  LT_CHECK(static_cast<int>(sizes.size()) == size(), "dist all_to_all: expected one split size per rank (", size(),
           "), got ", sizes.size());
  NoGradGuard no_grad;
  std::vector<Tensor> pieces = longtape::split(tensor.detach(), sizes, sd);
  std::vector<Tensor> received = all_to_all(pieces);
  return received.size() == 1 ? received[0] : cat(received, cd);
}

namespace {
std::mutex g_process_mutex;
std::shared_ptr<Communicator> g_process_owner;
std::atomic<Communicator*> g_process{nullptr};
}  // namespace

Communicator* current_communicator() { return g_current != nullptr ? g_current : g_process.load(); }

void set_process_communicator(std::shared_ptr<Communicator> comm) {
  std::lock_guard<std::mutex> lock(g_process_mutex);
  g_process = comm.get();
  g_process_owner = std::move(comm);
}

CommunicatorScope::CommunicatorScope(Communicator& comm) : previous_(g_current) { g_current = &comm; }
CommunicatorScope::~CommunicatorScope() { g_current = previous_; }

std::shared_ptr<Communicator> keep_alive(Communicator& comm) {
  try {
    return comm.shared_from_this();
  } catch (const std::bad_weak_ptr&) {
    LT_CHECK(false, "dist: this communicator is not owned by a std::shared_ptr; create it with std::make_shared "
                    "(run_ranks does) so that a backward pass can keep it alive");
  }
  return nullptr;
}

void run_ranks(int size, const std::function<void(Communicator&)>& body, const CommOptions& options) {
  LT_CHECK(size >= 1, "run_ranks: expected at least 1 rank, got ", size);
  LT_CHECK(static_cast<bool>(body), "run_ranks: expected a body to run on every rank");
  LT_CHECK(options.timeout.count() > 0, "run_ranks: the timeout must be > 0 ms, got ", options.timeout.count());
  auto world = std::make_shared<World>(size);
  std::vector<int> everyone;
  for (int r = 0; r < size; ++r) everyone.push_back(r);
  auto group = std::make_shared<Group>(world, everyone, options);
  std::vector<std::shared_ptr<InProcessCommunicator>> comms;
  for (int r = 0; r < size; ++r) comms.push_back(std::make_shared<InProcessCommunicator>(group, r));
  const bool grad_mode = autograd::grad_enabled();
  // Every rank draws from a random stream of its own, keyed by the caller's generator state and the
  // rank, so what a rank draws never depends on how the threads interleave. The caller's generator
  // moves on by one block, so the next run_ranks gets fresh streams.
  const PhiloxState base = next_philox(1);
#ifdef _OPENMP
  // The ranks share the cores: each one gets its share of the OpenMP threads.
  const int omp_threads = std::max(1, omp_get_max_threads() / size);
#endif

  auto rank_main = [&](int r) {
    autograd::set_grad_enabled(grad_mode);
    ThreadGeneratorScope rng({derive_stream_seed(base.seed, base.offset, static_cast<uint64_t>(r)), 0});
#ifdef _OPENMP
    omp_set_num_threads(omp_threads);
#endif
    g_current = comms[static_cast<size_t>(r)].get();
    try {
      body(*comms[static_cast<size_t>(r)]);
#ifdef LONGTAPE_WITH_CUDA
      // Results handed to the caller's thread are complete.
      if (cuda_available()) cuda::synchronize(cuda::current_device());
#endif
      world->finish(r);
    } catch (const std::exception& e) {
      world->fail(r, e.what());
    } catch (...) {
      world->fail(r, "an exception that is not a std::exception");
    }
    g_current = nullptr;
  };

  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(size));
  try {
    for (int r = 0; r < size; ++r) threads.emplace_back(rank_main, r);
  } catch (const std::exception& e) {
    world->fail(static_cast<int>(threads.size()), std::string("could not start the rank's thread: ") + e.what());
  }
  for (std::thread& t : threads) t.join();
  world->close();
  std::lock_guard<std::mutex> lock(world->mutex);
  LT_CHECK(!world->failed, "run_ranks: rank ", world->failed_rank, " of ", size, " failed: ", world->failed_message);
}

std::vector<int64_t> Communicator::all_gather_sizes(int64_t value) {
  std::vector<int64_t> out;
  for (const Tensor& t : all_gather(Tensor::from_vector(std::vector<int64_t>{value}, {1})))
    out.push_back(static_cast<int64_t>(t.item()));
  return out;
}

}  // namespace longtape::dist
