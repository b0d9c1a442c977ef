// Fused attention on the CPU, backward: flash-style dQ over the key runs of each query tile, dK and
// dV over the query runs of each key tile. The shared pieces are in cpu_attention_common.h.
//
// The backward is deterministic: dK and dV are owned by the key tile that computes them, dQ and
// dbias by the query tile (or query block), and lse-mixed branches run one after another.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention/fused/backends.h"
#include "attention/fused/cpu_attention_common.h"
#include "tensor/error.h"

namespace longtape::attention::fused {

namespace cpu_detail {

namespace {

// ---------------------------------------------------------------------------------------------
// Backward

// The query runs that see key block J of a block problem (tag I, bias of (I, J)), causal-clipped;
// runs left empty are dropped.
template <typename Real>
void block_query_runs(const Context<Real>& c, int64_t b, int64_t h, int64_t block, int64_t first_key,
                      std::vector<Run<Real>>& runs) {
  paired_block_runs(c, b, h, block, false, first_key, runs);
  std::erase_if(runs, [](const Run<Real>& run) { return run.count <= 0; });
}

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
  while (const int64_t cols = next_key_tile(c, b, h, lanes, cursor, sc)) {
    // dP = V dout^T, key-major like the scores.
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
    parallel_block_tiles(c, nkb, bs.block_size, c.Nk, kKeyTile,
                         [&](int64_t b, int64_t h, int64_t block, int64_t first, int64_t cols, Scratch<Real>& sc) {
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
    parallel_stream_tiles(c, spec, i, branch, kKeyTile,
                          [&](int64_t b, int64_t h, int64_t offset, int64_t t, int64_t skip, Scratch<Real>& sc) {
                            const Run<Real> keys = branch.stream<Real>(t, offset, c.Nk);
                            const int64_t cols = std::min(kKeyTile, keys.count - skip);
                            if (cols <= 0) return;
                            set_key_tile(sc, keys.first + skip * keys.step, keys.step, cols);
                            Run<Real> queries = branch.stream<Real>(t, offset, c.Nq);
                            if (c.causal) keep_from(queries, sc.col_pos[0]);
                            sc.runs.assign(1, queries);
                            key_tile_grad(c, g, b, h, cols, sc);
                          });
    parallel_stream_tiles(c, spec, i, branch, kQueryTile,
                          [&](int64_t b, int64_t h, int64_t offset, int64_t t, int64_t skip, Scratch<Real>& sc) {
                            const int64_t rows = load_stream_query_tile(c, branch, b, h, offset, t, skip, sc);
                            if (rows <= 0) return;
                            query_tile_grad(c, g, b, h, rows, false, sc);
                          });
  }
}

// ---------------------------------------------------------------------------------------------
// Checks

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

}  // namespace cpu_detail

void cpu_backward(const BackwardProblem& problem) {
  cpu_detail::check_backward(problem);
  const Problem& p = problem.forward;
  if (p.batch * p.heads * std::max(p.seq_q, p.seq_k) == 0) return;
  if (p.dtype == DType::f64)
    cpu_detail::backward_impl<double>(problem);
  else
    cpu_detail::backward_impl<float>(problem);
}

}  // namespace longtape::attention::fused
