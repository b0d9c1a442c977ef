// Softmax / log_softmax and LayerNorm rows, forward and backward. LayerNorm rows of up to 1024
// columns take one warp each; longer rows (and softmax) one block per row; row sums
// use the fixed block-reduction tree of tensor/cuda/block_reduce.cuh, and the LayerNorm parameter gradients
// are column sums in a fixed order (per-chunk partial sums in row order, then the chunks in
// order, inside the one backward launch), so every result is bitwise reproducible. f32/bf16
// accumulate in f32, f64 in f64. f32 rows may write a bf16 result and read a bf16 gradient (the
// type of the output Y and of the gradient G are template parameters, T's by default).
#include "tensor/cuda/block_reduce.cuh"
#include "tensor/cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

template <typename T>
__global__ void softmax_kernel(T* out, const T* in, int64_t rows, int64_t cols, bool log) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = in + r * cols;
    T* y = out + r * cols;
    const RowMaxSumExp<A> row = row_max_sum_exp(x, cols, shared);
    const A m = row.max, s = row.sum_exp;
    if (log) {
      const A lse = m + m_log(s);
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) E::store(y, c, static_cast<A>(E::load(x, c)) - lse);
    } else {
      const A inv = A(1) / s;
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
        E::store(y, c, m_exp(static_cast<A>(E::load(x, c)) - m) * inv);
    }
  }
}

template <typename T>
__global__ void softmax_backward_kernel(T* dx, const T* y, const T* dy, int64_t rows, int64_t cols, bool log) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * cols;
    const T* gr = dy + r * cols;
    T* o = dx + r * cols;
    A s = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A g = E::load(gr, c);
      s += log ? g : g * static_cast<A>(E::load(yr, c));
    }
    s = block_reduce(s, SumOp{}, A(0), shared);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A g = E::load(gr, c), yv = E::load(yr, c);
      E::store(o, c, log ? g - m_exp(yv) * s : yv * (g - s));
    }
  }
}

// mean and rstd are AccT<T> (f32, or f64 for f64 data).
template <typename T, typename Y>
__global__ void layer_norm_kernel(Y* y, AccT<T>* mean, AccT<T>* rstd, const T* x, const T* weight, const T* bias,
                                  int64_t rows, int64_t cols, double eps) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    A s = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += static_cast<A>(E::load(xr, c));
    const A mu = block_reduce(s, SumOp{}, A(0), shared) / static_cast<A>(cols);
    A v = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A dev = static_cast<A>(E::load(xr, c)) - mu;
      v += dev * dev;
    }
    const A var = block_reduce(v, SumOp{}, A(0), shared) / static_cast<A>(cols);
    const A rs = A(1) / m_sqrt(var + static_cast<A>(eps));
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      A h = (static_cast<A>(E::load(xr, c)) - mu) * rs;
      if (weight) h *= static_cast<A>(E::load(weight, c));
      if (bias) h += static_cast<A>(E::load(bias, c));
      Elem<Y>::store(y, r * cols + c, h);
    }
  }
}

// dx of one LayerNorm row: rstd * (g - mean(g) - h * mean(g * h)) with g = dy * weight and h the
// normalized input, plus addr (the row's dx_addend) when not null. Every thread of the block must
// call it for the same row.
template <typename T, typename G>
__device__ void layer_norm_row_dx(T* dxr, const G* gr, const T* addr, const T* xr, AccT<T> mu, AccT<T> rs,
                                  const T* weight, int64_t cols, AccT<T>* shared) {
  using A = AccT<T>;
  using E = Elem<T>;
  A sg = 0, sgh = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    A gh = Elem<G>::load(gr, c);
    if (weight) gh *= static_cast<A>(E::load(weight, c));
    const A h = (static_cast<A>(E::load(xr, c)) - mu) * rs;
    sg += gh;
    sgh += gh * h;
  }
  sg = block_reduce(sg, SumOp{}, A(0), shared) / static_cast<A>(cols);
  sgh = block_reduce(sgh, SumOp{}, A(0), shared) / static_cast<A>(cols);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    A gh = Elem<G>::load(gr, c);
    if (weight) gh *= static_cast<A>(E::load(weight, c));
    const A h = (static_cast<A>(E::load(xr, c)) - mu) * rs;
    A d = rs * (gh - sg - h * sgh);
    if (addr) d += static_cast<A>(E::load(addr, c));
    E::store(dxr, c, d);
  }
}

