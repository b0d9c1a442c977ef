#include <cmath>
#include <cstring>
#include <vector>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"
#include "tensor/cpu/vector_math.h"
#include "tensor/elementwise_math.h"

namespace longtape::cpu {

namespace {

// The transcendental primitives of tensor/elementwise_math.h for the CPU: the vectorised float
// exp/erf of vector_math.h, libm for the rest.
struct HostMath {
  template <typename T> [[gnu::always_inline]] static T exp(T x) { return exp_of(x); }
  template <typename T> [[gnu::always_inline]] static T erf(T x) { return erf_of(x); }
  template <typename T> [[gnu::always_inline]] static T log(T x) { return std::log(x); }
  template <typename T> [[gnu::always_inline]] static T sqrt(T x) { return std::sqrt(x); }
  template <typename T> [[gnu::always_inline]] static T tanh(T x) { return std::tanh(x); }
  template <typename T> [[gnu::always_inline]] static T pow(T x, T y) { return std::pow(x, y); }
  template <typename T> [[gnu::always_inline]] static T abs(T x) { return std::abs(x); }
};

template <typename T>
[[gnu::always_inline]] inline T apply_unary(UnaryOp op, T x, T alpha) {
  return element::apply_unary<HostMath>(op, x, alpha);
}
template <typename T>
[[gnu::always_inline]] inline T apply_binary(BinaryOp op, T a, T b) {
  return element::apply_binary<HostMath>(op, a, b);
}

template <typename T>
double load_as_double(const View& v, int64_t off) {
  return static_cast<double>(static_cast<const T*>(v.data)[off]);
}

double load(const View& v, int64_t off) {
  switch (v.dtype) {
    case DType::f32: return load_as_double<float>(v, off);
    case DType::f64: return load_as_double<double>(v, off);
    case DType::i32: return load_as_double<int32_t>(v, off);
    case DType::i64: return load_as_double<int64_t>(v, off);
    case DType::bf16: return static_cast<float>(static_cast<const bfloat16*>(v.data)[off]);
    case DType::f16: return static_cast<float>(static_cast<const float16*>(v.data)[off]);
  }
  return 0;
}

void store(const View& v, int64_t off, double x) {
  switch (v.dtype) {
    case DType::f32: static_cast<float*>(v.data)[off] = static_cast<float>(x); return;
    case DType::f64: static_cast<double*>(v.data)[off] = x; return;
    case DType::i32: static_cast<int32_t*>(v.data)[off] = static_cast<int32_t>(x); return;
    case DType::i64: static_cast<int64_t*>(v.data)[off] = static_cast<int64_t>(x); return;
    case DType::bf16: static_cast<bfloat16*>(v.data)[off] = bfloat16(static_cast<float>(x)); return;
    case DType::f16: static_cast<float16*>(v.data)[off] = float16(static_cast<float>(x)); return;
  }
}

// Runs f.template operator()<OP>() with the runtime op as a compile-time constant, so the op's
// switch folds away and the row loops below vectorise.
#define LT_UNARY_OPS(X)                                                                                      \
  X(neg) X(exp) X(log) X(sqrt) X(rsqrt) X(tanh) X(relu) X(sigmoid) X(abs) X(square) X(reciprocal)          \
  X(gelu_tanh) X(gelu_erf) X(gelu_tanh_grad) X(gelu_erf_grad) X(step) X(pow_scalar) X(add_scalar)          \
  X(mul_scalar) X(rsub_scalar) X(gt_scalar) X(lt_scalar) X(eq_scalar)
#define LT_BINARY_OPS(X) X(add) X(sub) X(mul) X(div) X(pow) X(maximum) X(minimum) X(gt) X(lt) X(ge) X(le) X(eq) X(ne)

template <typename F>
void with_unary_op(UnaryOp op, F&& f) {
  switch (op) {
#define LT_CASE(name)                        \
  case UnaryOp::name:                        \
    f.template operator()<UnaryOp::name>(); \
    return;
    LT_UNARY_OPS(LT_CASE)
#undef LT_CASE
  }
}

template <typename F>
void with_binary_op(BinaryOp op, F&& f) {
  switch (op) {
#define LT_CASE(name)                         \
  case BinaryOp::name:                        \
    f.template operator()<BinaryOp::name>(); \
    return;
    LT_BINARY_OPS(LT_CASE)
#undef LT_CASE
  }
}
}  // namespace

void unary(UnaryOp op, const View& out, const View& in, double alpha) {
  LT_CHECK(out.dtype == in.dtype, "unary: dtype mismatch");
  dispatch_float(out.dtype, "unary op", [&]<typename T>() {
    T* o = static_cast<T*>(out.data);
    const T* x = static_cast<const T*>(in.data);
    const T a = static_cast<T>(alpha);
    const View* views[2] = {&out, &in};
    with_unary_op(op, [&]<UnaryOp OP>() {
      for_each_row<2>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
        T* orow = o + off[0];
        const T* xrow = x + off[1];
        if (st[0] == 1 && st[1] == 1) {
          for (int64_t i = 0; i < n; ++i) orow[i] = apply_unary<T>(OP, xrow[i], a);
        } else if (st[1] == 0) {
          const T v = apply_unary<T>(OP, xrow[0], a);
          for (int64_t i = 0; i < n; ++i) orow[i * st[0]] = v;
        } else {
          for (int64_t i = 0; i < n; ++i) orow[i * st[0]] = apply_unary<T>(OP, xrow[i * st[1]], a);
        }
      });
    });
  });
}

