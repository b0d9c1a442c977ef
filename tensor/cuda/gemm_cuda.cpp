// Batched matrix products through cuBLAS (cublasGemmStridedBatchedEx). longtape's matrices are
// row-major and cuBLAS's column-major, so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T:
// a row-major matrix read as column-major is its transpose, so no data moves.
//
// f32 computes in exact f32 (CUBLAS_COMPUTE_32F) unless set_allow_tf32(true) or a tf32
// AutocastScope allows TF32 tensor cores; bf16 reads bf16, accumulates in f32 and writes bf16 (f32
// with GemmArgs::f32_out); f64 computes in f64.
// Results are reproducible run to run: each handle has its own fixed workspace (cuBLAS is
// bitwise deterministic on one GPU model when the workspace does not change).
//
// Products with an epilogue (a bias, A's row sums, a C input other than the result) go through
// cuBLASLt, which fuses them into the product; the handle, workspace and stream are the same
// per-thread lease. Each context caches, per shape, the descriptors and the algorithm its
// heuristic picked, so a shape always runs the same kernel. Where cuBLASLt has no kernel for the
// combination, the plain product runs and tensor/cuda/gemm_epilogue.cu adds the epilogue after it.
#include <cublasLt.h>

#include <algorithm>
#include <array>
#include <climits>
#include <map>
#include <mutex>
#include <vector>

#include "tensor/cuda/check.cuh"
#include "tensor/cuda/gemm_epilogue.h"
#include "tensor/cuda/kernels.h"
#include "tensor/cuda/runtime.h"
#include "tensor/backend_options.h"
#include "tensor/precision.h"

namespace longtape::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // what cuBLAS recommends for Hopper
constexpr int kMaxDevices = 64;

// One cuBLASLt product shape: descriptors and the chosen algorithm (found = false: none fits).
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;
};

struct BlasContext {
  cublasHandle_t handle = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  std::map<std::vector<int64_t>, LtPlan> lt_plans;  // keyed by everything the plan depends on
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
      CUBLAS_CHECK(cublasLtCreate(&c->lt));
      CUDA_CHECK(cudaMalloc(&c->workspace, kWorkspaceBytes));
    } catch (...) {
      if (c->handle) cublasDestroy(c->handle);
      if (c->lt) cublasLtDestroy(c->lt);
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

// The types a product computes in: operand type, result type, compute type, scale type.
struct GemmTypes {
  cudaDataType_t operand, result, scale;
  cublasComputeType_t compute;
};

GemmTypes types_of(const GemmArgs& g) {
  LT_CHECK(!g.f32_out || g.dtype == DType::bf16, "matmul: an f32 result is written from bf16 operands only, got ",
           dtype_name(g.dtype));
  GemmTypes t{};
  switch (g.dtype) {
    case DType::f32:
      t.operand = CUDA_R_32F;
      t.compute = allow_tf32() || autocast_precision() == Precision::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                               : CUBLAS_COMPUTE_32F;
      t.scale = CUDA_R_32F;
      break;
    case DType::bf16:
      t.operand = CUDA_R_16BF;
      t.compute = CUBLAS_COMPUTE_32F;
      t.scale = CUDA_R_32F;
      break;
    case DType::f64:
      t.operand = CUDA_R_64F;
      t.compute = CUBLAS_COMPUTE_64F;
      t.scale = CUDA_R_64F;
      break;
    default:
      throw Error(detail::concat("matmul: the CUDA backend multiplies f32, bf16 or f64 matrices, got ",
                                 dtype_name(g.dtype)));
  }
  t.result = g.f32_out ? CUDA_R_32F : t.operand;
  return t;
}

// The largest power of two (at most 256) dividing the address of every batch entry.
int64_t alignment_of(const void* p, int64_t batch_stride_bytes) {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256u;
  if (batch_stride_bytes != 0) bits |= static_cast<uint64_t>(batch_stride_bytes);
  return static_cast<int64_t>(bits & (~bits + 1));
}

void set_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, int64_t rows, int64_t cols, int64_t batch,
                int64_t stride) {
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols),
                                          std::max<int64_t>(1, rows)));
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                  sizeof(stride)));
  }
}

