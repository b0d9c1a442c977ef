// Softmax / log_softmax and LayerNorm rows, forward and backward. One block per row; row sums
// use the fixed block-reduction tree of cuda/common.cuh, and the LayerNorm parameter gradients
// are column sums done in two fixed-order passes (per-chunk partial sums, then the chunks in
// order), so every result is bitwise reproducible. f32/bf16 accumulate in f32, f64 in f64.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;


template <typename T>
__global__ void softmax_kernel(T* out, const T* in, int64_t rows, int64_t cols, bool log) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  const A inf = A(1) / A(0);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = in + r * cols;
    T* y = out + r * cols;
    A m = -inf;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = MaxOp{}(m, static_cast<A>(E::load(x, c)));
    m = block_reduce(m, MaxOp{}, -inf, shared);
    if (m == -inf) m = 0;  // all -inf row: avoid inf - inf
    A s = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += m_exp(static_cast<A>(E::load(x, c)) - m);
    s = block_reduce(s, SumOp{}, A(0), shared);
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
template <typename T>
__global__ void layer_norm_kernel(T* y, AccT<T>* mean, AccT<T>* rstd, const T* x, const T* weight, const T* bias,
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
      E::store(y, r * cols + c, h);
    }
  }
}

template <typename T>
__global__ void layer_norm_backward_dx_kernel(T* dx, const T* dy, const T* x, const AccT<T>* mean,
                                              const AccT<T>* rstd, const T* weight, int64_t rows, int64_t cols) {
  using A = AccT<T>;
  using E = Elem<T>;
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gr = dy + r * cols;
    const T* xr = x + r * cols;
    const A mu = mean[r], rs = rstd[r];
    A sg = 0, sgh = 0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      A gh = E::load(gr, c);
      if (weight) gh *= static_cast<A>(E::load(weight, c));
      const A h = (static_cast<A>(E::load(xr, c)) - mu) * rs;
      sg += gh;
      sgh += gh * h;
    }
    sg = block_reduce(sg, SumOp{}, A(0), shared) / static_cast<A>(cols);
    sgh = block_reduce(sgh, SumOp{}, A(0), shared) / static_cast<A>(cols);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      A gh = E::load(gr, c);
      if (weight) gh *= static_cast<A>(E::load(weight, c));
      const A h = (static_cast<A>(E::load(xr, c)) - mu) * rs;
      E::store(dx, r * cols + c, rs * (gh - sg - h * sgh));
    }
  }
}

// Pass 1 of dweight/dbias: thread (chunk, column) sums its chunk of rows in row order.
template <typename T>
__global__ void layer_norm_param_partial_kernel(AccT<T>* pw, AccT<T>* pb, const T* dy, const T* x,
                                                const AccT<T>* mean, const AccT<T>* rstd, int64_t rows,
                                                int64_t cols, int64_t chunk_rows, int64_t nchunks) {
  using A = AccT<T>;
  using E = Elem<T>;
  const int64_t total = cols * nchunks;
  for (int64_t t = global_tid(); t < total; t += grid_stride()) {
    const int64_t chunk = t / cols, c = t % cols;
    const int64_t begin = chunk * chunk_rows, end = min(rows, begin + chunk_rows);
    A sw = 0, sb = 0;
    for (int64_t r = begin; r < end; ++r) {
      const A g = E::load(dy, r * cols + c);
      if (pw) sw += g * ((static_cast<A>(E::load(x, r * cols + c)) - mean[r]) * rstd[r]);
      sb += g;
    }
    if (pw) pw[t] = sw;
    if (pb) pb[t] = sb;
  }
}

// Pass 2: each column's chunk sums, in chunk order.
template <typename T>
__global__ void layer_norm_param_final_kernel(T* dw, T* db, const AccT<T>* pw, const AccT<T>* pb, int64_t cols,
                                              int64_t nchunks) {
  using A = AccT<T>;
  for (int64_t c = global_tid(); c < cols; c += grid_stride()) {
    A sw = 0, sb = 0;
    for (int64_t k = 0; k < nchunks; ++k) {
      if (dw) sw += pw[k * cols + c];
      if (db) sb += pb[k * cols + c];
    }
    if (dw) Elem<T>::store(dw, c, sw);
    if (db) Elem<T>::store(db, c, sb);
  }
}

