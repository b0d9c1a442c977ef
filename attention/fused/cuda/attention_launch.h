#pragma once
// Host side of the fused attention kernels: how a Problem becomes launches (attention/fused/cuda/attention_fused.cu)
// and the forward / backward drivers (attention_fused_fwd.cu, attention_fused_bwd.cu).
#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention/fused/problem.h"
#include "attention/fused/cuda/attention_fused.cuh"
#include "attention/fused/cuda/attention_tuning.h"
#include "tensor/cuda/check.cuh"
#include "tensor/cuda/common.cuh"

namespace longtape {
struct Storage;
}

namespace longtape::cuda::attn {

struct LaunchPlan {
  std::vector<Streams> launches;  // run in order on the current stream
  bool merge = false;    // lse mixing of several branches: results merge through an f32 accumulator
  bool prefill = false;  // some rows may be covered by no stream: out 0, lse -inf first
  float out_scale = 1.f;  // head_groups: 1 / G
  Lists lists;
};

LaunchPlan plan_launches(const attention::fused::Problem& problem);

// Runs body(Bf16Format{}) or body(F16Format{}): the 16-bit format of the inputs' dtype.
template <class Body>
void with_format(DType dtype, Body&& body) {
  LT_CHECK(dtype == DType::bf16 || dtype == DType::f16,
           "fused attention (CUDA): the 16-bit kernels take bf16 or f16 inputs, got ", dtype_name(dtype));
  if (dtype == DType::f16)
    body(F16Format{});
  else
    body(Bf16Format{});
}

// Runs body(std::integral_constant<int, D>{}) for the problem's head dim D (32, 64 or 128).
template <class Body>
void with_head_dim(int64_t head_dim, Body&& body) {
  switch (head_dim) {
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    case 128: return body(std::integral_constant<int, 128>{});
    default: LT_CHECK(false, "fused attention (CUDA): head_dim must be 32, 64 or 128, got ", head_dim);
  }
}

// The CTAs a launch needs along x: the most tiles of any branch (0: nothing to run).
inline int64_t max_tiles_of(const Streams& streams) {
  int64_t max_tiles = 0;
  for (int br = 0; br < kMaxBranches; ++br) max_tiles = std::max(max_tiles, streams.num_tiles[br]);
  return max_tiles;
}

// The launch's streams cut into tiles of `rows` rows (the sm_90a kernels' tiles, instead of kTile);
// returns the most tiles of any branch.
inline int64_t retile(Streams& st, int64_t rows) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t n = std::max(st.seq_q, st.seq_k);
  int64_t max_tiles = 0;
  for (int br = 0; br < kMaxBranches; ++br) {
    if (st.num_tiles[br] == 0) continue;
    const int64_t w = st.segment[br], r = st.dilation[br];
    st.tiles_per_stream[br] = ceil_div(ceil_div(std::min(w, n), r), rows);
    st.num_tiles[br] = ceil_div(n, w) * st.tiles_per_stream[br];
    max_tiles = std::max(max_tiles, st.num_tiles[br]);
  }
  return max_tiles;
}

// Launches kKernel<<<grid, threads, smem>>>(args...) on the current stream, raising the kernel's
// dynamic shared memory limit to `smem` at its first launch (the limit is per function).
template <auto kKernel, class... Args>
void launch_with_shared(dim3 grid, int threads, size_t smem, const Args&... args) {
  static bool configured = false;
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    configured = true;
  }
  kKernel<<<grid, threads, smem, impl::stream()>>>(args...);
  CUDA_CHECK_LAUNCH();
}

// Rows [start, start + rows) of the sequence, run as a problem of their own.
struct SequenceChunk {
  int64_t start, rows;
};
// lse mixing merges branches through f32 accumulators of every row; dilated segments never cross a
// multiple of every segment length, so the sequence can run in chunks of such multiples, each a
// problem of its own, and the accumulators hold one chunk. Chunks are large enough to fill the GPU
// (rows x batch x heads at least min_row_heads); one chunk when nothing merges.
std::vector<SequenceChunk> merge_chunks(const attention::fused::Problem& problem, const LaunchPlan& plan,
                                        int64_t min_row_heads);
