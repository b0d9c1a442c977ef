// Reductions (sum / max / min) over the trailing dims of a strided view, bitwise reproducible:
// every output is computed by a fixed set of threads in a fixed order (strided per-thread
// accumulation, then a fixed shuffle tree), with no atomics, so the result depends only on the
// shapes and strides. f32, bf16 and f16 accumulate in f32, f64 in f64.
//
// Two layouts, chosen from the strides:
//  - rows: a warp (short rows) or a 256-thread block (long rows) per output row; used when the
//    reduced elements are contiguous, or whenever the outputs are not adjacent in memory.
//  - columns: 8 threads per output, each walking every 8th reduced element in order, then combined
//    in lane order; used when adjacent outputs are adjacent in memory and the reduced dims are
//    strided (e.g. sum over the batch dim of a (B, C) tensor), so a warp's loads are coalesced.
// Few long reductions are split into fixed-size chunks whose partial results (in the
// accumulation type) are reduced again by a second pass of the same code.
#include "tensor/cuda/block_reduce.cuh"
#include "tensor/cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

// Output index -> base offset (kept dims), reduced index -> offset (reduced dims).
struct ReduceDesc {
  int keep_ndim = 0, red_ndim = 0;
  int64_t keep_shape[kMaxDims] = {}, keep_stride[kMaxDims] = {};
  int64_t red_shape[kMaxDims] = {}, red_stride[kMaxDims] = {};
  int64_t outer = 1, len = 1;
};

__device__ __forceinline__ int64_t dims_offset(int ndim, const int64_t* shape, const int64_t* stride, int64_t i) {
  if (ndim <= 1) return ndim == 0 ? 0 : i * stride[0];  // the common case after merging dims
  int64_t off = 0;
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d < ndim) {
      off += (i % shape[d]) * stride[d];
      i /= shape[d];
    }
  }
  return off;
}

// Appends dims to (shape, stride, ndim), skipping size-1 dims and merging contiguous neighbours.
void push_dims(int& ndim, int64_t* shape, int64_t* stride, const int64_t* src_shape, const int64_t* src_stride, int n) {
  for (int d = 0; d < n; ++d) {
    if (src_shape[d] == 1) continue;
    if (ndim > 0 && stride[ndim - 1] == src_stride[d] * src_shape[d]) {
      shape[ndim - 1] *= src_shape[d];
      stride[ndim - 1] = src_stride[d];
    } else {
      shape[ndim] = src_shape[d];
      stride[ndim] = src_stride[d];
      ++ndim;
    }
  }
}

template <typename A>
__device__ __forceinline__ A identity_of(ReduceOp op) {
  if (op == ReduceOp::sum) return A(0);
  const A inf = A(1) / A(0);
  return op == ReduceOp::max ? -inf : inf;
}

template <typename A>
__device__ __forceinline__ A combine(ReduceOp op, A a, A b) {
  if (op == ReduceOp::sum) return SumOp{}(a, b);
  if (op == ReduceOp::max) return MaxOp{}(a, b);
  return MinOp{}(a, b);
}

// Groups of `group` threads (32, or the whole block) each reduce one chunk of one row; the
// result goes to out[row * nchunks + chunk].
template <typename Tin, typename Tout, typename A>
__global__ void reduce_rows_kernel(ReduceOp op, ReduceDesc d, const Tin* in, Tout* out, int64_t chunk_len,
                                   int64_t nchunks, int group) {
  __shared__ A shared[32];
  const int groups_per_block = blockDim.x / group;
  const int lane = threadIdx.x % group;
  const int64_t total = d.outer * nchunks;
  auto comb = [op](A a, A b) { return combine(op, a, b); };
  // The loop bound is uniform across each group, so the group's shuffles and barriers line up.
  for (int64_t g0 = static_cast<int64_t>(blockIdx.x) * groups_per_block; g0 < total;
       g0 += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t g = g0 + threadIdx.x / group;
    A acc = identity_of<A>(op);
    if (g < total) {
      const int64_t row = g / nchunks, chunk = g % nchunks;
      const int64_t base = dims_offset(d.keep_ndim, d.keep_shape, d.keep_stride, row);
      const int64_t begin = chunk * chunk_len, end = min(d.len, begin + chunk_len);
      // Unrolled so that several loads are in flight; the combines keep their order (same bits).
#pragma unroll 8
      for (int64_t e = begin + lane; e < end; e += group)
        acc = comb(acc, static_cast<A>(Elem<Tin>::load(in, base + dims_offset(d.red_ndim, d.red_shape, d.red_stride, e))));
    }
    if (group == 32) {
      acc = warp_reduce(acc, comb);
    } else {
      acc = block_reduce(acc, comb, identity_of<A>(op), shared);
    }
    if (lane == 0 && g < total) Elem<Tout>::store(out, g, static_cast<typename Elem<Tout>::C>(acc));
  }
}

