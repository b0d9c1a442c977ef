#pragma once
// The process group for CPU tensors: one process per rank, a TCP connection between every pair of
// ranks (a full mesh set up through the store), a sender thread per peer so sends are buffered as
// Communicator::send documents (a ring of sends cannot deadlock), and a receiver thread per peer
// that files incoming messages by (group, source, tag).
//
// all_reduce sums in rank order, so every rank holds bitwise the same result, equal to the
// in-process group's: small tensors are gathered whole, large ones are reduce-scattered in
// chunks (each chunk summed in rank order by its owner) and gathered back. Every blocking call
// waits at most CommOptions::timeout; a peer that dies (its connection closes) or aborts makes
// every waiting or later call throw longtape::Error naming that rank. CUDA tensors are accepted
// (staged through host memory); the NCCL group (nn/dist/nccl_communicator.h) is the GPU path.
#include <memory>

#include "nn/dist/communicator.h"
#include "nn/dist/store.h"

namespace longtape::dist {

// Collective over the `size` processes that call it with the same store: rank `rank`'s
// communicator of the whole group. Connections use the store's keys under `prefix`.
std::shared_ptr<Communicator> make_tcp_process_group(TcpStore& store, int rank, int size, const CommOptions& options,
                                                     const std::string& prefix = "tcp");

}  // namespace longtape::dist
