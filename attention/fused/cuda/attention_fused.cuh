#pragma once
// Shared pieces of the fused attention kernels (attention_fused_fwd.cu, attention_fused_bwd.cu; the
// stream geometry and block lists also serve the f32 kernels, attention/fused/cuda/attention_f32.cuh):
// the per-launch parameters, the stream/tile geometry every kernel uses, the two 16-bit input
// formats (bf16, f16) and the warp-level tensor-core primitives (ldmatrix, mma.sync m16n8k16 with
// f32 accumulation, cp.async).
//
// Work decomposition: a launch covers one set of (head -> dilated branch, offset) assignments.
// A stream is a strided run of rows (first, first + step, ...) of one (batch, head); a CTA owns
// one 64-row tile of one stream. Dense attention is one stream of step 1; block-sparse attention
// is one stream whose key tiles come from block lists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention/fused/problem.h"

namespace longtape::cuda::attn {

// An input element: tiles move 16-bit elements as raw bits (cp.async, ldmatrix); the format
// (Bf16Format, F16Format) decides only the tensor-core product and the f32 conversions.
using elem16 = uint16_t;
using attention::fused::kMaxBranches;
using attention::fused::kMaxHeads;

constexpr int kTile = 64;     // query rows per CTA and keys per inner step
constexpr int kWarps = 4;     // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

struct RowStrides {
  int64_t batch, row, head;
};

// The memory-bound passes over a (batch, rows, heads, dim) view (zeroing, rescaled copies, maxima,
// f32 accumulator stores) walk it in chunks of `width` consecutive elements along dim, numbered
// batch-major with rows from `start`. Index I: uint32_t where the chunk count fits (three 32-bit
// divisions per chunk instead of 64-bit ones), else uint64_t; chunk_walk() (attention_launch.h)
// builds it.
struct HeadRowChunks {
  RowStrides s;
  int64_t start;
  int64_t chunks;                      // batch * rows * heads * per_row
  uint32_t per_row, heads, rows, width;  // per_row = dim / width
  template <class I>
  __device__ __forceinline__ int64_t offset(I i) const {
    const I head_row = i / per_row, d = (i - head_row * per_row) * width;
    const I row_all = head_row / heads, h = head_row - row_all * heads;
    const I b = row_all / rows, r = row_all - b * rows;
    return static_cast<int64_t>(b) * s.batch + (start + static_cast<int64_t>(r)) * s.row +
           static_cast<int64_t>(h) * s.head + static_cast<int64_t>(d);
  }
};

// The (head -> branch) table and stream geometry of one launch.
struct Streams {
  int64_t segment[kMaxBranches];   // tokens per segment
  int64_t dilation[kMaxBranches];  // row step inside a stream
  int64_t tiles_per_stream[kMaxBranches];
  int64_t num_tiles[kMaxBranches];  // segments * tiles_per_stream
  int8_t branch_of_head[kMaxHeads];  // -1: the head takes no part in this launch
  int16_t offset_of_head[kMaxHeads];
  int64_t seq_q, seq_k;
};

// Block lists (CSR, int32) of a block-sparse launch; null row_begin = key tiles are a range.
struct Lists {
  const int32_t* row_begin = nullptr;
  const int32_t* col_index = nullptr;
  const int32_t* col_begin = nullptr;
  const int32_t* row_index = nullptr;
  int64_t num_lists = 1, nqb = 0, nkb = 0;
  int block_tiles = 1;  // block_size / kTile
  const float* bias = nullptr;  // (B, H, nqb, nkb) or null
  float* dbias = nullptr;
};

// What the parameters of every attention kernel hold (forward and backward, 16-bit and f32 inputs
// of element type T): q, k, v with their (batch, row, head) strides, the heads, the softmax
// scale in log2 units, the mask, and the launch's streams and block lists.
template <class T>
struct InputParams {
  const T *q, *k, *v;
  RowStrides qs, ks, vs;
  int64_t heads;
  float scale_log2;  // softmax scale * log2(e)
  bool causal;
  Streams st;
  Lists lists;
};

// What every backward's parameters hold besides the inputs (elements T): dO, lse and delta, and
// the gradients dq, dk, dv with their strides.
template <class T>
struct BackwardParams : InputParams<T> {
  const T* dout;
  RowStrides dos;
  const float* lse;    // (B, H, lse_stride), natural log
  const float* delta;  // (B, H, lse_stride)
  int64_t lse_stride;
  T *dq, *dk, *dv;
  RowStrides dqs, dks, dvs;
  float scale, do_scale;
};

// One stream of one (batch, head): rows first, first + step, ... (length rows) of q (or k).
struct StreamRows {
  int64_t first_q, first_k, step, len_q, len_k;
};

// Stream `s` of branch `br` at offset `o`; segment t covers [t*w, min((t+1)*w, n)).
__device__ __forceinline__ StreamRows stream_rows(const Streams& st, int br, int64_t o, int64_t t) {
  const int64_t w = st.segment[br], r = st.dilation[br];
  StreamRows s;
  s.step = r;
  s.first_q = t * w + o;
  s.first_k = s.first_q;
  const int64_t end_q = min(t * w + w, st.seq_q), end_k = min(t * w + w, st.seq_k);
  s.len_q = s.first_q < end_q ? (end_q - s.first_q + r - 1) / r : 0;
  s.len_k = s.first_k < end_k ? (end_k - s.first_k + r - 1) / r : 0;
  return s;
}

// Where the kernels of one stream read q, k and v: the stream's first row, and the step between rows.
// The element type is that of the parameters' pointers (elem16, or float for the f32 kernels).
template <class T>
struct StreamInputsOf {
  const T *q, *k, *v;
  int64_t q_step, k_step, v_step;
};
using StreamInputs = StreamInputsOf<elem16>;
template <class Params>
__device__ __forceinline__ auto stream_inputs(const Params& p, const StreamRows& s, int b, int h) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.q)>>;
  return StreamInputsOf<T>{p.q + b * p.qs.batch + h * p.qs.head + s.first_q * p.qs.row,
          p.k + b * p.ks.batch + h * p.ks.head + s.first_k * p.ks.row,
          p.v + b * p.vs.batch + h * p.vs.head + s.first_k * p.vs.row, s.step * p.qs.row, s.step * p.ks.row,
          s.step * p.vs.row};
}

