#pragma once
// Per-element math written once for host and device: the formulas of every UnaryOp and BinaryOp
// (GELU and its derivative, sigmoid, comparisons, ...), used by the CPU kernels
// (tensor/cpu/elementwise.cpp) and the CUDA kernels (tensor/cuda/elementwise.cu).
//
// `M` supplies the transcendental primitives for the element type T, so each backend keeps its
// fast forms: the CPU's vectorised exp/erf (tensor/cpu/vector_math.h), CUDA's intrinsics
// (tensor/cuda/common.cuh). M needs static exp, log, sqrt, tanh, erf, pow and abs taking T.
#include "tensor/kernels.h"

#if defined(__CUDACC__)
#define LT_ELEMENT_FN __host__ __device__ __forceinline__
#else
#define LT_ELEMENT_FN [[gnu::always_inline]] inline
#endif

namespace longtape::element {

inline constexpr double kSqrt2OverPi = 0.7978845608028654;
inline constexpr double kInvSqrt2 = 0.7071067811865476;
inline constexpr double kInvSqrt2Pi = 0.3989422804014327;
inline constexpr double kGeluCubic = 0.044715;

template <typename M, typename T>
LT_ELEMENT_FN T sigmoid(T x) {
  return T(1) / (T(1) + M::exp(-x));
}

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <typename M, typename T>
LT_ELEMENT_FN T gelu_tanh(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x);
  return T(0.5) * x * (T(1) + M::tanh(u));
}
template <typename M, typename T>
LT_ELEMENT_FN T gelu_tanh_grad(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x);
  const T t = M::tanh(u);
  const T du = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * x * x);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
}

// GELU, exact: 0.5 x (1 + erf(x / sqrt(2))); derivative Phi(x) + x phi(x).
template <typename M, typename T>
LT_ELEMENT_FN T gelu_erf(T x) {
  return T(0.5) * x * (T(1) + M::erf(x * T(kInvSqrt2)));
}
template <typename M, typename T>
LT_ELEMENT_FN T gelu_erf_grad(T x) {
  return T(0.5) * (T(1) + M::erf(x * T(kInvSqrt2))) + x * T(kInvSqrt2Pi) * M::exp(T(-0.5) * x * x);
}

template <typename M, typename T>
LT_ELEMENT_FN T apply_unary(kernels::UnaryOp op, T x, T alpha) {
  using kernels::UnaryOp;
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return M::exp(x);
    case UnaryOp::log: return M::log(x);
    case UnaryOp::sqrt: return M::sqrt(x);
    case UnaryOp::rsqrt: return T(1) / M::sqrt(x);
    case UnaryOp::tanh: return M::tanh(x);
    case UnaryOp::relu: return x > T(0) ? x : T(0);
    case UnaryOp::sigmoid: return sigmoid<M>(x);
    case UnaryOp::abs: return M::abs(x);
    case UnaryOp::square: return x * x;
    case UnaryOp::reciprocal: return T(1) / x;
    case UnaryOp::gelu_tanh: return gelu_tanh<M>(x);
    case UnaryOp::gelu_erf: return gelu_erf<M>(x);
    case UnaryOp::gelu_tanh_grad: return gelu_tanh_grad<M>(x);
    case UnaryOp::gelu_erf_grad: return gelu_erf_grad<M>(x);
    case UnaryOp::step: return x > T(0) ? T(1) : T(0);
    case UnaryOp::pow_scalar: return M::pow(x, alpha);
    case UnaryOp::add_scalar: return x + alpha;
    case UnaryOp::mul_scalar: return x * alpha;
    case UnaryOp::rsub_scalar: return alpha - x;
    case UnaryOp::gt_scalar: return x > alpha ? T(1) : T(0);
    case UnaryOp::lt_scalar: return x < alpha ? T(1) : T(0);
    case UnaryOp::eq_scalar: return x == alpha ? T(1) : T(0);
  }
  return x;
}

template <typename M, typename T>
LT_ELEMENT_FN T apply_binary(kernels::BinaryOp op, T a, T b) {
  using kernels::BinaryOp;
  switch (op) {
    case BinaryOp::add: return a + b;
    case BinaryOp::sub: return a - b;
    case BinaryOp::mul: return a * b;
    case BinaryOp::div: return a / b;
    case BinaryOp::pow: return M::pow(a, b);
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

}  // namespace longtape::element
