#pragma once
// All-to-all between the processes of one host on the GPUs' copy engines. Each rank copies its
// pieces straight into the receivers' tensors, which the receivers' processes share through CUDA
// IPC, with cudaMemcpy2DAsync (rows of bytes at a pitch, so head slices leave without packing).
// No SM does the moving, so compute beside it keeps every SM (a GEMM beside it runs at full speed;
// the dilated attention core ends ~2% later with eight exchanges beside it, its own pieces' SM
// copies included); NCCL's kernels need SMs, which a compute-bound kernel holds, and so run several
// times slower beside one.
//
// Each exchange is ordered by two interprocess events per rank (the receiver's "its tensors are
// ready", the sender's "its copies are done") and named through the job's TCP store: a rank posts
// where each piece goes, reads where its own go, and after its copies posts that they are queued.
// The store round trips (~50 us each, several per exchange) and the queuing of the copies run on a
// worker thread, so the caller's thread goes on queuing compute meanwhile: start() only records an
// event and hands the exchange over; wait() blocks the host only until peers have queued their
// copies (bounded by the store's timeout); the GPU streams wait on the events. Events are reused
// in kSlots slots; a slot is taken again only once every rank has waited for the exchange that used
// it last. start_many carries several exchanges as one (one job, one slot, one set of round trips).
// Pieces travel as they are, on both sides, when contiguous or rows at a pitch (head slices; rows
// of different lengths on the two sides take several 2-D copies); a receiving tensor that is
// neither (single-element rows) gets a contiguous buffer, copied into it in wait().
//
// Only for builds with NCCL (the NCCL process group uses it when every rank can reach every other
// GPU through CUDA IPC; LONGTAPE_PEER_COPY=0 turns it off).
#ifdef LONGTAPE_WITH_NCCL
#include <memory>
#include <string>
#include <vector>

#include "nn/dist/communicator.h"
#include "nn/dist/store.h"

namespace longtape::dist {

class PeerCopyExchange {
 public:
  static constexpr int kSlots = 32;

  // Collective over the `size` ranks of `store`: connects when every rank runs on this host, can
  // map every other rank's GPU memory and LONGTAPE_PEER_COPY is not "0" on any rank; otherwise
  // every rank gets nullptr (and keeps NCCL).
  static std::unique_ptr<PeerCopyExchange> connect(const TcpStore& store, int rank, int size, int device,
                                                   const std::string& prefix);
  ~PeerCopyExchange();
  PeerCopyExchange(const PeerCopyExchange&) = delete;
  PeerCopyExchange& operator=(const PeerCopyExchange&) = delete;

  // Communicator::start_all_to_all's contract; pieces of any layout (copied through a contiguous
  // buffer where no row pattern describes them) and on any device.
  std::unique_ptr<Communicator::PendingAllToAll> start(const std::vector<Tensor>& to_each,
                                                       const std::vector<Tensor>& into);
  // Communicator::start_all_to_all_many's: every exchange of the group in one job (one set of
  // store round trips and one slot for all of them).
  std::unique_ptr<Communicator::PendingAllToAll> start_many(const std::vector<std::vector<Tensor>>& to_each,
                                                            const std::vector<std::vector<Tensor>>& into);

  // Whether the protocol's posts go through shared memory (every rank on this host mapped it) rather
  // than the TCP store.
  bool posts_in_shared_memory() const;
  // Communicator::all_gather_sizes through the shared memory (only where posts_in_shared_memory()).
  std::vector<int64_t> all_gather_sizes(int64_t value);

  struct State;  // shared with the exchanges under way

 private:
  explicit PeerCopyExchange(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace longtape::dist
#endif