// The plan of this product (built and cached on first use). cuBLASLt is column-major: it computes
// C^T (n x m) = op(B)^T op(A)^T, so its "A" is our B and its "B" our A; our bias (one value per
// column of the row-major C) is a per-row bias of C^T (EPILOGUE_BIAS), and our A's row sums are
// the sums of its "B" over k (EPILOGUE_BGRADB).
LtPlan& lt_plan(BlasContext& ctx, const GemmArgs& g, const GemmTypes& t) {
  const int64_t op_size = static_cast<int64_t>(dtype_size(g.dtype)), out_size = static_cast<int64_t>(dtype_size(g.out_dtype()));
  const cublasLtEpilogue_t epilogue =
      g.bias ? CUBLASLT_EPILOGUE_BIAS : g.a_sums ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT;
  const void* vector = g.bias ? g.bias : g.a_sums;
  const void* c_in = g.c_in ? g.c_in : g.c;
  // cuBLASLt's A, B, C and D (see above) and the vector.
  const int64_t align_a = alignment_of(g.b, g.stride_b * op_size), align_b = alignment_of(g.a, g.stride_a * op_size),
                align_c = alignment_of(c_in, g.stride_c * out_size), align_d = alignment_of(g.c, g.stride_c * out_size),
                align_vector = vector ? alignment_of(vector, 0) : 0;
  std::vector<int64_t> key{static_cast<int64_t>(t.operand), static_cast<int64_t>(t.result), static_cast<int64_t>(t.compute),
                           g.batch, g.m, g.n, g.k, g.stride_a, g.stride_b, g.stride_c, g.trans_a, g.trans_b,
                           static_cast<int64_t>(epilogue), align_a, align_b, align_c, align_d, align_vector};
  auto it = ctx.lt_plans.find(key);
  if (it != ctx.lt_plans.end()) return it->second;
  LtPlan plan;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, t.compute, t.scale));
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (vector) {
    const cudaDataType_t vector_type = g.dtype == DType::f64 ? CUDA_R_64F : CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &vector_type,
                                                sizeof(vector_type)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector, sizeof(vector)));
  }
  set_layout(&plan.a, t.operand, g.trans_b ? g.k : g.n, g.trans_b ? g.n : g.k, g.batch, g.stride_b);
  set_layout(&plan.b, t.operand, g.trans_a ? g.m : g.k, g.trans_a ? g.k : g.m, g.batch, g.stride_a);
  set_layout(&plan.c, t.result, g.n, g.m, g.batch, g.stride_c);
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace = kWorkspaceBytes;
  // Like CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: split-k partial sums of a bf16 result
  // only in the compute type (the in-place and output-type schemes would sum in bf16).
  const uint32_t reductions = t.result == CUDA_R_16BF ? static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)
                                                      : static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_MASK);
  const uint32_t alignments[4] = {static_cast<uint32_t>(align_a), static_cast<uint32_t>(align_b),
                                  static_cast<uint32_t>(align_c), static_cast<uint32_t>(align_d)};
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  try {
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                      sizeof(workspace)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions,
                                                      sizeof(reductions)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alignments[0],
                                                      sizeof(uint32_t)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alignments[1],
                                                      sizeof(uint32_t)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alignments[2],
                                                      sizeof(uint32_t)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alignments[3],
                                                      sizeof(uint32_t)));
  } catch (...) {
    cublasLtMatmulPreferenceDestroy(pref);
    throw;
  }
  // An unsupported combination answers with an error status or no result: the plan then says so.
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(ctx.lt, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  plan.found = status == CUBLAS_STATUS_SUCCESS && returned > 0;
  if (plan.found) plan.algo = result.algo;
  return ctx.lt_plans.emplace(std::move(key), plan).first->second;
}

// The epilogue through cuBLASLt; false when it has no kernel for this product (nothing was run).
bool gemm_lt(BlasContext& ctx, const GemmArgs& g, const GemmTypes& t, const void* alpha, const void* beta) {
  if (g.k == 0) return false;
  LtPlan& plan = lt_plan(ctx, g, t);
  if (!plan.found) return false;
  if (const void* vector = g.bias ? g.bias : g.a_sums)  // the pointer of this call (the plan keeps the first's)
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &vector, sizeof(vector)));
  const cublasStatus_t status =
      cublasLtMatmul(ctx.lt, plan.desc, alpha, g.b, plan.a, g.a, plan.b, beta, g.c_in ? g.c_in : g.c, plan.c, g.c,
                     plan.c, &plan.algo, ctx.workspace, kWorkspaceBytes, static_cast<cudaStream_t>(current_stream()));
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) {  // checked before anything is launched: use the separate passes
    plan.found = false;
    return false;
  }
  CUBLAS_CHECK(status);
  return true;
}

}  // namespace

