// Entry points of the fused CUDA attention kernels: the launch plan of a Problem (which streams
// each launch covers, shared by the 16-bit and the f32 kernels), output fills and the f32
// accumulator store shared by forward and backward.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "attention/fused/backends.h"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Branch slot `br` of a launch: segments of w tokens, row step r.
void set_branch(Streams& st, int br, int64_t w, int64_t r) {
  const int64_t n = std::max(st.seq_q, st.seq_k);
  st.segment[br] = w;
  st.dilation[br] = r;
  st.tiles_per_stream[br] = ceil_div(ceil_div(std::min(w, n), r), kTile);
  st.num_tiles[br] = ceil_div(n, w) * st.tiles_per_stream[br];
}

Streams empty_streams(const attention::fused::Problem& p) {
  Streams st{};
  st.seq_q = p.seq_q;
  st.seq_k = p.seq_k;
  std::fill(std::begin(st.branch_of_head), std::end(st.branch_of_head), static_cast<int8_t>(-1));
  return st;
}

__global__ void fill_lse_kernel(float* lse, int64_t n) {
  for (int64_t i = impl::global_tid(); i < n; i += impl::grid_stride()) lse[i] = -INFINITY;
}

// Zeroes the chunks of a (batch, rows, heads, dim) view of type T (16 bytes per store where the
// view allows). +0 has all bits clear in bf16, f16 and f32.
template <class T, class I>
__global__ void zero_rows_kernel(T* dst, HeadRowChunks c) {
  for (I i = static_cast<I>(impl::global_tid()); i < static_cast<I>(c.chunks); i += static_cast<I>(impl::grid_stride())) {
    T* at = dst + c.offset(i);
    if (c.width > 1)
      *reinterpret_cast<uint4*>(at) = make_uint4(0, 0, 0, 0);
    else
      *at = T{};
  }
}

template <class T>
void launch_zero_rows(void* dst, const attention::fused::Strides& s, const attention::fused::Problem& p, int64_t rows) {
  const HeadRowChunks c = chunk_walk(dst, sizeof(T), row_strides_of(s), p.batch, 0, rows, p.heads, p.head_dim,
                                     16 / sizeof(T));
  with_chunk_index(c.chunks, [&](auto index) {
    zero_rows_kernel<T, decltype(index)><<<impl::grid_for(c.chunks), impl::kThreads, 0, impl::stream()>>>(
        static_cast<T*>(dst), c);
    CUDA_CHECK_LAUNCH();
  });
}

// The f32 accumulator (contiguous (batch, rows, heads, dim)) rounded into the strided output,
// 4 elements per step where the view allows; the rounding's rest into `residual` if given.
template <class F, class I>
__global__ void store_accumulator_kernel(elem16* dst, elem16* residual, HeadRowChunks c, const float* acc) {
  for (I i = static_cast<I>(impl::global_tid()); i < static_cast<I>(c.chunks); i += static_cast<I>(impl::grid_stride())) {
    const int64_t at = c.offset(i);
    const float* from = acc + static_cast<int64_t>(i) * c.width;
    if (c.width == 4) {
      const float4 v = *reinterpret_cast<const float4*>(from);
      const uint2 rounded{F::pack(v.x, v.y), F::pack(v.z, v.w)};
      *reinterpret_cast<uint2*>(dst + at) = rounded;
      if (residual) {
        const float2 a = F::unpack(rounded.x), b = F::unpack(rounded.y);
        *reinterpret_cast<uint2*>(residual + at) = uint2{F::pack(v.x - a.x, v.y - a.y), F::pack(v.z - b.x, v.w - b.y)};
      }
    } else {
      const elem16 rounded = F::from_float(*from);
      dst[at] = rounded;
      if (residual) residual[at] = F::from_float(*from - F::to_float(rounded));
    }
  }
}

}  // namespace

KernelTuning& kernel_tuning() {
  static KernelTuning tuning;
  return tuning;
}

