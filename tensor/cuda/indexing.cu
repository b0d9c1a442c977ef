// Index kernels on contiguous data viewed as (outer, dim, inner): index_select, gather (any
// dtype: they move bits) and index_add, scatter_add (f32, f64, bf16, f16).
//
// The two accumulating kernels are deterministic without float atomics: the destinations are
// sorted with a stable radix sort (cub::DeviceRadixSort, values = source positions in
// increasing order), then one thread per destination adds its sources in source order. That
// is the order of the CPU kernels, so f32 and f64 results match the CPU bit for bit; bf16
// accumulates in f32 and rounds once.
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "tensor/cuda/common.cuh"
#include "tensor/cuda/kernels.h"

namespace longtape::cuda {

using namespace impl;

namespace {

// out (outer, n, inner) takes rows of in (outer, in_dim, inner): index_select (kPerElement false)
// reads row index[j] for every element at position j of the dim, gather (kPerElement) reads row
// index[p] for output element p.
template <int Bytes, bool kPerElement>
__global__ void take_rows_kernel(void* out, const void* in, const int64_t* index, int64_t outer, int64_t in_dim,
                                 int64_t n, int64_t inner) {
  using U = typename Bits<Bytes>::type;
  const int64_t total = outer * n * inner;
  for (int64_t p = global_tid(); p < total; p += grid_stride()) {
    const int64_t i = p % inner, o = p / (inner * n);
    if constexpr (kPerElement) {
      static_cast<U*>(out)[p] = static_cast<const U*>(in)[(o * in_dim + index[p]) * inner + i];
    } else {
      const int64_t row = index[(p / inner) % n];
      // An out-of-range index (its check is raised later, tensor/device_checks.h) reads nothing.
      static_cast<U*>(out)[p] =
          row >= 0 && row < in_dim ? static_cast<const U*>(in)[(o * in_dim + row) * inner + i] : U(0);
    }
  }
}

// *first_bad = min(*first_bad, positions whose index is outside [0, limit) and != allowed).
__global__ void flag_bad_indices_kernel(int64_t* first_bad, const int64_t* index, int64_t n, int64_t limit,
                                        int64_t allowed) {
  for (int64_t i = global_tid(); i < n; i += grid_stride()) {
    const int64_t v = index[i];
    if ((v < 0 || v >= limit) && v != allowed)
      atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(i));
  }
}

__global__ void iota_kernel(int64_t* v, int64_t n) {
  for (int64_t i = global_tid(); i < n; i += grid_stride()) v[i] = i;
}

// scatter_add's sort keys: the flat destination of each source element.
__global__ void scatter_keys_kernel(uint64_t* keys, const int64_t* index, int64_t total, int64_t out_dim, int64_t n,
                                    int64_t inner) {
  for (int64_t p = global_tid(); p < total; p += grid_stride()) {
    const int64_t i = p % inner, o = p / (inner * n);
    keys[p] = static_cast<uint64_t>((o * out_dim + index[p]) * inner + i);
  }
}

// index_add: thread (o, p, i) where p starts a run of equal destinations in the sorted order
// adds the run's source rows (in increasing source row) to out(o, key, i).
template <typename T>
__global__ void index_add_runs_kernel(T* out, const T* src, const uint64_t* keys, const int64_t* rows,
                                      int64_t outer, int64_t out_dim, int64_t n, int64_t inner) {
  using E = Elem<T>;
  using A = typename E::C;
  const int64_t total = outer * n * inner;
  for (int64_t t = global_tid(); t < total; t += grid_stride()) {
    const int64_t i = t % inner, p = (t / inner) % n, o = t / (inner * n);
    const uint64_t key = keys[p];
    if (p > 0 && keys[p - 1] == key) continue;
    if (key >= static_cast<uint64_t>(out_dim)) continue;  // out of range: its check is raised later
    const int64_t dst = (o * out_dim + static_cast<int64_t>(key)) * inner + i;
    A acc = E::load(out, dst);
    for (int64_t q = p; q < n && keys[q] == key; ++q) acc += static_cast<A>(E::load(src, (o * n + rows[q]) * inner + i));
    E::store(out, dst, acc);
  }
}

// scatter_add: thread p that starts a run of equal flat destinations adds the run's sources.
template <typename T>
__global__ void scatter_add_runs_kernel(T* out, const T* src, const uint64_t* keys, const int64_t* pos,
                                        int64_t total) {
  using E = Elem<T>;
  using A = typename E::C;
  for (int64_t p = global_tid(); p < total; p += grid_stride()) {
    const uint64_t key = keys[p];
    if (p > 0 && keys[p - 1] == key) continue;
    A acc = E::load(out, static_cast<int64_t>(key));
    for (int64_t q = p; q < total && keys[q] == key; ++q) acc += static_cast<A>(E::load(src, pos[q]));
    E::store(out, static_cast<int64_t>(key), acc);
  }
}

// Sorts (keys, 0..n-1) by key, stably, looking only at the bits below max_key's highest bit.
// Returns device buffers holding the sorted keys and the source positions.
struct SortedRuns {
  std::shared_ptr<Storage> keys, positions;
  const uint64_t* key_data() const { return static_cast<const uint64_t*>(keys->data); }
  const int64_t* position_data() const { return static_cast<const int64_t*>(positions->data); }
};

SortedRuns sort_destinations(const uint64_t* keys_in, int64_t n, uint64_t max_key, const char* op) {
  LT_CHECK(n <= INT_MAX, op, ": at most ", INT_MAX, " source elements are supported on CUDA, got ", n);
  const int count = static_cast<int>(n);
  int end_bit = 1;
  while (end_bit < 64 && (max_key >> end_bit) != 0) ++end_bit;
  auto positions_in = scratch(static_cast<size_t>(n) * sizeof(int64_t));
  iota_kernel<<<grid_for(n), kThreads, 0, stream()>>>(static_cast<int64_t*>(positions_in->data), n);
  CUDA_CHECK_LAUNCH();
  SortedRuns out{scratch(static_cast<size_t>(n) * sizeof(uint64_t)), scratch(static_cast<size_t>(n) * sizeof(int64_t))};
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, static_cast<uint64_t*>(out.keys->data),
                                             static_cast<const int64_t*>(positions_in->data),
                                             static_cast<int64_t*>(out.positions->data), count, 0, end_bit, stream()));
  auto temp = scratch(temp_bytes);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp->data, temp_bytes, keys_in, static_cast<uint64_t*>(out.keys->data),
                                             static_cast<const int64_t*>(positions_in->data),
                                             static_cast<int64_t*>(out.positions->data), count, 0, end_bit, stream()));
  return out;
}

