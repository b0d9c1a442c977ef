#include "nn/dist/tcp_communicator.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "autograd/grad_mode.h"
#include "nn/dist/socket.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

constexpr uint32_t kMagic = 0x4c544350;  // "LTCP"
constexpr int kMaxDims = 16;
// Below this many elements per rank an all_reduce gathers whole tensors (one round); above, it
// reduce-scatters chunks (each rank moves 2 (P - 1) / P of the tensor instead of P - 1 times it).
constexpr int64_t kChunkedReduceMinPerRank = 4096;

enum class Kind : uint8_t { data = 0, abort = 1 };

struct Header {
  uint32_t magic = kMagic;
  Kind kind = Kind::data;
  uint8_t dtype = 0;
  uint16_t ndim = 0;
  int64_t group = 0;
  int64_t tag = 0;
  uint64_t nbytes = 0;
  int64_t dims[kMaxDims] = {};
  char op[16] = {};
};

struct Message {
  Tensor tensor;
  std::string op;
};

struct Outgoing {
  Header header;
  Tensor tensor;        // contiguous CPU data (Kind::data)
  std::string payload;  // the reason (Kind::abort)
};

std::string describe(const Tensor& t) {
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

double seconds(std::chrono::milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The connections of this process to every other rank, shared by the whole group and the
// sub-groups split from it.
class Mesh {
 public:
  Mesh(int rank, int size, CommOptions options) : rank_(rank), size_(size), options_(options), peers_(size) {}

  ~Mesh() { close(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  const CommOptions& options() const { return options_; }

  void connect(TcpStore& store, const std::string& prefix) {
    const auto deadline = net::deadline_after(options_.timeout);
    net::Socket listener = net::listen_on("", 0);
    store.set(prefix + "/addr/" + std::to_string(rank_),
              store.local_address() + ":" + std::to_string(net::local_port(listener)));
    // Rank r connects to every lower rank and accepts the higher ones.
    for (int p = 0; p < rank_; ++p) {
      const std::string address = store.get(prefix + "/addr/" + std::to_string(p));
      const size_t colon = address.rfind(':');
      LT_CHECK(colon != std::string::npos, "dist: rank ", p, " published a malformed address \"", address, "\"");
      net::Socket s = net::connect_to(address.substr(0, colon), std::stoi(address.substr(colon + 1)), deadline,
                                      "rank " + std::to_string(rank_) + " connecting to rank " + std::to_string(p));
      const int32_t hello[2] = {static_cast<int32_t>(kMagic), rank_};
      net::send_all(s, hello, sizeof hello, "greeting rank " + std::to_string(p));
      peers_[static_cast<size_t>(p)].socket = std::move(s);
    }
    for (int n = rank_ + 1; n < size_; ++n) {
      net::Socket s = net::accept_from(listener, deadline, "rank " + std::to_string(rank_) +
                                                               " waiting for the higher ranks to connect");
      int32_t hello[2] = {0, -1};
      LT_CHECK(net::recv_all(s, hello, sizeof hello, deadline, "reading a peer's greeting") &&
                   hello[0] == static_cast<int32_t>(kMagic) && hello[1] > rank_ && hello[1] < size_ &&
                   !peers_[static_cast<size_t>(hello[1])].socket.valid(),
               "dist: rank ", rank_, " got a connection that is not from a higher rank of this job");
      peers_[static_cast<size_t>(hello[1])].socket = std::move(s);
    }
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      Peer& peer = peers_[static_cast<size_t>(p)];
      peer.sender = std::thread([this, p] { send_loop(p); });
      peer.receiver = std::thread([this, p] { receive_loop(p); });
    }
  }

  void post(int dst, Outgoing message, const std::string& what) {
    Peer& peer = peers_[static_cast<size_t>(dst)];
    {
      std::lock_guard<std::mutex> lock(mutex_);
      check_usable(what);
      LT_CHECK(!peer.closed, "dist: ", what, ": rank ", dst, " closed its connection (its process exited or died): ",
               peer.close_reason);
      peer.outbox.push_back(std::move(message));
    }
    peer_changed_.notify_all();
  }

  Message take(int64_t group, int src, int64_t tag, const std::string& who, const std::string& what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const auto deadline = net::deadline_after(options_.timeout);
    const auto key = std::make_tuple(group, src, tag);
    while (true) {
      check_usable(who + ": " + what);
      auto it = mailbox_.find(key);
      if (it != mailbox_.end() && !it->second.empty()) {
        Message m = std::move(it->second.front());
        it->second.pop_front();
        if (it->second.empty()) mailbox_.erase(it);
        return m;
      }
      const Peer& peer = peers_[static_cast<size_t>(src)];
      LT_CHECK(!peer.closed, "dist: ", who, " waits for ", what, " from rank ", src, ", but rank ", src,
               " closed its connection (its process exited or died): ", peer.close_reason);
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
        auto again = mailbox_.find(key);
        if (again != mailbox_.end() && !again->second.empty()) continue;
        const std::string message = "dist: " + who + " timed out after " + std::to_string(seconds(options_.timeout)) +
                                    " s waiting for " + what + " from rank " + std::to_string(src);
        lock.unlock();
        abort(message);
        throw Error(message);
      }
    }
  }

  // Marks the group failed here and tells every peer.
  void abort(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_) return;
      failed_ = true;
      failed_rank_ = rank_;
      failed_message_ = why;
      for (int p = 0; p < size_; ++p) {
        if (p == rank_ || peers_[static_cast<size_t>(p)].closed) continue;
        Outgoing o;
        o.header.kind = Kind::abort;
        o.header.nbytes = why.size();
        o.payload = why;
        peers_[static_cast<size_t>(p)].outbox.push_front(std::move(o));
      }
    }
    changed_.notify_all();
    peer_changed_.notify_all();
  }

  void check_usable(const std::string& what) const {
    LT_CHECK(!failed_, "dist: rank ", rank_, ": ", what, " aborted because rank ", failed_rank_,
             " failed: ", failed_message_);
  }

  void ensure_usable(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable(what);
  }

 private:
  struct Peer {
    net::Socket socket;
    std::thread sender, receiver;
    std::deque<Outgoing> outbox;  // under mutex_
    bool closed = false;          // the connection is gone (under mutex_)
    bool receiver_done = false;   // under mutex_
    std::string close_reason;
  };

  void mark_closed(int p, const std::string& reason) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Peer& peer = peers_[static_cast<size_t>(p)];
      if (!peer.closed) {
        peer.closed = true;
        peer.close_reason = reason;
      }
    }
    changed_.notify_all();
    peer_changed_.notify_all();
  }

  void send_loop(int p) {
    Peer& peer = peers_[static_cast<size_t>(p)];
    const std::string what = "rank " + std::to_string(rank_) + " sending to rank " + std::to_string(p);
    while (true) {
      Outgoing o;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        peer_changed_.wait(lock, [&] { return !peer.outbox.empty() || stopping_ || peer.closed; });
        if (peer.outbox.empty() || peer.closed) break;
        o = std::move(peer.outbox.front());
        peer.outbox.pop_front();
      }
      try {
        net::send_all(peer.socket, &o.header, sizeof o.header, what);
        if (o.header.kind == Kind::abort) {
          net::send_all(peer.socket, o.payload.data(), o.payload.size(), what);
        } else if (o.header.nbytes > 0) {
          net::send_all(peer.socket, o.tensor.raw_data(), o.header.nbytes, what);
        }
      } catch (const Error& e) {
        mark_closed(p, e.what());
        break;
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    peer.outbox.clear();
  }

  void receive_loop(int p) {
    Peer& peer = peers_[static_cast<size_t>(p)];
    const std::string what = "rank " + std::to_string(rank_) + " receiving from rank " + std::to_string(p);
    std::string reason = "the connection was closed";
    try {
      while (true) {
        Header h;
        if (!net::recv_all(peer.socket, &h, sizeof h, net::Clock::time_point::max(), what)) break;
        LT_CHECK(h.magic == kMagic && h.ndim <= kMaxDims, "dist: ", what, ": a malformed message header");
        if (h.kind == Kind::abort) {
          std::string why(h.nbytes, '\0');
          if (h.nbytes > 0) net::recv_all(peer.socket, why.data(), h.nbytes, net::Clock::time_point::max(), what);
          {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!failed_) {
              failed_ = true;
              failed_rank_ = p;
              failed_message_ = why;
            }
          }
          changed_.notify_all();
          continue;
        }
        Shape shape(h.dims, h.dims + h.ndim);
        Tensor t = Tensor::empty(shape, static_cast<DType>(h.dtype));
        LT_CHECK(t.nbytes() == h.nbytes, "dist: ", what, ": a message's size does not match its shape");
        if (h.nbytes > 0) net::recv_all(peer.socket, t.raw_data(), h.nbytes, net::Clock::time_point::max(), what);
        {
          std::lock_guard<std::mutex> lock(mutex_);
          mailbox_[{h.group, p, h.tag}].push_back({std::move(t), std::string(h.op, strnlen(h.op, sizeof h.op))});
        }
        changed_.notify_all();
      }
    } catch (const std::exception& e) {
      reason = e.what();
    }
    mark_closed(p, reason);
    std::lock_guard<std::mutex> lock(mutex_);
    peer.receiver_done = true;
    changed_.notify_all();
  }

  // Sends what is queued, says goodbye (end of stream), then keeps reading until each peer has
  // done the same (bounded), so no message in flight is cut off by a reset: closing a socket with
  // unread data resets the connection and the peer may lose what it had not read yet. After a
  // failure (or while an exception unwinds) the wait is short: the job is ending.
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    peer_changed_.notify_all();
    for (Peer& peer : peers_)
      if (peer.sender.joinable()) peer.sender.join();
    for (Peer& peer : peers_)
      peer.socket.shutdown_write();
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const bool ending = failed_ || std::uncaught_exceptions() > 0;
      const auto grace = ending ? std::chrono::milliseconds(500) : std::min(options_.timeout, std::chrono::milliseconds(30000));
      changed_.wait_for(lock, grace, [&] {
        return std::all_of(peers_.begin(), peers_.end(),
                           [](const Peer& p) { return !p.receiver.joinable() || p.receiver_done; });
      });
    }
    for (Peer& peer : peers_) peer.socket.shutdown();
    for (Peer& peer : peers_)
      if (peer.receiver.joinable()) peer.receiver.join();
  }

  const int rank_, size_;
  const CommOptions options_;
  std::vector<Peer> peers_;
  std::mutex mutex_;
  std::condition_variable changed_;       // mailbox, failures, closed peers
  std::condition_variable peer_changed_;  // outboxes
  std::map<std::tuple<int64_t, int, int64_t>, std::deque<Message>> mailbox_;
  bool failed_ = false;
  int failed_rank_ = -1;
  std::string failed_message_;
  bool stopping_ = false;
};

