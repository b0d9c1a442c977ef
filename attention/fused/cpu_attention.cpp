// Fused attention on the CPU: tiled online-softmax forward and flash-style backward for every key
// set of problem.h (dense, dilated with lse or head_groups mixing, block lists with bias).
//
// Every key set is reduced to the same two shapes of work: a tile of query rows against a list of
// key runs (forward, dQ), or a tile of key rows against a list of query runs (dK, dV). A run is an
// arithmetic sequence of positions (first, count, step) with one bias value, so a dense stream, a
// dilated stream and the key blocks of one query block are all a few runs. Tiles are copied from
// the strided tensors into per-thread scratch whose size depends on the tile and head dims only
// (memory O(N) overall); no N x N matrix is ever formed.
//
// Layout of the scores: in the query-tile loops the scores are kept key-major (key x query), so the
// per-query softmax statistics are vectors over the query lanes; in the key-tile loop (dK, dV) they
// are query-major. Either way every product is C += A * B with B read by rows, computed by one
// register-blocked kernel on the compiler's vector types.
//
// The backward is deterministic: dK and dV are owned by the key tile that computes them, dQ and
// dbias by the query tile (or query block), and lse-mixed branches run one after another.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/fused/backends.h"
#include "tensor/error.h"

#ifdef _OPENMP
#define LT_OMP(directive) _Pragma(#directive)
#else
#define LT_OMP(directive)
#endif

namespace longtape::attention::fused {

namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;

template <typename Real>
constexpr Real kNegInf = -std::numeric_limits<Real>::infinity();
template <typename Real>
constexpr Real kPosInf = std::numeric_limits<Real>::infinity();

// ---------------------------------------------------------------------------------------------
// Vectors: the widest registers the target has (SSE2 is the x86-64 baseline).

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename Real>
struct Simd {
  typedef Real type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t lanes = kVectorBytes / static_cast<int>(sizeof(Real));
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// exp

// What the softmax loops step by: a vector of floats, or one double. The float exp is written out
// (libm's has no vector form without -ffast-math); double keeps std::exp for its accuracy.
template <typename Real>
struct Pack;

template <>
struct Pack<float> {
  typedef Simd<float>::type type;
  typedef int32_t bits __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t width = kVectorBytes / 4;
  static type splat(float x) { return type{} + x; }
  static type load(const float* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // Cephes range reduction and degree-6 polynomial (about 2 ulp). Inputs below -87 give exactly 0,
  // -inf included, so masked scores vanish without a NaN.
  static type exp(type x) {
    const type low = splat(-87.0f), high = splat(88.0f);
    type clamped = x < low ? low : x;
    clamped = clamped > high ? high : clamped;
    // Round to nearest with the 1.5 * 2^23 trick: no rounding call.
    const type n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    type r = clamped - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    type p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const bits exponent = (__builtin_convertvector(n, bits) + 127) << 23;
    return x < low ? splat(0.0f) : p * std::bit_cast<type>(exponent);
  }
};

template <>
struct Pack<double> {
  typedef double type;
  static constexpr int64_t width = 1;
  static type splat(double x) { return x; }
  static type load(const double* p) { return *p; }
  static void store(double* p, type v) { *p = v; }
  static type exp(type x) { return std::exp(x); }
};

// ---------------------------------------------------------------------------------------------
// Tile products: C (M x N, row-major, ldc) = or += A (M x K) * B (K x N)
//
// B is read by rows through row pointers (b_rows[k] + n, n contiguous). A is either read by rows
// (a.rows[m][k], k contiguous) or stored k-major (a.data[k * a.ld + m], m contiguous): the scores
// are the left operand of P V and dS K without being transposed.

template <typename Real>
struct Operand {
  const Real* const* rows = nullptr;  // a_rows[m] (A by rows) or b_rows[k] (B)
  const Real* data = nullptr;         // A k-major
  int64_t ld = 0;
};

template <typename Real, bool kAKMajor>
inline Real a_at(const Operand<Real>& a, int64_t m, int64_t k) {
  if constexpr (kAKMajor) return a.data[k * a.ld + m];
  return a.rows[m][k];
}

// MR rows x NV vectors of C, accumulated in registers over all of K (6 x 2 vectors: 12
// accumulators, enough independent FMAs to hide their latency).
template <typename Real, int MR, int NV, bool kAKMajor>
inline void micro_tile(int64_t K, const Operand<Real>& a, int64_t m0, const Real* const* b_rows, int64_t n0,
                       Real* c, int64_t ldc, bool accumulate) {
  using V = typename Simd<Real>::type;
  constexpr int64_t W = Simd<Real>::lanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  const Real* a_row[MR] = {};
  if constexpr (!kAKMajor) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) a_row[i] = a.rows[m0 + i];
  }
  for (int64_t k = 0; k < K; ++k) {
    const Real* b = b_rows[k] + n0;
    V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + j * W, sizeof(V));
    const Real* ak = kAKMajor ? a.data + k * a.ld + m0 : nullptr;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Real s = kAKMajor ? ak[i] : a_row[i][k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] += bv[j] * s;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      Real* out = c + (m0 + i) * ldc + n0 + j * W;
      if (accumulate) {
        V old;
        std::memcpy(&old, out, sizeof(V));
        acc[i][j] += old;
      }
      std::memcpy(out, &acc[i][j], sizeof(V));
    }
}

// All rows of one column band of NV vectors.
template <typename Real, int NV, bool kAKMajor>
inline void column_band(int64_t M, int64_t K, const Operand<Real>& a, const Real* const* b_rows, int64_t n0,
                        Real* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) micro_tile<Real, 6, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
  if (m + 4 <= M) {
    micro_tile<Real, 4, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
    m += 4;
  }
  if (m + 2 <= M) {
    micro_tile<Real, 2, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
    m += 2;
  }
  if (m < M) micro_tile<Real, 1, NV, kAKMajor>(K, a, m, b_rows, n0, c, ldc, accumulate);
}

template <typename Real, bool kAKMajor>
void gemm(int64_t M, int64_t N, int64_t K, const Operand<Real>& a, const Real* const* b_rows, Real* c, int64_t ldc,
          bool accumulate) {
  constexpr int64_t W = Simd<Real>::lanes;
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W) column_band<Real, 2, kAKMajor>(M, K, a, b_rows, n, c, ldc, accumulate);
  for (; n + W <= N; n += W) column_band<Real, 1, kAKMajor>(M, K, a, b_rows, n, c, ldc, accumulate);
  if (n == N) return;
  // Columns past the last full vector (head dims that are not a multiple of the vector width).
  for (int64_t m = 0; m < M; ++m)
    for (int64_t col = n; col < N; ++col) {
      Real sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += a_at<Real, kAKMajor>(a, m, k) * b_rows[k][col];
      c[m * ldc + col] = accumulate ? c[m * ldc + col] + sum : sum;
    }
}

template <typename Real>
Operand<Real> by_rows(const Real* const* rows) {
  Operand<Real> a;
  a.rows = rows;
  return a;
}
template <typename Real>
Operand<Real> k_major(const Real* data, int64_t ld) {
  Operand<Real> a;
  a.data = data;
  a.ld = ld;
  return a;
}