// ---- warp-level primitives -------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; bytes beyond src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The 16-bit input formats: Bf16Format (8-bit mantissa, f32's exponent range) and F16Format
// (IEEE half: 11-bit mantissa, largest finite 65504). The instruction text of the product names
// the input type, so it is written once for "bf16" and "f16" through a macro.
#define LT_MMA_M16N8K16(T)                                                                               \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
               "{%0,%1,%2,%3};\n"                                                                        \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <bool kF16>
struct Format16 {
  static constexpr bool kIsF16 = kF16;
  using Pair = std::conditional_t<kF16, __half2, __nv_bfloat162>;
  // c (16x8 f32) += a (16x16, row) * b (16x8, col).
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kF16)
      LT_MMA_M16N8K16("f16");
    else
      LT_MMA_M16N8K16("bf16");
  }
  // Two f32 values rounded to nearest even, lo in the low half.
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    Pair v;
    if constexpr (kF16)
      v = __floats2half2_rn(lo, hi);
    else
      v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t packed) {
    const Pair h = *reinterpret_cast<const Pair*>(&packed);
    return make_float2(__low2float(h), __high2float(h));
  }
  __device__ __forceinline__ static float to_float(elem16 x) {
    if constexpr (kF16)
      return __half2float(__ushort_as_half(x));
    else
      return __bfloat162float(__ushort_as_bfloat16(x));
  }
  __device__ __forceinline__ static elem16 from_float(float x) {
    if constexpr (kF16)
      return __half_as_ushort(__float2half_rn(x));
    else
      return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};
#undef LT_MMA_M16N8K16
using Bf16Format = Format16<false>;
using F16Format = Format16<true>;

