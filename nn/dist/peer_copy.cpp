#include "nn/dist/peer_copy.h"

#ifdef LONGTAPE_WITH_NCCL
#include <cuda.h>  // CUdeviceptr, CUresult: cuMemGetAddressRange through the runtime's entry point
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>

#include "nn/dist/shm_mailbox.h"
#include "tensor/autograd/grad_mode.h"
#include "tensor/cuda/runtime.h"
#include "tensor/error.h"

namespace longtape::dist {

namespace {

using Clock = std::chrono::steady_clock;

void cuda_ok(cudaError_t status, const char* what) {
  LT_CHECK(status == cudaSuccess, "dist (copy engines): ", what, " failed: ", cudaGetErrorString(status));
}

// A tensor's bytes as `rows` runs of `row_bytes` contiguous bytes, `pitch` bytes apart.
struct RowLayout {
  int64_t rows = 0, row_bytes = 0, pitch = 0;
};

// nullopt when no such pattern describes `t` (or its rows would be single elements, which copy
// engines move slowly).
std::optional<RowLayout> row_layout(const Tensor& t) {
  const int64_t element = static_cast<int64_t>(dtype_size(t.dtype()));
  if (t.numel() == 0) return RowLayout{};
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride) of the dims that matter
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.shape()[static_cast<size_t>(i)] != 1)
      dims.emplace_back(t.shape()[static_cast<size_t>(i)], t.strides()[static_cast<size_t>(i)]);
  int64_t inner = 1;
  size_t outer = dims.size();
  while (outer > 0 && dims[outer - 1].second == inner) inner *= dims[--outer].first;
  if (outer == 0) return RowLayout{1, inner * element, inner * element};
  if (inner == 1) return std::nullopt;
  int64_t rows = dims[outer - 1].first;
  const int64_t pitch = dims[outer - 1].second;
  for (size_t j = outer - 1; j > 0; --j) {
    if (dims[j - 1].second != dims[j].second * dims[j].first) return std::nullopt;
    rows *= dims[j - 1].first;
  }
  if (pitch < inner) return std::nullopt;
  return RowLayout{rows, inner * element, pitch * element};
}

// One 2-D copy: `height` rows of `width` bytes, read at src_pitch from src_offset and written at
// dst_pitch from dst_offset.
struct RowCopy {
  int64_t src_offset, src_pitch, dst_offset, dst_pitch, width, height;
};

// The 2-D copies that move the bytes of `from`'s rows into `to`'s rows in order (equal totals). A
// contiguous side takes the other's rows; rows of different lengths are both cut into rows of g =
// gcd of the two lengths, and sub-row s travels in copy s mod lcm(kf, kt) (kf, kt: sub-rows per
// row), which is uniform on both sides. Rows of one length (head slices) take one copy.
std::vector<RowCopy> row_copies(RowLayout from, RowLayout to) {
  if (from.rows == 1 && to.rows == 1) return {{0, from.row_bytes, 0, to.row_bytes, from.row_bytes, 1}};
  if (from.rows == 1) from = {to.rows, to.row_bytes, to.row_bytes};
  if (to.rows == 1) to = {from.rows, from.row_bytes, from.row_bytes};
  const int64_t g = std::gcd(from.row_bytes, to.row_bytes);
  const int64_t kf = from.row_bytes / g, kt = to.row_bytes / g, copies = std::lcm(kf, kt);
  const int64_t height = from.rows * kf / copies;  // from.rows * kf = to.rows * kt, a multiple of both
  std::vector<RowCopy> out;
  for (int64_t j = 0; j < copies; ++j)
    out.push_back({(j / kf) * from.pitch + (j % kf) * g, copies / kf * from.pitch, (j / kt) * to.pitch + (j % kt) * g,
                   copies / kt * to.pitch, g, height});
  return out;
}

int64_t bytes_of(const Tensor& t) { return t.numel() * static_cast<int64_t>(dtype_size(t.dtype())); }