template <typename T, typename G>
__global__ void layer_norm_backward_dx_kernel(T* dx, const G* dy, const T* dx_addend, const T* x, const AccT<T>* mean,
                                              const AccT<T>* rstd, const T* weight, int64_t rows, int64_t cols) {
  __shared__ AccT<T> shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    layer_norm_row_dx(dx + r * cols, dy + r * cols, dx_addend ? dx_addend + r * cols : nullptr, x + r * cols,
                      mean[r], rstd[r], weight, cols, shared);
}

// The whole backward in one launch: block k takes chunk k of rows, writes dx row by row and adds
// each row's dweight/dbias terms to its chunk's partial sums (each thread owns its columns, so the
// sums run in row order without atomics); the last block to finish adds the chunks in chunk order.
template <typename T, typename G>
__global__ void layer_norm_backward_fused_kernel(T* dx, T* dw, T* db, AccT<T>* pw, AccT<T>* pb,
                                                 unsigned* blocks_done, const G* dy, const T* dx_addend, const T* x,
                                                 const AccT<T>* mean, const AccT<T>* rstd, const T* weight,
                                                 int64_t rows, int64_t cols, int64_t chunk_rows) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  __shared__ bool last_block;
  const int64_t chunk = blockIdx.x;
  A* pwc = pw ? pw + chunk * cols : nullptr;
  A* pbc = pb ? pb + chunk * cols : nullptr;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if (pwc) pwc[c] = 0;
    if (pbc) pbc[c] = 0;
  }
  const int64_t begin = chunk * chunk_rows, end = min(rows, begin + chunk_rows);
  for (int64_t r = begin; r < end; ++r) {
    const G* gr = dy + r * cols;
    const T* xr = x + r * cols;
    const A mu = mean[r], rs = rstd[r];
    if (dx)
      layer_norm_row_dx(dx + r * cols, gr, dx_addend ? dx_addend + r * cols : nullptr, xr, mu, rs, weight, cols,
                        shared);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A g = Elem<G>::load(gr, c);
      if (pwc) pwc[c] += g * ((static_cast<A>(E::load(xr, c)) - mu) * rs);
      if (pbc) pbc[c] += g;
    }
  }
  // Publish this chunk's sums, then let the last block to arrive add up all chunks.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    A sw = 0, sb = 0;
    for (int64_t k = 0; k < static_cast<int64_t>(gridDim.x); ++k) {
      if (dw) sw += __ldcg(pw + k * cols + c);
      if (db) sb += __ldcg(pb + k * cols + c);
    }
    if (dw) Elem<T>::store(dw, c, sw);
    if (db) Elem<T>::store(db, c, sb);
  }
}

// ---- LayerNorm rows of up to 1024 columns: one warp per row, the row in registers (kPer values per
// lane, columns lane, lane + 32, ...), shuffle sums only. A block per row spent its time in block
// barriers on short rows (about 8x slower at 384 columns). ----

constexpr int kNormWarps = 8;  // warps (rows in flight) per block

