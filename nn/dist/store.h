#pragma once
// A small TCP key-value store through which the processes of one job find each other (their
// addresses, the NCCL unique id), as torch.distributed's TCPStore: one process serves it at
// MASTER_ADDR:MASTER_PORT, every process (the server's own included) is a client. Values are
// bytes; get() waits until some process has set the key, at most `timeout`.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace longtape::dist {

class TcpStore {
 public:
  // Connects to host:port, retrying until `timeout` while the server is not up yet. With
  // `serve`, first starts the server on that port in this process (port 0: a free one, see port()).
  TcpStore(const std::string& host, int port, bool serve, std::chrono::milliseconds timeout);
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  void set(const std::string& key, const std::string& value);
  // The value of `key`, waiting until it is set; throws longtape::Error naming the key at the timeout.
  std::string get(const std::string& key);
  std::string get(const std::string& key, std::chrono::milliseconds timeout);
  // Waits until every key is set (throws naming the first missing one at the timeout).
  void wait(const std::vector<std::string>& keys);
  // Adds `delta` to the integer at `key` (0 when unset) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);

  int port() const { return port_; }
  // The address this client connected to (what another client of the same store connects to).
  const std::string& host() const { return host_; }
  // This process's address as the server sees it (the interface other hosts reach it by).
  std::string local_address() const;
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  struct Server;
  struct Connection;
  std::string request(uint8_t op, const std::string& key, const std::string& value, std::chrono::milliseconds wait,
                      bool* found);

  std::unique_ptr<Server> server_;
  std::unique_ptr<Connection> connection_;
  std::string host_;
  int port_ = 0;
  std::chrono::milliseconds timeout_;
};

}  // namespace longtape::dist