// The start of the cudaMalloc allocation that holds `p` (IPC handles name whole allocations).
char* allocation_base(const void* p) {
  using AddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static const AddressRange address_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cuda_ok(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found),
            "cudaGetDriverEntryPointByVersion(cuMemGetAddressRange)");
    LT_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
             "dist (copy engines): the driver has no cuMemGetAddressRange");
    return reinterpret_cast<AddressRange>(fn);
  }();
  CUdeviceptr base = 0;
  size_t size = 0;
  LT_CHECK(address_range(&base, &size, reinterpret_cast<CUdeviceptr>(p)) == CUDA_SUCCESS,
           "dist (copy engines): cuMemGetAddressRange failed for a tensor's memory");
  return reinterpret_cast<char*>(base);
}

// The driver's id of the allocation that holds `p`: unique for the life of the process, so a
// handle cached under it never names a later allocation at the same address.
uint64_t allocation_id(const void* p) {
  using PointerAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
  static const PointerAttribute attribute = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cuda_ok(cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &fn, 12000, cudaEnableDefault, &found),
            "cudaGetDriverEntryPointByVersion(cuPointerGetAttribute)");
    LT_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
             "dist (copy engines): the driver has no cuPointerGetAttribute");
    return reinterpret_cast<PointerAttribute>(fn);
  }();
  unsigned long long id = 0;
  LT_CHECK(attribute(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, reinterpret_cast<CUdeviceptr>(p)) == CUDA_SUCCESS,
           "dist (copy engines): cuPointerGetAttribute(BUFFER_ID) failed for a tensor's memory");
  return id;
}

// What a receiver posts for each sender: where the piece goes (an allocation by IPC handle, an
// offset into it) and its layout there.
struct Destination {
  cudaIpcMemHandle_t handle{};
  int64_t offset = 0, bytes = 0, rows = 0, row_bytes = 0, pitch = 0;
};

template <typename T>
void append(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

template <typename T>
T read_at(const std::string& in, size_t at) {
  LT_CHECK(at + sizeof(T) <= in.size(), "dist (copy engines): a malformed store entry (", in.size(), " bytes)");
  T value;
  std::memcpy(&value, in.data() + at, sizeof value);
  return value;
}

// LONGTAPE_PEER_COPY_SHM=0: the protocol's posts go through the TCP store even on one host.
bool env_shm_disabled() {
  const char* v = std::getenv("LONGTAPE_PEER_COPY_SHM");
  return v != nullptr && std::string(v) == "0";
}

bool env_disabled() {
  const char* v = std::getenv("LONGTAPE_PEER_COPY");
  return v != nullptr && std::string(v) == "0";
}

}  // namespace

// One exchange as the worker thread carries it out: what this rank posts, and its pieces (contiguous
// or rows) with the event after which they, and its receiving tensors, are ready.
struct Job {
  int64_t seq = 0;
  cudaEvent_t start = nullptr;  // recorded on the caller's stream in start(); the worker destroys it
  std::string post;
  struct Piece {
    int peer;
    int exchange;  // which exchange of the job (start_many)
    const char* src;
    RowLayout rows;
    int64_t bytes;
  };
  std::vector<Piece> pieces;
};

struct PeerCopyExchange::State {
  int rank = 0, size = 0, device = 0;
  std::string prefix;
  std::unique_ptr<TcpStore> store;  // this exchange's own connection (one request at a time)
  // The posts, stamps and counters of the protocol below in shared memory (null: through the store).
  std::unique_ptr<ShmMailbox> mailbox;
  std::vector<cudaEvent_t> ready, sent;                          // [slot], interprocess
  std::vector<std::vector<cudaEvent_t>> peer_ready, peer_sent;   // [rank][slot], opened
  std::vector<cudaStream_t> copy_streams;                        // [peer]
  std::vector<cudaEvent_t> copy_done;                            // [peer]
  cudaStream_t signal_stream = nullptr;
  std::map<std::string, char*> opened;  // IPC handle bytes -> this process's mapping (worker only)
  std::map<uint64_t, std::pair<char*, cudaIpcMemHandle_t>> exported;  // allocation id -> (base, handle)
  int64_t next_seq = 0;
  int64_t next_gather = 0;  // all_gather_sizes calls so far
  std::deque<int64_t> unwaited;
  std::mutex mutex;  // start() and wait()
  double start_host_s = 0, wait_host_s = 0;  // the caller's host time inside start() and wait()
  double worker_s[4] = {0, 0, 0, 0};  // the worker's time per phase: slot free, where, copies queued, sent

