// Warp-specialized fused attention backward for Hopper (sm_90a): D = 64, bf16 problems rescaled
// into f16 copies (RescaledF16), dense / causal / dilated streams of both mixings, no block lists.
// Not deterministic: dQ is reduced into an f32 accumulator in global memory.
//
// A CTA owns 128 keys of one stream and runs three warpgroups:
//   producer (warpgroup 0, registers cut to kProducerRegisters): its first warp streams the query
//     tiles (Q, dO: 64 rows each, with lse and delta) into kStages stages by cp.async; a stage's
//     "full" mbarrier completes when its copies land, its "empty" mbarrier when both consumers
//     are done reading it;
//   consumers (warpgroups 1, 2; registers raised to kConsumerRegisters): 64 keys each. Per query
//     tile: S^T = K Q^T and dP^T = V dO^T, P^T and dS^T in registers, dS^T also into the tile's
//     shared 128-key dS^T tile; then dV += P^T dO and dK += dS^T Q, and one of the two (taking
//     turns) adds dQ = dS K over all 128 keys: 5 products per 64 x 64 pair where the
//     deterministic kernels (separate dQ CTAs that recompute S and dP) issue 7.
//   That consumer stages dQ in f32 and one thread adds it into the accumulator with two bulk
//   tensor reductions (cp.reduce.async.bulk.tensor through a tensor map whose dimensions put a
//   dilated stream's rows 64 at a time into one box), which run beside the next tile's products.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/fused/cuda/attention_backward.cuh"
#include "attention/fused/cuda/attention_launch.h"
#include "attention/fused/cuda/sm90a/hopper_backward_parts.cuh"
#include "tensor/cuda/common.cuh"

namespace longtape::cuda::attn {

namespace {

using namespace hopper_backward;
using M = RescaledF16;
using F = M::Compute;

constexpr int kD = 64;
constexpr int kConsumers = 2;
constexpr int kKeys = 64 * kConsumers;  // keys per CTA
constexpr int kCtaThreads = 128 * (1 + kConsumers);
constexpr int kStages = 4;
constexpr int kProducerRegisters = 56;
constexpr int kConsumerRegisters = 224;
static_assert(kProducerRegisters * 128 + kConsumerRegisters * 128 * kConsumers <= 65536, "register file");

struct Layout {
  static constexpr int kTileBytes = kStep * kD * 2;     // one 64-row tile of Q or dO
  static constexpr int kDsBytes = kKeys * kStep * 2;    // dS^T [128 keys][64 queries]
  static constexpr int kDqBytes = kStep * kD * 4;       // dQ, f32: two 64 x 32 swizzled halves
  static constexpr int kK = 0;                          // K, V: kKeys rows each, resident
  static constexpr int kV = kK + kKeys * kD * 2;
  static constexpr int kQ = kV + kKeys * kD * 2;         // kStages tiles
  static constexpr int kG = kQ + kStages * kTileBytes;   // dO, kStages tiles
  static constexpr int kDs = kG + kStages * kTileBytes;  // two dS^T tiles (tiles alternate)
  static constexpr int kDq = kDs + 2 * kDsBytes;         // one staged dQ per consumer
  static constexpr int kLse = kDq + kConsumers * kDqBytes;  // kStages x kStep floats
  static constexpr int kDelta = kLse + kStages * kStep * 4;
  static constexpr int kBarriers = kDelta + kStages * kStep * 4;  // full[kStages], empty[kStages]
  static constexpr int kEnd = kBarriers + 2 * kStages * 8;
  static constexpr size_t kSmem = 1024 + kEnd;
};
// Arrivals that complete a stage: each producer lane arrives once after its shared stores (lse,
// delta) and once when its copies land; each consumer thread arrives once when done with a stage
// (its own reads then precede the producer's refill by the barrier alone, with no warp-level step).
constexpr int kFullArrivals = 2 * 32;
constexpr int kEmptyArrivals = 128 * kConsumers;

// The dQ accumulator (B, N, H, D f32) seen by one branch's tensor map, dimensions innermost first:
// (d, head, pos mod step, pos / step, batch), so that the rows pos0, pos0 + step, ... of a
// stream are one box of 64 along the fourth dimension. Boxes hold 32 columns (128 bytes, the
// 128-byte swizzle of the staged tile).
struct DqMaps {
  CUtensorMap branch[kMaxBranches];
};

// ---- mbarriers, register reallocation, bulk tensor reductions -----------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives when every cp.async this thread has issued so far has landed (the arrival is counted
// in the barrier's expected arrivals).
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
template <int kRegisters>
__device__ __forceinline__ void registers_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void registers_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
// Named barriers (0 is __syncthreads) between the consumers, per dS^T buffer b: "ready" (1 + b)
// completes when both halves of the tile are written, "free" (3 + b) when the tile's dQ product
// has read it; each consumer warpgroup also has its own (5 + c). A warpgroup that must see a
// barrier complete waits (bar.sync); the other only arrives (bar.arrive), so the consumers run
// out of step.
constexpr int kReadyBarrier = 1, kFreeBarrier = 3, kOwnBarrier = 5;
__device__ __forceinline__ void consumers_wait(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(128 * kConsumers) : "memory");
}
__device__ __forceinline__ void consumers_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(128 * kConsumers) : "memory");
}
__device__ __forceinline__ void warpgroup_sync(int consumer) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(kOwnBarrier + consumer) : "memory");
}
// Adds a staged 64 x 32 f32 box into the tensor at coordinates (c0 .. c4).
__device__ __forceinline__ void bulk_reduce_add_box(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2,
                                                    int c3, int c4) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups no longer read shared memory.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// ---- the kernel -------------------------------------------------------------------------------