// The A fragment (16 rows x 16 k, format F) made of two adjacent accumulator n-tiles f0, f1.
template <class F>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const float (&f0)[4], const float (&f1)[4]) {
  a[0] = F::pack(f0[0], f0[1]);
  a[1] = F::pack(f0[2], f0[3]);
  a[2] = F::pack(f1[0], f1[1]);
  a[3] = F::pack(f1[2], f1[3]);
}
// The same as hi + lo parts: hi + lo carries about twice the format's bits, for products whose
// terms cancel (dS = P (dP - delta) feeding dQ and dK), where one rounding per term shows.
template <class F>
__device__ __forceinline__ void a_fragment_split(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&f0)[4],
                                                 const float (&f1)[4]) {
  a_fragment<F>(hi, f0, f1);
  const float vals[8] = {f0[0], f0[1], f0[2], f0[3], f1[0], f1[1], f1[2], f1[3]};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float2 h = F::unpack(hi[r]);
    lo[r] = F::pack(vals[2 * r] - h.x, vals[2 * r + 1] - h.y);
  }
}

// Shared-memory tile of kTile rows x D 16-bit elements, rows padded by 16 bytes so ldmatrix is conflict-free.
template <int D>
struct TileLayout {
  static constexpr int kLd = D + 8;
  static constexpr int kElems = kTile * kLd;
  static constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  static constexpr int kChunksPerThread = kTile * kChunksPerRow / kThreads;
};

// Starts the copy of rows [row0, row0 + kTile) of one stream into a shared tile; rows at or beyond
// `len` are zero-filled. `base` points at the stream's first row, `step` is the row step in elements.
template <int D>
__device__ __forceinline__ void load_tile_async(elem16* tile, const elem16* base, int64_t step, int64_t row0,
                                                int64_t len) {
  using L = TileLayout<D>;
  constexpr int kRowsPerPass = kThreads / L::kChunksPerRow;
  // This thread copies rows r, r + kRowsPerPass, ... at one 16-byte column: one 64-bit multiply
  // per tile, then pointer increments.
  const int r = threadIdx.x / L::kChunksPerRow, col = (threadIdx.x % L::kChunksPerRow) * 8;
  const elem16* src = base + (row0 + r) * step + col;
  const int64_t pass_step = kRowsPerPass * step;
  const int64_t rows_left = len - row0 - r;  // rows of this thread's column still inside the stream
  elem16* dst = tile + r * L::kLd + col;
#pragma unroll
  for (int i = 0; i < L::kChunksPerThread; ++i) {
    const bool valid = i * kRowsPerPass < rows_left;
    cp_async_16(dst + i * kRowsPerPass * L::kLd, valid ? src : base, valid ? 16 : 0);
    src += pass_step;
  }
}

// A fragments (16 rows x 16 k) of rows [row0, row0 + 16) of a shared tile, k block kk.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const elem16* tile, int row0, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * TileLayout<D>::kLd + kk * 16 + (lane >> 4) * 8);
}
// B fragments for two n-tiles (n0..n0+15) where the tile stores B as [n][k] (k contiguous).
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const elem16* tile, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * TileLayout<D>::kLd + kk * 16 + ((lane >> 3) & 1) * 8);
}
// B fragments for two n-tiles (n0..n0+15) where the tile stores B as [k][n] (n contiguous).
template <int D>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const elem16* tile, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + (kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)) * TileLayout<D>::kLd + n0 +
                           ((lane >> 4) << 3));
}