// ---------------------------------------------------------------------------------------------
// Runs of positions

// Positions first, first + step, ..., first + (count - 1) * step, all with one logit bias; `tag`
// is the block index of the run for block key sets.
template <typename Real>
struct Run {
  int64_t first = 0, count = 0, step = 1;
  Real bias = 0;
  int64_t tag = 0;
};

// Drops the positions after `last` (causal keys of a query tile).
template <typename Real>
void keep_until(Run<Real>& run, int64_t last) {
  if (run.count == 0) return;
  if (last < run.first) {
    run.count = 0;
    return;
  }
  run.count = std::min(run.count, (last - run.first) / run.step + 1);
}

// Drops the positions before `first` (causal queries of a key tile).
template <typename Real>
void keep_from(Run<Real>& run, int64_t first) {
  if (run.count == 0 || first <= run.first) return;
  const int64_t skipped = (first - run.first + run.step - 1) / run.step;
  run.count = std::max<int64_t>(0, run.count - skipped);
  run.first += skipped * run.step;
}

// Where the next tile starts inside a list of runs.
struct Cursor {
  size_t run = 0;
  int64_t next = 0;
};

// The next up to `limit` positions of `runs`: positions, the bias of their run and the index of
// their run. Returns how many (0 at the end).
template <typename Real>
int64_t take(const std::vector<Run<Real>>& runs, Cursor& cursor, int64_t limit, int64_t* pos, Real* bias,
             int32_t* run_index) {
  int64_t n = 0;
  while (n < limit && cursor.run < runs.size()) {
    const Run<Real>& run = runs[cursor.run];
    const int64_t count = std::min(limit - n, run.count - cursor.next);
    for (int64_t j = 0; j < count; ++j) {
      pos[n + j] = run.first + (cursor.next + j) * run.step;
      bias[n + j] = run.bias;
      run_index[n + j] = static_cast<int32_t>(cursor.run);
    }
    n += count;
    cursor.next += count;
    if (cursor.next >= run.count) {
      ++cursor.run;
      cursor.next = 0;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Operands and scratch

// One (B, N, H, D) operand: base pointer and strides in elements.
template <typename Real>
struct View {
  Real* data = nullptr;
  Strides stride;
  Real* rows(int64_t b, int64_t h) const { return data + b * stride.batch + h * stride.head; }
  Real* row(int64_t b, int64_t h, int64_t pos) const { return rows(b, h) + pos * stride.row; }
};

// Row pointers of the positions pos[0..n) of one (b, h).
template <typename Real>
void row_pointers(const View<const Real>& x, int64_t b, int64_t h, const int64_t* pos, int64_t n,
                  const Real** out) {
  const Real* base = x.rows(b, h);
  for (int64_t i = 0; i < n; ++i) out[i] = base + pos[i] * x.stride.row;
}

// Copies the rows at pos[0..n) of one (b, h) into dst (n x dim, contiguous). Products read their
// operands many times; rows a large power-of-two stride apart would share a few cache sets.
template <typename Real>
void pack_rows(const View<const Real>& x, int64_t b, int64_t h, const int64_t* pos, int64_t n, int64_t dim,
               Real* dst) {
  const Real* base = x.rows(b, h);
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + i * dim, base + pos[i] * x.stride.row, static_cast<size_t>(dim) * sizeof(Real));
}

// dst[d * ld + i] = factor * rows[i][d] for i < n, d < dim; lanes [n, padded) are zeroed so that
// products over whole vectors read finite values there.
template <typename Real>
void transpose_rows(const Real* const* rows, int64_t n, int64_t padded, int64_t dim, Real factor, Real* dst,
                    int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const Real* __restrict src = rows[i];
    for (int64_t d = 0; d < dim; ++d) dst[d * ld + i] = factor * src[d];
  }
  for (int64_t d = 0; d < dim; ++d) std::fill(dst + d * ld + n, dst + d * ld + padded, Real(0));
}

// rows[i][:] += factor * src[i * dim + :].
template <typename Real>
void add_rows(Real* const* rows, int64_t n, int64_t dim, Real factor, const Real* src) {
  for (int64_t i = 0; i < n; ++i) {
    Real* __restrict out = rows[i];
    const Real* __restrict in = src + i * dim;
    for (int64_t e = 0; e < dim; ++e) out[e] += factor * in[e];
  }
}

// Sets every (b, pos, h, :) row of x to zero.
template <typename Real>
void zero_all(const View<Real>& x, int64_t batch, int64_t n, int64_t heads, int64_t dim) {
  const int64_t count = batch * n;
  LT_OMP(omp parallel for schedule(static) if (count * heads * dim > 65536))
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = i / n, pos = i % n;
    for (int64_t h = 0; h < heads; ++h) std::fill_n(x.row(b, h, pos), dim, Real(0));
  }
}

template <typename Real>
struct Scratch {
  // Transposed tiles (dim x tile): queries and dout of a query tile, or keys and values of a key
  // tile; their row pointers for the products.
  std::vector<Real> t0, t1;
  std::vector<const Real*> t0_rows, t1_rows;
  // Packed row tiles (tile x dim): keys and values of a key tile, or queries and dout.
  std::vector<Real> p0, p1;
  std::vector<const Real*> p0_rows, p1_rows;
  std::vector<Real> s, dp;         // scores and their gradient (kKeyTile x kQueryTile or transposed)
  std::vector<Real> acc0, acc1;    // accumulators: out or dQ (query tile), dK and dV (key tile)
  std::vector<Real> row_max, row_sum, row_shift, row_scale, row_lse, row_delta, row_bias;
  std::vector<Real> col_bias;
  std::vector<int64_t> row_pos, col_pos;
  std::vector<int32_t> row_run, col_run;
  std::vector<const Real*> a_rows, b_rows, c_rows, d_rows;  // tensor rows in place (transposes)
  std::vector<Real*> out_rows;
  std::vector<Run<Real>> runs;
  std::vector<Real> run_sum;  // dbias per run of a block query row
  int64_t q_first = 0, q_step = 1;  // the query tile, an arithmetic run (forward and dQ)
  int64_t k_first = 0, k_step = 1;  // the key tile, an arithmetic run (dK and dV)

