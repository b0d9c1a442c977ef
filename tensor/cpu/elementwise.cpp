#include <cmath>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/strided.h"

namespace longtape::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <typename T>
T apply_unary(UnaryOp op, T x, T alpha) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::rsqrt: return T(1) / std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::relu: return x > T(0) ? x : T(0);
    case UnaryOp::sigmoid: return T(1) / (T(1) + std::exp(-x));
    case UnaryOp::abs: return std::abs(x);
    case UnaryOp::square: return x * x;
    case UnaryOp::reciprocal: return T(1) / x;
    case UnaryOp::gelu_tanh: {
      T u = T(kSqrt2OverPi) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + std::tanh(u));
    }
    case UnaryOp::gelu_erf: return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrt2)));
    case UnaryOp::gelu_tanh_grad: {
      T u = T(kSqrt2OverPi) * (x + T(0.044715) * x * x * x);
      T t = std::tanh(u);
      T du = T(kSqrt2OverPi) * (T(1) + T(3 * 0.044715) * x * x);
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
    }
    case UnaryOp::gelu_erf_grad:
      return T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2))) + x * T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
    case UnaryOp::step: return x > T(0) ? T(1) : T(0);
    case UnaryOp::pow_scalar: return std::pow(x, alpha);
    case UnaryOp::add_scalar: return x + alpha;
    case UnaryOp::mul_scalar: return x * alpha;
    case UnaryOp::rsub_scalar: return alpha - x;
    case UnaryOp::gt_scalar: return x > alpha ? T(1) : T(0);
    case UnaryOp::lt_scalar: return x < alpha ? T(1) : T(0);
    case UnaryOp::eq_scalar: return x == alpha ? T(1) : T(0);
  }
  return x;
}

template <typename T>
T apply_binary(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::add: return a + b;
    case BinaryOp::sub: return a - b;
    case BinaryOp::mul: return a * b;
    case BinaryOp::div: return a / b;
    case BinaryOp::pow: return std::pow(a, b);
    case BinaryOp::maximum: return a > b ? a : b;
    case BinaryOp::minimum: return a < b ? a : b;
    case BinaryOp::gt: return a > b ? T(1) : T(0);
    case BinaryOp::lt: return a < b ? T(1) : T(0);
    case BinaryOp::ge: return a >= b ? T(1) : T(0);
    case BinaryOp::le: return a <= b ? T(1) : T(0);
    case BinaryOp::eq: return a == b ? T(1) : T(0);
    case BinaryOp::ne: return a != b ? T(1) : T(0);
  }
  return a;
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
    for_each_offset<2>(views, [&](int64_t oo, int64_t io) { o[oo] = apply_unary<T>(op, x[io], a); });
  });
}

void binary(BinaryOp op, const View& out, const View& a, const View& b) {
  LT_CHECK(out.dtype == a.dtype && a.dtype == b.dtype, "binary: dtype mismatch");
  if (!is_floating(out.dtype)) {  // integer arithmetic through double is exact below 2^53
    const View* views[3] = {&out, &a, &b};
    for_each_offset<3>(views, [&](int64_t oo, int64_t ao, int64_t bo) {
      store(out, oo, apply_binary<double>(op, load(a, ao), load(b, bo)));
    });
    return;
  }
  dispatch_float(out.dtype, "binary op", [&]<typename T>() {
    T* o = static_cast<T*>(out.data);
    const T* x = static_cast<const T*>(a.data);
    const T* y = static_cast<const T*>(b.data);
    const View* views[3] = {&out, &a, &b};
    for_each_offset<3>(views, [&](int64_t oo, int64_t ao, int64_t bo) { o[oo] = apply_binary<T>(op, x[ao], y[bo]); });
  });
}

void where(const View& out, const View& cond, const View& a, const View& b) {
  const View* views[4] = {&out, &cond, &a, &b};
  for_each_offset<4>(views, [&](int64_t oo, int64_t co, int64_t ao, int64_t bo) {
    store(out, oo, load(cond, co) != 0 ? load(a, ao) : load(b, bo));
  });
}

void copy(const View& dst, const View& src) {
  const View* views[2] = {&dst, &src};
  if (dst.dtype == src.dtype) {
    const size_t es = dtype_size(dst.dtype);
    char* d = static_cast<char*>(dst.data);
    const char* s = static_cast<const char*>(src.data);
    switch (es) {
      case 2: for_each_offset<2>(views, [&](int64_t a, int64_t b) { reinterpret_cast<uint16_t*>(d)[a] = reinterpret_cast<const uint16_t*>(s)[b]; }); return;
      case 4: for_each_offset<2>(views, [&](int64_t a, int64_t b) { reinterpret_cast<uint32_t*>(d)[a] = reinterpret_cast<const uint32_t*>(s)[b]; }); return;
      default: for_each_offset<2>(views, [&](int64_t a, int64_t b) { reinterpret_cast<uint64_t*>(d)[a] = reinterpret_cast<const uint64_t*>(s)[b]; }); return;
    }
  }
  for_each_offset<2>(views, [&](int64_t a, int64_t b) { store(dst, a, load(src, b)); });
}

void fill(const View& dst, double value) {
  const View* views[1] = {&dst};
  for_each_offset<1>(views, [&](int64_t a) { store(dst, a, value); });
}

void reduce(ReduceOp op, const View& out, const View& in, int nreduce) {
  const int keep = in.ndim - nreduce;
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < keep; ++d) outer *= in.shape[d];
  for (int d = keep; d < in.ndim; ++d) inner *= in.shape[d];
  LT_CHECK(inner > 0 || op == ReduceOp::sum, "reduce: max/min over an empty dimension");
  // A view of one outer row: the reduced dims only.
  View row = in;
  row.ndim = nreduce;
  for (int d = 0; d < nreduce; ++d) {
    row.shape[d] = in.shape[keep + d];
    row.strides[d] = in.strides[keep + d];
  }
  dispatch_float(in.dtype, "reduce", [&]<typename T>() {
    const T* x = static_cast<const T*>(in.data);
    T* o = static_cast<T*>(out.data);
    int64_t idx[kernels::kMaxDims] = {};
    for (int64_t r = 0; r < outer; ++r) {
      int64_t base = 0, rem = r;
      for (int d = keep - 1; d >= 0; --d) {
        idx[d] = rem % in.shape[d];
        rem /= in.shape[d];
        base += idx[d] * in.strides[d];
      }
      // Sums accumulate in double for f32 too: one fixed order, and accuracy for long rows.
      double acc = op == ReduceOp::sum ? 0.0 : static_cast<double>(x[base]);
      View shifted = row;
      shifted.data = const_cast<T*>(x + base);
      const View* views[1] = {&shifted};
      for_each_offset<1>(views, [&](int64_t off) {
        double v = static_cast<double>(x[base + off]);
        if (op == ReduceOp::sum) acc += v;
        else if (op == ReduceOp::max) acc = (v > acc || std::isnan(v)) ? v : acc;
        else acc = (v < acc || std::isnan(v)) ? v : acc;
      });
      o[r] = static_cast<T>(acc);
    }
  });
}

}  // namespace longtape::cpu
