#pragma once
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
// Internal to the fused CPU attention (cpu_attention_forward.cpp, cpu_attention_backward.cpp): the
// pieces both passes share. Not part of the library's interface.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/fused/cpu_tile_math.h"
#include "attention/fused/problem.h"

#ifdef _OPENMP
#define LT_OMP(directive) _Pragma(#directive)
#else
#define LT_OMP(directive)
#endif

namespace longtape::attention::fused::cpu_detail {

inline constexpr int64_t kQueryTile = 64;
inline constexpr int64_t kKeyTile = 64;

template <typename Real>
inline constexpr Real kNegInf = -std::numeric_limits<Real>::infinity();
template <typename Real>
inline constexpr Real kPosInf = std::numeric_limits<Real>::infinity();

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
  // Calls fn(b, h, offset, t, skip) for every stream t of work item `item` (of H * groups per
  // batch entry) whose head takes part in branch `index`; skip = the tile's first stream row.
  template <typename Fn>
  void for_each_stream(const DilatedSpec& spec, int index, const Branch& branch, int64_t H, int64_t item,
                       int64_t tile_size, Fn&& fn) const {
    const int64_t g = item % groups, bh = item / groups, b = bh / H, h = bh % H;
    const int64_t offset = branch_offset(spec, index, h);
    if (offset < 0) return;
    const int64_t tile = g % tiles, first_stream = g / tiles * group;
    const int64_t last_stream = std::min(branch.segments, first_stream + group);
    for (int64_t t = first_stream; t < last_stream; ++t) fn(b, h, offset, t, tile * tile_size);
  }
};

// Runs fn(b, h, offset, t, skip, scratch) for every tile of `tile_size` stream rows of branch
// `index`, over all (batch, head) pairs, as parallel work items.
template <typename Real, typename Fn>
void parallel_stream_tiles(const Context<Real>& c, const DilatedSpec& spec, int index, const Branch& branch,
                           int64_t tile_size, const Fn& fn) {
  const StreamItems items(branch, tile_size);
  parallel_items<Real>(c.B * c.H * items.groups, c.D, [&](int64_t item, Scratch<Real>& sc) {
    items.for_each_stream(
        spec, index, branch, c.H, item, tile_size,
        [&](int64_t b, int64_t h, int64_t offset, int64_t t, int64_t skip) { fn(b, h, offset, t, skip, sc); });
  });
}

// Runs fn(b, h, block, first, count, scratch) for every tile of up to `tile_size` positions
// (first, first + 1, ...) of every one of `blocks` blocks of block_size positions over a sequence
// of `length`, over all (batch, head) pairs, as parallel work items.
template <typename Real, typename Fn>
void parallel_block_tiles(const Context<Real>& c, int64_t blocks, int64_t block_size, int64_t length, int64_t tile_size,
                          const Fn& fn) {
  const int64_t tiles = (block_size + tile_size - 1) / tile_size;  // per block
  parallel_items<Real>(c.B * c.H * blocks * tiles, c.D, [&](int64_t item, Scratch<Real>& sc) {
    const int64_t part = item % tiles, block = item / tiles % blocks, bh = item / tiles / blocks;
    const int64_t block_end = std::min(length, (block + 1) * block_size);
    const int64_t first = block * block_size + part * tile_size;
    const int64_t count = std::min(tile_size, block_end - first);
    if (count > 0) fn(bh / c.H, bh % c.H, block, first, count, sc);
  });
}

// ---------------------------------------------------------------------------------------------
// Query tiles and block runs (forward and dQ)

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

// Makes the query tile `skip` rows into stream t (at `offset`) of a dilated branch current, with
// the stream's keys, causal-clipped, as the one key run. Returns the tile's rows; none (<= 0) when
// the stream has no rows left at `skip`.
template <typename Real>
int64_t load_stream_query_tile(const Context<Real>& c, const Branch& branch, int64_t b, int64_t h, int64_t offset,
                               int64_t t, int64_t skip, Scratch<Real>& sc) {
  const Run<Real> queries = branch.stream<Real>(t, offset, c.Nq);
  const int64_t rows = std::min(kQueryTile, queries.count - skip);
  if (rows <= 0) return rows;
  load_query_tile(c, b, h, queries.first + skip * queries.step, queries.step, rows, sc);
  Run<Real> keys = branch.stream<Real>(t, offset, c.Nk);
  if (c.causal) keep_until(keys, sc.row_pos[rows - 1]);
  sc.runs.assign(1, keys);
  return rows;
}