  explicit Scratch(int64_t dim) {
    const int64_t tile = std::max(kQueryTile, kKeyTile);
    t0.resize(static_cast<size_t>(dim * tile));
    t1.resize(static_cast<size_t>(dim * tile));
    t0_rows.resize(static_cast<size_t>(dim));
    t1_rows.resize(static_cast<size_t>(dim));
    for (int64_t d = 0; d < dim; ++d) {
      t0_rows[d] = t0.data() + d * tile;
      t1_rows[d] = t1.data() + d * tile;
    }
    p0.resize(static_cast<size_t>(tile * dim));
    p1.resize(static_cast<size_t>(tile * dim));
    for (int64_t i = 0; i < tile; ++i) {
      p0_rows.push_back(p0.data() + i * dim);
      p1_rows.push_back(p1.data() + i * dim);
    }
    s.resize(static_cast<size_t>(kQueryTile * kKeyTile));
    dp.resize(static_cast<size_t>(kQueryTile * kKeyTile));
    acc0.resize(static_cast<size_t>(tile * dim));
    acc1.resize(static_cast<size_t>(tile * dim));
    for (auto* v : {&row_max, &row_sum, &row_shift, &row_scale, &row_lse, &row_delta, &row_bias, &col_bias})
      v->resize(static_cast<size_t>(tile));
    row_pos.resize(tile);
    col_pos.resize(tile);
    row_run.resize(tile);
    col_run.resize(tile);
    for (auto* v : {&a_rows, &b_rows, &c_rows, &d_rows}) v->resize(tile);
    out_rows.resize(tile);
  }
  int64_t ld() const { return std::max(kQueryTile, kKeyTile); }  // leading dim of t0, t1
};

// Runs fn(item, scratch) for item in [0, count) on all threads, one scratch per thread.
template <typename Real, typename Fn>
void parallel_items(int64_t count, int64_t dim, const Fn& fn) {
  if (count <= 0) return;
  LT_OMP(omp parallel if (count > 1)) {
    Scratch<Real> scratch(dim);
    LT_OMP(omp for schedule(dynamic))
    for (int64_t item = 0; item < count; ++item) fn(item, scratch);
  }
}

template <typename Real>
struct Context {
  int64_t B = 0, H = 0, D = 0, Nq = 0, Nk = 0;
  Real scale = 1;
  bool causal = false;
  bool has_bias = false;
  View<const Real> q, k, v;
  const Problem* problem = nullptr;

  explicit Context(const Problem& p)
      : B(p.batch), H(p.heads), D(p.head_dim), Nq(p.seq_q), Nk(p.seq_k), scale(static_cast<Real>(p.scale)),
        causal(p.causal), problem(&p) {
    q = {static_cast<const Real*>(p.q), p.q_stride};
    k = {static_cast<const Real*>(p.k), p.k_stride};
    v = {static_cast<const Real*>(p.v), p.v_stride};
    has_bias = p.key_set == KeySet::blocks && p.blocks.bias != nullptr;
  }

  // Index of (b, h, pos) in the (B, H, Nq) row statistics.
  int64_t stat(int64_t b, int64_t h, int64_t pos) const { return (b * H + h) * Nq + pos; }
};

// How many rows of an arithmetic query tile (first, step, rows) lie before key position `key`:
// under the causal mask they do not see it.
inline int64_t rows_before(int64_t key, int64_t first, int64_t step, int64_t rows) {
  if (key <= first) return 0;
  return std::min(rows, (key - first + step - 1) / step);
}

// How many keys of an arithmetic key tile (first, step, cols) lie at or before query `query`.
inline int64_t keys_until(int64_t query, int64_t first, int64_t step, int64_t cols) {
  if (query < first) return 0;
  return std::min(cols, (query - first) / step + 1);
}

// ---------------------------------------------------------------------------------------------
// Key-set geometry

// Block lists of one (b, h): list index 0, h or b * H + h by the number of lists.
inline int64_t list_of(const BlockSpec& blocks, int64_t b, int64_t h, int64_t heads, int64_t batch) {
  if (blocks.num_lists == batch * heads) return b * heads + h;
  if (blocks.num_lists == heads) return h;
  return 0;
}

// One branch of a dilated problem: segment w, dilation r; the streams of every segment.
struct Branch {
  int64_t segment = 1, dilation = 1, segments = 0;
  int64_t max_stream = 0;  // longest stream (offset 0, full segment)

  Branch(const DilatedSpec& spec, int index, int64_t n) {
    dilation = spec.dilation[index];
    segment = std::min(spec.segment[index], std::max<int64_t>(n, 1));
    segments = n == 0 ? 0 : (n + segment - 1) / segment;
    max_stream = (segment + dilation - 1) / dilation;
  }

  // The stream of segment t at `offset` over a sequence of n positions.
  template <typename Real>
  Run<Real> stream(int64_t t, int64_t offset, int64_t n) const {
    Run<Real> run;
    run.first = t * segment + offset;
    run.step = dilation;
    const int64_t end = std::min((t + 1) * segment, n);
    run.count = run.first < end ? (end - run.first + dilation - 1) / dilation : 0;
    return run;
  }
};

// Stream offset of head h in branch i, or -1 when the head does not run the branch.
inline int64_t branch_offset(const DilatedSpec& spec, int branch, int64_t h) {
  if (spec.mixing == BranchMixing::lse) return (spec.head_offset + h) % spec.dilation[branch];
  return spec.branch_of_head[h] == branch ? spec.offset_of_head[h] : -1;
}

