#include "tensor/cuda/graph.h"

#include "tensor/cuda/check.cuh"
#include "tensor/cuda/memory_pool.h"
#include "tensor/cuda/runtime.h"

namespace longtape::cuda {

namespace {
cudaStream_t stream() { return static_cast<cudaStream_t>(current_stream()); }
}  // namespace

Graph::Graph(int device) : device_(device) {}

Graph::~Graph() {
  if (capturing_) abort_capture();
  // A destructor reports nothing: failures here (the runtime shutting down) are cleared.
  int previous = 0;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess;
  if (exec_) {
    cudaStreamSynchronize(stream());
    cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  }
  if (graph_) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
  cudaGetLastError();
  if (pool_ != 0) {
    try {
      pool_release_private(device_, pool_);
    } catch (...) {
    }
  }
  if (switched) cudaSetDevice(previous);
  cudaGetLastError();
}

void Graph::begin_capture() {
  LT_CHECK(!capturing_ && !graph_, "cuda::Graph: expected a graph not yet captured, got one ",
           capturing_ ? "being captured" : "already captured");
  set_device(device_);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
  LT_CHECK(status == cudaStreamCaptureStatusNone, "cuda::Graph: this thread's stream is already being captured");
  pool_ = pool_begin_private(device_);
  const cudaError_t begun = cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal);
  if (begun != cudaSuccess) {
    pool_end_private(device_);
    cudaGetLastError();
    throw Error(detail::concat("cuda::Graph: cudaStreamBeginCapture failed: ", cudaGetErrorString(begun)));
  }
  capturing_ = true;
}

void Graph::end_capture() {
  LT_CHECK(capturing_, "cuda::Graph: end_capture without begin_capture");
  capturing_ = false;
  pool_end_private(device_);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream(), &graph);
  if (ended != cudaSuccess) {
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw Error(detail::concat("cuda::Graph: the capture failed (", cudaGetErrorString(ended),
                               "): the captured code synchronised, copied between host and device or used "
                               "another stream"));
  }
  graph_ = graph;
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  if (made != cudaSuccess) {
    cudaGetLastError();
    throw Error(detail::concat("cuda::Graph: cudaGraphInstantiate failed: ", cudaGetErrorString(made)));
  }
  exec_ = exec;
}

void Graph::abort_capture() noexcept {
  if (!capturing_) return;
  capturing_ = false;
  pool_end_private(device_);
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(stream(), &graph);
  if (graph) cudaGraphDestroy(graph);
  cudaGetLastError();
}

void Graph::replay() {
  LT_CHECK(exec_, "cuda::Graph: replay of a graph that was not captured");
  set_device(device_);
  CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), stream()));
}

bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace longtape::cuda
