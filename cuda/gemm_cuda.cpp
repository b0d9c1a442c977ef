// Batched matrix products through cuBLAS (cublasGemmStridedBatchedEx). longtape's matrices are
// row-major and cuBLAS's column-major, so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T:
// a row-major matrix read as column-major is its transpose, so no data moves.
//
// f32 computes in exact f32 (CUBLAS_COMPUTE_32F) unless set_allow_tf32(true) or a tf32
// AutocastScope allows TF32 tensor cores; bf16 reads bf16, accumulates in f32 and writes bf16 (f32
// with GemmArgs::f32_out); f64 computes in f64.
// Results are reproducible run to run: each handle has its own fixed workspace (cuBLAS is
// bitwise deterministic on one GPU model when the workspace does not change).
#include <algorithm>
#include <array>
#include <climits>
#include <mutex>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/kernels.h"
#include "cuda/runtime.h"
#include "tensor/backend_options.h"
#include "tensor/precision.h"

namespace longtape::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // what cuBLAS recommends for Hopper
constexpr int kMaxDevices = 64;

struct BlasContext {
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
};

// Contexts are created lazily, reused by later threads, and never destroyed: destroying them
// at process exit would race the CUDA runtime's own teardown.
class ContextPool {
 public:
  BlasContext* acquire(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& free = free_[device];
      if (!free.empty()) {
        BlasContext* c = free.back();
        free.pop_back();
        return c;
      }
    }
    auto* c = new BlasContext;
    try {
      CUBLAS_CHECK(cublasCreate(&c->handle));
      CUBLAS_CHECK(cublasSetMathMode(c->handle, static_cast<cublasMath_t>(
                                                    CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
      CUDA_CHECK(cudaMalloc(&c->workspace, kWorkspaceBytes));
    } catch (...) {
      if (c->handle) cublasDestroy(c->handle);
      delete c;
      throw;
    }
    return c;
  }
  void release(int device, BlasContext* c) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[device].push_back(c);
  }

 private:
  std::mutex mutex_;
  std::array<std::vector<BlasContext*>, kMaxDevices> free_;
};

ContextPool& context_pool() {
  static ContextPool* pool = new ContextPool;  // deliberately leaked, see above
  return *pool;
}

// Each host thread leases one context per device: a cuBLAS handle must not be used by two
// threads at once, and a workspace must not be shared by kernels on different streams (each
// thread launches on its own per-thread stream). Leases return to the pool at thread exit,
// after the thread's queued work has finished with the workspace.
struct ThreadLeases {
  std::array<BlasContext*, kMaxDevices> contexts{};
  ~ThreadLeases() {
    for (int d = 0; d < kMaxDevices; ++d) {
      if (!contexts[d]) continue;
      int previous = 0;
      if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(d) == cudaSuccess) {
        cudaStreamSynchronize(static_cast<cudaStream_t>(current_stream()));
        cudaSetDevice(previous);
      }
      cudaGetLastError();  // a destructor reports nothing
      context_pool().release(d, contexts[d]);
    }
  }
};
thread_local ThreadLeases t_leases;

BlasContext& context_for(int device) {
  LT_CHECK(device >= 0 && device < kMaxDevices, "matmul: CUDA device index ", device, " is out of range");
  BlasContext*& c = t_leases.contexts[device];
  if (!c) c = context_pool().acquire(device);
  return *c;
}

class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

int to_int(int64_t v, const char* what) {
  LT_CHECK(v >= 0 && v <= INT_MAX, "matmul: ", what, " = ", v, " exceeds what cuBLAS takes (", INT_MAX, ")");
  return static_cast<int>(v);
}

}  // namespace

void gemm(const GemmArgs& g) {
  LT_CHECK(g.device.is_cuda(), "matmul: expected CUDA operands, got ", g.device.str());
  if (g.batch == 0 || g.m == 0 || g.n == 0) return;
  const int m = to_int(g.m, "M"), n = to_int(g.n, "N"), k = to_int(g.k, "K"), batch = to_int(g.batch, "batch");
  DeviceScope scope(g.device.index);
  BlasContext& ctx = context_for(g.device.index);
  // cublasSetStream resets the workspace, so the workspace is set after it, on every call.
  CUBLAS_CHECK(cublasSetStream(ctx.handle, static_cast<cudaStream_t>(current_stream())));
  CUBLAS_CHECK(cublasSetWorkspace(ctx.handle, ctx.workspace, kWorkspaceBytes));

  cudaDataType_t type;
  cublasComputeType_t compute;
  float alpha32 = static_cast<float>(g.alpha), beta32 = static_cast<float>(g.beta);
  double alpha64 = g.alpha, beta64 = g.beta;
  const void* alpha = &alpha32;
  const void* beta = &beta32;
  switch (g.dtype) {
    case DType::f32:
      type = CUDA_R_32F;
      compute = allow_tf32() || autocast_precision() == Precision::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                             : CUBLAS_COMPUTE_32F;
      break;
    case DType::bf16:
      type = CUDA_R_16BF;
      compute = CUBLAS_COMPUTE_32F;
      break;
    case DType::f64:
      type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
      alpha = &alpha64;
      beta = &beta64;
      break;
    default:
      throw Error(detail::concat("matmul: the CUDA backend multiplies f32, bf16 or f64 matrices, got ",
                                 dtype_name(g.dtype)));
  }
  // Column-major C^T (n x m) = op(B)^T (n x k) * op(A)^T (k x m).
  const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ld_b = std::max(1, g.trans_b ? k : n);
  const int ld_a = std::max(1, g.trans_a ? m : k);
  LT_CHECK(!g.f32_out || g.dtype == DType::bf16, "matmul: an f32 result is written from bf16 operands only, got ",
           dtype_name(g.dtype));
  const cudaDataType_t c_type = g.f32_out ? CUDA_R_32F : type;
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx.handle, op_b, op_a, n, m, k, alpha, g.b, type, ld_b, g.stride_b, g.a,
                                          type, ld_a, g.stride_a, beta, g.c, c_type, n, g.stride_c, batch, compute,
                                          CUBLAS_GEMM_DEFAULT));
}

}  // namespace longtape::cuda