// The blocks paired with block `block` in the lists of a block problem, as runs over the other
// side's positions (tag: the paired block's index, bias: the pair's). With `key_runs`, the key
// blocks of query block `block` (forward and dQ), causal-clipped to keys up to `causal_bound` (the
// block's last query); otherwise the query blocks of key block `block` (dK and dV), from the
// transposed lists, causal-clipped to queries from `causal_bound` (the block's first key).
template <typename Real>
void paired_block_runs(const Context<Real>& c, int64_t b, int64_t h, int64_t block, bool key_runs,
                       int64_t causal_bound, std::vector<Run<Real>>& runs) {
  const BlockSpec& bs = c.problem->blocks;
  const int64_t list = list_of(bs, b, h, c.H, c.B);
  const int32_t* begin =
      key_runs ? bs.row_begin + list * (bs.num_query_blocks + 1) : bs.col_begin + list * (bs.num_key_blocks + 1);
  const int32_t* paired = key_runs ? bs.col_index : bs.row_index;
  const int64_t length = key_runs ? c.Nk : c.Nq;
  const Real* bias = static_cast<const Real*>(bs.bias);
  runs.clear();
  for (int32_t e = begin[block]; e < begin[block + 1]; ++e) {
    const int64_t other = paired[e];
    const int64_t I = key_runs ? block : other, J = key_runs ? other : block;
    Run<Real> run;
    run.first = other * bs.block_size;
    run.count = std::min(bs.block_size, length - run.first);
    run.tag = other;
    if (bias) run.bias = bias[((b * c.H + h) * bs.num_query_blocks + I) * bs.num_key_blocks + J];
    if (c.causal) {
      if (key_runs)
        keep_until(run, causal_bound);
      else
        keep_from(run, causal_bound);
    }
    runs.push_back(run);
  }
}

// The key runs of one query block I of a block problem (tag J, bias of (I, J)), causal-clipped.
// Runs left empty stay: scratch.run_sum is indexed by run.
template <typename Real>
void block_key_runs(const Context<Real>& c, int64_t b, int64_t h, int64_t block, int64_t last_query,
                    std::vector<Run<Real>>& runs) {
  paired_block_runs(c, b, h, block, true, last_query, runs);
}

// The next key tile of scratch.runs against the current query tile (see load_query_tile): takes
// its positions (col_pos, col_bias, col_run), packs its keys into p0 and its values into p1, and
// writes the unscaled scores key-major into s (s[j * kQueryTile + r], r < lanes). Returns its
// columns; 0 once the runs are done.
template <typename Real>
int64_t next_key_tile(const Context<Real>& c, int64_t b, int64_t h, int64_t lanes, Cursor& cursor, Scratch<Real>& sc) {
  const int64_t cols = take(sc.runs, cursor, kKeyTile, sc.col_pos.data(), sc.col_bias.data(), sc.col_run.data());
  if (cols == 0) return 0;
  pack_rows(c.k, b, h, sc.col_pos.data(), cols, c.D, sc.p0.data());
  pack_rows(c.v, b, h, sc.col_pos.data(), cols, c.D, sc.p1.data());
  gemm<Real, false>(cols, lanes, c.D, by_rows(sc.p0_rows.data()), sc.t0_rows.data(), sc.s.data(), kQueryTile, false);
  return cols;
}

// ---------------------------------------------------------------------------------------------
// Checks

// Throws unless the fused CPU kernels can run `p` (with `backward`, also the transposed block
// lists). Defined in cpu_attention_forward.cpp.
void check_problem(const Problem& p, bool backward);

}  // namespace longtape::attention::fused::cpu_detail