  // The worker: the store round trips and the copies' queuing, off the caller's thread, so that
  // the caller queues its compute meanwhile (a round trip costs ~50 us, several per exchange).
  std::thread worker;
  std::mutex jobs_mutex;
  std::condition_variable jobs_changed;
  std::deque<Job> jobs;
  int64_t queued_through = -1;  // the last exchange whose copies and "sent" the worker has queued
  std::exception_ptr failure;
  bool stopping = false;

  ~State() {
    if (worker.joinable()) {
      {
        std::lock_guard<std::mutex> lock(jobs_mutex);
        stopping = true;
      }
      jobs_changed.notify_all();
      worker.join();
    }
    if (const char* v = std::getenv("LONGTAPE_PEER_COPY_STATS"); v && std::string(v) == "1" && next_seq > 0)
      std::fprintf(stderr, "peer copy rank %d: %lld exchanges, caller's host time %.1f us in start and %.1f us in wait "
                   "each; the helper thread's per exchange: %.1f us until the slot was free, %.1f us posting and "
                   "reading where the pieces go, %.1f us queuing the copies, %.1f us posting that they are queued\n",
                   rank, static_cast<long long>(next_seq), start_host_s / next_seq * 1e6, wait_host_s / next_seq * 1e6,
                   worker_s[0] / next_seq * 1e6, worker_s[1] / next_seq * 1e6, worker_s[2] / next_seq * 1e6,
                   worker_s[3] / next_seq * 1e6);
    cudaSetDevice(device);
    for (cudaStream_t s : copy_streams)
      if (s) cudaStreamSynchronize(s);
    if (signal_stream) cudaStreamSynchronize(signal_stream);
    for (auto& [key, base] : opened) cudaIpcCloseMemHandle(base);
    for (auto& events : peer_ready)
      for (cudaEvent_t e : events) cudaEventDestroy(e);
    for (auto& events : peer_sent)
      for (cudaEvent_t e : events) cudaEventDestroy(e);
    for (cudaEvent_t e : ready) cudaEventDestroy(e);
    for (cudaEvent_t e : sent) cudaEventDestroy(e);
    for (cudaEvent_t e : copy_done) cudaEventDestroy(e);
    for (Job& job : jobs)
      if (job.start) cudaEventDestroy(job.start);
    for (cudaStream_t s : copy_streams)
      if (s) cudaStreamDestroy(s);
    if (signal_stream) cudaStreamDestroy(signal_stream);
  }

  std::string key(const char* what, int64_t slot, int r) const {
    return prefix + "/" + what + "/" + std::to_string(slot) + "/" + std::to_string(r);
  }

