#pragma once
// The transport of the TCP process group (nn/dist/tcp_communicator.h): a connection from this
// process to every other rank, a sender thread per peer draining an outbox (so posts are
// buffered), and a receiver thread per peer that files incoming messages by (group, source, tag).
// A failure anywhere (a timeout, an abort, a closed connection) makes every waiting or later call
// throw naming the rank that failed.
//
// Internal to nn/dist: not part of the library's interface.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "nn/dist/communicator.h"
#include "nn/dist/message_communicator.h"
#include "nn/dist/socket.h"
#include "nn/dist/store.h"

namespace longtape::dist::detail {

inline constexpr uint32_t kTcpMagic = 0x4c544350;  // "LTCP"
inline constexpr int kTcpMaxDims = 16;

enum class TcpKind : uint8_t { data = 0, abort = 1 };

// What precedes every message on the wire.
struct TcpHeader {
  uint32_t magic = kTcpMagic;
  TcpKind kind = TcpKind::data;
  uint8_t dtype = 0;
  uint16_t ndim = 0;
  int64_t group = 0;
  int64_t tag = 0;
  uint64_t nbytes = 0;
  int64_t dims[kTcpMaxDims] = {};
  char op[16] = {};
};

struct TcpOutgoing {
  TcpHeader header;
  Tensor tensor;        // contiguous CPU data (TcpKind::data)
  std::string payload;  // the reason (TcpKind::abort)
};

// The connections of this process to every other rank, shared by the whole group and the
// sub-groups split from it.
class Mesh {
 public:
  Mesh(int rank, int size, CommOptions options) : rank_(rank), size_(size), options_(options), peers_(size) {}
  ~Mesh() { close(); }
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const CommOptions& options() const { return options_; }

  // Collective over all ranks: publishes this rank's address in the store under `prefix`, connects
  // to every lower rank, accepts every higher one, and starts the sender and receiver threads.
  void connect(TcpStore& store, const std::string& prefix);
  // Queues `message` for process rank `dst`; throws when the group failed or dst is gone.
  void post(int dst, TcpOutgoing message, const std::string& what);
  // The next message of `group` from process rank `src` with `tag`; throws on timeout (and fails
  // the group), when the group failed, or when src closed its connection.
  Message take(int64_t group, int src, int64_t tag, const std::string& who, const std::string& what);
  // Marks the group failed here and tells every peer.
  void abort(const std::string& why);
  // Throws when the group can no longer communicate.
  void ensure_usable(const std::string& what);

 private:
  struct Peer {
    net::Socket socket;
    std::thread sender, receiver;
    std::deque<TcpOutgoing> outbox;  // under mutex_
    bool closed = false;             // the connection is gone (under mutex_)
    bool receiver_done = false;      // under mutex_
    std::string close_reason;
  };

  void check_usable(const std::string& what) const;  // caller holds mutex_
  // Puts a message from rank `src` into the mailbox and wakes the waiting takers.
  void deliver(const TcpHeader& h, int src, Tensor tensor);
  void mark_closed(int p, const std::string& reason);
  void send_loop(int p);
  void receive_loop(int p);
  void close();

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

}  // namespace longtape::dist::detail