LaunchPlan plan_launches(const attention::fused::Problem& p) {
  using attention::fused::BranchMixing;
  using attention::fused::KeySet;
  LaunchPlan plan;
  if (p.key_set == KeySet::dense || p.key_set == KeySet::blocks) {
    Streams st = empty_streams(p);
    set_branch(st, 0, std::max(p.seq_q, p.seq_k), 1);
    for (int64_t h = 0; h < p.heads; ++h) {
      st.branch_of_head[h] = 0;
      st.offset_of_head[h] = 0;
    }
    plan.launches.push_back(st);
    if (p.key_set == KeySet::blocks) {
      const auto& bl = p.blocks;
      plan.lists.row_begin = bl.row_begin;
      plan.lists.col_index = bl.col_index;
      plan.lists.col_begin = bl.col_begin;
      plan.lists.row_index = bl.row_index;
      plan.lists.num_lists = bl.num_lists;
      plan.lists.nqb = bl.num_query_blocks;
      plan.lists.nkb = bl.num_key_blocks;
      plan.lists.block_tiles = static_cast<int>(bl.block_size / kTile);
      plan.lists.bias = static_cast<const float*>(bl.bias);
    }
    return plan;
  }
  const auto& dl = p.dilated;
  plan.prefill = true;
  if (dl.mixing == BranchMixing::lse) {
    plan.merge = dl.num_branches > 1;
    for (int br = 0; br < dl.num_branches; ++br) {
      Streams st = empty_streams(p);
      set_branch(st, br, dl.segment[br], dl.dilation[br]);
      for (int64_t h = 0; h < p.heads; ++h) {
        st.branch_of_head[h] = static_cast<int8_t>(br);
        st.offset_of_head[h] = static_cast<int16_t>((dl.head_offset + h) % dl.dilation[br]);
      }
      plan.launches.push_back(st);
    }
  } else {
    Streams st = empty_streams(p);
    for (int br = 0; br < dl.num_branches; ++br) set_branch(st, br, dl.segment[br], dl.dilation[br]);
    for (int64_t h = 0; h < p.heads; ++h) {
      st.branch_of_head[h] = dl.branch_of_head[h];
      st.offset_of_head[h] = static_cast<int16_t>(dl.offset_of_head[h]);
    }
    plan.launches.push_back(st);
    plan.out_scale = 1.f / static_cast<float>(dl.num_branches);
  }
  return plan;
}

bool current_device_is_sm90() {
  static int capability[64] = {};  // major * 10 + minor per device, 0 = not asked yet
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) return false;
  if (capability[device] == 0) {
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    capability[device] = major * 10 + minor;
  }
  return capability[device] == 90;
}

std::vector<SequenceChunk> merge_chunks(const attention::fused::Problem& p, const LaunchPlan& plan,
                                        int64_t min_row_heads) {
  const int64_t n = p.seq_q;
  std::vector<SequenceChunk> chunks;
  int64_t period = 1;  // least common multiple of the segment lengths
  if (plan.merge && p.key_set == attention::fused::KeySet::dilated && p.seq_q == p.seq_k) {
    for (int br = 0; br < p.dilated.num_branches && period > 0; ++br) {
      period = std::lcm(period, p.dilated.segment[br]);
      if (period >= n) period = 0;  // no chunk boundary inside the sequence
    }
  } else {
    period = 0;
  }
  if (period <= 0) return {{0, n}};
  const int64_t min_rows =
      ceil_div(std::max<int64_t>(1, min_row_heads), std::max<int64_t>(1, p.batch * p.heads));
  const int64_t rows = ceil_div(min_rows, period) * period;
  for (int64_t start = 0; start < n; start += rows) chunks.push_back({start, std::min(rows, n - start)});
  return chunks;
}

attention::fused::Problem chunk_problem(const attention::fused::Problem& p, const SequenceChunk& chunk) {
  attention::fused::Problem c = p;
  c.seq_q = c.seq_k = chunk.rows;
  return c;
}