  // The value rank r posted under `name` for exchange `seq` (slots are reused: an older
  // exchange's value may still be there until r gets to this one).
  std::string read_fresh(const char* name, int64_t seq, int r) {
    const std::string k = key(name, seq % kSlots, r);
    const auto deadline = Clock::now() + store->timeout();
    while (true) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      const std::string value = store->get(k, std::max(left, std::chrono::milliseconds(1)));
      const int64_t posted = read_at<int64_t>(value, 0);
      if (posted == seq) return value;
      LT_CHECK(posted < seq, "dist (copy engines): rank ", r, " posted exchange ", posted, " where rank ", rank,
               " expected ", seq, ": the ranks called start_all_to_all a different number of times");
      LT_CHECK(Clock::now() < deadline, "dist (copy engines): rank ", rank, " timed out after ",
               store->timeout().count() / 1000.0, " s waiting for rank ", r, " to reach all-to-all ", seq);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  // This rank's post of where its pieces of exchange `seq` go, and rank r's.
  void post_where(int64_t seq, const std::string& post) {
    if (mailbox) return mailbox->post(static_cast<int>(seq % kSlots), rank, seq, post);
    store->set(key("where", seq % kSlots, rank), post);
  }
  std::string read_where(int64_t seq, int r) {
    if (mailbox) return mailbox->read(static_cast<int>(seq % kSlots), r, seq, store->timeout(), "where its pieces go");
    return read_fresh("where", seq, r);
  }
  // That this rank's copies of exchange `seq` are queued (after its "sent" event), and waiting for rank r's.
  void post_sent(int64_t seq) {
    if (mailbox) return mailbox->stamp(static_cast<int>(seq % kSlots), rank, seq);
    std::string posted;
    append(posted, seq);
    store->set(key("sent", seq % kSlots, rank), posted);
  }
  void wait_sent(int64_t seq, int r) {
    if (mailbox) return mailbox->wait_stamp(static_cast<int>(seq % kSlots), r, seq, store->timeout(), "its copies are queued");
    read_fresh("sent", seq, r);
  }
  // This rank has waited for exchange `seq` (its slot's counter).
  void add_done(int64_t seq) {
    if (mailbox) {
      mailbox->add(static_cast<int>(seq % kSlots), 1);
      return;
    }
    store->add(prefix + "/done/" + std::to_string(seq % kSlots), 1);
  }

  // Waits until every rank has waited for the exchange that used `slot` before exchange `seq`.
  void wait_slot_free(int64_t seq) {
    const int64_t round = seq / kSlots;
    if (round == 0) return;
    const std::string k = prefix + "/done/" + std::to_string(seq % kSlots);
    const auto deadline = Clock::now() + store->timeout();
    auto done = [&] { return mailbox ? mailbox->count(static_cast<int>(seq % kSlots)) : store->add(k, 0); };
    while (done() < size * round) {
      LT_CHECK(Clock::now() < deadline, "dist (copy engines): rank ", rank, " timed out after ",
               store->timeout().count() / 1000.0, " s waiting for every rank to finish all-to-all ", seq - kSlots);
      std::this_thread::sleep_for(std::chrono::microseconds(mailbox ? 2 : 20));
    }
  }

  // The allocation holding `p` and its IPC handle (made once per allocation).
  std::pair<char*, cudaIpcMemHandle_t> exported_handle(const void* p) {
    constexpr size_t kMaxExported = 4096;
    const uint64_t id = allocation_id(p);
    auto it = exported.find(id);
    if (it != exported.end()) return it->second;
    if (exported.size() >= kMaxExported) exported.clear();
    char* base = allocation_base(p);
    cudaIpcMemHandle_t handle{};
    cuda_ok(cudaIpcGetMemHandle(&handle, base), "cudaIpcGetMemHandle");
    return exported.emplace(id, std::make_pair(base, handle)).first->second;
  }

  // This process's mapping of a peer's allocation. Allocations come from the peers' caching pools,
  // so there are few; past kMaxOpened (a pool without caching) every mapping is closed once the
  // copies in flight are done.
  char* open(const cudaIpcMemHandle_t& handle) {
    constexpr size_t kMaxOpened = 512;
    const std::string k(reinterpret_cast<const char*>(&handle), sizeof handle);
    auto it = opened.find(k);
    if (it != opened.end()) return it->second;
    if (opened.size() >= kMaxOpened) {
      for (cudaStream_t s : copy_streams) cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
      for (auto& [unused, base] : opened) cudaIpcCloseMemHandle(base);
      opened.clear();
    }
    void* base = nullptr;
    cuda_ok(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    opened.emplace(k, static_cast<char*>(base));
    return static_cast<char*>(base);
  }

  // Posts where this rank's pieces of job.seq go, reads where its own go and queues the copies.
  void carry_out(Job& job) {
    const int64_t seq = job.seq;
    const size_t slot = static_cast<size_t>(seq % kSlots);
    const auto t0 = Clock::now();
    wait_slot_free(seq);
    const auto t1 = Clock::now();
    cuda_ok(cudaStreamWaitEvent(signal_stream, job.start, 0), "cudaStreamWaitEvent");
    cuda_ok(cudaEventRecord(ready[slot], signal_stream), "cudaEventRecord");
    post_where(seq, job.post);
    std::map<int, std::string> where;  // what each peer posted for this job
    for (const Job::Piece& piece : job.pieces)
      if (!where.count(piece.peer)) where.emplace(piece.peer, read_where(seq, piece.peer));
    const auto t2 = Clock::now();
    for (const Job::Piece& piece : job.pieces) {
      const auto it = where.find(piece.peer);
      const Destination d = read_at<Destination>(
          it->second, sizeof(int64_t) + (static_cast<size_t>(piece.exchange) * static_cast<size_t>(size) +
                                         static_cast<size_t>(rank)) * sizeof(Destination));
      LT_CHECK(d.bytes == piece.bytes, "dist start_all_to_all: rank ", rank, " sends rank ", piece.peer, " ",
               piece.bytes, " bytes but rank ", piece.peer, " receives ", d.bytes, " bytes from it");
      if (d.bytes == 0) continue;
      cudaStream_t stream = copy_streams[static_cast<size_t>(piece.peer)];
      cuda_ok(cudaStreamWaitEvent(stream, job.start, 0), "cudaStreamWaitEvent");
      cuda_ok(cudaStreamWaitEvent(stream, peer_ready[static_cast<size_t>(piece.peer)][slot], 0),
              "cudaStreamWaitEvent (the receiver's tensors)");
      char* const dst = open(d.handle) + d.offset;
      for (const RowCopy& c : row_copies(piece.rows, RowLayout{d.rows, d.row_bytes, d.pitch}))
        cuda_ok(cudaMemcpy2DAsync(dst + c.dst_offset, static_cast<size_t>(c.dst_pitch), piece.src + c.src_offset,
                                  static_cast<size_t>(c.src_pitch), static_cast<size_t>(c.width),
                                  static_cast<size_t>(c.height), cudaMemcpyDefault, stream),
                "cudaMemcpy2DAsync");
      cuda_ok(cudaEventRecord(copy_done[static_cast<size_t>(piece.peer)], stream), "cudaEventRecord");
      cuda_ok(cudaStreamWaitEvent(signal_stream, copy_done[static_cast<size_t>(piece.peer)], 0),
              "cudaStreamWaitEvent");
    }
    cuda_ok(cudaEventRecord(sent[slot], signal_stream), "cudaEventRecord");
    const auto t3 = Clock::now();
    post_sent(seq);
    const auto t4 = Clock::now();
    auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
    worker_s[0] += seconds(t1 - t0);
    worker_s[1] += seconds(t2 - t1);
    worker_s[2] += seconds(t3 - t2);
    worker_s[3] += seconds(t4 - t3);
  }

  void work() {
    cudaSetDevice(device);
    while (true) {
      Job job;
      bool failed = false;
      {
        std::unique_lock<std::mutex> lock(jobs_mutex);
        jobs_changed.wait(lock, [&] { return stopping || !jobs.empty(); });
        if (jobs.empty()) return;
        job = std::move(jobs.front());
        jobs.pop_front();
        failed = failure != nullptr;
      }
      std::exception_ptr error;
      if (!failed) {
        try {
          carry_out(job);
        } catch (...) {
          error = std::current_exception();
        }
      }
      cudaEventDestroy(job.start);
      {
        std::lock_guard<std::mutex> lock(jobs_mutex);
        if (error && !failure) failure = error;
        queued_through = job.seq;
      }
      jobs_changed.notify_all();
    }
  }

  // Blocks until the worker has queued exchange `seq` (rethrows what stopped it).
  void wait_queued(int64_t seq) {
    std::unique_lock<std::mutex> lock(jobs_mutex);
    jobs_changed.wait(lock, [&] { return queued_through >= seq || failure; });
    if (failure) std::rethrow_exception(failure);
  }
};

namespace {

class PeerCopyPending final : public Communicator::PendingAllToAll {
 public:
  PeerCopyPending(std::shared_ptr<PeerCopyExchange::State> state, int64_t seq, std::vector<Tensor> keep,
                  std::vector<std::pair<Tensor, Tensor>> copy_after)
      : state_(std::move(state)), seq_(seq), keep_(std::move(keep)), copy_after_(std::move(copy_after)) {}
  ~PeerCopyPending() override {
    if (done_) return;
    try {
      wait();
    } catch (const std::exception&) {
    }
  }

  void wait() override {
    if (done_) return;
    done_ = true;
    PeerCopyExchange::State& s = *state_;
    std::lock_guard<std::mutex> lock(s.mutex);
    const auto t0 = Clock::now();
    s.wait_queued(seq_);
    cudaStream_t compute = static_cast<cudaStream_t>(cuda::current_stream());
    const int64_t slot = seq_ % PeerCopyExchange::kSlots;
    for (int p = 0; p < s.size; ++p) {
      if (p == s.rank) continue;
      s.wait_sent(seq_, p);
      cuda_ok(cudaStreamWaitEvent(compute, s.peer_sent[static_cast<size_t>(p)][static_cast<size_t>(slot)], 0),
              "cudaStreamWaitEvent (a peer's copies)");
    }
    // This rank's copies read its sources: they are released after this point of the stream.
    cuda_ok(cudaStreamWaitEvent(compute, s.sent[static_cast<size_t>(slot)], 0), "cudaStreamWaitEvent (own copies)");
    {
      NoGradGuard no_grad;
      for (auto& [buffer, into] : copy_after_) into.copy_(buffer);
    }
    copy_after_.clear();
    keep_.clear();
    s.add_done(seq_);
    auto it = std::find(s.unwaited.begin(), s.unwaited.end(), seq_);
    if (it != s.unwaited.end()) s.unwaited.erase(it);
    s.wait_host_s += std::chrono::duration<double>(Clock::now() - t0).count();
  }

 private:
  std::shared_ptr<PeerCopyExchange::State> state_;
  int64_t seq_;
  std::vector<Tensor> keep_;
  std::vector<std::pair<Tensor, Tensor>> copy_after_;  // (buffer, into)
  bool done_ = false;
};

}  // namespace

PeerCopyExchange::PeerCopyExchange(std::shared_ptr<State> state) : state_(std::move(state)) {}
PeerCopyExchange::~PeerCopyExchange() = default;

bool PeerCopyExchange::posts_in_shared_memory() const { return state_->mailbox != nullptr; }

std::vector<int64_t> PeerCopyExchange::all_gather_sizes(int64_t value) {
  State& s = *state_;
  LT_CHECK(s.mailbox, "dist (copy engines): all_gather_sizes needs the shared-memory mailbox");
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.mailbox->all_gather(s.next_gather++, value, s.store->timeout());
}

std::unique_ptr<PeerCopyExchange> PeerCopyExchange::connect(const TcpStore& store, int rank, int size, int device,
                                                            const std::string& prefix) {
  auto state = std::make_shared<State>();
  state->rank = rank;
  state->size = size;
  state->device = device;
  state->prefix = prefix;
  state->store = std::make_unique<TcpStore>(store.host(), store.port(), false, store.timeout());
  cuda::set_device(device);
  // Round 1: what each rank is (host, GPU) and, when it can take part, its events.
  bool able = size > 1 && !env_disabled();
  std::string mine;
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  char bus[64] = {};
  if (able) able = cudaDeviceGetPCIBusId(bus, sizeof bus - 1, device) == cudaSuccess;
  for (int s = 0; able && s < kSlots; ++s) {
    cudaEvent_t r = nullptr, t = nullptr;
    able = cudaEventCreateWithFlags(&r, cudaEventInterprocess | cudaEventDisableTiming) == cudaSuccess &&
           cudaEventCreateWithFlags(&t, cudaEventInterprocess | cudaEventDisableTiming) == cudaSuccess;
    if (r) state->ready.push_back(r);
    if (t) state->sent.push_back(t);
  }
  append(mine, static_cast<int64_t>(able));
  mine.append(host, sizeof host);
  mine.append(bus, sizeof bus);
  for (int s = 0; able && s < kSlots; ++s) {
    cudaIpcEventHandle_t hr{}, ht{};
    able = cudaIpcGetEventHandle(&hr, state->ready[static_cast<size_t>(s)]) == cudaSuccess &&
           cudaIpcGetEventHandle(&ht, state->sent[static_cast<size_t>(s)]) == cudaSuccess;
    append(mine, hr);
    append(mine, ht);
  }
  state->store->set(prefix + "/who/" + std::to_string(rank), mine);
  // Round 2: every rank says whether it reaches every other; all must.
  bool reach = able;
  state->peer_ready.assign(static_cast<size_t>(size), {});
  state->peer_sent.assign(static_cast<size_t>(size), {});
  const size_t events_at = sizeof(int64_t) + sizeof host + sizeof bus;
  for (int p = 0; p < size; ++p) {
    const std::string theirs = state->store->get(prefix + "/who/" + std::to_string(p));
    if (p == rank || !reach) continue;
    reach = read_at<int64_t>(theirs, 0) != 0 && std::strncmp(theirs.data() + sizeof(int64_t), host, sizeof host) == 0;
    int their_device = -1, can = 0;
    if (reach) {
      std::string their_bus(theirs.data() + sizeof(int64_t) + sizeof host, sizeof bus);
      reach = cudaDeviceGetByPCIBusId(&their_device, their_bus.c_str()) == cudaSuccess;
    }
    if (reach && their_device != device)
      reach = cudaDeviceCanAccessPeer(&can, device, their_device) == cudaSuccess && can != 0;
    for (int s = 0; reach && s < kSlots; ++s) {
      const size_t at = events_at + static_cast<size_t>(s) * 2 * sizeof(cudaIpcEventHandle_t);
      cudaEvent_t r = nullptr, t = nullptr;
      reach = cudaIpcOpenEventHandle(&r, read_at<cudaIpcEventHandle_t>(theirs, at)) == cudaSuccess &&
              cudaIpcOpenEventHandle(&t, read_at<cudaIpcEventHandle_t>(theirs, at + sizeof(cudaIpcEventHandle_t))) ==
                  cudaSuccess;
      if (r) state->peer_ready[static_cast<size_t>(p)].push_back(r);
      if (t) state->peer_sent[static_cast<size_t>(p)].push_back(t);
    }
  }
  cudaGetLastError();  // a failed probe above leaves its error behind
  state->store->set(prefix + "/reach/" + std::to_string(rank), std::string(1, reach ? '1' : '0'));
  bool all = true;
  for (int p = 0; p < size; ++p) all = state->store->get(prefix + "/reach/" + std::to_string(p)) == "1" && all;
  if (!all) return nullptr;
  // Every rank is on this host: the protocol's posts go through shared memory where every rank
  // maps it (and none has LONGTAPE_PEER_COPY_SHM=0).
  state->mailbox = ShmMailbox::connect(*state->store, prefix, rank, size, kSlots, !env_shm_disabled());
  state->copy_streams.assign(static_cast<size_t>(size), nullptr);
  state->copy_done.assign(static_cast<size_t>(size), nullptr);
  for (int p = 0; p < size; ++p) {
    cuda_ok(cudaStreamCreateWithFlags(&state->copy_streams[static_cast<size_t>(p)], cudaStreamNonBlocking),
            "cudaStreamCreate");
    cuda_ok(cudaEventCreateWithFlags(&state->copy_done[static_cast<size_t>(p)], cudaEventDisableTiming),
            "cudaEventCreate");
  }
  cuda_ok(cudaStreamCreateWithFlags(&state->signal_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  State* raw = state.get();
  state->worker = std::thread([raw] { raw->work(); });
  return std::unique_ptr<PeerCopyExchange>(new PeerCopyExchange(std::move(state)));
}

std::unique_ptr<Communicator::PendingAllToAll> PeerCopyExchange::start(const std::vector<Tensor>& to_each,
                                                                       const std::vector<Tensor>& into) {
  return start_many({to_each}, {into});
}

std::unique_ptr<Communicator::PendingAllToAll> PeerCopyExchange::start_many(
    const std::vector<std::vector<Tensor>>& to_each_list, const std::vector<std::vector<Tensor>>& into_list) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  const auto t0 = Clock::now();
  {
    std::lock_guard<std::mutex> jobs_lock(s.jobs_mutex);
    if (s.failure) std::rethrow_exception(s.failure);
  }
  const Device gpu = Device::cuda(s.device);
  const int64_t seq = s.next_seq;
  LT_CHECK(s.unwaited.empty() || seq - s.unwaited.front() < kSlots, "dist start_all_to_all (copy engines): rank ",
           s.rank, " has ", kSlots, " exchanges under way; wait() for the oldest (number ", s.unwaited.front(),
           ") before starting another");
  LT_CHECK(!to_each_list.empty() && to_each_list.size() == into_list.size(),
           "dist start_all_to_all_many (copy engines): rank ", s.rank, " gave ", to_each_list.size(),
           " lists to send and ", into_list.size(), " to receive into");
  for (size_t e = 0; e < to_each_list.size(); ++e) {
    const Tensor& own_from = to_each_list[e][static_cast<size_t>(s.rank)];
    const Tensor& own_to = into_list[e][static_cast<size_t>(s.rank)];
    LT_CHECK(bytes_of(own_from) == bytes_of(own_to), "dist start_all_to_all: rank ", s.rank, " keeps ",
             shape_str(own_from.shape()), " ", dtype_name(own_from.dtype()), " of its own but receives ",
             shape_str(own_to.shape()), " ", dtype_name(own_to.dtype()), " from itself");
  }
  ++s.next_seq;
  cudaStream_t compute = static_cast<cudaStream_t>(cuda::current_stream());
  NoGradGuard no_grad;

  // Where each piece goes (exchange by exchange, rank by rank): into[p] itself when it is on this
  // GPU as one range or rows at a pitch (head slices; a sender's rows of another length travel in
  // several 2-D copies), else a contiguous buffer copied into it in wait().
  Job job;
  job.seq = seq;
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> copy_after;
  append(job.post, seq);
  for (const std::vector<Tensor>& into : into_list) {
    for (int p = 0; p < s.size; ++p) {
      Destination d;
      const Tensor& target = into[static_cast<size_t>(p)];
      d.bytes = bytes_of(target);
      if (p != s.rank && d.bytes > 0) {
        Tensor dst = target;
        std::optional<RowLayout> layout;
        if (dst.device() == gpu) layout = row_layout(dst);
        if (!layout) {
          dst = Tensor::empty(target.shape(), target.dtype(), gpu);
          layout = RowLayout{1, d.bytes, d.bytes};
          copy_after.emplace_back(dst, target);
        }
        keep.push_back(dst);
        const auto [base, handle] = s.exported_handle(dst.raw_data());
        d.handle = handle;
        d.offset = static_cast<char*>(dst.raw_data()) - base;
        d.rows = layout->rows;
        d.row_bytes = layout->row_bytes;
        d.pitch = layout->pitch;
      }
      append(job.post, d);
    }
  }
  // This rank's pieces: contiguous, or rows at a pitch (head slices) copied as they are.
  for (size_t e = 0; e < to_each_list.size(); ++e) {
    for (int p = 0; p < s.size; ++p) {
      const Tensor& piece = to_each_list[e][static_cast<size_t>(p)];
      if (p == s.rank || piece.numel() == 0) {
        if (p != s.rank) job.pieces.push_back({p, static_cast<int>(e), nullptr, RowLayout{}, 0});
        continue;
      }
      Tensor src = piece.device() == gpu ? piece.detach() : piece.detach().to(gpu);
      std::optional<RowLayout> rows = row_layout(src);
      if (!rows) {
        src = src.contiguous();
        rows = row_layout(src);
      }
      keep.push_back(src);
      job.pieces.push_back({p, static_cast<int>(e), static_cast<const char*>(src.raw_data()), *rows, bytes_of(src)});
    }
  }
  cuda_ok(cudaEventCreateWithFlags(&job.start, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(job.start, compute), "cudaEventRecord");
  // Its own pieces on the compute stream: the transfers do not wait for them (an SM copy takes a
  // third of a copy engine's time for it).
  for (size_t e = 0; e < to_each_list.size(); ++e) {
    const Tensor& own_to = into_list[e][static_cast<size_t>(s.rank)];
    if (own_to.numel() > 0) {
      Tensor own = own_to;
      own.copy_(to_each_list[e][static_cast<size_t>(s.rank)]);
    }
  }
  {
    std::lock_guard<std::mutex> jobs_lock(s.jobs_mutex);
    s.jobs.push_back(std::move(job));
  }
  s.jobs_changed.notify_all();
  s.unwaited.push_back(seq);
  for (const std::vector<Tensor>& into : into_list)
    for (const Tensor& t : into) keep.push_back(t);
  s.start_host_s += std::chrono::duration<double>(Clock::now() - t0).count();
  return std::make_unique<PeerCopyPending>(state_, seq, std::move(keep), std::move(copy_after));
}

}  // namespace longtape::dist
#endif  // LONGTAPE_WITH_NCCL