// The producer's first warp: streams query tiles `first`, first + 1, ... into the stages.
__device__ __forceinline__ void produce(const BwdParams& p, const BackwardInputs& in, const StreamRows& s,
                                       unsigned char* smem, uint32_t barriers, int first, int count, float delta_scale) {
  const int lane = threadIdx.x & 31;
  const int len_q = static_cast<int>(s.len_q);
  float* sLse = reinterpret_cast<float*>(smem + Layout::kLse);
  float* sDelta = reinterpret_cast<float*>(smem + Layout::kDelta);
  for (int i = first, t = 0; i < count; ++i, ++t) {
    const int stage = t % kStages;
    const uint32_t full = barriers + stage * 8, empty = barriers + (kStages + stage) * 8;
    if (t >= kStages) mbarrier_wait(empty, ((t / kStages) - 1) & 1);
    const int64_t q0 = static_cast<int64_t>(i) * kStep;
    load_swizzled_async<kD, kStep, 32>(smem + Layout::kQ + stage * Layout::kTileBytes, in.q, in.q_step, q0, len_q);
    load_swizzled_async<kD, kStep, 32>(smem + Layout::kG + stage * Layout::kTileBytes, in.dout, in.g_step, q0, len_q);
    mbarrier_arrive_on_copies(full);
#pragma unroll
    for (int r = lane; r < kStep; r += 32) {
      const int64_t row = q0 + r;
      const bool valid = row < len_q;
      sLse[stage * kStep + r] = valid ? lse_log2(p.lse[in.lse_row0 + row * s.step]) : INFINITY;
      sDelta[stage * kStep + r] = valid ? p.delta[in.lse_row0 + row * s.step] * delta_scale : 0.f;
    }
    mbarrier_arrive(full);
  }
  cp_async_wait<0>();  // no copy outlives the warp that issued it
}

// dq (64 queries x 64 columns) = dS K over the CTA's keys [0, 16 k_steps): A = dS read
// transposed from the dS^T tile, B = the K tile read N-major.
__device__ __forceinline__ void dq_over_keys(float (&dq)[kD / 2], uint32_t ds_addr, uint32_t k_addr, int k_steps) {
  for (int kk = 0; kk < k_steps; ++kk)
    wgmma::wgmma_ss<64, F::kIsF16, true>(dq, n_major(ds_addr, kStep * 128, kk), n_major(k_addr, kKeys * 128, kk),
                                         kk > 0);
}