void gemm(const GemmArgs& g) {
  LT_CHECK(g.device.is_cuda(), "matmul: expected CUDA operands, got ", g.device.str());
  LT_CHECK(!(g.bias && g.a_sums), "matmul: a product adds a bias or sums A's rows, not both");
  LT_CHECK(!g.a_sums || g.batch == 1, "matmul: A's row sums are taken for one product, got batch ", g.batch);
  if (g.batch == 0 || g.m == 0 || g.n == 0) {
    if (g.a_sums && g.m > 0) {  // no product, but A's row sums are still defined
      DeviceScope scope(g.device.index);
      sum_operand_rows(g.a_sums, g.a, g.dtype, g.trans_a, g.m, g.k);
    }
    return;
  }
  const int m = to_int(g.m, "M"), n = to_int(g.n, "N"), k = to_int(g.k, "K"), batch = to_int(g.batch, "batch");
  DeviceScope scope(g.device.index);
  BlasContext& ctx = context_for(g.device.index);
  const GemmTypes t = types_of(g);
  float alpha32 = static_cast<float>(g.alpha), beta32 = static_cast<float>(g.beta);
  double alpha64 = g.alpha, beta64 = g.beta;
  const void* alpha = g.dtype == DType::f64 ? static_cast<const void*>(&alpha64) : &alpha32;
  const void* beta = g.dtype == DType::f64 ? static_cast<const void*>(&beta64) : &beta32;
  const bool separate_c_in = g.c_in && g.c_in != g.c && g.beta != 0;
  if ((g.bias || g.a_sums || separate_c_in) && gemm_lt(ctx, g, t, alpha, beta)) return;

  cudaStream_t stream = static_cast<cudaStream_t>(current_stream());
  if (separate_c_in) {  // C starts as c_in, then the plain product scales and adds to it
    const size_t matrix_bytes = static_cast<size_t>(g.m * g.n) * dtype_size(g.out_dtype());
    if (g.batch == 1 || g.stride_c == g.m * g.n) {
      CUDA_CHECK(cudaMemcpyAsync(g.c, g.c_in, matrix_bytes * static_cast<size_t>(g.batch), cudaMemcpyDeviceToDevice,
                                 stream));
    } else {
      const size_t pitch = static_cast<size_t>(g.stride_c) * dtype_size(g.out_dtype());
      CUDA_CHECK(cudaMemcpy2DAsync(g.c, pitch, g.c_in, pitch, matrix_bytes, static_cast<size_t>(g.batch),
                                   cudaMemcpyDeviceToDevice, stream));
    }
  }
  // A's row sums read A only, so they may run before the product.
  if (g.a_sums) sum_operand_rows(g.a_sums, g.a, g.dtype, g.trans_a, g.m, g.k);
  // cublasSetStream resets the workspace, so the workspace is set after it, on every call.
  CUBLAS_CHECK(cublasSetStream(ctx.handle, stream));
  CUBLAS_CHECK(cublasSetWorkspace(ctx.handle, ctx.workspace, kWorkspaceBytes));
  // Column-major C^T (n x m) = op(B)^T (n x k) * op(A)^T (k x m).
  const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ld_b = std::max(1, g.trans_b ? k : n);
  const int ld_a = std::max(1, g.trans_a ? m : k);
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx.handle, op_b, op_a, n, m, k, alpha, g.b, t.operand, ld_b, g.stride_b,
                                          g.a, t.operand, ld_a, g.stride_a, beta, g.c, t.result, n, g.stride_c, batch,
                                          t.compute, CUBLAS_GEMM_DEFAULT));
  if (g.bias) add_bias_rows(g.c, g.out_dtype(), g.bias, g.batch, g.m, g.n, g.stride_c);
}

}  // namespace longtape::cuda