class TcpCommunicator final : public Communicator {
 public:
  TcpCommunicator(std::shared_ptr<Mesh> mesh, std::vector<int> members, int64_t group_id, int rank)
      : mesh_(std::move(mesh)), members_(std::move(members)), group_id_(group_id), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  const CommOptions& options() const override { return mesh_->options(); }

  void send(const Tensor& tensor, int dst, int tag) override {
    check_peer(dst, "send", "destination");
    LT_CHECK(tag >= 0, "dist send: tag must be >= 0, got ", tag);
    LT_CHECK(tensor.defined(), "dist send: rank ", rank_, " was given an undefined tensor to send to rank ", dst);
    post(dst, tag, tensor, "send", "send to rank " + std::to_string(dst));
  }

  Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag) override {
    check_peer(src, "recv", "source");
    LT_CHECK(tag >= 0, "dist recv: tag must be >= 0, got ", tag);
    Message m = take(src, tag, "a message with tag " + std::to_string(tag));
    LT_CHECK(m.tensor.shape() == shape && m.tensor.dtype() == dtype, "dist recv: rank ", rank_, " expected ",
             shape_str(shape), " ", dtype_name(dtype), " from rank ", src, " (tag ", tag, "), got ",
             describe(m.tensor));
    return arrive(m.tensor, device);
  }

  std::unique_ptr<PendingRecv> exchange(const Tensor& tensor, int dst, const Shape& shape, DType dtype, Device device,
                                        int src, int tag) override {
    // The send is queued on dst's sender thread and src's receiver thread is already reading, so
    // the transfer overlaps whatever the caller computes before wait().
    send(tensor, dst, tag);
    check_peer(src, "exchange", "source");
    class Pending final : public PendingRecv {
     public:
      Pending(std::shared_ptr<Communicator> comm, Shape shape, DType dtype, Device device, int src, int tag)
          : comm_(std::move(comm)), shape_(std::move(shape)), dtype_(dtype), device_(device), src_(src), tag_(tag) {}
      Tensor wait() override { return comm_->recv(shape_, dtype_, device_, src_, tag_); }

     private:
      std::shared_ptr<Communicator> comm_;
      Shape shape_;
      DType dtype_;
      Device device_;
      int src_, tag_;
    };
    return std::make_unique<Pending>(shared_from_this(), shape, dtype, device, src, tag);
  }

  std::vector<Tensor> all_gather(const Tensor& tensor) override {
    LT_CHECK(tensor.defined(), "dist all_gather: rank ", rank_, " was given an undefined tensor");
    const int64_t tag = next_collective("all_gather");
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, tensor, "all_gather", name("all_gather", tag));
    std::vector<Tensor> result(static_cast<size_t>(size()));
    for (int s = 0; s < size(); ++s) {
      if (s == rank_) {
        result[static_cast<size_t>(s)] = private_copy(tensor);
        continue;
      }
      Message m = expect(s, tag, "all_gather");
      check_same(m, tensor, s, "all_gather");
      result[static_cast<size_t>(s)] = arrive(m.tensor, tensor.device());
    }
    return result;
  }

  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override {
    LT_CHECK(static_cast<int>(to_each.size()) == size(), "dist all_to_all: rank ", rank_,
             " must give one tensor per rank (", size(), "), got ", to_each.size());
    for (size_t d = 0; d < to_each.size(); ++d)
      LT_CHECK(to_each[d].defined(), "dist all_to_all: rank ", rank_, " gave an undefined tensor for rank ", d);
    const int64_t tag = next_collective("all_to_all");
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, to_each[static_cast<size_t>(d)], "all_to_all", name("all_to_all", tag));
    const Device device = to_each[static_cast<size_t>(rank_)].device();
    std::vector<Tensor> result(static_cast<size_t>(size()));
    for (int s = 0; s < size(); ++s)
      result[static_cast<size_t>(s)] = s == rank_ ? private_copy(to_each[static_cast<size_t>(s)])
                                                  : arrive(expect(s, tag, "all_to_all").tensor, device);
    return result;
  }

  // Sends now (on each peer's sender thread) and receives in wait(): the transfer overlaps the
  // caller's work in between.
  std::unique_ptr<PendingAllToAll> start_all_to_all(const std::vector<Tensor>& to_each,
                                                    const std::vector<Tensor>& into) override {
    check_all_to_all_into(to_each, into);
    const int64_t tag = next_collective("all_to_all");
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, to_each[static_cast<size_t>(d)], "all_to_all", name("all_to_all", tag));
    receive_into(to_each[static_cast<size_t>(rank_)], into[static_cast<size_t>(rank_)], rank_);
    return receive_later(
        [this, tag, into](int s) {
          return arrive(expect(s, tag, "all_to_all").tensor, into[static_cast<size_t>(s)].device());
        },
        into);
  }

  Tensor all_reduce(const Tensor& tensor, ReduceOp op) override {
    LT_CHECK(tensor.defined(), "dist all_reduce: rank ", rank_, " was given an undefined tensor");
    LT_CHECK(op == ReduceOp::sum || is_floating(tensor.dtype()), "dist all_reduce: mean needs a floating tensor, got ",
             describe(tensor));
    NoGradGuard no_grad;
    Tensor total = tensor.numel() >= kChunkedReduceMinPerRank * size() ? chunked_sum(tensor) : gathered_sum(tensor);
    if (op == ReduceOp::mean) total = mul(total, 1.0 / size());
    return arrive(total, tensor.device());
  }

  Tensor broadcast(const Tensor& tensor, int root) override {
    check_peer(root, "broadcast", "root");
    LT_CHECK(tensor.defined(), "dist broadcast: rank ", rank_, " was given an undefined tensor");
    const int64_t tag = next_collective("broadcast");
    if (rank_ == root) {
      for (int d = 0; d < size(); ++d)
        if (d != rank_) post(d, tag, tensor, "broadcast", name("broadcast", tag));
      return private_copy(tensor);
    }
    Message m = expect(root, tag, "broadcast");
    LT_CHECK(m.tensor.shape() == tensor.shape() && m.tensor.dtype() == tensor.dtype(), "dist broadcast: rank ", rank_,
             " expected ", describe(tensor), " but root ", root, " sent ", describe(m.tensor));
    return arrive(m.tensor, tensor.device());
  }

  void barrier() override {
    const int64_t tag = next_collective("barrier");
    const Tensor token = Tensor::zeros({1});
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, token, "barrier", name("barrier", tag));
    for (int s = 0; s < size(); ++s)
      if (s != rank_) expect(s, tag, "barrier");
  }

  void abort(const std::string& why) override { mesh_->abort(why); }

  std::shared_ptr<Communicator> split(int64_t color, int64_t key) override {
    const int64_t tag = next_collective("split");
    const Tensor mine = Tensor::from_vector(std::vector<int64_t>{color, key}, {2});
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, mine, "split", name("split", tag));
    std::vector<std::pair<int64_t, int>> same;
    for (int s = 0; s < size(); ++s) {
      const std::vector<int64_t> ck =
          s == rank_ ? std::vector<int64_t>{color, key} : expect(s, tag, "split").tensor.to_vector_as<int64_t>();
      if (ck[0] == color) same.emplace_back(ck[1], s);
    }
    std::sort(same.begin(), same.end());
    std::vector<int> members;
    int new_rank = 0;
    for (size_t i = 0; i < same.size(); ++i) {
      members.push_back(members_[static_cast<size_t>(same[i].second)]);
      if (same[i].second == rank_) new_rank = static_cast<int>(i);
    }
    // Every member derives the same id from (this group, this split, color).
    const int64_t id = static_cast<int64_t>(mix(mix(static_cast<uint64_t>(group_id_) ^ static_cast<uint64_t>(tag)) ^
                                                static_cast<uint64_t>(color)));
    return std::make_shared<TcpCommunicator>(mesh_, members, id, new_rank);
  }

 private:
  // Small tensors: every rank sends its whole tensor to every other and sums in rank order.
  Tensor gathered_sum(const Tensor& tensor) {
    const int64_t tag = next_collective("all_reduce");
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, tensor, "all_reduce", name("all_reduce", tag));
    Tensor total;
    for (int s = 0; s < size(); ++s) {
      Tensor part;
      if (s == rank_) {
        part = host(tensor);
      } else {
        Message m = expect(s, tag, "all_reduce");
        check_same(m, tensor, s, "all_reduce");
        part = m.tensor;
      }
      total = s == 0 ? part.clone() : add(total, part);
    }
    return total;
  }

  // Large tensors: chunk c of every rank goes to rank c, which sums the chunks in rank order
  // (elementwise, so the bits equal the whole-tensor sum) and sends its reduced chunk to everyone.
  Tensor chunked_sum(const Tensor& tensor) {
    const int64_t tag = next_collective("all_reduce");
    const Tensor flat = host(tensor).reshape({-1});
    const int64_t n = flat.numel(), p = size();
    auto chunk = [&](int c) { return flat.narrow(0, n * c / p, n * (c + 1) / p - n * c / p); };
    // A fingerprint first, so ranks with different shapes fail clearly.
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, shape_tensor(tensor), "all_reduce", name("all_reduce", tag));
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, chunk(d), "all_reduce", name("all_reduce", tag));
    for (int s = 0; s < size(); ++s) {
      if (s == rank_) continue;
      Message m = expect(s, tag, "all_reduce");
      LT_CHECK(m.tensor.to_vector_as<int64_t>() == shape_tensor(tensor).to_vector_as<int64_t>(),
               "dist all_reduce: rank ", rank_, " has ", describe(tensor), " but rank ", s,
               " contributed another shape or dtype (every rank must contribute the same shape and dtype)");
    }
    Tensor mine;
    for (int s = 0; s < size(); ++s) {
      const Tensor part = s == rank_ ? chunk(rank_) : expect(s, tag, "all_reduce").tensor;
      mine = s == 0 ? part.clone() : add(mine, part);
    }
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, mine, "all_reduce", name("all_reduce", tag));
    std::vector<Tensor> reduced(static_cast<size_t>(size()));
    for (int s = 0; s < size(); ++s) reduced[static_cast<size_t>(s)] = s == rank_ ? mine : expect(s, tag, "all_reduce").tensor;
    return cat(reduced, 0).reshape(tensor.shape());
  }

  static Tensor shape_tensor(const Tensor& t) {
    std::vector<int64_t> d{static_cast<int64_t>(t.dtype()), t.dim()};
    d.insert(d.end(), t.shape().begin(), t.shape().end());
    return Tensor::from_vector(d, {static_cast<int64_t>(d.size())});
  }

  void check_same(const Message& m, const Tensor& tensor, int s, const char* op) const {
    LT_CHECK(m.tensor.shape() == tensor.shape() && m.tensor.dtype() == tensor.dtype(), "dist ", op, ": rank ", rank_,
             " has ", describe(tensor), " but rank ", s, " sent ", describe(m.tensor),
             " (every rank must contribute the same shape and dtype)");
  }

  void check_peer(int peer, const char* op, const char* role) const {
    LT_CHECK(peer >= 0 && peer < size(), "dist ", op, ": ", role, " rank must be in [0, ", size(), "), got ", peer);
  }

  std::string who() const {
    std::string text = "rank " + std::to_string(rank_);
    if (static_cast<int>(members_.size()) == mesh_->size()) return text;
    return text + " of a sub-group (process rank " + std::to_string(mesh_->rank()) + ")";
  }

  int64_t next_collective(const char* op) {
    const int64_t tag = -1 - collective_count_++;
    mesh_->ensure_usable(std::string(op) + " (collective #" + std::to_string(-1 - tag) + ")");
    return tag;
  }

  static std::string name(const char* op, int64_t tag) {
    return std::string(op) + " (collective #" + std::to_string(-1 - tag) + ")";
  }

  static Tensor host(const Tensor& t) {
    NoGradGuard no_grad;
    Tensor d = t.detach();
    if (!d.device().is_cpu()) d = d.to(Device::cpu());
    return d.contiguous();
  }

  static Tensor private_copy(const Tensor& t) {
    NoGradGuard no_grad;
    return t.detach().clone();
  }

  static Tensor arrive(const Tensor& message, Device device) {
    NoGradGuard no_grad;
    return message.device() == device ? message : message.to(device);
  }

  void post(int dst, int64_t tag, const Tensor& tensor, const char* op, const std::string& what) {
    LT_CHECK(tensor.dim() <= kMaxDims, "dist: the TCP group sends tensors of at most ", kMaxDims, " dims, got ",
             describe(tensor));
    Outgoing o;
    // A private copy: the caller may change its tensor once send returns (buffered semantics).
    o.tensor = tensor.device().is_cpu() ? host(tensor).clone() : host(tensor);
    o.header.dtype = static_cast<uint8_t>(o.tensor.dtype());
    o.header.ndim = static_cast<uint16_t>(o.tensor.dim());
    o.header.group = group_id_;
    o.header.tag = tag;
    o.header.nbytes = o.tensor.nbytes();
    for (int64_t i = 0; i < o.tensor.dim(); ++i) o.header.dims[i] = o.tensor.size(i);
    std::strncpy(o.header.op, op, sizeof o.header.op - 1);
    mesh_->post(members_[static_cast<size_t>(dst)], std::move(o), who() + ": " + what);
  }

  Message take(int src, int64_t tag, const std::string& what) {
    return mesh_->take(group_id_, members_[static_cast<size_t>(src)], tag, who(), what);
  }

  Message expect(int src, int64_t tag, const char* op) {
    const std::string what = name(op, tag);
    Message m = take(src, tag, what);
    LT_CHECK(m.op == op, "dist: collective mismatch: rank ", rank_, " called ", what, " but rank ", src, " called ",
             m.op, " at the same position (every rank must call the same collectives in the same order)");
    return m;
  }

  std::shared_ptr<Mesh> mesh_;
  const std::vector<int> members_;  // process ranks, by rank in this group
  const int64_t group_id_;
  const int rank_;
  int64_t collective_count_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_tcp_process_group(TcpStore& store, int rank, int size, const CommOptions& options,
                                                     const std::string& prefix) {
  LT_CHECK(size >= 1 && rank >= 0 && rank < size, "dist: expected 0 <= rank < size, got rank ", rank, " and size ",
           size);
  LT_CHECK(options.timeout.count() > 0, "dist: the timeout must be > 0 ms, got ", options.timeout.count());
  auto mesh = std::make_shared<Mesh>(rank, size, options);
  mesh->connect(store, prefix);
  std::vector<int> everyone(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) everyone[static_cast<size_t>(r)] = r;
  return std::make_shared<TcpCommunicator>(mesh, everyone, 0, rank);
}

}  // namespace longtape::dist