// A consumer warpgroup: 64 keys from key_base, every query tile from `first` on.
__device__ __forceinline__ void consume(const BwdParams& p, const CUtensorMap* dq_map, const StreamRows& s,
                                       unsigned char* smem, uint32_t barriers, int consumer, int k0, int first,
                                       int count, int b, int h) {
  const ProductScales sc = product_scales<M>(p);
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int col_in_quad = (lane & 3) * 2;
  const int key_base = k0 + consumer * 64;
  const int key_a = key_base + warp * 16 + (lane >> 2);  // this thread's keys: key_a, key_a + 8
  const uint32_t k_all = smem_addr(smem + Layout::kK);
  const uint32_t k_addr = k_all + consumer * 64 * 128;
  const uint32_t v_addr = smem_addr(smem + Layout::kV) + consumer * 64 * 128;
  unsigned char* sDq = smem + Layout::kDq + consumer * Layout::kDqBytes;
  const float* sLse = reinterpret_cast<const float*>(smem + Layout::kLse);
  const float* sDelta = reinterpret_cast<const float*>(smem + Layout::kDelta);
  // The stream's rows q0 + i sit at pos = first_q + (q0 + i) step = o + (first_q / step + q0 + i) step.
  const int pos_mod = static_cast<int>(s.first_q % s.step);
  const int pos_div = static_cast<int>(s.first_q / s.step);

  float dk[kD / 2], dv[kD / 2], st[kStep / 2], dpt[kStep / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kStep / 2; ++i) st[i] = dpt[i] = 0.f;

  // Causal: a warpgroup whose keys all follow the query tile's last query has nothing to add, and
  // the second one's keys take no part in its dQ. The consumers take turns at dQ, the first one
  // alone while the second has no part.
  auto second_skips_tile = [&](int i) { return warp_uniform(p.causal && k0 + 64 > i * kStep + kStep - 1); };
  auto dq_owner_of = [&](int i, int t) { return second_skips_tile(i) ? 0 : (t & 1); };
  const int tiles = count - first;
  for (int i = first, t = 0; i < count; ++i, ++t) {
    const int stage = t % kStages;
    const uint32_t full = barriers + stage * 8, empty = barriers + (kStages + stage) * 8;
    const int q0 = i * kStep;
    const int buffer = t & 1;
    unsigned char* sDs = smem + Layout::kDs + buffer * Layout::kDsBytes;
    const uint32_t ds_addr = smem_addr(sDs);
    const bool skip_me = warp_uniform(p.causal && key_base > q0 + kStep - 1);
    const bool second_skips = second_skips_tile(i);
    const bool owner = consumer == dq_owner_of(i, t);
    // This dS^T buffer was last read by the dQ product of tile t - 2; its owner (if not this
    // warpgroup) says when that is done.
    if (t >= 2 && consumer != dq_owner_of(i - 2, t - 2)) consumers_wait(kFreeBarrier + buffer);
    mbarrier_wait(full, (t / kStages) & 1);
    const uint32_t q_addr = smem_addr(smem + Layout::kQ + stage * Layout::kTileBytes);
    const uint32_t g_addr = smem_addr(smem + Layout::kG + stage * Layout::kTileBytes);
    if (!skip_me) {
      wgmma::fence_proxy_async();  // the copies landed through the generic proxy; wgmma reads them
      // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries). This and the P^T / dS^T step repeat
      // dkdv_tile's: shared through one helper they cost that kernel 4-17% (NOTES v29).
      wgmma::fence_registers(st);
      wgmma::fence_registers(dpt);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        mma_ss<F, kStep>(st, k_major(k_addr, kKeys * 128, kk), k_major(q_addr, kStep * 128, kk), kk > 0);
        mma_ss<F, kStep>(dpt, k_major(v_addr, kKeys * 128, kk), k_major(g_addr, kStep * 128, kk), kk > 0);
      }
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(st);
      wgmma::fence_registers(dpt);

      const float* tLse = sLse + stage * kStep;
      const float* tDelta = sDelta + stage * kStep;
      // P^T = exp2(S^T scale_log2 - lse); causal-diagonal tiles: P = 0 where the query precedes
      // the key. dS^T = P^T (dP^T dp - delta).
      const bool diagonal = p.causal && key_base + 63 > q0;
#pragma unroll
      for (int j = 0; j < kStep / 8; ++j) {
        const float2 l2 = *reinterpret_cast<const float2*>(tLse + j * 8 + col_in_quad);
        const float2 d2 = *reinterpret_cast<const float2*>(tDelta + j * 8 + col_in_quad);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float prob = fast_exp2(fmaf(st[4 * j + e], sc.scale_log2, sc.p_log2 - ((e & 1) ? l2.y : l2.x)));
          if (diagonal && q0 + j * 8 + col_in_quad + (e & 1) < key_a + (e >> 1) * 8) prob = 0.f;
          st[4 * j + e] = prob;
          dpt[4 * j + e] = prob * fmaf(dpt[4 * j + e], sc.dp, -((e & 1) ? d2.y : d2.x));
        }
      }
      // This warpgroup's 64 rows of the tile's dS^T (this buffer's last reader, the dQ product
      // of tile t - 2, is done: the wait above).
      write_ds_tile<M>(sDs + consumer * 64 * 128, dpt, key_a < s.len_k, key_a + 8 < s.len_k);
      wgmma::fence_proxy_async();
    }
    // The owner waits for the whole dS^T tile (and, through the same barrier, for its thread 0 to
    // see that the staged dQ of its last turn is no longer read by its reduction).
    if (owner) {
      if (warp == 0 && lane == 0) bulk_wait_read();
      consumers_wait(kReadyBarrier + buffer);
    } else {
      consumers_arrive(kReadyBarrier + buffer);
    }

    float dq[kD / 2];
    if (!skip_me) {
      // dV += P^T dO, dK += dS^T Q (k = the tile's queries); the owner: dQ = dS K (k = the keys).
      wgmma::fence_registers(dv);
      wgmma::fence_registers(dk);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kStep / 16; ++kk) {
        uint32_t hi[4], lo[4];
        a_fragment_split_at<F, kStep / 2>(hi, lo, st, kk);
        mma_rs_nmajor<F, kD>(dv, hi, n_major(g_addr, kStep * 128, kk));
        a_fragment_split_at<F, kStep / 2>(hi, lo, dpt, kk);
        mma_rs_nmajor<F, kD>(dk, hi, n_major(q_addr, kStep * 128, kk));
      }
      if (owner) dq_over_keys(dq, ds_addr, k_all, second_skips ? kStep / 16 : kKeys / 16);
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_registers(dv);
      wgmma::fence_registers(dk);
      if (owner) wgmma::fence_registers(dq);
    }
    if (owner && t + 2 < tiles) consumers_arrive(kFreeBarrier + buffer);
    // Q, dO, lse and delta of this stage are no longer read by this thread.
    mbarrier_arrive(empty);

    if (owner) {
      // dQ times its factor into the staged tile (two swizzled 64 x 32 halves, 128-byte rows),
      // then two bulk tensor reductions into the accumulator.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + half * 8 + (lane >> 2);
#pragma unroll
        for (int j = 0; j < kD / 8; ++j) {
          const uint32_t offset = (j / 4) * (kStep * 128) + wgmma::swizzled_offset(row, (j % 4) * 2 + (lane & 3) / 2) +
                                  (lane & 1) * 8;
          *reinterpret_cast<float2*>(sDq + offset) =
              make_float2(dq[4 * j + 2 * half] * sc.dq, dq[4 * j + 2 * half + 1] * sc.dq);
        }
      }
      wgmma::fence_proxy_async();
      warpgroup_sync(consumer);
      if (warp == 0 && lane == 0) {
        const uint32_t src = smem_addr(sDq);
        bulk_reduce_add_box(dq_map, src, 0, h, pos_mod, pos_div + q0, b);
        bulk_reduce_add_box(dq_map, src + kStep * 128, 32, h, pos_mod, pos_div + q0, b);
        bulk_commit();
      }
    }
  }
  if (warp == 0 && lane == 0) bulk_wait_all();

  const int64_t nk = p.st.seq_k;
  store_rows<M::Out, kD>([&](int d, int e) { return dk[4 * d + e]; }, sc.dk, key_a, s.len_k, s, p.accumulate,
                         p.accumulate_first, p.dk, p.dks, p.dk_acc, b, h, p.heads, nk);
  store_rows<M::Out, kD>([&](int d, int e) { return dv[4 * d + e]; }, sc.dv, key_a, s.len_k, s, p.accumulate,
                         p.accumulate_first, p.dv, p.dvs, p.dv_acc, b, h, p.heads, nk);
}

