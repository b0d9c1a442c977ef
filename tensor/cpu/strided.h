#pragma once
// Walks the elements of views that share one shape, in row-major order, yielding element offsets.
#include <cstdint>
#include <algorithm>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tensor/kernels.h"

namespace longtape::cpu {

// Calls f(offset_0, ..., offset_{K-1}) for each element; views[0] defines the shape.
template <int K, typename F>
void for_each_offset(const kernels::View* const (&views)[K], F&& f) {
  const kernels::View& v0 = *views[0];
  const int nd = v0.ndim;
  const int64_t total = v0.numel();
  if (total == 0) return;
  int64_t off[K] = {};
  auto call = [&](const int64_t* o) {
    [&]<size_t... I>(std::index_sequence<I...>) { f(o[I]...); }(std::make_index_sequence<K>());
  };
  if (nd == 0) {
    call(off);
    return;
  }
  int64_t idx[kernels::kMaxDims] = {};
  const int64_t inner = v0.shape[nd - 1];
  int64_t inner_stride[K];
  for (int k = 0; k < K; ++k) inner_stride[k] = views[k]->strides[nd - 1];
  for (int64_t done = 0; done < total; done += inner) {
    int64_t o[K];
    for (int k = 0; k < K; ++k) o[k] = off[k];
    for (int64_t i = 0; i < inner; ++i) {
      call(o);
      for (int k = 0; k < K; ++k) o[k] += inner_stride[k];
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < v0.shape[d]) {
        for (int k = 0; k < K; ++k) off[k] += views[k]->strides[d];
        break;
      }
      for (int k = 0; k < K; ++k) off[k] -= views[k]->strides[d] * (v0.shape[d] - 1);
      idx[d] = 0;
    }
  }
}

inline int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Elements per thread below which elementwise kernels stay on one thread: a fork and join costs
// microseconds on an idle machine and a scheduler time slice when the cores are shared, so only
// kernels of a few hundred microseconds split.
constexpr int64_t kParallelGrain = 1 << 16;

// Calls f(offsets[K], inner_strides[K], n) once per row of the views' common shape, after merging
// adjacent dims that every view walks contiguously (so a bias broadcast over (B, T, E) becomes
// rows of E, and contiguous tensors one long row). Rows are split over OpenMP threads when the
// views hold more than kParallelGrain elements; every element is visited exactly once, and
// views[0] (the output) must not alias another view at a different offset.
template <int K, typename F>
void for_each_row(const kernels::View* const (&views)[K], F&& f) {
  const kernels::View& v0 = *views[0];
  const int64_t total = v0.numel();
  if (total == 0) return;
  // Coalesce dims (innermost first), dropping size-1 dims.
  int nd = 0;
  int64_t shape[kernels::kMaxDims];
  int64_t strides[K][kernels::kMaxDims];
  for (int d = v0.ndim - 1; d >= 0; --d) {
    if (v0.shape[d] == 1) continue;
    bool merge = nd > 0;
    for (int k = 0; k < K && merge; ++k)
      merge = views[k]->strides[d] == strides[k][nd - 1] * shape[nd - 1];
    if (merge) {
      shape[nd - 1] *= v0.shape[d];
    } else {
      shape[nd] = v0.shape[d];
      for (int k = 0; k < K; ++k) strides[k][nd] = views[k]->strides[d];
      ++nd;
    }
  }
  if (nd == 0) {  // a single element
    int64_t zero[K] = {}, ones[K];
    for (int k = 0; k < K; ++k) ones[k] = 1;
    f(zero, ones, int64_t{1});
    return;
  }
  // shape[0] / strides[k][0] are now the innermost (row) dim; the rest are outer dims.
  const int64_t inner = shape[0];
  const int64_t rows = total / inner;
  int64_t inner_stride[K];
  for (int k = 0; k < K; ++k) inner_stride[k] = strides[k][0];
  auto run_rows = [&](int64_t r0, int64_t r1) {
    // Offsets of row r0 by decomposing its index, then an odometer step per row.
    int64_t idx[kernels::kMaxDims] = {};
    int64_t off[K] = {};
    int64_t rem = r0;
    for (int d = 1; d < nd; ++d) {
      idx[d] = rem % shape[d];
      rem /= shape[d];
      for (int k = 0; k < K; ++k) off[k] += idx[d] * strides[k][d];
    }
    for (int64_t r = r0; r < r1; ++r) {
      f(static_cast<const int64_t*>(off), static_cast<const int64_t*>(inner_stride), inner);
      for (int d = 1; d < nd; ++d) {
        if (++idx[d] < shape[d]) {
          for (int k = 0; k < K; ++k) off[k] += strides[k][d];
          break;
        }
        for (int k = 0; k < K; ++k) off[k] -= strides[k][d] * (shape[d] - 1);
        idx[d] = 0;
      }
    }
  };
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(total / kParallelGrain, omp_get_max_threads()));
  if (threads < 2) {
    run_rows(0, rows);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    if (rows >= nt) {
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      if (r1 > r0) run_rows(r0, r1);
    } else if (rows == 1) {  // one long row: split it
      const int64_t c0 = inner * t / nt, c1 = inner * (t + 1) / nt;
      int64_t off[K];
      for (int k = 0; k < K; ++k) off[k] = c0 * inner_stride[k];
      if (c1 > c0) f(static_cast<const int64_t*>(off), static_cast<const int64_t*>(inner_stride), c1 - c0);
    } else if (t == 0) {
      run_rows(0, rows);
    }
  }
#else
  run_rows(0, rows);
#endif
}

// Runs body.template operator()<T>() for the float dtypes the CPU computes in (f32, f64).
template <typename Body>
void dispatch_float(DType t, const char* op, Body&& body) {
  switch (t) {
    case DType::f32: body.template operator()<float>(); return;
    case DType::f64: body.template operator()<double>(); return;
    default:
      throw Error(detail::concat(op, ": the CPU backend computes in f32 or f64, got ", dtype_name(t),
                                 " (cast first; bf16 and f16 are storage types on the CPU)"));
  }
}

}  // namespace longtape::cpu