void binary(BinaryOp op, const View& out, const View& a, const View& b) {
  LT_CHECK(out.dtype == a.dtype && a.dtype == b.dtype, "binary: dtype mismatch");
  const View* views[3] = {&out, &a, &b};
  if (!is_floating(out.dtype)) {  // integer arithmetic through double is exact below 2^53
    for_each_row<3>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
      for (int64_t i = 0; i < n; ++i)
        store(out, off[0] + i * st[0], apply_binary<double>(op, load(a, off[1] + i * st[1]), load(b, off[2] + i * st[2])));
    });
    return;
  }
  dispatch_float(out.dtype, "binary op", [&]<typename T>() {
    T* o = static_cast<T*>(out.data);
    const T* x = static_cast<const T*>(a.data);
    const T* y = static_cast<const T*>(b.data);
    with_binary_op(op, [&]<BinaryOp OP>() {
      for_each_row<3>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
        T* orow = o + off[0];
        const T* xrow = x + off[1];
        const T* yrow = y + off[2];
        if (st[0] == 1 && st[1] == 1 && st[2] == 1) {
          for (int64_t i = 0; i < n; ++i) orow[i] = apply_binary<T>(OP, xrow[i], yrow[i]);
        } else if (st[0] == 1 && st[1] == 1 && st[2] == 0) {
          const T v = yrow[0];
          for (int64_t i = 0; i < n; ++i) orow[i] = apply_binary<T>(OP, xrow[i], v);
        } else if (st[0] == 1 && st[1] == 0 && st[2] == 1) {
          const T v = xrow[0];
          for (int64_t i = 0; i < n; ++i) orow[i] = apply_binary<T>(OP, v, yrow[i]);
        } else {
          for (int64_t i = 0; i < n; ++i) orow[i * st[0]] = apply_binary<T>(OP, xrow[i * st[1]], yrow[i * st[2]]);
        }
      });
    });
  });
}

void where(const View& out, const View& cond, const View& a, const View& b) {
  const View* views[4] = {&out, &cond, &a, &b};
  if (is_floating(out.dtype) && !is_half_precision(out.dtype) && cond.dtype == out.dtype && a.dtype == out.dtype &&
      b.dtype == out.dtype) {
    dispatch_float(out.dtype, "where", [&]<typename T>() {
      T* o = static_cast<T*>(out.data);
      const T* c = static_cast<const T*>(cond.data);
      const T* x = static_cast<const T*>(a.data);
      const T* y = static_cast<const T*>(b.data);
      for_each_row<4>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
        for (int64_t i = 0; i < n; ++i)
          o[off[0] + i * st[0]] = c[off[1] + i * st[1]] != T(0) ? x[off[2] + i * st[2]] : y[off[3] + i * st[3]];
      });
    });
    return;
  }
  for_each_row<4>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      store(out, off[0] + i * st[0],
            load(cond, off[1] + i * st[1]) != 0 ? load(a, off[2] + i * st[2]) : load(b, off[3] + i * st[3]));
  });
}

namespace {
template <typename W>
void copy_words(const View& dst, const View& src) {
  W* d = static_cast<W*>(dst.data);
  const W* s = static_cast<const W*>(src.data);
  const View* views[2] = {&dst, &src};
  for_each_row<2>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
    if (st[0] == 1 && st[1] == 1) std::memcpy(d + off[0], s + off[1], static_cast<size_t>(n) * sizeof(W));
    else
      for (int64_t i = 0; i < n; ++i) d[off[0] + i * st[0]] = s[off[1] + i * st[1]];
  });
}
}  // namespace

void copy(const View& dst, const View& src) {
  if (dst.dtype == src.dtype) {
    switch (dtype_size(dst.dtype)) {
      case 2: copy_words<uint16_t>(dst, src); return;
      case 4: copy_words<uint32_t>(dst, src); return;
      default: copy_words<uint64_t>(dst, src); return;
    }
  }
  const View* views[2] = {&dst, &src};
  for_each_row<2>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
    for (int64_t i = 0; i < n; ++i) store(dst, off[0] + i * st[0], load(src, off[1] + i * st[1]));
  });
}