// Columns: a block covers 32 adjacent outputs (threadIdx.x) with kColumnLanes threads each
// (threadIdx.y): lane y combines rows y, y + kColumnLanes, ... of its chunk in order, then lane 0
// combines the lanes' results in lane order. Result to out[chunk * outer + output], chunk = blockIdx.y.
constexpr int kColumnLanes = 8;

template <typename Tin, typename Tout, typename A>
__global__ void reduce_cols_kernel(ReduceOp op, ReduceDesc d, const Tin* in, Tout* out, int64_t chunk_len) {
  __shared__ A lanes[kColumnLanes][32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  A acc = identity_of<A>(op);
  if (row < d.outer) {
    const int64_t base = dims_offset(d.keep_ndim, d.keep_shape, d.keep_stride, row);
    const int64_t begin = chunk * chunk_len, end = min(d.len, begin + chunk_len);
#pragma unroll 4
    for (int64_t e = begin + threadIdx.y; e < end; e += kColumnLanes)
      acc = combine(op, acc, static_cast<A>(Elem<Tin>::load(in, base + dims_offset(d.red_ndim, d.red_shape, d.red_stride, e))));
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && row < d.outer) {
    A total = lanes[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kColumnLanes; ++y) total = combine(op, total, lanes[y][threadIdx.x]);
    Elem<Tout>::store(out, chunk * d.outer + row, static_cast<typename Elem<Tout>::C>(total));
  }
}

DType acc_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }

template <typename Tin, typename Tout>
void launch_pass(bool columns, ReduceOp op, const ReduceDesc& d, const void* in, void* out, int64_t chunk_len,
                 int64_t nchunks, int group) {
  using A = AccT<Tin>;
  const int64_t total = d.outer * nchunks;
  if (columns) {
    const dim3 grid(static_cast<unsigned>((d.outer + 31) / 32), static_cast<unsigned>(nchunks));
    reduce_cols_kernel<Tin, Tout, A><<<grid, dim3(32, kColumnLanes), 0, stream()>>>(
        op, d, static_cast<const Tin*>(in), static_cast<Tout*>(out), chunk_len);
  } else {
    const int per_block = kThreads / group;
    const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>((total + per_block - 1) / per_block, 1, 65536));
    reduce_rows_kernel<Tin, Tout, A><<<grid, kThreads, 0, stream()>>>(
        op, d, static_cast<const Tin*>(in), static_cast<Tout*>(out), chunk_len, nchunks, group);
  }
  CUDA_CHECK_LAUNCH();
}

void dispatch_pass(bool columns, ReduceOp op, const ReduceDesc& d, const void* in, DType in_t, void* out,
                   DType out_t, int64_t chunk_len, int64_t nchunks, int group) {
  if (in_t == DType::f32 && out_t == DType::f32) launch_pass<float, float>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::f32 && out_t == DType::bf16) launch_pass<float, bf16>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::bf16 && out_t == DType::bf16) launch_pass<bf16, bf16>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::bf16 && out_t == DType::f32) launch_pass<bf16, float>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::f32 && out_t == DType::f16) launch_pass<float, f16>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::f16 && out_t == DType::f16) launch_pass<f16, f16>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::f16 && out_t == DType::f32) launch_pass<f16, float>(columns, op, d, in, out, chunk_len, nchunks, group);
  else if (in_t == DType::f64 && out_t == DType::f64) launch_pass<double, double>(columns, op, d, in, out, chunk_len, nchunks, group);
  else LT_ASSERT(false, "reduce: unexpected dtype pair");
}

// Thresholds of the layout choice. They depend on nothing but the problem's shape, so the
// same shapes always take the same path (and give the same bits) on any GPU.
constexpr int64_t kColumnOutputsTarget = 1 << 15;  // columns: split until this many (output, chunk) pairs
constexpr int64_t kMinColumnChunk = 32;
constexpr int64_t kMaxColumnChunks = 65535;         // grid y
constexpr int64_t kRowSplitLen = 1 << 14;          // rows longer than this may be split ...
constexpr int64_t kRowGroupsTarget = 1024;         // ... until there are this many groups
constexpr int64_t kMinRowChunk = 4096;