template <typename T, typename Y, int kPer>
__global__ void __launch_bounds__(kNormWarps * 32)
    layer_norm_warp_kernel(Y* y, AccT<T>* mean, AccT<T>* rstd, const T* x, const T* weight, const T* bias,
                           int64_t rows, int64_t cols, double eps) {
  using A = AccT<T>;
  using E = Elem<T>;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kNormWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5); r < rows; r += stride) {
    const T* xr = x + r * cols;
    A v[kPer];
    A s = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t c = lane + 32 * i;
      v[i] = c < cols ? static_cast<A>(E::load(xr, c)) : A(0);
      s += v[i];
    }
    const A mu = warp_all_sum(s) / static_cast<A>(cols);
    A q = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < cols) q += (v[i] - mu) * (v[i] - mu);
    const A rs = A(1) / m_sqrt(warp_all_sum(q) / static_cast<A>(cols) + static_cast<A>(eps));
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t c = lane + 32 * i;
      if (c >= cols) continue;
      A h = (v[i] - mu) * rs;
      if (weight) h *= static_cast<A>(E::load(weight, c));
      if (bias) h += static_cast<A>(E::load(bias, c));
      Elem<Y>::store(y, r * cols + c, h);
    }
  }
}

// Backward: block k takes chunk k of rows, its warps rows begin + w, begin + w + kNormWarps, ...;
// each lane keeps its columns' dweight/dbias terms in registers, the warps add theirs into shared
// memory in warp order, and the block writes its chunk's sums (layer_norm_chunk_sums_kernel then
// adds the chunks). Fixed order throughout, no atomics.
template <typename T, typename G, int kPer>
__global__ void __launch_bounds__(kNormWarps * 32)
    layer_norm_backward_warp_kernel(T* dx, AccT<T>* pw, AccT<T>* pb, const G* dy, const T* dx_addend, const T* x,
                                    const AccT<T>* mean, const AccT<T>* rstd, const T* weight, int64_t rows,
                                    int64_t cols, int64_t chunk_rows) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A sum_w[32 * kPer], sum_b[32 * kPer];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A gw[kPer], gb[kPer], wt[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = lane + 32 * i;
    gw[i] = gb[i] = A(0);
    wt[i] = weight && c < cols ? static_cast<A>(E::load(weight, c)) : A(1);
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_rows, end = min(rows, begin + chunk_rows);
  for (int64_t r = begin + warp; r < end; r += kNormWarps) {
    const G* gr = dy + r * cols;
    const T* xr = x + r * cols;
    const A mu = mean[r], rs = rstd[r];
    A g[kPer], h[kPer];
    A sg = 0, sgh = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t c = lane + 32 * i;
      const bool in = c < cols;
      g[i] = in ? static_cast<A>(Elem<G>::load(gr, c)) : A(0);
      h[i] = in ? (static_cast<A>(E::load(xr, c)) - mu) * rs : A(0);
      sg += g[i] * wt[i];
      sgh += g[i] * wt[i] * h[i];
      gw[i] += g[i] * h[i];
      gb[i] += g[i];
    }
    if (!dx) continue;
    sg = warp_all_sum(sg) / static_cast<A>(cols);
    sgh = warp_all_sum(sgh) / static_cast<A>(cols);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t c = lane + 32 * i;
      if (c >= cols) continue;
      A d = rs * (g[i] * wt[i] - sg - h[i] * sgh);
      if (dx_addend) d += static_cast<A>(E::load(dx_addend, r * cols + c));
      E::store(dx, r * cols + c, d);
    }
  }
  if (!pw && !pb) return;
  for (int w = 0; w < kNormWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = lane + 32 * i;
        sum_w[c] = (w == 0 ? A(0) : sum_w[c]) + gw[i];
        sum_b[c] = (w == 0 ? A(0) : sum_b[c]) + gb[i];
      }
    }
    __syncthreads();
  }
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if (pw) pw[blockIdx.x * cols + c] = sum_w[c];
    if (pb) pb[blockIdx.x * cols + c] = sum_b[c];
  }
}

