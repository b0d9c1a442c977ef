#include <cstring>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"

namespace longtape::cpu {

namespace {
// Runs body<T>() for every dtype: the index kernels move data, they also serve integer tensors.
template <typename Body>
void dispatch_any(DType t, Body&& body) {
  switch (t) {
    case DType::f32: body.template operator()<float>(); return;
    case DType::f64: body.template operator()<double>(); return;
    case DType::i32: body.template operator()<int32_t>(); return;
    case DType::i64: body.template operator()<int64_t>(); return;
    case DType::bf16: body.template operator()<uint16_t>(); return;
    case DType::f16: body.template operator()<uint16_t>(); return;
  }
}
}  // namespace

void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
                  int64_t n, int64_t inner) {
  const size_t row = static_cast<size_t>(inner) * dtype_size(dtype);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(dst + (o * n + j) * row, src + (o * in_dim + index[j]) * row, row);
}

void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
               int64_t n, int64_t inner) {
  dispatch_float(dtype, "index_add", [&]<typename T>() {
    T* o = static_cast<T*>(out);
    const T* s = static_cast<const T*>(src);
    for (int64_t b = 0; b < outer; ++b)
      for (int64_t j = 0; j < n; ++j) {
        T* orow = o + (b * out_dim + index[j]) * inner;
        const T* srow = s + (b * n + j) * inner;
        for (int64_t i = 0; i < inner; ++i) orow[i] += srow[i];
      }
  });
}

void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
            int64_t n, int64_t inner) {
  dispatch_any(dtype, [&]<typename T>() {
    T* o = static_cast<T*>(out);
    const T* x = static_cast<const T*>(in);
    for (int64_t b = 0; b < outer; ++b)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < inner; ++i) {
          int64_t pos = (b * n + j) * inner + i;
          o[pos] = x[(b * in_dim + index[pos]) * inner + i];
        }
  });
}

void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
                 int64_t n, int64_t inner) {
  dispatch_float(dtype, "scatter_add", [&]<typename T>() {
    T* o = static_cast<T*>(out);
    const T* s = static_cast<const T*>(src);
    for (int64_t b = 0; b < outer; ++b)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < inner; ++i) {
          int64_t pos = (b * n + j) * inner + i;
          o[(b * out_dim + index[pos]) * inner + i] += s[pos];
        }
  });
}

void flag_bad_indices(int64_t* first_bad, const int64_t* index, int64_t n, int64_t limit, int64_t allowed) {
  for (int64_t i = 0; i < n && i < *first_bad; ++i)
    if ((index[i] < 0 || index[i] >= limit) && index[i] != allowed) {
      *first_bad = i;
      return;
    }
}

}  // namespace longtape::cpu