// `problem` with `rows` queries and keys (the stream geometry of a chunk; pointers unchanged).
attention::fused::Problem chunk_problem(const attention::fused::Problem& problem, const SequenceChunk& chunk);

// Kernel parameters whose q, k, v and lse start at row `start` of the sequence.
template <class Params>
Params params_from_row(const Params& p, int64_t start) {
  Params pc = p;
  pc.q += start * p.qs.row;
  pc.k += start * p.ks.row;
  pc.v += start * p.vs.row;
  pc.lse += start;
  return pc;
}

// The f32 accumulator of a chunked driver: zeroed(n) gives n zeroed floats on the current stream,
// uninitialized(n) n floats to be written whole first; allocated for the first chunk
// (merge_chunks gives the largest first) and reused by the others.
class ChunkAccumulator {
 public:
  float* zeroed(size_t elems);
  float* uninitialized(size_t elems);

 private:
  std::shared_ptr<Storage> storage_;
};

// Runs body(chunk, chunk's problem, chunk's launch plan, params, acc) for every chunk of
// merge_chunks, in order: the plan is the problem's own when the chunk is the whole sequence, params
// start at the chunk's first row (params_from_row), and acc is the chunks' f32 accumulator.
template <class Params, class Body>
void for_each_chunk(const attention::fused::Problem& problem, const LaunchPlan& plan, int64_t min_row_heads,
                    const Params& params, Body&& body) {
  ChunkAccumulator acc;
  for (const SequenceChunk& chunk : merge_chunks(problem, plan, min_row_heads)) {
    const attention::fused::Problem part = chunk_problem(problem, chunk);
    body(chunk, part, chunk.start == 0 && chunk.rows == problem.seq_q ? plan : plan_launches(part),
         params_from_row(params, chunk.start), acc);
  }
}

// The grid of a launch: `tiles` CTAs along x, one per head along y and per batch entry along z.
inline dim3 cta_grid(int64_t tiles, int64_t heads, int64_t batch) {
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

// out = 0 and lse = -inf everywhere.
void fill_outputs(const attention::fused::Problem& problem);
// dst (B, rows, H, D) (elements of the problem's dtype: bf16, f16 or f32) with strides = 0.
void zero_rows(void* dst, const attention::fused::Strides& strides, const attention::fused::Problem& problem,
               int64_t rows);
// dst (B, N, H, D) in the problem's dtype (bf16 or f16) with strides = acc (contiguous f32
// (B, N, H, D)). `residual`, when set, receives acc - dst (same dtype, dst's strides).
void store_accumulator(void* dst, const attention::fused::Strides& strides, const float* acc,
                       const attention::fused::Problem& problem, int64_t rows, void* residual = nullptr);
// Zeroes the block-bias gradient (B, H, nqb, nkb) where the backward computes one.
void zero_block_bias_grad(const attention::fused::BackwardProblem& problem, const LaunchPlan& plan);
// Whether the current device is compute capability 9.0 (where sm_90a code runs); asked once per device.
bool current_device_is_sm90();
// Whether the sm_90a kernels were built, run on the current device and cover the problem's
// shape: head dim 64 or 128, block lists of 64- or 128-key blocks (each pass adds its own terms).
bool hopper_kernels_cover(const attention::fused::Problem& problem);
void run_forward(const attention::fused::Problem& problem, const LaunchPlan& plan);
void run_backward(const attention::fused::BackwardProblem& problem, const LaunchPlan& plan);
// The same for f32 inputs: exact f32 on the CUDA cores (attention/fused/cuda/attention_f32_fwd.cu, attention_f32_bwd.cu).
void run_forward_f32(const attention::fused::Problem& problem, const LaunchPlan& plan);
void run_backward_f32(const attention::fused::BackwardProblem& problem, const LaunchPlan& plan);
// What last_forward_kernel() / last_backward_kernel() report; each driver sets them.
extern const char* g_last_forward_kernel;
extern const char* g_last_backward_kernel;

// bf16 backward problems rescaled into f16 copies (attention/fused/cuda/attention_rescale.cu): the factor
// buffer (BwdRescale's scalars first, computed on the device from the tensors' maxima), and rows
// [start, start + rows) of q (which = 0), k (1), v (2) or dO (3) multiplied by their factor into
// a contiguous f16 (B, rows, H, D) copy.
std::shared_ptr<Storage> bf16_rescale_factors(const attention::fused::BackwardProblem& problem, float do_scale);
struct RescaledRows {
  std::shared_ptr<Storage> storage;
  const elem16* rows = nullptr;
  RowStrides strides{};
};
RescaledRows rescale_rows_to_f16(const float* factors, int which, const void* src,
                                 const attention::fused::Strides& strides, int64_t batch, int64_t start, int64_t rows,
                                 int64_t heads, int64_t dim);

// A fused::Strides as the kernels' row strides.
inline RowStrides row_strides_of(const attention::fused::Strides& s) { return {s.batch, s.row, s.head}; }

// The chunks of a (batch, rows from start, heads, dim) view at `base` with strides s: `wide`
// elements at a time (one vector load or store) when dim, the strides and the address allow, else
// one.
inline HeadRowChunks chunk_walk(const void* base, size_t elem_bytes, RowStrides s, int64_t batch, int64_t start,
                                int64_t rows, int64_t heads, int64_t dim, int wide) {
  const auto at = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(start * s.row) * elem_bytes;
  const bool take_wide = dim % wide == 0 && s.batch % wide == 0 && s.row % wide == 0 && s.head % wide == 0 &&
                         at % (wide * elem_bytes) == 0;
  const int64_t width = take_wide ? wide : 1;
  HeadRowChunks c;
  c.s = s;
  c.start = start;
  c.width = static_cast<uint32_t>(width);
  c.per_row = static_cast<uint32_t>(dim / width);
  c.heads = static_cast<uint32_t>(heads);
  c.rows = static_cast<uint32_t>(rows);
  c.chunks = batch * rows * heads * (dim / width);
  return c;
}
// Runs launch(index) with the narrowest index type that numbers `chunks` chunks (and a grid
// stride past the last one).
template <class Launch>
void with_chunk_index(int64_t chunks, const Launch& launch) {
  if (chunks < (int64_t{1} << 31))
    launch(uint32_t{});
  else
    launch(uint64_t{});
}
// Blocks for a grid-stride pass over n items: enough to fill the GPU, few enough that a block
// reduction's one atomic per block stays cheap.
inline unsigned reduction_grid(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 1024));
}