// dweight and dbias from the chunks' sums: block j takes columns 32 j .. 32 j + 31 (one per lane),
// warp w the chunks w, w + kNormWarps, ... in order, then the warps' sums in warp order.
template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32)
    layer_norm_chunk_sums_kernel(T* dw, T* db, const AccT<T>* pw, const AccT<T>* pb, int64_t chunks, int64_t cols) {
  using A = AccT<T>;
  __shared__ A part_w[kNormWarps][32], part_b[kNormWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  A sw = 0, sb = 0;
  if (c < cols) {
#pragma unroll 4
    for (int64_t k = warp; k < chunks; k += kNormWarps) {
      if (pw) sw += pw[k * cols + c];
      if (pb) sb += pb[k * cols + c];
    }
  }
  part_w[warp][lane] = sw;
  part_b[warp][lane] = sb;
  __syncthreads();
  if (warp != 0 || c >= cols) return;
  for (int w = 1; w < kNormWarps; ++w) {
    sw += part_w[w][lane];
    sb += part_b[w][lane];
  }
  if (dw) Elem<T>::store(dw, c, sw);
  if (db) Elem<T>::store(db, c, sb);
}

// Rows short enough for one warp: 1024 columns (512 in f64, whose registers run out sooner).
template <typename T>
constexpr int64_t kWarpRowCols = std::is_same_v<T, double> ? 512 : 1024;

// Calls body(std::integral_constant<int, kPer>) with the smallest kPer in {4, 8, 16, 32} such that
// 32 kPer >= cols; false (no call) when the rows are longer than kWarpRowCols<T>.
template <typename T, typename Body>
bool with_values_per_lane(int64_t cols, Body&& body) {
  if (cols > kWarpRowCols<T>) return false;
  if (cols <= 128) return body(std::integral_constant<int, 4>{}), true;
  if (cols <= 256) return body(std::integral_constant<int, 8>{}), true;
  if (cols <= 512) return body(std::integral_constant<int, 16>{}), true;
  if constexpr (kWarpRowCols<T> > 512) body(std::integral_constant<int, 32>{});
  return true;
}

unsigned warp_row_grid(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>((rows + kNormWarps - 1) / kNormWarps, 1, 65536));
}

// Runs body(Tag<T>{}, Tag<Other>{}) with T the data type and Other = T, or bf16 when `other` is bf16
// and the data f32 (a bf16 result written, or a bf16 gradient read, by the f32 kernels).
template <typename Body>
void dispatch_with_bf16_side(DType dtype, DType other, const char* op, const char* what, Body&& body) {
  if (other != dtype) {
    LT_CHECK(dtype == DType::f32 && other == DType::bf16, op, ": ", what, " must be the data's dtype ",
             dtype_name(dtype), " or bf16 with f32 data, got ", dtype_name(other));
    body(Tag<float>{}, Tag<bf16>{});
    return;
  }
  dispatch_floating(dtype, op, [&](auto tag) { body(tag, tag); });
}

}  // namespace

void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log) {
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device_of(out));
  dispatch_floating(dtype, "softmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    softmax_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(out), static_cast<const T*>(in), rows, cols, log);
  });
  CUDA_CHECK_LAUNCH();
}

void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols, bool log) {
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device_of(dx));
  dispatch_floating(dtype, "softmax_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    softmax_backward_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(dx), static_cast<const T*>(y), static_cast<const T*>(dy), rows, cols, log);
  });
  CUDA_CHECK_LAUNCH();
}

void layer_norm(void* y, DType out_dtype, void* mean, void* rstd, const void* x, const void* weight, const void* bias,
                DType dtype, int64_t rows, int64_t cols, double eps) {
  if (rows == 0) return;
  LT_CHECK(cols > 0, "layer_norm: normalizing over an empty last dim");
  DeviceGuard guard(device_of(y));
  dispatch_with_bf16_side(dtype, out_dtype, "layer_norm", "the output", [&](auto tag, auto out_tag) {
    using T = typename decltype(tag)::type;
    using Y = typename decltype(out_tag)::type;
    using A = AccT<T>;
    const bool short_rows = with_values_per_lane<T>(cols, [&](auto per) {
      layer_norm_warp_kernel<T, Y, decltype(per)::value><<<warp_row_grid(rows), kNormWarps * 32, 0, stream()>>>(
          static_cast<Y*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), static_cast<const T*>(x),
          static_cast<const T*>(weight), static_cast<const T*>(bias), rows, cols, eps);
    });
    if (!short_rows)
      layer_norm_kernel<T, Y><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
          static_cast<Y*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), static_cast<const T*>(x),
          static_cast<const T*>(weight), static_cast<const T*>(bias), rows, cols, eps);
  });
  CUDA_CHECK_LAUNCH();
}

