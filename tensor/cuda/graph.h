#pragma once
// CUDA graphs (plain C++, no CUDA headers; implemented in graph_cuda.cpp, built only with the CUDA
// backend, so callers guard their use with #ifdef LONGTAPE_WITH_CUDA). The work one piece of host
// code queues on the calling thread's stream is captured once and replayed with one launch.
//
// Rules for the captured code (nn/trainer.h's graph mode follows them): no host synchronisation
// and no copy between host and device (both fail the capture), no value read from the device, no
// host value that changes between replays baked into a kernel argument (pass it through device
// memory written before each replay), and every tensor the graph reads or writes that was made
// before the capture kept alive, at the same address, for as long as the graph is replayed.
// While capturing, the thread's allocations on the device come from a pool private to the graph
// (tensor/cuda/memory_pool.h): blocks freed during the capture are reused only inside it, and the pool
// lives until the graph is destroyed.
#include <cstdint>

namespace longtape::cuda {

class Graph {
 public:
  explicit Graph(int device);
  // Waits for the graph's replays to finish, destroys it and releases its pool.
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Starts capturing the calling thread's stream (thread-local capture mode: this thread may not
  // synchronise; other threads are unaffected) and routes the thread's allocations to the pool.
  void begin_capture();
  // Ends the capture and instantiates the graph; throws longtape::Error with CUDA's reason when the
  // capture was invalidated (the graph stays unusable).
  void end_capture();
  // Ends a capture that failed part-way (after an exception) and discards what was recorded.
  void abort_capture() noexcept;
  // Launches the graph on the calling thread's stream.
  void replay();
  bool ready() const { return exec_ != nullptr; }
  int device() const { return device_; }

 private:
  int device_;
  bool capturing_ = false;
  uintptr_t pool_ = 0;     // private pool id (0 = none yet)
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

// Whether the calling thread's stream is being captured into a graph.
bool stream_capturing();

}  // namespace longtape::cuda
