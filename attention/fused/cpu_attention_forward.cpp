// Fused attention on the CPU, forward: tiled online softmax over the key runs of each query tile.
// The shared pieces (runs, scratch, tile products, exp) are in cpu_attention_common.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention/fused/backends.h"
#include "attention/fused/cpu_attention_common.h"
#include "tensor/error.h"

namespace longtape::attention::fused {

namespace cpu_detail {

namespace {

// ---------------------------------------------------------------------------------------------
// Forward

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
  while (const int64_t cols = next_key_tile(c, b, h, lanes, cursor, sc)) {
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
    parallel_block_tiles(c, bs.num_query_blocks, bs.block_size, c.Nq, kQueryTile,
                         [&](int64_t b, int64_t h, int64_t block, int64_t first, int64_t rows, Scratch<Real>& sc) {
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
    parallel_stream_tiles(c, spec, i, branch, kQueryTile,
                          [&](int64_t b, int64_t h, int64_t offset, int64_t t, int64_t skip, Scratch<Real>& sc) {
                            const int64_t rows = load_stream_query_tile(c, branch, b, h, offset, t, skip, sc);
                            if (rows <= 0) return;
                            attend(c, b, h, rows, sc);
                            if (merge)
                              merge_rows(c, out, lse, b, h, rows, sc);
                            else
                              write_rows(c, out, lse, b, h, rows, out_scale, sc);
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

}  // namespace

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

}  // namespace cpu_detail

void cpu_forward(const Problem& problem) {
  cpu_detail::check_problem(problem, false);
  if (problem.batch * problem.heads * problem.seq_q == 0) return;
  if (problem.dtype == DType::f64)
    cpu_detail::forward_impl<double>(problem);
  else
    cpu_detail::forward_impl<float>(problem);
}

}  // namespace longtape::attention::fused