void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, DType dy_dtype, const void* dx_addend,
                         const void* x, const void* mean, const void* rstd, const void* weight, DType dtype,
                         int64_t rows, int64_t cols) {
  if (cols == 0) return;
  DeviceGuard guard(device_of(dx ? dx : dy));
  dispatch_with_bf16_side(dtype, dy_dtype, "layer_norm_backward", "the gradient dy", [&](auto tag, auto grad_tag) {
    using T = typename decltype(tag)::type;
    using G = typename decltype(grad_tag)::type;
    using A = AccT<T>;
    const G* dy_data = static_cast<const G*>(dy);
    const T* addend = static_cast<const T*>(dx_addend);
    if (rows > 0 && cols <= kWarpRowCols<T>) {
      // Chunks of rows (one block each): a function of `rows` alone, so the summation order never
      // changes; up to 512 of them (enough blocks to fill the GPU, few sums for the second kernel).
      const int64_t chunk_rows = std::max<int64_t>(4 * kNormWarps, (rows + 511) / 512);
      const int64_t nchunks = (rows + chunk_rows - 1) / chunk_rows;
      auto pw = dweight ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
      auto pb = dbias ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
      A* pw_data = pw ? static_cast<A*>(pw->data) : nullptr;
      A* pb_data = pb ? static_cast<A*>(pb->data) : nullptr;
      with_values_per_lane<T>(cols, [&](auto per) {
        layer_norm_backward_warp_kernel<T, G, decltype(per)::value>
            <<<static_cast<unsigned>(nchunks), kNormWarps * 32, 0, stream()>>>(
                static_cast<T*>(dx), pw_data, pb_data, dy_data, addend, static_cast<const T*>(x),
                static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<const T*>(weight), rows, cols,
                chunk_rows);
      });
      CUDA_CHECK_LAUNCH();
      if (dweight || dbias)
        layer_norm_chunk_sums_kernel<T><<<static_cast<unsigned>((cols + 31) / 32), kNormWarps * 32, 0, stream()>>>(
            static_cast<T*>(dweight), static_cast<T*>(dbias), pw_data, pb_data, nchunks, cols);
      CUDA_CHECK_LAUNCH();
      return;
    }
    if (rows > 0 && dx && !dweight && !dbias) {
      layer_norm_backward_dx_kernel<T, G><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
          static_cast<T*>(dx), dy_data, addend, static_cast<const T*>(x), static_cast<const A*>(mean),
          static_cast<const A*>(rstd), static_cast<const T*>(weight), rows, cols);
      CUDA_CHECK_LAUNCH();
    }
    if (!dweight && !dbias) return;
    // Chunks of rows (one block each): a function of `rows` alone, so the summation order never
    // changes. Up to 1024 chunks keep the rows each block walks through short.
    const int64_t chunk_rows = std::max<int64_t>(32, (rows + 1023) / 1024);
    const int64_t nchunks = std::max<int64_t>(1, (rows + chunk_rows - 1) / chunk_rows);
    auto pw = dweight ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
    auto pb = dbias ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
    auto done = scratch(sizeof(unsigned));
    CUDA_CHECK(cudaMemsetAsync(done->data, 0, sizeof(unsigned), stream()));
    layer_norm_backward_fused_kernel<T, G><<<static_cast<unsigned>(nchunks), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(dx), static_cast<T*>(dweight), static_cast<T*>(dbias),
        pw ? static_cast<A*>(pw->data) : nullptr, pb ? static_cast<A*>(pb->data) : nullptr,
        static_cast<unsigned*>(done->data), dy_data, addend, static_cast<const T*>(x),
        static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<const T*>(weight), rows, cols,
        chunk_rows);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace longtape::cuda