// The inputs, their strides and the scalars every kernel's parameters share (forward and
// backward), as elements of type E (the 16-bit formats' raw bits, or f32).
template <typename E, typename Params>
void set_inputs(Params& p, const attention::fused::Problem& f, const LaunchPlan& plan) {
  p.q = static_cast<const E*>(f.q);
  p.k = static_cast<const E*>(f.k);
  p.v = static_cast<const E*>(f.v);
  p.qs = row_strides_of(f.q_stride);
  p.ks = row_strides_of(f.k_stride);
  p.vs = row_strides_of(f.v_stride);
  p.heads = f.heads;
  p.scale_log2 = static_cast<float>(f.scale) * kLog2e;
  p.causal = f.causal;
  p.lists = plan.lists;
}

// The inputs, gradient outputs, strides and scalars every backward's parameters share.
template <typename E, typename Params>
void set_backward_inputs(Params& p, const attention::fused::BackwardProblem& bp, const LaunchPlan& plan) {
  const attention::fused::Problem& f = bp.forward;
  set_inputs<E>(p, f, plan);
  p.dout = static_cast<const E*>(bp.dout);
  p.dos = row_strides_of(bp.dout_stride);
  p.lse = static_cast<const float*>(f.lse);
  p.lse_stride = f.seq_q;
  p.dq = static_cast<E*>(bp.dq);
  p.dk = static_cast<E*>(bp.dk);
  p.dv = static_cast<E*>(bp.dv);
  p.dqs = row_strides_of(bp.dq_stride);
  p.dks = row_strides_of(bp.dk_stride);
  p.dvs = row_strides_of(bp.dv_stride);
  p.scale = static_cast<float>(f.scale);
  p.do_scale = plan.out_scale;
  p.lists.dbias = static_cast<float*>(bp.dbias);
}

}  // namespace longtape::cuda::attn