void run_reduce(ReduceOp op, const ReduceDesc& d, const void* in, DType in_t, void* out, DType out_t) {
  const bool red_contiguous = d.red_ndim == 0 || d.red_stride[d.red_ndim - 1] == 1;
  const bool outs_adjacent = d.keep_ndim > 0 && d.keep_stride[d.keep_ndim - 1] == 1;
  const bool columns = !red_contiguous && outs_adjacent;
  int64_t nchunks = 1;
  int group = 32;
  if (columns) {
    if (d.outer < kColumnOutputsTarget) {
      const int64_t want = (kColumnOutputsTarget + d.outer - 1) / d.outer;
      nchunks = std::max<int64_t>(1, std::min(want, d.len / kMinColumnChunk));
    }
    nchunks = std::min(nchunks, kMaxColumnChunks);
  } else {
    group = d.len > 256 ? kThreads : 32;
    if (d.len > kRowSplitLen && d.outer < kRowGroupsTarget) {
      const int64_t want = (kRowGroupsTarget + d.outer - 1) / d.outer;
      nchunks = std::max<int64_t>(1, std::min(want, d.len / kMinRowChunk));
    }
  }
  const int64_t chunk_len = (d.len + nchunks - 1) / nchunks;
  nchunks = d.len == 0 ? 1 : (d.len + chunk_len - 1) / chunk_len;
  if (nchunks == 1) {
    dispatch_pass(columns, op, d, in, in_t, out, out_t, std::max<int64_t>(chunk_len, 1), 1, group);
    return;
  }
  // Pass 1: partial results in the accumulation type; pass 2 reduces them in chunk order.
  const DType acc_t = acc_dtype(in_t);
  auto partial = scratch(static_cast<size_t>(d.outer * nchunks) * dtype_size(acc_t));
  dispatch_pass(columns, op, d, in, in_t, partial->data, acc_t, chunk_len, nchunks, group);
  ReduceDesc p;
  p.outer = d.outer;
  p.len = nchunks;
  p.keep_ndim = 1;
  p.keep_shape[0] = d.outer;
  p.red_ndim = 1;
  p.red_shape[0] = nchunks;
  if (columns) {  // partial[chunk * outer + row]
    p.keep_stride[0] = 1;
    p.red_stride[0] = d.outer;
  } else {  // partial[row * nchunks + chunk]
    p.keep_stride[0] = nchunks;
    p.red_stride[0] = 1;
  }
  run_reduce(op, p, partial->data, acc_t, out, out_t);
}

}  // namespace

void reduce(ReduceOp op, const View& out, const View& in, int nreduce) {
  LT_CHECK(in.device.is_cuda(), "reduce: expected a CUDA tensor, got one on ", in.device.str());
  LT_CHECK(in.dtype == DType::f32 || in.dtype == DType::f64 || is_half_precision(in.dtype),
           "reduce: the CUDA backend reduces f32, f64, bf16 or f16, got ", dtype_name(in.dtype));
  LT_CHECK(out.dtype == in.dtype, "reduce: output dtype ", dtype_name(out.dtype), " differs from input ",
           dtype_name(in.dtype));
  LT_CHECK(nreduce >= 0 && nreduce <= in.ndim, "reduce: cannot reduce ", nreduce, " dims of a ", in.ndim, "-d view");
  const int keep = in.ndim - nreduce;
  ReduceDesc d;
  push_dims(d.keep_ndim, d.keep_shape, d.keep_stride, in.shape, in.strides, keep);
  push_dims(d.red_ndim, d.red_shape, d.red_stride, in.shape + keep, in.strides + keep, nreduce);
  for (int i = 0; i < keep; ++i) d.outer *= in.shape[i];
  for (int i = keep; i < in.ndim; ++i) d.len *= in.shape[i];
  LT_CHECK(d.len > 0 || op == ReduceOp::sum || d.outer == 0, "reduce: max/min over an empty dimension");
  if (d.outer == 0) return;
  DeviceGuard guard(out.device);
  run_reduce(op, d, in.data, in.dtype, out.data, out.dtype);
}

}  // namespace longtape::cuda
