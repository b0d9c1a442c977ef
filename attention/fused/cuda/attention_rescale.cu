// bf16 inputs of the sm_90a backward rescaled into f16 copies (the RescaledF16 mode of
// attention/fused/cuda/sm90a/attention_hopper_bwd.cu). Each of q, k, v and dO is multiplied by a power of
// two that brings its largest magnitude to at most 2^14, so the copy is exact (bf16's 8
// significant bits fit f16's 11 wherever the scaled value stays above 2^-17); P and dS then go
// into the products as one f16 part each (11 significant bits) instead of bf16 hi + lo parts. The
// factors come from the tensors' maxima, on the device: nothing is read back to the host.
#include <cuda_fp16.h>

#include <algorithm>

#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "tensor/cuda/block_reduce.cuh"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

// Slots of the factor buffer after the kernel scalars (BwdRescale): the inputs' factors, then
// the maxima (as the bits of non-negative floats, which order as unsigned integers).
enum Slot : int {
  kFactorQ = kRescaleCount,
  kFactorK,
  kFactorV,
  kFactorDout,
  kMaxQ,
  kMaxK,
  kMaxV,
  kMaxDout,
  kMaxOut,
  kMaxDlse,
  kSlots
};

// The widest load that divides the rows: 8 elements (16 bytes) when dim, the strides and the
// pointer allow, else 1.
bool rows_take_16_bytes(const void* p, RowStrides s, int64_t dim) {
  return dim % 8 == 0 && s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0 &&
         reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Element i (of W) of a (batch, rows, heads, dim) view: its offset through the strides, rows
// counted from `start`.
__device__ __forceinline__ int64_t strided_offset(int64_t i, RowStrides s, int64_t start, int64_t rows, int64_t heads,
                                                  int64_t dim, int W) {
  const int64_t per_row = dim / W;
  const int64_t d = (i % per_row) * W, head_row = i / per_row;
  const int64_t h = head_row % heads, r = (head_row / heads) % rows, b = head_row / heads / rows;
  return b * s.batch + (start + r) * s.row + h * s.head + d;
}

template <int W>
__global__ void bf16_absmax_kernel(unsigned* max_bits, const elem16* src, RowStrides s, int64_t rows, int64_t heads,
                                   int64_t dim, int64_t n) {
  float m = 0.f;
  for (int64_t i = impl::global_tid(); i < n / W; i += impl::grid_stride()) {
    const elem16* at = src + strided_offset(i, s, 0, rows, heads, dim, W);
    elem16 x[W];
    if constexpr (W == 8)
      *reinterpret_cast<uint4*>(x) = *reinterpret_cast<const uint4*>(at);
    else
      x[0] = *at;
#pragma unroll
    for (int e = 0; e < W; ++e) m = fmaxf(m, fabsf(Bf16Format::to_float(x[e])));
  }
  m = impl::warp_reduce(m, impl::MaxOp{});
  if ((threadIdx.x & 31) == 0) atomicMax(max_bits, __float_as_uint(m));
}

__global__ void f32_absmax_kernel(unsigned* max_bits, const float* src, int64_t n) {
  float m = 0.f;
  for (int64_t i = impl::global_tid(); i < n; i += impl::grid_stride()) m = fmaxf(m, fabsf(src[i]));
  m = impl::warp_reduce(m, impl::MaxOp{});
  if ((threadIdx.x & 31) == 0) atomicMax(max_bits, __float_as_uint(m));
}

// The exponent e with m 2^e <= 2^14 (within f16's 2^15.99), kept to [-60, 60] so that sums of
// a few stay inside f32; 0 for a zero, infinite or NaN maximum (the non-finite values then
// reach the results as they would without rescaling).
__device__ __forceinline__ float exponent_to_2_14(float m) {
  if (!(m > 0.f) || isinf(m)) return 0.f;
  return fminf(fmaxf(floorf(14.f - log2f(m)), -60.f), 60.f);
}
__device__ __forceinline__ float pow2(float e) { return exp2f(fminf(fmaxf(e, -126.f), 126.f)); }

__global__ void rescale_factors_kernel(float* f, float scale, float do_scale, int dim) {
  const unsigned* bits = reinterpret_cast<const unsigned*>(f);
  const float mq = __uint_as_float(bits[kMaxQ]), mk = __uint_as_float(bits[kMaxK]), mv = __uint_as_float(bits[kMaxV]),
              mg = __uint_as_float(bits[kMaxDout]), mo = __uint_as_float(bits[kMaxOut]),
              ml = __uint_as_float(bits[kMaxDlse]);
  const float ea = exponent_to_2_14(mq), eb = exponent_to_2_14(mk), ec = exponent_to_2_14(mv),
              eg = exponent_to_2_14(mg);
  // |dS| <= P (|dP| do_scale + |delta|) with |dP| <= D max|dO| max|v| and
  // |delta| <= D max|dO| max|O| + max|dlse|; P' = P 2^14 <= 2^14.
  const float ds_bound = static_cast<float>(dim) * mg * (mv * fabsf(do_scale) + mo) + ml;
  const float es = exponent_to_2_14(ds_bound), ep = 14.f;
  f[kRescaleScoreLog2] = scale * 1.4426950408889634f * pow2(-(ea + eb));
  f[kRescaleProbLog2] = ep;
  f[kRescaleDp] = do_scale * pow2(es - ep - ec - eg);
  f[kRescaleDelta] = pow2(es - ep);
  f[kRescaleDk] = scale * pow2(-(es + ea));
  f[kRescaleDv] = do_scale * pow2(-(ep + eg));
  f[kRescaleDq] = scale * pow2(-(es + eb));
  f[kFactorQ] = pow2(ea);
  f[kFactorK] = pow2(eb);
  f[kFactorV] = pow2(ec);
  f[kFactorDout] = pow2(eg);
}

template <int W>
__global__ void rescale_rows_kernel(elem16* dst, const elem16* src, RowStrides s, int64_t start, int64_t rows,
                                    int64_t heads, int64_t dim, int64_t n, const float* factor) {
  const float by = *factor;
  for (int64_t i = impl::global_tid(); i < n / W; i += impl::grid_stride()) {
    const elem16* at = src + strided_offset(i, s, start, rows, heads, dim, W);
    elem16 x[W];
    if constexpr (W == 8)
      *reinterpret_cast<uint4*>(x) = *reinterpret_cast<const uint4*>(at);
    else
      x[0] = *at;
#pragma unroll
    for (int e = 0; e < W; ++e) x[e] = F16Format::from_float(Bf16Format::to_float(x[e]) * by);
    if constexpr (W == 8)
      *reinterpret_cast<uint4*>(dst + i * W) = *reinterpret_cast<const uint4*>(x);
    else
      dst[i] = x[0];
  }
}

void launch_absmax(unsigned* max_bits, const void* src, const attention::fused::Strides& strides, int64_t batch,
                   int64_t rows, int64_t heads, int64_t dim) {
  const int64_t n = batch * rows * heads * dim;
  if (n == 0) return;
  const RowStrides s = row_strides_of(strides);
  const auto* p = static_cast<const elem16*>(src);
  if (rows_take_16_bytes(p, s, dim))
    bf16_absmax_kernel<8><<<impl::grid_for(n / 8), impl::kThreads, 0, impl::stream()>>>(max_bits, p, s, rows, heads,
                                                                                         dim, n);
  else
    bf16_absmax_kernel<1><<<impl::grid_for(n), impl::kThreads, 0, impl::stream()>>>(max_bits, p, s, rows, heads, dim,
                                                                                    n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

std::shared_ptr<Storage> bf16_rescale_factors(const attention::fused::BackwardProblem& bp, float do_scale) {
  const attention::fused::Problem& f = bp.forward;
  auto buffer = impl::scratch(kSlots * sizeof(float));
  float* factors = static_cast<float*>(buffer->data);
  unsigned* max_bits = reinterpret_cast<unsigned*>(factors);
  CUDA_CHECK(cudaMemsetAsync(max_bits + kMaxQ, 0, (kSlots - kMaxQ) * sizeof(unsigned), impl::stream()));
  launch_absmax(max_bits + kMaxQ, f.q, f.q_stride, f.batch, f.seq_q, f.heads, f.head_dim);
  launch_absmax(max_bits + kMaxK, f.k, f.k_stride, f.batch, f.seq_k, f.heads, f.head_dim);
  launch_absmax(max_bits + kMaxV, f.v, f.v_stride, f.batch, f.seq_k, f.heads, f.head_dim);
  launch_absmax(max_bits + kMaxDout, bp.dout, bp.dout_stride, f.batch, f.seq_q, f.heads, f.head_dim);
  launch_absmax(max_bits + kMaxOut, f.out, f.out_stride, f.batch, f.seq_q, f.heads, f.head_dim);
  if (bp.dlse) {
    const int64_t n = f.batch * f.heads * f.seq_q;
    f32_absmax_kernel<<<impl::grid_for(n), impl::kThreads, 0, impl::stream()>>>(
        max_bits + kMaxDlse, static_cast<const float*>(bp.dlse), n);
    CUDA_CHECK_LAUNCH();
  }
  rescale_factors_kernel<<<1, 1, 0, impl::stream()>>>(factors, static_cast<float>(f.scale), do_scale,
                                                      static_cast<int>(f.head_dim));
  CUDA_CHECK_LAUNCH();
  return buffer;
}

RescaledRows rescale_rows_to_f16(const float* factors, int which, const void* src,
                                 const attention::fused::Strides& strides, int64_t batch, int64_t start, int64_t rows,
                                 int64_t heads, int64_t dim) {
  static_assert(kFactorQ + 1 == kFactorK && kFactorK + 1 == kFactorV && kFactorV + 1 == kFactorDout);
  const int64_t n = batch * rows * heads * dim;
  RescaledRows out;
  out.storage = impl::scratch(static_cast<size_t>(n) * sizeof(elem16));
  out.rows = static_cast<const elem16*>(out.storage->data);
  out.strides = {rows * heads * dim, heads * dim, dim};
  if (n == 0) return out;
  const RowStrides s = row_strides_of(strides);
  const auto* p = static_cast<const elem16*>(src);
  auto* dst = static_cast<elem16*>(out.storage->data);
  const float* factor = factors + kFactorQ + which;
  if (rows_take_16_bytes(p + start * s.row, s, dim))
    rescale_rows_kernel<8><<<impl::grid_for(n / 8), impl::kThreads, 0, impl::stream()>>>(dst, p, s, start, rows, heads,
                                                                                         dim, n, factor);
  else
    rescale_rows_kernel<1><<<impl::grid_for(n), impl::kThreads, 0, impl::stream()>>>(dst, p, s, start, rows, heads, dim,
                                                                                     n, factor);
  CUDA_CHECK_LAUNCH();
  return out;
}

}  // namespace longtape::cuda::attn
