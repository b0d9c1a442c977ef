#pragma once
// Blocking TCP sockets with deadlines, for the key-value store (nn/dist/store.h) and the TCP
// process group (nn/dist/tcp_communicator.h). Every wait is bounded by a deadline, every failure
// throws longtape::Error saying what was being done (`what`), and writes never raise SIGPIPE.
#include <chrono>
#include <cstddef>
#include <string>

namespace longtape::dist::net {

using Clock = std::chrono::steady_clock;

// An owned socket descriptor (closed on destruction).
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { close(); }
  Socket(Socket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void close();
  // Ends both directions: a thread blocked reading this socket returns (EOF).
  void shutdown();
  // Ends this side's sending (the peer reads end of stream after the data already sent).
  void shutdown_write();

 private:
  int fd_ = -1;
};

// A listening socket on host:port (port 0: a free port chosen by the system; host "" or
// "0.0.0.0": every interface).
Socket listen_on(const std::string& host, int port);
int local_port(const Socket& socket);
// Connects to host:port, retrying while the listener is not up yet, until the deadline.
Socket connect_to(const std::string& host, int port, Clock::time_point deadline, const std::string& what);
// The next connection to `listener`, waiting until the deadline.
Socket accept_from(const Socket& listener, Clock::time_point deadline, const std::string& what);

// Writes every byte (blocking).
void send_all(const Socket& socket, const void* data, size_t n, const std::string& what);
// Reads exactly n bytes. Returns false when the peer closed the connection before the first byte;
// throws when it closes in the middle, on an error, or at the deadline.
bool recv_all(const Socket& socket, void* data, size_t n, Clock::time_point deadline, const std::string& what);

// Deadline `timeout` from now (saturating).
Clock::time_point deadline_after(std::chrono::milliseconds timeout);
// A port nobody listens on right now (bound, then released; for a launcher choosing MASTER_PORT).
int free_port();
// The IPv4 address of this end of a connected socket: the interface that reaches the peer, which is
// the address other ranks use to reach this one.
std::string local_address(const Socket& connected);

}  // namespace longtape::dist::net
