#include "nn/dist/socket.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "tensor/error.h"

namespace longtape::dist::net {

namespace {

std::string errno_text(int e) { return std::string(std::strerror(e)); }

int remaining_ms(Clock::time_point deadline) {
  if (deadline == Clock::time_point::max()) return -1;
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<long long>(left, 1000 * 60 * 60));
}

// Resolves host:port to IPv4 addresses ("" = any interface).
addrinfo* resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* result = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &result);
  LT_CHECK(rc == 0 && result != nullptr, "dist: cannot resolve the address ", host.empty() ? "(any)" : host, ":",
           port, ": ", gai_strerror(rc));
  return result;
}

void set_no_delay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

void Socket::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void Socket::shutdown() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::shutdown_write() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
}

Socket listen_on(const std::string& host, int port) {
  LT_CHECK(port >= 0 && port <= 65535, "dist: a port must be in [0, 65535], got ", port);
  addrinfo* addresses = resolve(host == "0.0.0.0" ? "" : host, port, true);
  Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int socket_errno = errno;
  if (!s.valid()) {
    freeaddrinfo(addresses);
    LT_CHECK(false, "dist: cannot create a socket: ", errno_text(socket_errno));
  }
  int one = 1;
  setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const int rc = ::bind(s.fd(), addresses->ai_addr, addresses->ai_addrlen);
  const int bind_errno = errno;
  freeaddrinfo(addresses);
  LT_CHECK(rc == 0, "dist: cannot listen on ", host.empty() ? "(any)" : host, ":", port, ": ",
           errno_text(bind_errno));
  LT_CHECK(::listen(s.fd(), 128) == 0, "dist: listen() failed: ", errno_text(errno));
  return s;
}

int local_port(const Socket& socket) {
  sockaddr_in address{};
  socklen_t length = sizeof address;
  LT_CHECK(getsockname(socket.fd(), reinterpret_cast<sockaddr*>(&address), &length) == 0,
           "dist: getsockname() failed: ", errno_text(errno));
  return ntohs(address.sin_port);
}

Socket connect_to(const std::string& host, int port, Clock::time_point deadline, const std::string& what) {
  int last_errno = 0;
  auto pause = std::chrono::milliseconds(10);
  while (true) {
    addrinfo* addresses = resolve(host, port, false);
    Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    const int rc = s.valid() ? ::connect(s.fd(), addresses->ai_addr, addresses->ai_addrlen) : -1;
    last_errno = errno;
    freeaddrinfo(addresses);
    if (rc == 0) {
      set_no_delay(s.fd());
      return s;
    }
    LT_CHECK(Clock::now() + pause < deadline, "dist: ", what, ": could not connect to ", host, ":", port,
             " before the timeout (last error: ", errno_text(last_errno), ")");
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(200));
  }
}

Socket accept_from(const Socket& listener, Clock::time_point deadline, const std::string& what) {
  while (true) {
    pollfd p{listener.fd(), POLLIN, 0};
    const int ready = ::poll(&p, 1, remaining_ms(deadline));
    if (ready < 0 && errno == EINTR) continue;
    LT_CHECK(ready >= 0, "dist: ", what, ": poll() failed: ", errno_text(errno));
    LT_CHECK(ready > 0, "dist: ", what, ": timed out waiting for a connection");
    const int fd = ::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0 && (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED)) continue;
    LT_CHECK(fd >= 0, "dist: ", what, ": accept() failed: ", errno_text(errno));
    set_no_delay(fd);
    return Socket(fd);
  }
}

void send_all(const Socket& socket, const void* data, size_t n, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t sent = ::send(socket.fd(), p, n, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    LT_CHECK(sent > 0, "dist: ", what, ": the connection failed while sending (", errno_text(errno), ")");
    p += sent;
    n -= static_cast<size_t>(sent);
  }
}

bool recv_all(const Socket& socket, void* data, size_t n, Clock::time_point deadline, const std::string& what) {
  char* p = static_cast<char*>(data);
  size_t got = 0;
  while (got < n) {
    pollfd pf{socket.fd(), POLLIN, 0};
    const int ready = ::poll(&pf, 1, remaining_ms(deadline));
    if (ready < 0 && errno == EINTR) continue;
    LT_CHECK(ready >= 0, "dist: ", what, ": poll() failed: ", errno_text(errno));
    LT_CHECK(ready > 0, "dist: ", what, ": timed out");
    const ssize_t r = ::recv(socket.fd(), p + got, n - got, 0);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (r == 0 && got == 0) return false;
    LT_CHECK(r > 0, "dist: ", what, ": the connection ", r == 0 ? "was closed" : "failed (" + errno_text(errno) + ")",
             " in the middle of a message");
    got += static_cast<size_t>(r);
  }
  return true;
}

Clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  const auto now = Clock::now();
  if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - now))
    return Clock::time_point::max();
  return now + timeout;
}

int free_port() {
  Socket s = listen_on("", 0);
  return local_port(s);
}

std::string local_address(const Socket& connected) {
  sockaddr_in address{};
  socklen_t length = sizeof address;
  LT_CHECK(getsockname(connected.fd(), reinterpret_cast<sockaddr*>(&address), &length) == 0,
           "dist: getsockname() failed: ", errno_text(errno));
  char text[INET_ADDRSTRLEN] = {};
  LT_CHECK(inet_ntop(AF_INET, &address.sin_addr, text, sizeof text) != nullptr, "dist: inet_ntop() failed: ",
           errno_text(errno));
  return text;
}

}  // namespace longtape::dist::net
