#include "attention/composed.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

Tensor scalar_like(double value, const Tensor& like) { return Tensor::full({}, value, like.dtype(), like.device()); }

// first, first + 1, ..., first + count - 1 (built on the host in `dtype`, then moved).
Tensor index_values(int64_t first, int64_t count, DType dtype, Device device) {
  return Tensor::arange(static_cast<double>(first), static_cast<double>(first + count), 1, dtype, Device::cpu())
      .to(device);
}

// (rows, keys) additive bias: 0 where key j <= query (first_query + i), -inf elsewhere.
Tensor causal_bias(int64_t first_query, int64_t rows, int64_t keys, DType dtype, Device device) {
  NoGradGuard no_grad;
  Tensor key_pos = index_values(0, keys, dtype, device).reshape({1, keys});
  Tensor query_pos = index_values(first_query, rows, dtype, device).reshape({rows, 1});
  Tensor future = gt(key_pos, query_pos);
  return where(future, Tensor::full({}, kNegInf, dtype, device), Tensor::zeros({}, dtype, device));
}

// Index of a maximum of every row of scores (..., L) as (..., 1) i64; not recorded.
Tensor row_argmax(const Tensor& scores) {
  NoGradGuard no_grad;
  const int64_t keys = scores.shape().back();
  Tensor row_max = amax(scores, {-1}, true);
  Tensor hit = eq(scores, row_max);
  Tensor pos = index_values(0, keys, scores.dtype(), scores.device());
  return cast(amax(mul(hit, pos), {-1}, true), DType::i64);
}

Tensor index_tensor(const std::vector<int64_t>& values, Device device) {
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}, device);
}

// True when values == {start, start + 1, ..., start + size - 1}.
bool is_range(const std::vector<int64_t>& values, int64_t start) {
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i] != start + static_cast<int64_t>(i)) return false;
  return true;
}

Tensor cat_or_single(const std::vector<Tensor>& parts, int64_t dim) {
  return parts.size() == 1 ? parts[0] : cat(parts, dim);
}

}  // namespace

void validate_core_config(const AttentionConfig& config, const std::string& variant) {
  const std::string who = "attention '" + variant + "'";
  LT_CHECK(config.num_heads > 0, who, ": num_heads must be > 0, got ", config.num_heads);
  LT_CHECK(config.head_dim > 0, who, ": head_dim must be > 0, got ", config.head_dim);
  const double scale = config.scale();
  LT_CHECK(std::isfinite(scale) && scale > 0, who, ": softmax scale must be finite and > 0, got ", scale);
  LT_CHECK(config.dropout >= 0.0 && config.dropout < 1.0, who, ": dropout must be in [0, 1), got ",
           config.dropout);
}

DType compute_dtype(DType input) { return input == DType::f64 ? DType::f64 : DType::f32; }

