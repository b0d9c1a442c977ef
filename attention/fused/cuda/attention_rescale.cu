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

// The maxima of up to five bf16 views in one launch (blockIdx.y picks the view): a grid-stride
// pass, a block reduction, then one atomicMax per block (an atomic per warp on one address
// serialized the pass).
struct AbsmaxViews {
  const elem16* src[5];
  HeadRowChunks at[5];
  unsigned* max_bits[5];
};

template <class I>
__global__ void bf16_absmax_kernel(AbsmaxViews views) {
  __shared__ float partial[32];
  const elem16* src = views.src[blockIdx.y];
  const HeadRowChunks& c = views.at[blockIdx.y];
  float m = 0.f;
  for (I i = static_cast<I>(impl::global_tid()); i < static_cast<I>(c.chunks); i += static_cast<I>(impl::grid_stride())) {
    const elem16* at = src + c.offset(i);
    if (c.width == 8) {
      const uint4 x = *reinterpret_cast<const uint4*>(at);
      for (const uint32_t pair : {x.x, x.y, x.z, x.w}) {
        const float2 f = Bf16Format::unpack(pair);
        m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
    } else {
      m = fmaxf(m, fabsf(Bf16Format::to_float(*at)));
    }
  }
  m = impl::block_reduce(m, impl::MaxOp{}, 0.f, partial);
  if (threadIdx.x == 0) atomicMax(views.max_bits[blockIdx.y], __float_as_uint(m));
}

__global__ void f32_absmax_kernel(unsigned* max_bits, const float* src, int64_t n) {
  __shared__ float partial[32];
  float m = 0.f;
  for (int64_t i = impl::global_tid(); i < n; i += impl::grid_stride()) m = fmaxf(m, fabsf(src[i]));
  m = impl::block_reduce(m, impl::MaxOp{}, 0.f, partial);
  if (threadIdx.x == 0) atomicMax(max_bits, __float_as_uint(m));
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

// Rows [start, start + rows) of a bf16 view times *factor into a contiguous f16 copy.
template <class I>
__global__ void rescale_rows_kernel(elem16* dst, const elem16* src, HeadRowChunks c, const float* factor) {
  const float by = *factor;
  for (I i = static_cast<I>(impl::global_tid()); i < static_cast<I>(c.chunks); i += static_cast<I>(impl::grid_stride())) {
    const elem16* at = src + c.offset(i);
    if (c.width == 8) {
      uint4 x = *reinterpret_cast<const uint4*>(at);
      for (uint32_t* pair : {&x.x, &x.y, &x.z, &x.w}) {
        const float2 f = Bf16Format::unpack(*pair);
        *pair = F16Format::pack(f.x * by, f.y * by);
      }
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(i) * 8) = x;
    } else {
      dst[i] = F16Format::from_float(Bf16Format::to_float(*at) * by);
    }
  }
}

}  // namespace

std::shared_ptr<Storage> bf16_rescale_factors(const attention::fused::BackwardProblem& bp, float do_scale) {
  const attention::fused::Problem& f = bp.forward;
  auto buffer = impl::scratch(kSlots * sizeof(float));
  float* factors = static_cast<float*>(buffer->data);
  unsigned* max_bits = reinterpret_cast<unsigned*>(factors);
  CUDA_CHECK(cudaMemsetAsync(max_bits + kMaxQ, 0, (kSlots - kMaxQ) * sizeof(unsigned), impl::stream()));
  AbsmaxViews views{};
  const void* sources[] = {f.q, f.k, f.v, bp.dout, f.out};
  const attention::fused::Strides* strides[] = {&f.q_stride, &f.k_stride, &f.v_stride, &bp.dout_stride, &f.out_stride};
  const int slots[] = {kMaxQ, kMaxK, kMaxV, kMaxDout, kMaxOut};
  int64_t most = 0;
  for (int which = 0; which < 5; ++which) {
    const int64_t rows = which == 1 || which == 2 ? f.seq_k : f.seq_q;
    views.src[which] = static_cast<const elem16*>(sources[which]);
    views.at[which] = chunk_walk(sources[which], sizeof(elem16), row_strides_of(*strides[which]), f.batch, 0, rows,
                                 f.heads, f.head_dim, 8);
    views.max_bits[which] = max_bits + slots[which];
    if (views.at[which].chunks > most) most = views.at[which].chunks;
  }
  if (most > 0) {
    with_chunk_index(most, [&](auto index) {
      bf16_absmax_kernel<decltype(index)><<<dim3(reduction_grid(most), 5), impl::kThreads, 0, impl::stream()>>>(views);
      CUDA_CHECK_LAUNCH();
    });
  }
  if (bp.dlse) {
    const int64_t n = f.batch * f.heads * f.seq_q;
    f32_absmax_kernel<<<reduction_grid(n), impl::kThreads, 0, impl::stream()>>>(
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
  const HeadRowChunks c = chunk_walk(src, sizeof(elem16), row_strides_of(strides), batch, start, rows, heads, dim, 8);
  const float* factor = factors + kFactorQ + which;
  with_chunk_index(c.chunks, [&](auto index) {
    rescale_rows_kernel<decltype(index)><<<impl::grid_for(c.chunks), impl::kThreads, 0, impl::stream()>>>(
        static_cast<elem16*>(out.storage->data), static_cast<const elem16*>(src), c, factor);
    CUDA_CHECK_LAUNCH();
  });
  return out;
}

}  // namespace longtape::cuda::attn