// Launches a bit-moving kernel over `total` outputs on out's device: launch(SizeTag<bytes>) for
// dtype's element size. Nothing to do when total is 0.
template <typename Launch>
void launch_moving_bits(void* out, DType dtype, int64_t total, Launch&& launch) {
  if (total == 0) return;
  DeviceGuard guard(device_of(out));
  switch (dtype_size(dtype)) {
    case 2: launch(SizeTag<2>{}); break;
    case 4: launch(SizeTag<4>{}); break;
    default: launch(SizeTag<8>{}); break;
  }
  CUDA_CHECK_LAUNCH();
}

template <bool kPerElement>
void take_rows(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim, int64_t n,
               int64_t inner) {
  const int64_t total = outer * n * inner;
  launch_moving_bits(out, dtype, total, [&](auto tag) {
    take_rows_kernel<decltype(tag)::value, kPerElement>
        <<<grid_for(total), kThreads, 0, stream()>>>(out, in, index, outer, in_dim, n, inner);
  });
}

}  // namespace

void flag_bad_indices(int64_t* first_bad, const int64_t* index, int64_t n, int64_t limit, int64_t allowed) {
  if (n == 0) return;
  DeviceGuard guard(device_of(first_bad));
  flag_bad_indices_kernel<<<grid_for(n), kThreads, 0, stream()>>>(first_bad, index, n, limit, allowed);
  CUDA_CHECK_LAUNCH();
}

void index_select(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim,
                  int64_t n, int64_t inner) {
  take_rows<false>(out, in, index, dtype, outer, in_dim, n, inner);
}

void gather(void* out, const void* in, const int64_t* index, DType dtype, int64_t outer, int64_t in_dim, int64_t n,
            int64_t inner) {
  take_rows<true>(out, in, index, dtype, outer, in_dim, n, inner);
}

void index_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
               int64_t n, int64_t inner) {
  if (outer * n * inner == 0) return;
  DeviceGuard guard(device_of(out));
  dispatch_floating<true>(dtype, "index_add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Indices lie in [0, out_dim) (or are skipped below: their check is raised later), so their
    // bits sort as unsigned keys.
    SortedRuns runs = sort_destinations(reinterpret_cast<const uint64_t*>(index), n,
                                        static_cast<uint64_t>(std::max<int64_t>(out_dim - 1, 0)), "index_add");
    const int64_t total = outer * n * inner;
    index_add_runs_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<T*>(out), static_cast<const T*>(src), runs.key_data(), runs.position_data(), outer, out_dim, n,
        inner);
    CUDA_CHECK_LAUNCH();
  });
}

void scatter_add(void* out, const void* src, const int64_t* index, DType dtype, int64_t outer, int64_t out_dim,
                 int64_t n, int64_t inner) {
  const int64_t total = outer * n * inner;
  if (total == 0) return;
  DeviceGuard guard(device_of(out));
  dispatch_floating<true>(dtype, "scatter_add", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto keys = scratch(static_cast<size_t>(total) * sizeof(uint64_t));
    scatter_keys_kernel<<<grid_for(total), kThreads, 0, stream()>>>(static_cast<uint64_t*>(keys->data), index, total,
                                                                    out_dim, n, inner);
    CUDA_CHECK_LAUNCH();
    const uint64_t max_key = static_cast<uint64_t>(std::max<int64_t>(outer * out_dim * inner - 1, 0));
    SortedRuns runs = sort_destinations(static_cast<const uint64_t*>(keys->data), total, max_key, "scatter_add");
    scatter_add_runs_kernel<T><<<grid_for(total), kThreads, 0, stream()>>>(
        static_cast<T*>(out), static_cast<const T*>(src), runs.key_data(), runs.position_data(), total);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace longtape::cuda