unsigned row_grid(int64_t rows) { return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, 65536)); }

template <typename Body>
void dispatch_norm(DType t, const char* op, Body&& body) {
  switch (t) {
    case DType::f32: body(Tag<float>{}); return;
    case DType::f64: body(Tag<double>{}); return;
    case DType::bf16: body(Tag<bf16>{}); return;
    default:
      throw Error(detail::concat(op, ": the CUDA backend computes in f32, f64 or bf16, got ", dtype_name(t)));
  }
}

}  // namespace

void softmax(void* out, const void* in, DType dtype, int64_t rows, int64_t cols, bool log) {
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device_of(out));
  dispatch_norm(dtype, "softmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    softmax_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(out), static_cast<const T*>(in), rows, cols, log);
  });
  CUDA_CHECK_LAUNCH();
}

void softmax_backward(void* dx, const void* y, const void* dy, DType dtype, int64_t rows, int64_t cols, bool log) {
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(device_of(dx));
  dispatch_norm(dtype, "softmax_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    softmax_backward_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(dx), static_cast<const T*>(y), static_cast<const T*>(dy), rows, cols, log);
  });
  CUDA_CHECK_LAUNCH();
}

void layer_norm(void* y, void* mean, void* rstd, const void* x, const void* weight, const void* bias, DType dtype,
                int64_t rows, int64_t cols, double eps) {
  if (rows == 0) return;
  LT_CHECK(cols > 0, "layer_norm: normalizing over an empty last dim");
  DeviceGuard guard(device_of(y));
  dispatch_norm(dtype, "layer_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = AccT<T>;
    layer_norm_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
        static_cast<T*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), static_cast<const T*>(x),
        static_cast<const T*>(weight), static_cast<const T*>(bias), rows, cols, eps);
  });
  CUDA_CHECK_LAUNCH();
}

void layer_norm_backward(void* dx, void* dweight, void* dbias, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* weight, DType dtype, int64_t rows, int64_t cols) {
  if (cols == 0) return;
  DeviceGuard guard(device_of(dx ? dx : dy));
  dispatch_norm(dtype, "layer_norm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = AccT<T>;
    if (rows > 0 && dx) {
      layer_norm_backward_dx_kernel<T><<<row_grid(rows), row_block_size(cols), 0, stream()>>>(
          static_cast<T*>(dx), static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
          static_cast<const A*>(rstd), static_cast<const T*>(weight), rows, cols);
      CUDA_CHECK_LAUNCH();
    }
    if (!dweight && !dbias) return;
    // Chunks of rows: a function of `rows` alone, so the summation order never changes.
    const int64_t chunk_rows = std::max<int64_t>(64, (rows + 255) / 256);
    const int64_t nchunks = std::max<int64_t>(1, (rows + chunk_rows - 1) / chunk_rows);
    auto pw = dweight ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
    auto pb = dbias ? scratch(static_cast<size_t>(nchunks * cols) * sizeof(A)) : nullptr;
    A* pwp = pw ? static_cast<A*>(pw->data) : nullptr;
    A* pbp = pb ? static_cast<A*>(pb->data) : nullptr;
    layer_norm_param_partial_kernel<T><<<grid_for(nchunks * cols), kThreads, 0, stream()>>>(
        pwp, pbp, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
        static_cast<const A*>(rstd), rows, cols, chunk_rows, nchunks);
    CUDA_CHECK_LAUNCH();
    layer_norm_param_final_kernel<T><<<grid_for(cols), kThreads, 0, stream()>>>(
        static_cast<T*>(dweight), static_cast<T*>(dbias), pwp, pbp, cols, nchunks);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace longtape::cuda