// How the items of a dilated branch cover its streams: streams are grouped when short, split into
// tiles when long.
struct StreamItems {
  int64_t tiles = 1;    // tiles per stream
  int64_t group = 1;    // streams per item
  int64_t groups = 0;   // items per (b, h)
  StreamItems(const Branch& branch, int64_t tile) {
    tiles = std::max<int64_t>(1, (branch.max_stream + tile - 1) / tile);
    group = tiles == 1 ? std::max<int64_t>(1, tile / std::max<int64_t>(1, branch.max_stream)) : 1;
    groups = (branch.segments + group - 1) / group * tiles;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

// Makes the query tile first + r * step (r < rows) current: positions, and the scaled queries
// transposed into t0.
template <typename Real>
void load_query_tile(const Context<Real>& c, int64_t b, int64_t h, int64_t first, int64_t step, int64_t rows,
                     Scratch<Real>& sc) {
  sc.q_first = first;
  sc.q_step = step;
  for (int64_t r = 0; r < rows; ++r) sc.row_pos[r] = first + r * step;
  row_pointers(c.q, b, h, sc.row_pos.data(), rows, sc.a_rows.data());
  transpose_rows(sc.a_rows.data(), rows, round_up(rows, Simd<Real>::lanes), c.D, c.scale, sc.t0.data(), sc.ld());
}

// Online softmax of the current query tile over the keys of scratch.runs. Leaves the unnormalised
// output in acc0 (rows x D) and the running max and sum in row_max / row_sum.
template <typename Real>
void attend(const Context<Real>& c, int64_t b, int64_t h, int64_t rows, Scratch<Real>& sc) {
  const int64_t D = c.D, lanes = round_up(rows, Simd<Real>::lanes);
  Real* __restrict row_max = sc.row_max.data();
  Real* __restrict row_sum = sc.row_sum.data();
  Real* __restrict shift = sc.row_shift.data();
  Real* __restrict rescale = sc.row_scale.data();
  Real* out = sc.acc0.data();
  std::fill_n(row_max, lanes, kNegInf<Real>);
  std::fill_n(row_sum, lanes, Real(0));
  std::fill_n(out, rows * D, Real(0));
  Cursor cursor;
  while (true) {
    const int64_t cols = take(sc.runs, cursor, kKeyTile, sc.col_pos.data(), sc.col_bias.data(), sc.col_run.data());
    if (cols == 0) break;
    pack_rows(c.k, b, h, sc.col_pos.data(), cols, D, sc.p0.data());
    pack_rows(c.v, b, h, sc.col_pos.data(), cols, D, sc.p1.data());
    // Scores key-major: s[j * kQueryTile + r].
    gemm<Real, false>(cols, lanes, D, by_rows(sc.p0_rows.data()), sc.t0_rows.data(), sc.s.data(), kQueryTile, false);
    for (int64_t j = 0; j < cols; ++j) {
      Real* __restrict s = sc.s.data() + j * kQueryTile;
      if (c.has_bias) {
        const Real bias = sc.col_bias[j];
        for (int64_t r = 0; r < lanes; ++r) s[r] += bias;
      }
      if (c.causal) std::fill_n(s, rows_before(sc.col_pos[j], sc.q_first, sc.q_step, rows), kNegInf<Real>);
    }
    using P = Pack<Real>;
    using V = typename P::type;
    std::fill_n(shift, lanes, kNegInf<Real>);  // the tile max first
    for (int64_t j = 0; j < cols; ++j) {
      const Real* s = sc.s.data() + j * kQueryTile;
      for (int64_t r = 0; r < lanes; r += P::width) {
        const V score = P::load(s + r), best = P::load(shift + r);
        P::store(shift + r, score > best ? score : best);
      }
    }
    for (int64_t r = 0; r < lanes; r += P::width) {
      const V old_max = P::load(row_max + r), tile_max = P::load(shift + r);
      const V new_max = tile_max > old_max ? tile_max : old_max;
      // A row that has seen no key yet keeps max -inf; shifting by 0 keeps every exp at 0, not NaN.
      const V safe = new_max == P::splat(kNegInf<Real>) ? P::splat(Real(0)) : new_max;
      const V factor = P::exp(old_max - safe);
      P::store(shift + r, safe);
      P::store(rescale + r, factor);
      P::store(row_max + r, new_max);
      P::store(row_sum + r, P::load(row_sum + r) * factor);
    }
    for (int64_t j = 0; j < cols; ++j) {
      Real* s = sc.s.data() + j * kQueryTile;
      for (int64_t r = 0; r < lanes; r += P::width) {
        const V p = P::exp(P::load(s + r) - P::load(shift + r));
        P::store(s + r, p);
        P::store(row_sum + r, P::load(row_sum + r) + p);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (rescale[r] == Real(1)) continue;
      Real* __restrict o = out + r * D;
      const Real factor = rescale[r];
      for (int64_t e = 0; e < D; ++e) o[e] *= factor;
    }
    gemm<Real, true>(rows, D, cols, k_major(sc.s.data(), kQueryTile), sc.p1_rows.data(), out, D, true);
  }
}

// Writes out = acc / sum * out_scale and lse for the rows of the last attend().
template <typename Real>
void write_rows(const Context<Real>& c, const View<Real>& out, Real* lse, int64_t b, int64_t h, int64_t rows,
                Real out_scale, const Scratch<Real>& sc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = sc.row_pos[r];
    const Real sum = sc.row_sum[r];
    const Real factor = sum > 0 ? out_scale / sum : Real(0);
    Real* __restrict o = out.row(b, h, pos);
    const Real* __restrict a = sc.acc0.data() + r * c.D;
    for (int64_t e = 0; e < c.D; ++e) o[e] = factor * a[e];
    lse[c.stat(b, h, pos)] = sum > 0 ? sc.row_max[r] + std::log(sum) : kNegInf<Real>;
  }
}

// Merges the rows of the last attend() into out / lse by log-sum-exp (lse mixing of branches).
template <typename Real>
void merge_rows(const Context<Real>& c, const View<Real>& out, Real* lse, int64_t b, int64_t h, int64_t rows,
                const Scratch<Real>& sc) {
  for (int64_t r = 0; r < rows; ++r) {
    const Real sum = sc.row_sum[r];
    if (!(sum > 0)) continue;  // this branch gives the row no key
    const int64_t pos = sc.row_pos[r];
    const Real part = sc.row_max[r] + std::log(sum);
    Real& total = lse[c.stat(b, h, pos)];
    Real* __restrict o = out.row(b, h, pos);
    const Real* __restrict a = sc.acc0.data() + r * c.D;
    if (total == kNegInf<Real>) {
      const Real factor = Real(1) / sum;
      for (int64_t e = 0; e < c.D; ++e) o[e] = factor * a[e];
      total = part;
      continue;
    }
    const Real merged = std::max(total, part) + std::log1p(std::exp(-std::abs(total - part)));
    const Real keep = std::exp(total - merged);
    const Real add = std::exp(part - merged) / sum;
    for (int64_t e = 0; e < c.D; ++e) o[e] = keep * o[e] + add * a[e];
    total = merged;
  }
}

// The key runs of one query block I of a block problem (tag J, bias of (I, J)), causal-clipped.
template <typename Real>
void block_key_runs(const Context<Real>& c, int64_t b, int64_t h, int64_t block, int64_t last_query,
                    std::vector<Run<Real>>& runs) {
  const BlockSpec& bs = c.problem->blocks;
  const int64_t list = list_of(bs, b, h, c.H, c.B);
  const int32_t* begin = bs.row_begin + list * (bs.num_query_blocks + 1);
  const Real* bias = static_cast<const Real*>(bs.bias);
  runs.clear();
  for (int32_t e = begin[block]; e < begin[block + 1]; ++e) {
    const int64_t J = bs.col_index[e];
    Run<Real> run;
    run.first = J * bs.block_size;
    run.count = std::min(bs.block_size, c.Nk - run.first);
    run.tag = J;
    if (bias) run.bias = bias[((b * c.H + h) * bs.num_query_blocks + block) * bs.num_key_blocks + J];
    if (c.causal) keep_until(run, last_query);
    runs.push_back(run);
  }
}

// The query runs that see key block J of a block problem (tag I, bias of (I, J)), causal-clipped.
template <typename Real>
void block_query_runs(const Context<Real>& c, int64_t b, int64_t h, int64_t block, int64_t first_key,
                      std::vector<Run<Real>>& runs) {
  const BlockSpec& bs = c.problem->blocks;
  const int64_t list = list_of(bs, b, h, c.H, c.B);
  const int32_t* begin = bs.col_begin + list * (bs.num_key_blocks + 1);
  const Real* bias = static_cast<const Real*>(bs.bias);
  runs.clear();
  for (int32_t e = begin[block]; e < begin[block + 1]; ++e) {
    const int64_t I = bs.row_index[e];
    Run<Real> run;
    run.first = I * bs.block_size;
    run.count = std::min(bs.block_size, c.Nq - run.first);
    run.tag = I;
    if (bias) run.bias = bias[((b * c.H + h) * bs.num_query_blocks + I) * bs.num_key_blocks + block];
    if (c.causal) keep_from(run, first_key);
    if (run.count > 0) runs.push_back(run);
  }
}

template <typename Real>
void forward_impl(const Problem& p) {
  const Context<Real> c(p);
  const View<Real> out{static_cast<Real*>(p.out), p.out_stride};
  std::vector<Real> own_lse;
  Real* lse = static_cast<Real*>(p.lse);
  if (lse == nullptr) {
    own_lse.resize(static_cast<size_t>(c.B * c.H * c.Nq));
    lse = own_lse.data();
  }
  const int64_t D = c.D;

  if (p.key_set == KeySet::dense) {
    const int64_t tiles = (c.Nq + kQueryTile - 1) / kQueryTile;
    parallel_items<Real>(c.B * c.H * tiles, D, [&](int64_t item, Scratch<Real>& sc) {
      // Last tiles first: under a causal mask they are the most expensive.
      const int64_t tile = tiles - 1 - item % tiles, bh = item / tiles, b = bh / c.H, h = bh % c.H;
      const int64_t first = tile * kQueryTile, rows = std::min(kQueryTile, c.Nq - first);
      load_query_tile(c, b, h, first, 1, rows, sc);
      sc.runs.assign(1, Run<Real>{0, c.causal ? std::min(c.Nk, first + rows) : c.Nk, 1, 0, 0});
      attend(c, b, h, rows, sc);
      write_rows(c, out, lse, b, h, rows, Real(1), sc);
    });
    return;
  }

  if (p.key_set == KeySet::blocks) {
    const BlockSpec& bs = p.blocks;
    const int64_t sub = (bs.block_size + kQueryTile - 1) / kQueryTile;
    const int64_t nqb = bs.num_query_blocks;
    parallel_items<Real>(c.B * c.H * nqb * sub, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t part = item % sub, block = item / sub % nqb, bh = item / sub / nqb;
      const int64_t b = bh / c.H, h = bh % c.H;
      const int64_t block_end = std::min(c.Nq, (block + 1) * bs.block_size);
      const int64_t first = block * bs.block_size + part * kQueryTile;
      const int64_t rows = std::min(kQueryTile, block_end - first);
      if (rows <= 0) return;
      load_query_tile(c, b, h, first, 1, rows, sc);
      block_key_runs(c, b, h, block, first + rows - 1, sc.runs);
      attend(c, b, h, rows, sc);
      write_rows(c, out, lse, b, h, rows, Real(1), sc);
    });
    return;
  }

  // Dilated: rows outside every stream keep out 0 and lse -inf.
  const DilatedSpec& spec = p.dilated;
  zero_all(out, c.B, c.Nq, c.H, D);
  std::fill_n(lse, c.B * c.H * c.Nq, kNegInf<Real>);
  const bool merge = spec.mixing == BranchMixing::lse;
  const Real out_scale = merge ? Real(1) : Real(1) / static_cast<Real>(spec.num_branches);
  const int64_t n = std::max(c.Nq, c.Nk);
  for (int i = 0; i < spec.num_branches; ++i) {
    const Branch branch(spec, i, n);
    const StreamItems items(branch, kQueryTile);
    parallel_items<Real>(c.B * c.H * items.groups, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t g = item % items.groups, bh = item / items.groups, b = bh / c.H, h = bh % c.H;
      const int64_t offset = branch_offset(spec, i, h);
      if (offset < 0) return;
      const int64_t tile = g % items.tiles, first_stream = g / items.tiles * items.group;
      const int64_t last_stream = std::min(branch.segments, first_stream + items.group);
      for (int64_t t = first_stream; t < last_stream; ++t) {
        const Run<Real> queries = branch.stream<Real>(t, offset, c.Nq);
        const int64_t skip = tile * kQueryTile, rows = std::min(kQueryTile, queries.count - skip);
        if (rows <= 0) continue;
        load_query_tile(c, b, h, queries.first + skip * queries.step, queries.step, rows, sc);
        Run<Real> keys = branch.stream<Real>(t, offset, c.Nk);
        if (c.causal) keep_until(keys, sc.row_pos[rows - 1]);
        sc.runs.assign(1, keys);
        attend(c, b, h, rows, sc);
        if (merge)
          merge_rows(c, out, lse, b, h, rows, sc);
        else
          write_rows(c, out, lse, b, h, rows, out_scale, sc);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename Real>
struct Gradients {
  View<const Real> dout;
  View<Real> dq, dk, dv;
  const Real* lse = nullptr;    // final forward lse
  const Real* delta = nullptr;  // rowsum(dout * out) - dlse per (b, h, pos)
  Real* dbias = nullptr;
  Real out_scale = 1;           // head_groups: the forward's 1 / G
};

// lse (+inf for rows without keys, so that P = 0 there) and delta of the rows at row_pos; lanes
// [rows, lanes) get +inf and 0, so padded lanes give P = 0 and dS = 0.
template <typename Real>
void load_row_stats(const Context<Real>& c, const Gradients<Real>& g, int64_t b, int64_t h, int64_t rows,
                    int64_t lanes, Scratch<Real>& sc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = c.stat(b, h, sc.row_pos[r]);
    const Real l = g.lse[i];
    sc.row_lse[r] = l == kNegInf<Real> ? kPosInf<Real> : l;
    sc.row_delta[r] = g.delta[i];
  }
  std::fill(sc.row_lse.begin() + rows, sc.row_lse.begin() + lanes, kPosInf<Real>);
  std::fill(sc.row_delta.begin() + rows, sc.row_delta.begin() + lanes, Real(0));
}

// dK and dV of the current key tile (positions col_pos, the arithmetic run k_first, k_step)
// against the query runs in scratch.runs; added into dk and dv. Scores are query-major here:
// s[r * kKeyTile + j].
template <typename Real>
void key_tile_grad(const Context<Real>& c, const Gradients<Real>& g, int64_t b, int64_t h, int64_t cols,
                   Scratch<Real>& sc) {
  const int64_t D = c.D, lanes = round_up(cols, Simd<Real>::lanes);
  row_pointers(c.k, b, h, sc.col_pos.data(), cols, sc.b_rows.data());
  row_pointers(c.v, b, h, sc.col_pos.data(), cols, sc.c_rows.data());
  transpose_rows(sc.b_rows.data(), cols, lanes, D, Real(1), sc.t0.data(), sc.ld());
  transpose_rows(sc.c_rows.data(), cols, lanes, D, Real(1), sc.t1.data(), sc.ld());
  Real* dk = sc.acc0.data();
  Real* dv = sc.acc1.data();
  std::fill_n(dk, cols * D, Real(0));
  std::fill_n(dv, cols * D, Real(0));
  const Real scale = c.scale, out_scale = g.out_scale;
  Cursor cursor;
  while (true) {
    const int64_t rows = take(sc.runs, cursor, kQueryTile, sc.row_pos.data(), sc.row_bias.data(), sc.row_run.data());
    if (rows == 0) break;
    pack_rows(c.q, b, h, sc.row_pos.data(), rows, D, sc.p0.data());
    pack_rows(g.dout, b, h, sc.row_pos.data(), rows, D, sc.p1.data());
    load_row_stats(c, g, b, h, rows, rows, sc);
    gemm<Real, false>(rows, lanes, D, by_rows(sc.p0_rows.data()), sc.t0_rows.data(), sc.s.data(), kKeyTile, false);
    gemm<Real, false>(rows, lanes, D, by_rows(sc.p1_rows.data()), sc.t1_rows.data(), sc.dp.data(), kKeyTile, false);
    for (int64_t r = 0; r < rows; ++r) {
      Real* __restrict s = sc.s.data() + r * kKeyTile;
      Real* __restrict dp = sc.dp.data() + r * kKeyTile;
      const int64_t visible = c.causal ? keys_until(sc.row_pos[r], sc.k_first, sc.k_step, cols) : cols;
      const Real shift = sc.row_lse[r] - (c.has_bias ? sc.row_bias[r] : Real(0));
      using P = Pack<Real>;
      const typename P::type shift_v = P::splat(shift), delta_v = P::splat(sc.row_delta[r]);
      const typename P::type scale_v = P::splat(scale), out_scale_v = P::splat(out_scale);
      // Whole vectors (lanes past cols hold finite padding), then the hidden keys are zeroed.
      for (int64_t j = 0; j < lanes; j += P::width) {
        const typename P::type prob = P::exp(P::load(s + j) * scale_v - shift_v);
        P::store(s + j, prob);
        P::store(dp + j, prob * (P::load(dp + j) * out_scale_v - delta_v));
      }
      std::fill(s + visible, s + lanes, Real(0));
      std::fill(dp + visible, dp + lanes, Real(0));
    }
    // dV += P^T dout, dK += dS^T q (scaled by out_scale and scale at the end).
    gemm<Real, true>(cols, D, rows, k_major<Real>(sc.s.data(), kKeyTile), sc.p1_rows.data(), dv, D, true);
    gemm<Real, true>(cols, D, rows, k_major<Real>(sc.dp.data(), kKeyTile), sc.p0_rows.data(), dk, D, true);
  }
  for (int64_t j = 0; j < cols; ++j) sc.out_rows[j] = g.dk.row(b, h, sc.col_pos[j]);
  add_rows(sc.out_rows.data(), cols, D, scale, dk);
  for (int64_t j = 0; j < cols; ++j) sc.out_rows[j] = g.dv.row(b, h, sc.col_pos[j]);
  add_rows(sc.out_rows.data(), cols, D, out_scale, dv);
}

// dQ of the current query tile (see load_query_tile) against the key runs in scratch.runs, added
// into dq; with `run_sums`, the sum of dS per key run is added to scratch.run_sum.
template <typename Real>
void query_tile_grad(const Context<Real>& c, const Gradients<Real>& g, int64_t b, int64_t h, int64_t rows,
                     bool run_sums, Scratch<Real>& sc) {
  const int64_t D = c.D, lanes = round_up(rows, Simd<Real>::lanes);
  row_pointers(g.dout, b, h, sc.row_pos.data(), rows, sc.d_rows.data());
  transpose_rows(sc.d_rows.data(), rows, lanes, D, g.out_scale, sc.t1.data(), sc.ld());
  load_row_stats(c, g, b, h, rows, lanes, sc);
  Real* dq = sc.acc0.data();
  std::fill_n(dq, rows * D, Real(0));
  const Real* __restrict lse = sc.row_lse.data();
  const Real* __restrict delta = sc.row_delta.data();
  Cursor cursor;
  while (true) {
    const int64_t cols = take(sc.runs, cursor, kKeyTile, sc.col_pos.data(), sc.col_bias.data(), sc.col_run.data());
    if (cols == 0) break;
    pack_rows(c.k, b, h, sc.col_pos.data(), cols, D, sc.p0.data());
    pack_rows(c.v, b, h, sc.col_pos.data(), cols, D, sc.p1.data());
    gemm<Real, false>(cols, lanes, D, by_rows(sc.p0_rows.data()), sc.t0_rows.data(), sc.s.data(), kQueryTile, false);
    gemm<Real, false>(cols, lanes, D, by_rows(sc.p1_rows.data()), sc.t1_rows.data(), sc.dp.data(), kQueryTile, false);
    for (int64_t j = 0; j < cols; ++j) {
      Real* __restrict s = sc.s.data() + j * kQueryTile;
      Real* __restrict dp = sc.dp.data() + j * kQueryTile;
      const Real bias = c.has_bias ? sc.col_bias[j] : Real(0);
      if (c.causal) std::fill_n(s, rows_before(sc.col_pos[j], sc.q_first, sc.q_step, rows), kNegInf<Real>);
      using P = Pack<Real>;
      const typename P::type bias_v = P::splat(bias);
      for (int64_t r = 0; r < lanes; r += P::width) {
        const typename P::type prob = P::exp(P::load(s + r) + bias_v - P::load(lse + r));
        P::store(dp + r, prob * (P::load(dp + r) - P::load(delta + r)));
      }
    }
    gemm<Real, true>(rows, D, cols, k_major<Real>(sc.dp.data(), kQueryTile), sc.p0_rows.data(), dq, D, true);
    if (run_sums) {
      for (int64_t j = 0; j < cols; ++j) {
        const Real* __restrict ds = sc.dp.data() + j * kQueryTile;
        Real sum = 0;
        for (int64_t r = 0; r < rows; ++r) sum += ds[r];
        sc.run_sum[static_cast<size_t>(sc.col_run[j])] += sum;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) sc.out_rows[r] = g.dq.row(b, h, sc.row_pos[r]);
  add_rows(sc.out_rows.data(), rows, D, c.scale, dq);
}

template <typename Real>
void backward_impl(const BackwardProblem& bp) {
  const Problem& p = bp.forward;
  const Context<Real> c(p);
  const int64_t D = c.D;
  Gradients<Real> g;
  g.dout = {static_cast<const Real*>(bp.dout), bp.dout_stride};
  g.dq = {static_cast<Real*>(bp.dq), bp.dq_stride};
  g.dk = {static_cast<Real*>(bp.dk), bp.dk_stride};
  g.dv = {static_cast<Real*>(bp.dv), bp.dv_stride};
  g.lse = static_cast<const Real*>(p.lse);
  g.dbias = static_cast<Real*>(bp.dbias);
  if (p.key_set == KeySet::dilated && p.dilated.mixing == BranchMixing::head_groups)
    g.out_scale = Real(1) / static_cast<Real>(p.dilated.num_branches);

  // delta = rowsum(dout * out) - dlse, with out the final (scaled) output.
  std::vector<Real> delta(static_cast<size_t>(c.B * c.H * c.Nq));
  {
    const View<const Real> out{static_cast<const Real*>(p.out), p.out_stride};
    const Real* dlse = static_cast<const Real*>(bp.dlse);
    const int64_t count = c.B * c.H * c.Nq;
    LT_OMP(omp parallel for schedule(static) if (count * D > 65536))
    for (int64_t i = 0; i < count; ++i) {
      const int64_t pos = i % c.Nq, bh = i / c.Nq, b = bh / c.H, h = bh % c.H;
      const Real* __restrict o = out.row(b, h, pos);
      const Real* __restrict d = g.dout.row(b, h, pos);
      Real sum = 0;
      for (int64_t e = 0; e < D; ++e) sum += o[e] * d[e];
      delta[static_cast<size_t>(i)] = sum - (dlse ? dlse[i] : Real(0));
    }
  }
  g.delta = delta.data();

  zero_all(g.dq, c.B, c.Nq, c.H, D);
  zero_all(g.dk, c.B, c.Nk, c.H, D);
  zero_all(g.dv, c.B, c.Nk, c.H, D);

  // The key tile first + j * step (j < cols) for key_tile_grad.
  auto set_key_tile = [](Scratch<Real>& sc, int64_t first, int64_t step, int64_t cols) {
    sc.k_first = first;
    sc.k_step = step;
    for (int64_t j = 0; j < cols; ++j) sc.col_pos[j] = first + j * step;
  };

  if (p.key_set == KeySet::dense) {
    const int64_t key_tiles = (c.Nk + kKeyTile - 1) / kKeyTile;
    parallel_items<Real>(c.B * c.H * key_tiles, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t tile = item % key_tiles, bh = item / key_tiles, b = bh / c.H, h = bh % c.H;
      const int64_t first = tile * kKeyTile, cols = std::min(kKeyTile, c.Nk - first);
      set_key_tile(sc, first, 1, cols);
      const int64_t from = c.causal ? first : 0;
      sc.runs.assign(1, Run<Real>{from, std::max<int64_t>(0, c.Nq - from), 1, 0, 0});
      key_tile_grad(c, g, b, h, cols, sc);
    });
    const int64_t query_tiles = (c.Nq + kQueryTile - 1) / kQueryTile;
    parallel_items<Real>(c.B * c.H * query_tiles, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t tile = query_tiles - 1 - item % query_tiles, bh = item / query_tiles;
      const int64_t b = bh / c.H, h = bh % c.H;
      const int64_t first = tile * kQueryTile, rows = std::min(kQueryTile, c.Nq - first);
      load_query_tile(c, b, h, first, 1, rows, sc);
      sc.runs.assign(1, Run<Real>{0, c.causal ? std::min(c.Nk, first + rows) : c.Nk, 1, 0, 0});
      query_tile_grad(c, g, b, h, rows, false, sc);
    });
    return;
  }

  if (p.key_set == KeySet::blocks) {
    const BlockSpec& bs = p.blocks;
    const int64_t nqb = bs.num_query_blocks, nkb = bs.num_key_blocks;
    const int64_t key_sub = (bs.block_size + kKeyTile - 1) / kKeyTile;
    parallel_items<Real>(c.B * c.H * nkb * key_sub, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t part = item % key_sub, block = item / key_sub % nkb, bh = item / key_sub / nkb;
      const int64_t b = bh / c.H, h = bh % c.H;
      const int64_t block_end = std::min(c.Nk, (block + 1) * bs.block_size);
      const int64_t first = block * bs.block_size + part * kKeyTile;
      const int64_t cols = std::min(kKeyTile, block_end - first);
      if (cols <= 0) return;
      set_key_tile(sc, first, 1, cols);
      block_query_runs(c, b, h, block, first, sc.runs);
      key_tile_grad(c, g, b, h, cols, sc);
    });
    // dbias[b, h, I, :] is owned by one item per query block, which walks all its query tiles.
    const bool with_dbias = g.dbias != nullptr;
    const int64_t query_sub = (bs.block_size + kQueryTile - 1) / kQueryTile;
    const int64_t per_block = with_dbias ? 1 : query_sub;
    parallel_items<Real>(c.B * c.H * nqb * per_block, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t part = item % per_block, block = item / per_block % nqb, bh = item / per_block / nqb;
      const int64_t b = bh / c.H, h = bh % c.H;
      const int64_t block_end = std::min(c.Nq, (block + 1) * bs.block_size);
      const int64_t sub_first = with_dbias ? 0 : part, sub_last = with_dbias ? query_sub : part + 1;
      if (with_dbias) {
        block_key_runs(c, b, h, block, c.Nq, sc.runs);
        sc.run_sum.assign(sc.runs.size(), Real(0));
      }
      for (int64_t s = sub_first; s < sub_last; ++s) {
        const int64_t first = block * bs.block_size + s * kQueryTile;
        const int64_t rows = std::min(kQueryTile, block_end - first);
        if (rows <= 0) break;
        load_query_tile(c, b, h, first, 1, rows, sc);
        block_key_runs(c, b, h, block, first + rows - 1, sc.runs);
        query_tile_grad(c, g, b, h, rows, with_dbias, sc);
      }
      if (with_dbias) {
        Real* row = g.dbias + ((b * c.H + h) * nqb + block) * nkb;
        std::fill_n(row, nkb, Real(0));
        for (size_t e = 0; e < sc.runs.size(); ++e) row[sc.runs[e].tag] = sc.run_sum[e];
      }
    });
    return;
  }

  const DilatedSpec& spec = p.dilated;
  const int64_t n = std::max(c.Nq, c.Nk);
  // Branches one after another: each adds its share, so the sums are in a fixed order.
  for (int i = 0; i < spec.num_branches; ++i) {
    const Branch branch(spec, i, n);
    const StreamItems key_items(branch, kKeyTile);
    parallel_items<Real>(c.B * c.H * key_items.groups, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t gi = item % key_items.groups, bh = item / key_items.groups, b = bh / c.H, h = bh % c.H;
      const int64_t offset = branch_offset(spec, i, h);
      if (offset < 0) return;
      const int64_t tile = gi % key_items.tiles, first_stream = gi / key_items.tiles * key_items.group;
      const int64_t last_stream = std::min(branch.segments, first_stream + key_items.group);
      for (int64_t t = first_stream; t < last_stream; ++t) {
        const Run<Real> keys = branch.stream<Real>(t, offset, c.Nk);
        const int64_t skip = tile * kKeyTile, cols = std::min(kKeyTile, keys.count - skip);
        if (cols <= 0) continue;
        set_key_tile(sc, keys.first + skip * keys.step, keys.step, cols);
        Run<Real> queries = branch.stream<Real>(t, offset, c.Nq);
        if (c.causal) keep_from(queries, sc.col_pos[0]);
        sc.runs.assign(1, queries);
        key_tile_grad(c, g, b, h, cols, sc);
      }
    });
    const StreamItems query_items(branch, kQueryTile);
    parallel_items<Real>(c.B * c.H * query_items.groups, D, [&](int64_t item, Scratch<Real>& sc) {
      const int64_t gi = item % query_items.groups, bh = item / query_items.groups, b = bh / c.H, h = bh % c.H;
      const int64_t offset = branch_offset(spec, i, h);
      if (offset < 0) return;
      const int64_t tile = gi % query_items.tiles, first_stream = gi / query_items.tiles * query_items.group;
      const int64_t last_stream = std::min(branch.segments, first_stream + query_items.group);
      for (int64_t t = first_stream; t < last_stream; ++t) {
        const Run<Real> queries = branch.stream<Real>(t, offset, c.Nq);
        const int64_t skip = tile * kQueryTile, rows = std::min(kQueryTile, queries.count - skip);
        if (rows <= 0) continue;
        load_query_tile(c, b, h, queries.first + skip * queries.step, queries.step, rows, sc);
        Run<Real> keys = branch.stream<Real>(t, offset, c.Nk);
        if (c.causal) keep_until(keys, sc.row_pos[rows - 1]);
        sc.runs.assign(1, keys);
        query_tile_grad(c, g, b, h, rows, false, sc);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Checks

void check_block_lists(const char* who, const int32_t* begin, const int32_t* index, int64_t lists,
                       int64_t rows, int64_t limit, const char* kind) {
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t* b = begin + l * (rows + 1);
    for (int64_t i = 0; i < rows; ++i) {
      LT_CHECK(b[i] >= 0 && b[i] <= b[i + 1], who, ": ", kind, " list ", l, " has decreasing offsets at block ",
               i, " (", b[i], ", ", b[i + 1], ")");
      for (int32_t e = b[i]; e < b[i + 1]; ++e)
        LT_CHECK(index[e] >= 0 && index[e] < limit, who, ": ", kind, " list ", l, ", block ", i, " names block ",
                 index[e], " outside [0, ", limit, ")");
    }
  }
}

void check_problem(const Problem& p, bool backward) {
  const char* who = backward ? "fused CPU attention backward" : "fused CPU attention";
  LT_CHECK(p.dtype == DType::f32 || p.dtype == DType::f64, who,
           ": q, k, v must be f32 or f64 (bf16 runs on the composed path or on CUDA), got ", dtype_name(p.dtype));
  LT_CHECK(p.batch >= 0 && p.heads >= 0 && p.head_dim > 0 && p.seq_q >= 0 && p.seq_k >= 0, who,
           ": need batch, heads, seq_q, seq_k >= 0 and head_dim > 0, got B = ", p.batch, ", H = ", p.heads,
           ", D = ", p.head_dim, ", Nq = ", p.seq_q, ", Nk = ", p.seq_k);
  LT_CHECK(std::isfinite(p.scale), who, ": scale must be finite, got ", p.scale);
  LT_CHECK(!p.causal || p.seq_q == p.seq_k, who, ": causal attention needs as many queries as keys, got Nq = ",
           p.seq_q, ", Nk = ", p.seq_k);
  const bool empty = p.batch * p.heads * p.seq_q == 0;
  LT_CHECK(empty || (p.q && p.out && (p.seq_k == 0 || (p.k && p.v))), who,
           ": q, k, v and out must be set");
  if (p.key_set == KeySet::dilated) {
    const DilatedSpec& d = p.dilated;
    LT_CHECK(d.num_branches >= 1 && d.num_branches <= kMaxBranches, who, ": dilated attention needs 1 to ",
             kMaxBranches, " branches, got ", d.num_branches);
    for (int i = 0; i < d.num_branches; ++i)
      LT_CHECK(d.segment[i] > 0 && d.dilation[i] > 0, who, ": branch ", i,
               " needs segment > 0 and dilation > 0, got segment ", d.segment[i], ", dilation ", d.dilation[i]);
    if (d.mixing == BranchMixing::lse) {
      LT_CHECK(d.head_offset >= 0, who, ": head_offset must be >= 0, got ", d.head_offset);
    } else {
      LT_CHECK(p.heads <= kMaxHeads, who, ": head_groups mixing supports at most ", kMaxHeads, " heads, got ",
               p.heads);
      for (int64_t h = 0; h < p.heads; ++h) {
        LT_CHECK(d.branch_of_head[h] >= -1 && d.branch_of_head[h] < d.num_branches, who, ": head ", h,
                 " runs branch ", static_cast<int>(d.branch_of_head[h]), ", outside [-1, ", d.num_branches, ")");
        LT_CHECK(d.branch_of_head[h] < 0 || d.offset_of_head[h] >= 0, who, ": head ", h,
                 " has a negative stream offset ", d.offset_of_head[h]);
      }
    }
  } else if (p.key_set == KeySet::blocks) {
    const BlockSpec& b = p.blocks;
    LT_CHECK(b.block_size > 0, who, ": block_size must be > 0, got ", b.block_size);
    const int64_t nqb = (p.seq_q + b.block_size - 1) / b.block_size;
    const int64_t nkb = (p.seq_k + b.block_size - 1) / b.block_size;
    LT_CHECK(b.num_query_blocks == nqb && b.num_key_blocks == nkb, who, ": block lists must cover ", nqb,
             " query and ", nkb, " key blocks (block_size ", b.block_size, "), got ", b.num_query_blocks, " and ",
             b.num_key_blocks);
    LT_CHECK(b.num_lists == 1 || b.num_lists == p.heads || b.num_lists == p.batch * p.heads, who,
             ": expected 1, H = ", p.heads, " or B*H = ", p.batch * p.heads, " block lists, got ", b.num_lists);
    LT_CHECK(b.row_begin && (nqb == 0 || b.col_index || b.row_begin[b.num_lists * (nqb + 1) - 1] == 0), who,
             ": block lists (row_begin, col_index) must be set");
    check_block_lists(who, b.row_begin, b.col_index, b.num_lists, nqb, nkb, "query block");
    if (backward) {
      LT_CHECK(b.col_begin && (nkb == 0 || b.row_index || b.col_begin[b.num_lists * (nkb + 1) - 1] == 0), who,
               ": the transposed block lists (col_begin, row_index) must be set");
      check_block_lists(who, b.col_begin, b.row_index, b.num_lists, nkb, nqb, "key block");
    }
  }
}

void check_backward(const BackwardProblem& bp) {
  const Problem& p = bp.forward;
  check_problem(p, true);
  if (p.batch * p.heads * std::max(p.seq_q, p.seq_k) == 0) return;
  LT_CHECK(p.seq_q == 0 || (p.lse && p.out && bp.dout && bp.dq),
           "fused CPU attention backward: the forward out and lse, dout and dq must be set");
  LT_CHECK(p.seq_k == 0 || (p.k && p.v && bp.dk && bp.dv), "fused CPU attention backward: k, v, dk and dv must be set");
  LT_CHECK(bp.dbias == nullptr || p.key_set == KeySet::blocks,
           "fused CPU attention backward: dbias is only defined for block key sets");
}

}  // namespace

void cpu_forward(const Problem& problem) {
  check_problem(problem, false);
  if (problem.batch * problem.heads * problem.seq_q == 0) return;
  if (problem.dtype == DType::f64)
    forward_impl<double>(problem);
  else
    forward_impl<float>(problem);
}

void cpu_backward(const BackwardProblem& problem) {
  check_backward(problem);
  const Problem& p = problem.forward;
  if (p.batch * p.heads * std::max(p.seq_q, p.seq_k) == 0) return;
  if (p.dtype == DType::f64)
    backward_impl<double>(problem);
  else
    backward_impl<float>(problem);
}

}  // namespace longtape::attention::fused