// B fragments for two n-tiles (n0..n0+15) of a tile stored [n][k] (load_b_nk) or, with kKN, [k][n]
// (load_b_kn).
template <int D, bool kKN>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const elem16* tile, int n0, int kk) {
  if constexpr (kKN)
    load_b_kn<D>(b, tile, n0, kk);
  else
    load_b_nk<D>(b, tile, n0, kk);
}
// n-tiles 2 np and 2 np + 1 of c += a * b; with kSplit also += a_lo * b (A as hi + lo parts,
// a_fragment_split; a_lo is not read otherwise).
template <class F, bool kSplit, int kN>
__device__ __forceinline__ void mma_b_pair(float (&c)[kN][4], int np, const uint32_t (&a)[4], const uint32_t (&a_lo)[4],
                                           const uint32_t (&b)[4]) {
  F::mma(c[2 * np], a, b[0], b[1]);
  F::mma(c[2 * np + 1], a, b[2], b[3]);
  if constexpr (kSplit) {
    F::mma(c[2 * np], a_lo, b[0], b[1]);
    F::mma(c[2 * np + 1], a_lo, b[2], b[3]);
  }
}
// c (16 x 8 kN) += a * B for k block kk of a shared B tile (load_b), with kSplit also a_lo * B.
template <class F, int D, bool kKN, bool kSplit = false, int kN>
__device__ __forceinline__ void mma_tile_b(float (&c)[kN][4], const uint32_t (&a)[4], const uint32_t (&a_lo)[4],
                                           const elem16* tile, int kk) {
#pragma unroll
  for (int np = 0; np < kN / 2; ++np) {
    uint32_t bb[4];
    load_b<D, kKN>(bb, tile, np * 16, kk);
    mma_b_pair<F, kSplit>(c, np, a, a_lo, bb);
  }
}
// Two such products sharing k block kk, c1 += a1 * B1 and c2 += a2 * B2, with both B fragments of an
// n-tile pair loaded before its products (the order the backward kernels' registers are sized for).
template <class F, int D, bool kKN, bool kSplit, int kN>
__device__ __forceinline__ void mma_tile_b_pair(float (&c1)[kN][4], const uint32_t (&a1)[4], const uint32_t (&a1_lo)[4],
                                                const elem16* b1, float (&c2)[kN][4], const uint32_t (&a2)[4],
                                                const uint32_t (&a2_lo)[4], const elem16* b2, int kk) {
#pragma unroll
  for (int np = 0; np < kN / 2; ++np) {
    uint32_t y1[4], y2[4];
    load_b<D, kKN>(y1, b1, np * 16, kk);
    load_b<D, kKN>(y2, b2, np * 16, kk);
    mma_b_pair<F, kSplit>(c1, np, a1, a1_lo, y1);
    mma_b_pair<F, kSplit>(c2, np, a2, a2_lo, y2);
  }
}

// 2^x in one MUFU instruction (flushes denormal results to 0, which a probability can afford).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Row reductions over the 4 lanes that share a row of an mma accumulator.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The key tiles a query tile visits: a range [0, count) of the stream or the tiles of a block list.
// 32-bit: a stream has fewer than 2^31 rows.
struct KeyTiles {
  int count;            // number of key tiles
  const int32_t* list;  // key blocks (null: tiles 0..count-1)
  int block_tiles;
  __device__ __forceinline__ int tile(int i) const {
    if (!list) return i;
    return block_tiles == 1 ? list[i] : list[i / block_tiles] * block_tiles + i % block_tiles;
  }
};

// Which stream and tile a CTA owns, heavy tiles first (with causal masking the last tiles of a
// stream do the most work); false when none.
// `cta` is the CTA's index along x (blockIdx.x unless a launch runs two kinds of CTA).
__device__ __forceinline__ bool tile_of_cta(const Streams& st, int h, int64_t& tile, StreamRows& s, int& br,
                                            int64_t cta) {
  br = st.branch_of_head[h];
  if (br < 0) return false;
  const int64_t num_tiles = st.num_tiles[br];
  if (cta >= num_tiles) return false;
  const int64_t id = num_tiles - 1 - cta;
  const int64_t tps = st.tiles_per_stream[br];
  s = stream_rows(st, br, st.offset_of_head[h], id / tps);
  tile = id % tps;
  return true;
}
__device__ __forceinline__ bool tile_of_cta(const Streams& st, int h, int64_t& tile, StreamRows& s, int& br) {
  return tile_of_cta(st, h, tile, s, br, blockIdx.x);
}

// The key tiles of query block `block_row` in a block list (row_begin / col_index CSR; one list
// shared, one per head or one per (batch, head)).
__device__ __forceinline__ KeyTiles query_block_keys(const Lists& lists, int64_t heads, int b, int h, int block_row) {
  const int64_t list = lists.num_lists == 1 ? 0 : (lists.num_lists == heads ? h : b * heads + h);
  const int32_t* rb = lists.row_begin + list * (lists.nqb + 1);
  return {(rb[block_row + 1] - rb[block_row]) * lists.block_tiles, lists.col_index + rb[block_row], lists.block_tiles};
}

