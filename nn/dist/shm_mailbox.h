#pragma once
// Mailboxes in shared memory for the processes of one host: a faster stand-in for a TCP store's
// round trips (~40 us each) where every rank runs on the same machine. Per slot and rank there is
// a post (bytes stamped with an exchange number) and a second stamp ("sent"); per slot there is a
// counter. A stamp is stored after its bytes (release) and read before them (acquire), so a reader
// that sees the stamp it waits for sees the bytes that went with it. Slots are reused by their
// owner only after every reader is done with them (the caller's protocol, e.g. the counter).
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nn/dist/store.h"

namespace longtape::dist {

class ShmMailbox {
 public:
  static constexpr int kMaxRanks = 8;
  static constexpr size_t kPostBytes = 16384;

  // Collective over the `size` ranks of `store` (one host): rank 0 creates the segment and names it
  // under `prefix`; every rank maps it. nullptr on every rank when any rank cannot or does not
  // want to (`wanted` false; more than kMaxRanks ranks; no POSIX shared memory), so the caller
  // keeps its store.
  static std::unique_ptr<ShmMailbox> connect(TcpStore& store, const std::string& prefix, int rank, int size,
                                             int slots, bool wanted = true);
  ~ShmMailbox();
  ShmMailbox(const ShmMailbox&) = delete;
  ShmMailbox& operator=(const ShmMailbox&) = delete;

  // `rank`'s post for exchange `seq` in `slot` (at most kPostBytes).
  void post(int slot, int rank, int64_t seq, const std::string& bytes);
  // `rank`'s post for exchange `seq`, waited for up to `timeout`; throws naming `what` when it does
  // not come, or when a later exchange's post is there (the ranks disagree on the order).
  std::string read(int slot, int rank, int64_t seq, std::chrono::milliseconds timeout, const char* what);
  // The second stamp: `rank` says exchange `seq` reached its next stage; wait_stamp waits for it.
  void stamp(int slot, int rank, int64_t seq);
  void wait_stamp(int slot, int rank, int64_t seq, std::chrono::milliseconds timeout, const char* what);
  // The slot's counter: add returns the new value.
  int64_t add(int slot, int64_t delta);
  int64_t count(int slot) const;
  // Every rank's `value` (a collective: call number `call` on every rank). Uses two slots of its
  // own past the `slots` asked for, in turn, so a rank's next call never overwrites a value another
  // rank has yet to read.
  std::vector<int64_t> all_gather(int64_t call, int64_t value, std::chrono::milliseconds timeout);

 private:
  struct Box;
  struct Slot;
  ShmMailbox() = default;
  static size_t slot_bytes(int size);
  Box& box(int slot, int rank) const;
  Slot& slot_at(int slot) const;

  void* base_ = nullptr;
  size_t bytes_ = 0;
  int size_ = 0, rank_ = 0, slots_ = 0;
};

}  // namespace longtape::dist
