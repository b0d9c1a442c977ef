#pragma once
// The process group for CUDA tensors: one process per GPU, one ncclComm_t per rank.
//
// Every operation runs on the communicator's own stream: the stream first waits for the work
// queued so far on the compute stream (cuda::current_stream(), an event, no host sync), and the
// compute stream waits for the transfer's event before later work, so results may be used right
// away and the host is only blocked by barrier() (and by all_to_all, which first exchanges the
// shapes it will receive). Inputs stay alive until their transfer has finished.
//
// Sends are buffered: a send is issued together with this rank's next call (in one
// ncclGroupStart/End, so a ring of sends followed by receives cannot deadlock), or at barrier()
// and destruction. exchange() is one group of ncclSend and ncclRecv whose PendingRecv::wait()
// only orders the compute stream after it.
//
// NCCL moves raw bytes and matches the messages between two ranks in order: tags are not
// compared, and all_gather/all_reduce/broadcast do not compare shapes across ranks (that would
// cost a host round trip per call; the TCP group checks both, so run a program there first).
// all_reduce sums with ncclAllReduce (every rank gets the same bits; for two ranks they equal the
// in-process group's, a + b = b + a) and mean scales the sum afterwards, as the in-process group.
// The communicator is non-blocking (ncclConfig_t::blocking = 0): every call and every transfer in
// flight is watched, and when one takes longer than CommOptions::timeout or NCCL reports an
// asynchronous error (a peer that died over the network), the communicator is aborted
// (ncclCommAbort, which also ends the transfers stuck on the GPU) and this and every later call
// throws longtape::Error saying what happened.
//
// Built only with the CUDA backend and NCCL (LONGTAPE_WITH_NCCL); without, the factory throws.
#include <memory>

#include "nn/dist/communicator.h"
#include "nn/dist/store.h"

namespace longtape::dist {

// Whether this build has the NCCL process group.
bool nccl_built();

// Collective over the `size` processes of the store: rank `rank`'s NCCL communicator on GPU
// `device` (each process its own GPU). Rank 0 publishes the NCCL unique id under `prefix`.
std::shared_ptr<Communicator> make_nccl_process_group(TcpStore& store, int rank, int size, int device,
                                                      const CommOptions& options, const std::string& prefix = "nccl");

}  // namespace longtape::dist