// The query tiles of key block `block_col` in a block list (the transposed CSR, col_begin /
// row_index).
__device__ __forceinline__ KeyTiles key_block_queries(const Lists& lists, int64_t heads, int b, int h, int block_col) {
  const int64_t list = lists.num_lists == 1 ? 0 : (lists.num_lists == heads ? h : b * heads + h);
  const int32_t* cb = lists.col_begin + list * (lists.nkb + 1);
  return {(cb[block_col + 1] - cb[block_col]) * lists.block_tiles, lists.row_index + cb[block_col], lists.block_tiles};
}

// Index of the (query block, key block) pair of batch b, head h in the (B, H, nqb, nkb) block
// bias and its gradient.
template <class Params>
__device__ __forceinline__ int64_t block_pair(const Params& p, int b, int h, int block_row, int block_col) {
  return ((static_cast<int64_t>(b) * p.heads + h) * p.lists.nqb + block_row) * p.lists.nkb + block_col;
}
// The block bias of (query block, key block) in log2 units, 0 without a bias.
template <class Params>
__device__ __forceinline__ float bias_log2(const Params& p, int b, int h, int block_row, int block_col) {
  if (!p.lists.bias) return 0.f;
  return p.lists.bias[block_pair(p, b, h, block_row, block_col)] * kLog2e;
}
// The block bias row of query block block_row (indexed by key block), null without a bias.
template <class Params>
__device__ __forceinline__ const float* bias_row_of(const Params& p, int b, int h, int block_row) {
  return p.lists.bias ? p.lists.bias + block_pair(p, b, h, block_row, 0) : nullptr;
}

// A CTA's block list goes to shared memory (when it has at most kListCache entries) so that the
// tile loop does not wait on a dependent global load per tile. Call with every thread of the
// CTA (kCtaThreads of them); a __syncthreads() must follow before the list is read.
constexpr int kListCache = 512;
template <int kCtaThreads = kThreads>
__device__ __forceinline__ void cache_block_list(KeyTiles& tiles, int32_t* cache) {
  if (!tiles.list) return;
  const int entries = tiles.count / tiles.block_tiles;
  if (entries > kListCache) return;
  for (int i = threadIdx.x; i < entries; i += kCtaThreads) cache[i] = tiles.list[i];
  tiles.list = cache;
}

// The work of a CTA of the portable kernels: batch b, head h, its stream s and its kTile-row tile
// there (query rows, or key rows for the dK/dV kernels), and the tiles of the other side it visits
// (key tiles cut at the causal diagonal, or the query tiles that see its keys; from the block
// lists when there are any). block: the tile's query (key) block, 0 without lists.
struct CtaTile {
  int b, h;
  StreamRows s;
  int tile, row0, block;
  KeyTiles tiles;
};
// Fills `t` and caches its block list in `cache` (kListCache entries); false when the CTA has no
// tile (for the whole CTA). Every thread of the CTA (kCtaThreads of them) calls it.
template <bool kQueryRows, int kCtaThreads = kThreads, class Params>
__device__ __forceinline__ bool cta_tile(const Params& p, int32_t* cache, CtaTile& t) {
  t.h = blockIdx.y;
  t.b = blockIdx.z;
  int64_t tile;
  int br;
  if (!tile_of_cta(p.st, t.h, tile, t.s, br)) return false;
  t.tile = static_cast<int>(tile);
  t.row0 = t.tile * kTile;
  if (t.row0 >= (kQueryRows ? t.s.len_q : t.s.len_k)) return false;
  t.tiles = {0, nullptr, 1};
  t.block = 0;
  if (p.lists.row_begin) {
    t.block = t.tile / p.lists.block_tiles;
    if constexpr (kQueryRows)
      t.tiles = query_block_keys(p.lists, p.heads, t.b, t.h, t.block);
    else
      t.tiles = key_block_queries(p.lists, p.heads, t.b, t.h, t.block);
  } else if constexpr (kQueryRows) {
    const int len_k = static_cast<int>(t.s.len_k), k_tiles = (len_k + kTile - 1) / kTile;
    t.tiles.count = p.causal ? min(k_tiles, t.tile + 1) : k_tiles;
  } else {
    const int len_q = static_cast<int>(t.s.len_q);
    t.tiles.count = (len_q + kTile - 1) / kTile;
  }
  cache_block_list<kCtaThreads>(t.tiles, cache);
  __syncthreads();
  return true;
}

}  // namespace longtape::cuda::attn
