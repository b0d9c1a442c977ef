#include "tensor/cuda/runtime.h"

#include "tensor/cuda/check.cuh"
#include "tensor/device.h"

namespace longtape {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

bool cuda_available() { return cuda_device_count() > 0; }

namespace cuda {

void memcpy_any(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t nbytes) {
  cudaMemcpyKind kind = dst_on_device ? (src_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                      : (src_on_device ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  cudaStream_t stream = static_cast<cudaStream_t>(current_stream());
  // A copy that waits for the host cannot be part of a graph: say so instead of CUDA's generic
  // "operation not permitted when stream is capturing" (which also invalidates the capture).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  LT_CHECK(capture == cudaStreamCaptureStatusNone, "CUDA graph capture: expected no copy between host and device "
           "inside the captured step, got one of ", nbytes, " bytes (", src_on_device ? "device" : "host", " to ",
           dst_on_device ? "device" : "host", "; a value read back or a table uploaded by an op)");
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, kind, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void set_device(int device) { CUDA_CHECK(cudaSetDevice(device)); }

int current_device() {
  int d = 0;
  CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void synchronize(int device) {
  set_device(device);
  CUDA_CHECK(cudaDeviceSynchronize());
}

void* current_stream() { return static_cast<void*>(cudaStreamPerThread); }

}  // namespace cuda
}  // namespace longtape