__global__ void __launch_bounds__(kCtaThreads, 1)
    hopper_backward_ws_kernel(const BwdParams p, const __grid_constant__ DqMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  const int h = blockIdx.y, b = blockIdx.z;
  int64_t kt;
  StreamRows s;
  int br;
  if (!tile_of_cta(p.st, h, kt, s, br)) return;
  const int k0 = static_cast<int>(kt) * kKeys;
  if (k0 >= s.len_k) return;
  const int len_q = static_cast<int>(s.len_q);
  const int count = (len_q + kStep - 1) / kStep;
  const int first = p.causal ? k0 / kStep : 0;  // causal: earlier query tiles see none of these keys
  const BackwardInputs in = backward_inputs(p, s, b, h);
  const uint32_t barriers = smem_addr(smem + Layout::kBarriers);

  // K and V, copied by every thread; the barriers, set up by one.
  load_swizzled_async<kD, kKeys, kCtaThreads>(smem + Layout::kK, in.k, in.k_step, k0, s.len_k);
  load_swizzled_async<kD, kKeys, kCtaThreads>(smem + Layout::kV, in.v, in.v_step, k0, s.len_k);
  cp_async_commit();
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(barriers + stage * 8, kFullArrivals);
      mbarrier_init(barriers + (kStages + stage) * 8, kEmptyArrivals);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();

  const int warpgroup = warp_uniform(static_cast<int>(threadIdx.x >> 7));
  if (warpgroup == 0) {
    registers_down<kProducerRegisters>();
    if ((threadIdx.x >> 5) == 0) produce(p, in, s, smem, barriers, first, count, product_scales<M>(p).delta);
  } else {
    registers_up<kConsumerRegisters>();
    consume(p, &maps.branch[br], s, smem, barriers, warpgroup - 1, k0, first, count, b, h);
  }
#endif
}

