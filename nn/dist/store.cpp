#include "nn/dist/store.h"

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <list>
#include <map>
#include <mutex>
#include <thread>

#include "nn/dist/socket.h"
#include "tensor/error.h"

namespace longtape::dist {

namespace {

enum Op : uint8_t { kSet = 1, kGet = 2, kAdd = 3 };

// Frames: a request is op (1 byte), key length (4), key, value length (8), value, wait in ms (8);
// a reply is found (1 byte), value length (8), value.
void put_u64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }

template <typename T>
T read_pod(const net::Socket& s, net::Clock::time_point deadline, const std::string& what, bool* eof = nullptr) {
  T v{};
  const bool got = net::recv_all(s, &v, sizeof v, deadline, what);
  if (!got) {
    LT_CHECK(eof != nullptr, "dist: ", what, ": the connection was closed");
    *eof = true;
  }
  return v;
}

std::string read_bytes(const net::Socket& s, uint64_t n, net::Clock::time_point deadline, const std::string& what) {
  LT_CHECK(n <= (uint64_t{1} << 32), "dist: ", what, ": a store message of ", n, " bytes is too large");
  std::string bytes(n, '\0');
  if (n > 0) LT_CHECK(net::recv_all(s, bytes.data(), n, deadline, what), "dist: ", what, ": the connection was closed");
  return bytes;
}

}  // namespace

struct TcpStore::Server {
  net::Socket listener;
  int port = 0;
  std::mutex mutex;
  std::condition_variable changed;
  std::map<std::string, std::string> values;
  std::atomic<bool> stopping{false};
  std::list<std::pair<net::Socket, std::thread>> clients;  // under mutex
  int open_clients = 0;                                    // under mutex
  std::thread acceptor;

  explicit Server(int wanted_port) : listener(net::listen_on("", wanted_port)), port(net::local_port(listener)) {
    acceptor = std::thread([this] { accept_loop(); });
  }

  ~Server() {
    stopping = true;
    changed.notify_all();
    acceptor.join();
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto& [socket, thread] : clients) socket.shutdown();
    }
    // Without the lock: a client thread takes it once more on its way out. No new client comes
    // (the acceptor has stopped), so the list no longer changes.
    for (auto& [socket, thread] : clients) thread.join();
  }

  // Waits (bounded) until every client has hung up, so processes still setting up are not cut off
  // by the server's process finishing first.
  void drain(std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait_for(lock, limit, [&] { return open_clients <= 1; });  // this process's own client is last
  }

  void accept_loop() {
    while (!stopping) {
      net::Socket client;
      try {
        client = net::accept_from(listener, net::Clock::now() + std::chrono::milliseconds(100), "store server");
      } catch (const Error&) {
        continue;  // no connection within the poll interval
      }
      std::lock_guard<std::mutex> lock(mutex);
      ++open_clients;
      clients.emplace_back(std::move(client), std::thread());
      net::Socket& socket = clients.back().first;
      clients.back().second = std::thread([this, &socket] { serve(socket); });
    }
  }

  void serve(const net::Socket& client) {
    const std::string what = "store server";
    try {
      while (!stopping) {
        bool eof = false;
        const uint8_t op = read_pod<uint8_t>(client, net::Clock::time_point::max(), what, &eof);
        if (eof) break;
        const std::string key = read_bytes(client, read_pod<uint32_t>(client, net::Clock::time_point::max(), what),
                                           net::Clock::time_point::max(), what);
        const std::string value = read_bytes(client, read_pod<uint64_t>(client, net::Clock::time_point::max(), what),
                                             net::Clock::time_point::max(), what);
        const auto wait = std::chrono::milliseconds(read_pod<int64_t>(client, net::Clock::time_point::max(), what));
        std::string reply_value;
        bool found = true;
        {
          std::unique_lock<std::mutex> lock(mutex);
          if (op == kSet) {
            values[key] = value;
            changed.notify_all();
          } else if (op == kGet) {
            found = changed.wait_for(lock, wait, [&] { return stopping || values.count(key) > 0; }) &&
                    values.count(key) > 0;
            if (found) reply_value = values[key];
          } else if (op == kAdd) {
            int64_t delta = 0, current = 0;
            std::memcpy(&delta, value.data(), std::min(value.size(), sizeof delta));
            auto it = values.find(key);
            if (it != values.end()) std::memcpy(&current, it->second.data(), sizeof current);
            current += delta;
            values[key] = std::string(reinterpret_cast<const char*>(&current), sizeof current);
            reply_value = values[key];
            changed.notify_all();
          } else {
            break;  // not a store client
          }
        }
        std::string reply(1, found ? '\1' : '\0');
        put_u64(reply, reply_value.size());
        reply += reply_value;
        net::send_all(client, reply.data(), reply.size(), what);
      }
    } catch (const Error&) {
      // The client went away mid-request; the others carry on.
    }
    std::lock_guard<std::mutex> lock(mutex);
    --open_clients;
    changed.notify_all();
  }
};

