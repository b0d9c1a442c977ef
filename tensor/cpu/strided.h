#pragma once
// Walks the elements of views that share one shape, in row-major order, yielding element offsets.
#include <cstdint>
#include <utility>

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

// Runs body.template operator()<T>() for the float dtypes the CPU computes in (f32, f64).
template <typename Body>
void dispatch_float(DType t, const char* op, Body&& body) {
  switch (t) {
    case DType::f32: body.template operator()<float>(); return;
    case DType::f64: body.template operator()<double>(); return;
    default:
      throw Error(detail::concat(op, ": the CPU backend computes in f32 or f64, got ", dtype_name(t),
                                 " (cast first; bf16 is a storage type on the CPU)"));
  }
}

}  // namespace longtape::cpu