void fill(const View& dst, double value) {
  const View* views[1] = {&dst};
  if (dst.dtype == DType::f32 || dst.dtype == DType::f64) {
    dispatch_float(dst.dtype, "fill", [&]<typename T>() {
      T* d = static_cast<T*>(dst.data);
      const T v = static_cast<T>(value);
      for_each_row<1>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
        for (int64_t i = 0; i < n; ++i) d[off[0] + i * st[0]] = v;
      });
    });
    return;
  }
  for_each_row<1>(views, [&](const int64_t* off, const int64_t* st, int64_t n) {
    for (int64_t i = 0; i < n; ++i) store(dst, off[0] + i * st[0], value);
  });
}

namespace {
// Folds one value into a running reduction (NaN wins for max and min).
inline double fold(ReduceOp op, double acc, double v) {
  if (op == ReduceOp::sum) return acc + v;
  if (op == ReduceOp::max) return (v > acc || std::isnan(v)) ? v : acc;
  return (v < acc || std::isnan(v)) ? v : acc;
}
}  // namespace

// Every output folds its elements in row-major order of the reduced dims, in double (for f32 too:
// one fixed order, and accuracy for long rows), whichever path runs and however many threads: the
// result is bitwise the same.
void reduce(ReduceOp op, const View& out, const View& in, int nreduce) {
  const int keep = in.ndim - nreduce;
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < keep; ++d) outer *= in.shape[d];
  for (int d = keep; d < in.ndim; ++d) inner *= in.shape[d];
  LT_CHECK(inner > 0 || op == ReduceOp::sum, "reduce: max/min over an empty dimension");
  if (outer == 0) return;
  // Column path: the kept dims are one unit-stride run (outputs adjacent in memory), so a pass
  // over the reduced elements updates all outputs at once with contiguous loads.
  bool kept_unit = keep > 0;
  int64_t expect = 1;
  for (int d = keep - 1; d >= 0 && kept_unit; --d) {
    if (in.shape[d] != 1 && in.strides[d] != expect) kept_unit = false;
    expect *= in.shape[d];
  }
  dispatch_float(in.dtype, "reduce", [&]<typename T>() {
    const T* x = static_cast<const T*>(in.data);
    T* o = static_cast<T*>(out.data);
    View row = in;  // the reduced dims only
    row.ndim = nreduce;
    for (int d = 0; d < nreduce; ++d) {
      row.shape[d] = in.shape[keep + d];
      row.strides[d] = in.strides[keep + d];
    }
    if (kept_unit && inner > 1 && outer > 1) {
      const int64_t total = outer * inner;
      const int threads = static_cast<int>(std::max<int64_t>(
          1, std::min<int64_t>({total / kParallelGrain, outer / 16, static_cast<int64_t>(omp_threads())})));
#pragma omp parallel num_threads(threads) if (threads > 1)
      {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t c0 = outer * t / nt, c1 = outer * (t + 1) / nt;
        std::vector<double> acc(static_cast<size_t>(c1 - c0), 0.0);
        bool first = true;
        const View* views[1] = {&row};
        for_each_offset<1>(views, [&](int64_t off) {
          const T* src = x + off + c0;
          if (first && op != ReduceOp::sum) {
            for (int64_t c = 0; c < c1 - c0; ++c) acc[c] = static_cast<double>(src[c]);
          } else if (op == ReduceOp::sum) {
            for (int64_t c = 0; c < c1 - c0; ++c) acc[c] += static_cast<double>(src[c]);
          } else {
            for (int64_t c = 0; c < c1 - c0; ++c) acc[c] = fold(op, acc[c], static_cast<double>(src[c]));
          }
          first = false;
        });
        for (int64_t c = 0; c < c1 - c0; ++c) o[c0 + c] = static_cast<T>(acc[c]);
      }
      return;
    }
    auto reduce_rows = [&](int64_t r0, int64_t r1) {
      int64_t idx[kernels::kMaxDims] = {};
      for (int64_t r = r0; r < r1; ++r) {
        int64_t base = 0, rem = r;
        for (int d = keep - 1; d >= 0; --d) {
          idx[d] = rem % in.shape[d];
          rem /= in.shape[d];
          base += idx[d] * in.strides[d];
        }
        double acc = op == ReduceOp::sum ? 0.0 : static_cast<double>(x[base]);
        const View* views[1] = {&row};
        for_each_offset<1>(views, [&](int64_t off) { acc = fold(op, acc, static_cast<double>(x[base + off])); });
        o[r] = static_cast<T>(acc);
      }
    };
    const int threads = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>({outer * inner / kParallelGrain, outer, static_cast<int64_t>(omp_threads())})));
    if (threads <= 1) {
      reduce_rows(0, outer);
      return;
    }
#pragma omp parallel num_threads(threads)
    {
      int t = 0, nt = 1;
#ifdef _OPENMP
      t = omp_get_thread_num();
      nt = omp_get_num_threads();
#endif
      reduce_rows(outer * t / nt, outer * (t + 1) / nt);
    }
  });
}

}  // namespace longtape::cpu