// cuTensorMapEncodeTiled from the driver, looked up once (the runtime does not link libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || f == nullptr)
      throw std::runtime_error("warp-specialized attention backward: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The dQ accumulator's tensor map for rows of step `step` (see DqMaps).
CUtensorMap dq_map(float* dq_acc, int64_t batch, int64_t seq_q, int64_t heads, int64_t step) {
  CUtensorMap map;
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(step),
                              static_cast<cuuint64_t>((seq_q + step - 1) / step), static_cast<cuuint64_t>(batch)};
  const cuuint64_t row = static_cast<cuuint64_t>(heads) * kD * sizeof(float);
  const cuuint64_t strides[4] = {kD * sizeof(float), row, row * static_cast<cuuint64_t>(step),
                                 row * static_cast<cuuint64_t>(seq_q)};
  const cuuint32_t box[5] = {32, 1, 1, kStep, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 5, dq_acc, dims, strides, box,
                                    element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("warp-specialized attention backward: cuTensorMapEncodeTiled failed (error " +
                             std::to_string(static_cast<int>(r)) + ") for step " + std::to_string(step));
  return map;
}

}  // namespace

bool hopper_backward_ws_covers(int64_t head_dim, bool lists) { return head_dim == kD && !lists; }

int64_t hopper_backward_ws_dq_padding(const std::vector<Streams>& launches, int64_t heads) {
  int64_t step = 1;
  for (const Streams& st : launches)
    for (int br = 0; br < kMaxBranches; ++br)
      if (st.num_tiles[br] > 0) step = std::max(step, st.dilation[br]);
  return (step - 1) * heads * kD;
}

void launch_backward_hopper_ws(const BwdParams& params, const Streams& streams, int64_t batch) {
  BwdParams p = params;
  p.st = streams;
  const int64_t max_tiles = retile(p.st, kKeys);
  if (max_tiles == 0) return;
  DqMaps maps{};
  for (int br = 0; br < kMaxBranches; ++br)
    if (p.st.num_tiles[br] > 0) maps.branch[br] = dq_map(p.dq_acc, batch, p.st.seq_q, p.heads, p.st.dilation[br]);
  launch_with_shared<hopper_backward_ws_kernel>(cta_grid(max_tiles, p.heads, batch), kCtaThreads, Layout::kSmem, p,
                                                maps);
}

}  // namespace longtape::cuda::attn