OutLse attend_rows(const Tensor& q, const Tensor& k, const Tensor& v, const StreamOptions& options) {
  LT_CHECK(q.defined() && k.defined() && v.defined(), "attend_rows: q, k, v must be defined, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(q.dim() >= 2 && k.dim() == q.dim() && v.dim() == q.dim(),
           "attend_rows: q, k, v must be (..., L, D) with the same number of dims, got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
           "attend_rows: q, k, v must share one floating dtype, got q ", describe_tensor(q), ", k ", describe_tensor(k),
           ", v ", describe_tensor(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(), "attend_rows: q, k, v must be on one device, got q ",
           describe_tensor(q), ", k ", describe_tensor(k), ", v ", describe_tensor(v));
  const int64_t nd = q.dim();
  const Shape lead(q.shape().begin(), q.shape().end() - 2);
  LT_CHECK(
      Shape(k.shape().begin(), k.shape().end() - 2) == lead && Shape(v.shape().begin(), v.shape().end() - 2) == lead,
      "attend_rows: q, k, v must have equal leading dims, got q ", describe_tensor(q), ", k ", describe_tensor(k),
      ", v ", describe_tensor(v));
  const int64_t lq = q.size(nd - 2), lk = k.size(nd - 2), dim = q.size(nd - 1), dv = v.size(nd - 1);
  LT_CHECK(k.size(nd - 1) == dim, "attend_rows: q and k must have the same head dim, got q ", describe_tensor(q),
           ", k ", describe_tensor(k));
  LT_CHECK(v.size(nd - 2) == lk, "attend_rows: k and v must have the same length, got k ", describe_tensor(k), ", v ",
           describe_tensor(v));
  LT_CHECK(!options.causal || lq == lk, "attend_rows: causal attention needs as many queries as keys, got q ",
           describe_tensor(q), ", k ", describe_tensor(k));
  LT_CHECK(std::isfinite(options.scale), "attend_rows: scale must be finite, got ", options.scale);
  LT_CHECK(options.dropout >= 0.0 && options.dropout < 1.0, "attend_rows: dropout must be in [0, 1), got ",
           options.dropout);

  Shape out_shape = lead, lse_shape = lead;
  out_shape.push_back(lq);
  out_shape.push_back(dv);
  lse_shape.push_back(lq);
  const int64_t batch = shape_numel(lead);
  if (batch == 0 || lq == 0 || lk == 0) {
    // Nothing to attend to: every row sees no key.
    return {Tensor::zeros(out_shape, q.dtype(), q.device()), Tensor::full(lse_shape, kNegInf, q.dtype(), q.device())};
  }

  Tensor q3 = mul(q.reshape({batch, lq, dim}), options.scale);
  Tensor k3 = k.reshape({batch, lk, dim});
  Tensor v3 = v.reshape({batch, lk, dv});

  const int64_t budget = std::max<int64_t>(1, options.max_score_elements);
  const int64_t query_chunk = lq * lk <= budget ? lq : std::max<int64_t>(1, budget / lk);
  const int64_t batch_chunk = std::min(batch, std::max<int64_t>(1, budget / (query_chunk * lk)));

  std::vector<Tensor> out_blocks, lse_blocks;
  for (int64_t b0 = 0; b0 < batch; b0 += batch_chunk) {
    const int64_t bc = std::min(batch_chunk, batch - b0);
    std::vector<Tensor> out_rows, lse_rows;
    for (int64_t q0 = 0; q0 < lq; q0 += query_chunk) {
      const int64_t qc = std::min(query_chunk, lq - q0);
      // Causal: keys after the chunk's last query are masked for every row, so they are not formed.
      const int64_t keys = options.causal ? q0 + qc : lk;
      Tensor qp = q3.narrow(0, b0, bc).narrow(1, q0, qc);
      Tensor kp = k3.narrow(0, b0, bc).narrow(1, 0, keys);
      Tensor vp = v3.narrow(0, b0, bc).narrow(1, 0, keys);
      Tensor scores = matmul(qp, kp.transpose(1, 2));  // (bc, qc, keys)
      if (options.causal && qc > 1) {
        // Added as an expanded view: the add's backward passes the gradient through untouched.
        scores = add(scores, causal_bias(q0, qc, keys, scores.dtype(), scores.device()).expand(scores.shape()));
      }
      Tensor probs = softmax(scores, -1);
      // lse = S[m] - log P[m] at a row maximum m: P[m] >= 1 / keys, so the log is finite and exact
      // to rounding, and the gradient (through S and P) is P, that of logsumexp.
      Tensor at_max = row_argmax(scores);
      Tensor lse = sub(gather(scores, 2, at_max), log(gather(probs, 2, at_max)));
      if (options.dropout > 0.0) probs = dropout(probs, options.dropout, true);
      out_rows.push_back(matmul(probs, vp));
      lse_rows.push_back(lse.reshape({bc, qc}));
    }
    out_blocks.push_back(cat_or_single(out_rows, 1));
    lse_blocks.push_back(cat_or_single(lse_rows, 1));
  }
  return {cat_or_single(out_blocks, 0).reshape(out_shape), cat_or_single(lse_blocks, 0).reshape(lse_shape)};
}

AttentionOutput stream_attention(const Tensor& q, const Tensor& k, const Tensor& v, const StreamOptions& options) {
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
           "stream_attention: q, k, v must be 4-d (batch, length, heads, head_dim), got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  OutLse rows = attend_rows(q.permute({0, 2, 1, 3}), k.permute({0, 2, 1, 3}), v.permute({0, 2, 1, 3}), options);
  return {rows.out.permute({0, 2, 1, 3}).contiguous(), rows.lse};
}

Tensor gather_rows(const Tensor& x, int64_t dim, const std::vector<int64_t>& positions) {
  LT_CHECK(x.defined() && x.dim() >= 1, "gather_rows: expected a tensor with at least 1 dim, got ", describe_tensor(x));
  const int64_t d = normalize_dim(dim, x.dim(), "gather_rows");
  const int64_t n = x.size(d);
  if (!positions.empty() && positions[0] >= 0 && positions[0] + static_cast<int64_t>(positions.size()) <= n &&
      is_range(positions, positions[0]))
    return x.narrow(d, positions[0], static_cast<int64_t>(positions.size()));
  return index_select(x, d, index_tensor(positions, x.device()));
}

Tensor scatter_rows(const std::vector<Tensor>& pieces, int64_t dim, const std::vector<int64_t>& positions, int64_t n,
                    double fill) {
  LT_CHECK(!pieces.empty(), "scatter_rows: expected at least one piece, got none");
  const Tensor& first = pieces[0];
  LT_CHECK(first.defined() && first.dim() >= 1, "scatter_rows: pieces must have at least 1 dim, got ",
           describe_tensor(first));
  const int64_t d = normalize_dim(dim, first.dim(), "scatter_rows");
  int64_t rows = 0;
  for (const Tensor& p : pieces) {
    LT_CHECK(p.defined() && p.dim() == first.dim(), "scatter_rows: pieces must have the same rank, got ",
             describe_tensor(first), " and ", describe_tensor(p));
    rows += p.size(d);
  }
  LT_CHECK(rows == static_cast<int64_t>(positions.size()), "scatter_rows: the pieces hold ", rows,
           " rows along dim ", d, " but ", positions.size(), " positions were given");
  LT_CHECK(n >= 0, "scatter_rows: output length must be >= 0, got ", n);
  std::vector<int64_t> source(static_cast<size_t>(n), rows);  // `rows` = the padding row
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t p = positions[static_cast<size_t>(i)];
    LT_CHECK(p >= 0 && p < n, "scatter_rows: position ", p, " is outside [0, ", n, ")");
    LT_CHECK(source[static_cast<size_t>(p)] == rows, "scatter_rows: position ", p, " is given twice");
    source[static_cast<size_t>(p)] = i;
  }
  auto fill_block = [&](int64_t length) {
    Shape s = first.shape();
    s[d] = length;
    return Tensor::full(s, fill, first.dtype(), first.device());
  };
  // Common layouts need no index: the rows already are the output, or one contiguous run of it.
  if (is_range(positions, 0)) {
    if (rows == n) return cat_or_single(pieces, d);
    std::vector<Tensor> parts = pieces;
    parts.push_back(fill_block(n - rows));
    return cat(parts, d);
  }
  std::vector<Tensor> parts = pieces;
  parts.push_back(fill_block(1));
  return index_select(cat(parts, d), d, index_tensor(source, first.device()));
}