void fill_outputs(const attention::fused::Problem& p) {
  const int64_t n_lse = p.batch * p.heads * p.seq_q;
  if (n_lse == 0) return;
  fill_lse_kernel<<<impl::grid_for(n_lse), impl::kThreads, 0, impl::stream()>>>(static_cast<float*>(p.lse), n_lse);
  CUDA_CHECK_LAUNCH();
  zero_rows(p.out, p.out_stride, p, p.seq_q);
  if (p.out_residual) zero_rows(p.out_residual, p.out_stride, p, p.seq_q);
}

void zero_rows(void* dst, const attention::fused::Strides& s, const attention::fused::Problem& p, int64_t rows) {
  const int64_t n = p.batch * rows * p.heads * p.head_dim;
  if (n == 0) return;
  if (p.dtype == DType::f32)
    launch_zero_rows<float>(dst, s, p, rows);
  else
    launch_zero_rows<elem16>(dst, s, p, rows);
}

float* ChunkAccumulator::uninitialized(size_t elems) {
  if (!storage_) storage_ = impl::scratch(elems * sizeof(float));
  return static_cast<float*>(storage_->data);
}

float* ChunkAccumulator::zeroed(size_t elems) {
  float* data = uninitialized(elems);
  CUDA_CHECK(cudaMemsetAsync(data, 0, elems * sizeof(float), impl::stream()));
  return data;
}

void zero_block_bias_grad(const attention::fused::BackwardProblem& bp, const LaunchPlan& plan) {
  if (!bp.dbias) return;
  const attention::fused::Problem& f = bp.forward;
  const size_t n = static_cast<size_t>(f.batch * f.heads * plan.lists.nqb * plan.lists.nkb);
  CUDA_CHECK(cudaMemsetAsync(bp.dbias, 0, n * sizeof(float), impl::stream()));
}

void store_accumulator(void* dst, const attention::fused::Strides& s, const float* acc,
                       const attention::fused::Problem& p, int64_t rows, void* residual) {
  const int64_t n = p.batch * rows * p.heads * p.head_dim;
  if (n == 0) return;
  HeadRowChunks c = chunk_walk(dst, sizeof(elem16), row_strides_of(s), p.batch, 0, rows, p.heads, p.head_dim, 4);
  if (residual && c.width == 4 &&
      chunk_walk(residual, sizeof(elem16), row_strides_of(s), p.batch, 0, rows, p.heads, p.head_dim, 4).width != 4)
    c = chunk_walk(dst, sizeof(elem16), row_strides_of(s), p.batch, 0, rows, p.heads, p.head_dim, 1);
  with_format(p.dtype, [&](auto format) {
    with_chunk_index(c.chunks, [&](auto index) {
      store_accumulator_kernel<decltype(format), decltype(index)><<<impl::grid_for(c.chunks), impl::kThreads, 0,
                                                                    impl::stream()>>>(
          static_cast<elem16*>(dst), static_cast<elem16*>(residual), c, acc);
      CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace longtape::cuda::attn

namespace longtape::attention::fused {

namespace {
void check_supported(const Problem& problem) {
  const std::string reason = cuda_unsupported_reason(problem);
  LT_CHECK(reason.empty(), "fused attention (CUDA): ", reason);
}
}  // namespace

void cuda_forward(const Problem& problem) {
  check_supported(problem);
  if (problem.batch == 0 || problem.seq_q == 0 || problem.heads == 0) return;
  cuda::impl::DeviceGuard guard(cuda::impl::device_of(problem.q));
  if (problem.dtype == DType::f32)
    cuda::attn::run_forward_f32(problem, cuda::attn::plan_launches(problem));
  else
    cuda::attn::run_forward(problem, cuda::attn::plan_launches(problem));
}

void cuda_backward(const BackwardProblem& problem) {
  check_supported(problem.forward);
  const Problem& f = problem.forward;
  if (f.batch == 0 || f.heads == 0 || (f.seq_q == 0 && f.seq_k == 0)) return;
  cuda::impl::DeviceGuard guard(cuda::impl::device_of(f.q));
  if (f.dtype == DType::f32)
    cuda::attn::run_backward_f32(problem, cuda::attn::plan_launches(f));
  else
    cuda::attn::run_backward(problem, cuda::attn::plan_launches(f));
}

}  // namespace longtape::attention::fused
