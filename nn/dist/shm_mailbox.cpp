#include "nn/dist/shm_mailbox.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "tensor/error.h"

namespace longtape::dist {

// One rank's box in a slot: stamps hold exchange number + 1 (0: nothing posted yet).
struct ShmMailbox::Box {
  alignas(64) std::atomic<int64_t> post_stamp;
  std::atomic<int64_t> second_stamp;
  int64_t post_bytes;
  char post[kPostBytes];
};

struct ShmMailbox::Slot {
  alignas(64) std::atomic<int64_t> counter;
};

namespace {

static_assert(std::atomic<int64_t>::is_always_lock_free, "shared-memory stamps need lock-free 64-bit atomics");

using Clock = std::chrono::steady_clock;

// Polls `ready` until it holds: yields first (an answer usually comes within microseconds), then
// sleeps a few microseconds between looks; false at the deadline.
template <class Ready>
bool poll_until(const Ready& ready, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    if (i < 2000) {
      std::this_thread::yield();
    } else {
      if (Clock::now() >= deadline) return ready();
      std::this_thread::sleep_for(std::chrono::microseconds(5));
    }
  }
}

}  // namespace

// A slot: its counter on a 64-byte line, then one box per rank.
size_t ShmMailbox::slot_bytes(int size) { return 64 + static_cast<size_t>(size) * sizeof(Box); }

ShmMailbox::Box& ShmMailbox::box(int slot, int rank) const {
  char* at = static_cast<char*>(base_) + static_cast<size_t>(slot) * slot_bytes(size_) + 64 +
             static_cast<size_t>(rank) * sizeof(Box);
  return *reinterpret_cast<Box*>(at);
}

ShmMailbox::Slot& ShmMailbox::slot_at(int slot) const {
  return *reinterpret_cast<Slot*>(static_cast<char*>(base_) + static_cast<size_t>(slot) * slot_bytes(size_));
}

std::unique_ptr<ShmMailbox> ShmMailbox::connect(TcpStore& store, const std::string& prefix, int rank, int size,
                                                int slots, bool wanted) {
  const size_t bytes = static_cast<size_t>(slots + 2) * slot_bytes(size);  // + all_gather's two
  const std::string name_key = prefix + "/shm/name", ok_key = prefix + "/shm/ok/";
  std::string name;
  int fd = -1;
  if (rank == 0) {
    if (wanted && size <= kMaxRanks) {
      static std::atomic<int> counter{0};
      name = "/longtape-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
      fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd >= 0 && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        close(fd);
        shm_unlink(name.c_str());
        fd = -1;
      }
      if (fd < 0) name.clear();
    }
    store.set(name_key, name.empty() ? std::string("-") : name);
  } else {
    name = store.get(name_key);
    if (name == "-") name.clear();
    if (wanted && !name.empty()) fd = shm_open(name.c_str(), O_RDWR, 0600);
  }
  void* base = MAP_FAILED;
  if (fd >= 0) {
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
  }
  const bool mine = base != MAP_FAILED;
  store.set(ok_key + std::to_string(rank), mine ? "1" : "0");
  bool all = true;
  for (int r = 0; r < size; ++r) all = store.get(ok_key + std::to_string(r)) == "1" && all;
  // Every rank has mapped it (or given up): the name is no longer needed.
  if (rank == 0 && !name.empty()) shm_unlink(name.c_str());
  if (!all) {
    if (mine) munmap(base, bytes);
    return nullptr;
  }
  std::unique_ptr<ShmMailbox> m(new ShmMailbox());
  m->base_ = base;
  m->bytes_ = bytes;
  m->size_ = size;
  m->rank_ = rank;
  m->slots_ = slots;
  return m;
}

ShmMailbox::~ShmMailbox() {
  if (base_) munmap(base_, bytes_);
}

void ShmMailbox::post(int slot, int rank, int64_t seq, const std::string& bytes) {
  LT_CHECK(bytes.size() <= kPostBytes, "dist shared-memory mailbox: a post of ", bytes.size(),
           " bytes, at most ", kPostBytes, " fit");
  Box& b = box(slot, rank);
  std::memcpy(b.post, bytes.data(), bytes.size());
  b.post_bytes = static_cast<int64_t>(bytes.size());
  b.post_stamp.store(seq + 1, std::memory_order_release);
}

std::string ShmMailbox::read(int slot, int rank, int64_t seq, std::chrono::milliseconds timeout, const char* what) {
  Box& b = box(slot, rank);
  int64_t seen = 0;
  const bool came = poll_until([&] { return (seen = b.post_stamp.load(std::memory_order_acquire)) >= seq + 1; }, timeout);
  LT_CHECK(seen <= seq + 1, "dist (copy engines): rank ", rank, " posted exchange ", seen - 1, " where exchange ", seq,
           " was expected: the ranks called start_all_to_all a different number of times");
  LT_CHECK(came, "dist (copy engines): timed out after ", timeout.count() / 1000.0, " s waiting for rank ", rank,
           " to post ", what, " of all-to-all ", seq);
  return std::string(b.post, static_cast<size_t>(b.post_bytes));
}

void ShmMailbox::stamp(int slot, int rank, int64_t seq) {
  box(slot, rank).second_stamp.store(seq + 1, std::memory_order_release);
}

void ShmMailbox::wait_stamp(int slot, int rank, int64_t seq, std::chrono::milliseconds timeout, const char* what) {
  Box& b = box(slot, rank);
  int64_t seen = 0;
  const bool came =
      poll_until([&] { return (seen = b.second_stamp.load(std::memory_order_acquire)) >= seq + 1; }, timeout);
  LT_CHECK(seen <= seq + 1, "dist (copy engines): rank ", rank, " stamped exchange ", seen - 1, " where exchange ", seq,
           " was expected: the ranks called start_all_to_all a different number of times");
  LT_CHECK(came, "dist (copy engines): timed out after ", timeout.count() / 1000.0, " s waiting for rank ", rank,
           " to say ", what, " for all-to-all ", seq);
}

int64_t ShmMailbox::add(int slot, int64_t delta) {
  return slot_at(slot).counter.fetch_add(delta, std::memory_order_acq_rel) + delta;
}

int64_t ShmMailbox::count(int slot) const { return slot_at(slot).counter.load(std::memory_order_acquire); }

std::vector<int64_t> ShmMailbox::all_gather(int64_t call, int64_t value, std::chrono::milliseconds timeout) {
  const int slot = slots_ + static_cast<int>(call % 2);
  std::string mine(sizeof value, '\0');
  std::memcpy(mine.data(), &value, sizeof value);
  post(slot, rank_, call, mine);
  std::vector<int64_t> out(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    const std::string theirs = read(slot, r, call, timeout, "its value for all_gather_sizes");
    LT_CHECK(theirs.size() == sizeof value, "dist shared-memory mailbox: all_gather_sizes read ", theirs.size(),
             " bytes from rank ", r, ", expected ", sizeof value);
    std::memcpy(&out[static_cast<size_t>(r)], theirs.data(), sizeof value);
  }
  return out;
}

}  // namespace longtape::dist