OutLse merge_rows_by_lse(const std::vector<OutLse>& parts) {
  LT_CHECK(!parts.empty(), "merge_by_lse: expected at least one (out, lse) pair, got none");
  const OutLse& first = parts[0];
  for (size_t i = 0; i < parts.size(); ++i) {
    const OutLse& p = parts[i];
    LT_CHECK(p.out.defined() && p.lse.defined() && p.out.dim() >= 1, "merge_by_lse: part ", i,
             " needs a defined out (..., D) and lse (...), got out ", describe_tensor(p.out), ", lse ",
             describe_tensor(p.lse));
    LT_CHECK(Shape(p.out.shape().begin(), p.out.shape().end() - 1) == p.lse.shape(), "merge_by_lse: part ", i,
             ": lse must have out's shape without the last dim, got out ", describe_tensor(p.out), ", lse ",
             describe_tensor(p.lse));
    LT_CHECK(p.out.shape() == first.out.shape() && p.out.dtype() == first.out.dtype() &&
                 p.lse.dtype() == first.out.dtype() && p.out.device() == first.out.device() &&
                 p.lse.device() == first.out.device(),
             "merge_by_lse: every part must match part 0 (out ", describe_tensor(first.out), "), part ", i, " has out ",
             describe_tensor(p.out), ", lse ", describe_tensor(p.lse));
  }
  if (parts.size() == 1) return first;

  // m = max_i lse_i, replaced by 0 where every part is -inf so that lse_i - m stays -inf, not NaN.
  Tensor shift;
  {
    NoGradGuard no_grad;
    shift = parts[0].lse.detach();
    for (size_t i = 1; i < parts.size(); ++i) shift = maximum(shift, parts[i].lse.detach());
    shift = where(eq(shift, scalar_like(kNegInf, shift)), scalar_like(0.0, shift), shift);
  }
  Tensor total;
  for (const OutLse& p : parts) {
    Tensor term = exp(sub(p.lse, shift));
    total = total.defined() ? add(total, term) : term;
  }
  // total >= 1 wherever some part has a key (its maximum term is exp(0)); 0 only for empty rows.
  // Those rows use log(1) = 0, so every weight below is exp(-inf - 0) = 0 and no 0/0 appears.
  Tensor empty_rows;
  {
    NoGradGuard no_grad;
    empty_rows = eq(total.detach(), scalar_like(0.0, total));
  }
  Tensor finite_lse = add(shift, log(where(empty_rows, scalar_like(1.0, total), total)));
  Tensor out;
  for (const OutLse& p : parts) {
    Tensor weight = exp(sub(p.lse, finite_lse)).unsqueeze(-1);
    Tensor term = mul(weight, p.out);
    out = out.defined() ? add(out, term) : term;
  }
  Tensor lse = where(empty_rows, scalar_like(kNegInf, finite_lse), finite_lse);
  return {out, lse};
}

AttentionOutput merge_by_lse(const std::vector<AttentionOutput>& parts) {
  LT_CHECK(!parts.empty(), "merge_by_lse: expected at least one (out, lse) pair, got none");
  std::vector<OutLse> rows;
  for (size_t i = 0; i < parts.size(); ++i) {
    const AttentionOutput& p = parts[i];
    LT_CHECK(p.out.defined() && p.lse.defined() && p.out.dim() == 4 && p.lse.dim() == 3 &&
                 p.lse.shape() == Shape({p.out.size(0), p.out.size(2), p.out.size(1)}),
             "merge_by_lse: part ", i, " must have out (B, N, H, D) and lse (B, H, N), got out ",
             describe_tensor(p.out), ", lse ", describe_tensor(p.lse));
    rows.push_back({p.out.to(p.lse.dtype()), p.lse.permute({0, 2, 1})});
  }
  OutLse merged = merge_rows_by_lse(rows);
  return {merged.out.to(parts[0].out.dtype()), merged.lse.permute({0, 2, 1}).contiguous()};
}

}  // namespace longtape::attention
