#include "nn/dist/tcp_mesh.h"

#include <algorithm>
#include <cstring>
#include <exception>

#include "tensor/error.h"

namespace longtape::dist::detail {

namespace {
double seconds(std::chrono::milliseconds d) { return static_cast<double>(d.count()) / 1000.0; }
}  // namespace

void Mesh::connect(TcpStore& store, const std::string& prefix) {
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
    const int32_t hello[2] = {static_cast<int32_t>(kTcpMagic), rank_};
    net::send_all(s, hello, sizeof hello, "greeting rank " + std::to_string(p));
    peers_[static_cast<size_t>(p)].socket = std::move(s);
  }
  for (int n = rank_ + 1; n < size_; ++n) {
    net::Socket s = net::accept_from(listener, deadline, "rank " + std::to_string(rank_) +
                                                             " waiting for the higher ranks to connect");
    int32_t hello[2] = {0, -1};
    LT_CHECK(net::recv_all(s, hello, sizeof hello, deadline, "reading a peer's greeting") &&
                 hello[0] == static_cast<int32_t>(kTcpMagic) && hello[1] > rank_ && hello[1] < size_ &&
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

void Mesh::deliver(const TcpHeader& h, int src, Tensor tensor) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    mailbox_[{h.group, src, h.tag}].push_back({std::move(tensor), std::string(h.op, strnlen(h.op, sizeof h.op))});
  }
  changed_.notify_all();
}

void Mesh::post(int dst, TcpOutgoing message, const std::string& what) {
  if (dst == rank()) {  // a message to this process goes straight to its mailbox (there is no socket to itself)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      check_usable(what);
    }
    deliver(message.header, dst, std::move(message.tensor));
    return;
  }
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

Message Mesh::take(int64_t group, int src, int64_t tag, const std::string& who, const std::string& what) {
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

void Mesh::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return;
    failed_ = true;
    failed_rank_ = rank_;
    failed_message_ = why;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_ || peers_[static_cast<size_t>(p)].closed) continue;
      TcpOutgoing o;
      o.header.kind = TcpKind::abort;
      o.header.nbytes = why.size();
      o.payload = why;
      peers_[static_cast<size_t>(p)].outbox.push_front(std::move(o));
    }
  }
  changed_.notify_all();
  peer_changed_.notify_all();
}

void Mesh::ensure_usable(const std::string& what) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable(what);
}

void Mesh::check_usable(const std::string& what) const {
  LT_CHECK(!failed_, "dist: rank ", rank_, ": ", what, " aborted because rank ", failed_rank_,
           " failed: ", failed_message_);
}

void Mesh::mark_closed(int p, const std::string& reason) {
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

void Mesh::send_loop(int p) {
  Peer& peer = peers_[static_cast<size_t>(p)];
  const std::string what = "rank " + std::to_string(rank_) + " sending to rank " + std::to_string(p);
  while (true) {
    TcpOutgoing o;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      peer_changed_.wait(lock, [&] { return !peer.outbox.empty() || stopping_ || peer.closed; });
      if (peer.outbox.empty() || peer.closed) break;
      o = std::move(peer.outbox.front());
      peer.outbox.pop_front();
    }
    try {
      net::send_all(peer.socket, &o.header, sizeof o.header, what);
      if (o.header.kind == TcpKind::abort) {
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

void Mesh::receive_loop(int p) {
  Peer& peer = peers_[static_cast<size_t>(p)];
  const std::string what = "rank " + std::to_string(rank_) + " receiving from rank " + std::to_string(p);
  std::string reason = "the connection was closed";
  try {
    while (true) {
      TcpHeader h;
      if (!net::recv_all(peer.socket, &h, sizeof h, net::Clock::time_point::max(), what)) break;
      LT_CHECK(h.magic == kTcpMagic && h.ndim <= kTcpMaxDims, "dist: ", what, ": a malformed message header");
      if (h.kind == TcpKind::abort) {
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
      deliver(h, p, std::move(t));
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
void Mesh::close() {
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

}  // namespace longtape::dist::detail