struct TcpStore::Connection {
  net::Socket socket;
  std::mutex mutex;  // one request at a time
};

TcpStore::TcpStore(const std::string& host, int port, bool serve, std::chrono::milliseconds timeout)
    : host_(host), port_(port), timeout_(timeout) {
  LT_CHECK(timeout.count() > 0, "dist store: the timeout must be > 0 ms, got ", timeout.count());
  if (serve) {
    server_ = std::make_unique<Server>(port);
    port_ = server_->port;
  }
  connection_ = std::make_unique<Connection>();
  connection_->socket = net::connect_to(serve ? "127.0.0.1" : host, port_, net::deadline_after(timeout),
                                        "connecting to the store at " + host + ":" + std::to_string(port_));
}

TcpStore::~TcpStore() {
  if (server_ && std::uncaught_exceptions() == 0) {
    try {
      server_->drain(std::min(timeout_, std::chrono::milliseconds(30000)));
    } catch (...) {
    }
  }
  connection_.reset();
  server_.reset();
}

std::string TcpStore::request(uint8_t op, const std::string& key, const std::string& value,
                              std::chrono::milliseconds wait, bool* found) {
  const std::string what = "store at " + host_ + ":" + std::to_string(port_);
  std::string frame(1, static_cast<char>(op));
  const uint32_t key_length = static_cast<uint32_t>(key.size());
  frame.append(reinterpret_cast<const char*>(&key_length), sizeof key_length);
  frame += key;
  put_u64(frame, value.size());
  frame += value;
  const int64_t wait_ms = wait.count();
  frame.append(reinterpret_cast<const char*>(&wait_ms), sizeof wait_ms);
  std::lock_guard<std::mutex> lock(connection_->mutex);
  net::send_all(connection_->socket, frame.data(), frame.size(), what);
  // The server answers within `wait`; the margin covers the round trip.
  const auto deadline = net::deadline_after(wait + std::chrono::milliseconds(5000));
  const uint8_t ok = read_pod<uint8_t>(connection_->socket, deadline, what);
  std::string reply = read_bytes(connection_->socket, read_pod<uint64_t>(connection_->socket, deadline, what),
                                 deadline, what);
  if (found) *found = ok != 0;
  return reply;
}

void TcpStore::set(const std::string& key, const std::string& value) {
  request(kSet, key, value, std::chrono::milliseconds(0), nullptr);
}

std::string TcpStore::get(const std::string& key) { return get(key, timeout_); }

std::string TcpStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  bool found = false;
  std::string value = request(kGet, key, "", timeout, &found);
  LT_CHECK(found, "dist store: timed out after ", static_cast<double>(timeout.count()) / 1000.0,
           " s waiting for key \"", key, "\" at ", host_, ":", port_,
           " (a process of the job did not start, failed, or is stuck before setting it)");
  return value;
}

void TcpStore::wait(const std::vector<std::string>& keys) {
  const auto deadline = net::deadline_after(timeout_);
  for (const std::string& key : keys) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - net::Clock::now());
    get(key, std::max(left, std::chrono::milliseconds(1)));
  }
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  const std::string reply =
      request(kAdd, key, std::string(reinterpret_cast<const char*>(&delta), sizeof delta), std::chrono::milliseconds(0),
              nullptr);
  int64_t value = 0;
  LT_CHECK(reply.size() == sizeof value, "dist store: a malformed reply to add(\"", key, "\")");
  std::memcpy(&value, reply.data(), sizeof value);
  return value;
}

std::string TcpStore::local_address() const { return net::local_address(connection_->socket); }

}  // namespace longtape::dist
