// Reductions over dims, each with its backward.
#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

using autograd::record;

namespace {

struct ReducePlan {
  std::vector<bool> reduced;
  Shape kept_shape;   // keepdim=true shape
  Shape out_shape;    // as requested
  int64_t count = 1;  // elements per output
};

ReducePlan plan_reduce(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim, const char* op) {
  LT_CHECK(a.defined(), op, ": got an undefined tensor");
  ReducePlan p;
  const int64_t nd = a.dim();
  p.reduced.assign(nd, dims.empty());
  for (int64_t d : dims) {
    int64_t dd = normalize_dim(d, nd, op);
    LT_CHECK(!p.reduced[dd] || dims.empty(), op, ": dim ", d, " given twice");
    p.reduced[dd] = true;
  }
  for (int64_t i = 0; i < nd; ++i) {
    if (p.reduced[i]) {
      p.count *= a.shape()[i];
      p.kept_shape.push_back(1);
      if (keepdim) p.out_shape.push_back(1);
    } else {
      p.kept_shape.push_back(a.shape()[i]);
      p.out_shape.push_back(a.shape()[i]);
    }
  }
  return p;
}

// Raw reduction, returns the keepdim-shaped result.
Tensor reduce_raw(kernels::ReduceOp op, const Tensor& a, const ReducePlan& p) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (!p.reduced[i]) order.push_back(i);
  int nreduce = 0;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (p.reduced[i]) {
      order.push_back(i);
      ++nreduce;
    }
  Tensor permuted = make_view(a, [&] {
    Shape s;
    for (int64_t d : order) s.push_back(a.shape()[d]);
    return s;
  }(), [&] {
    Shape s;
    for (int64_t d : order) s.push_back(a.strides()[d]);
    return s;
  }(), a.offset());
  Tensor out = Tensor::empty(p.kept_shape, a.dtype(), a.device());
  kernels::reduce(op, kernels::make_view(out), kernels::make_view(permuted), nreduce);
  return out;
}

void check_float(const Tensor& a, const char* op) {
  LT_CHECK(a.defined() && is_floating(a.dtype()), op, ": expected a floating tensor, got ",
           a.defined() ? dtype_name(a.dtype()) : "undefined");
}

}  // namespace

Tensor sum(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  check_float(a, "sum");
  ReducePlan p = plan_reduce(a, dims, keepdim, "sum");
  Tensor out = reduce_raw(kernels::ReduceOp::sum, a, p).reshape(p.out_shape);
  Shape in_shape = a.shape(), kept = p.kept_shape;
  record("sum", {a}, {out}, [in_shape, kept](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {g[0].reshape(kept).expand(in_shape).contiguous()};
  });
  return out;
}

Tensor mean(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  check_float(a, "mean");
  ReducePlan p = plan_reduce(a, dims, keepdim, "mean");
  LT_CHECK(p.count > 0, "mean: reducing over an empty dimension of shape ", shape_str(a.shape()));
  return mul(sum(a, dims, keepdim), 1.0 / static_cast<double>(p.count));
}

Tensor amax(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  check_float(a, "amax");
  ReducePlan p = plan_reduce(a, dims, keepdim, "amax");
  LT_CHECK(p.count > 0, "amax: reducing over an empty dimension of shape ", shape_str(a.shape()));
  Tensor kept = reduce_raw(kernels::ReduceOp::max, a, p);
  Tensor out = kept.reshape(p.out_shape);
  Tensor ad = a.detach(), md = kept.detach();
  ReducePlan plan = p;
  record("amax", {a}, {out}, [ad, md, plan](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    // gradient shared evenly among the maxima, like torch.amax
    Tensor is_max = eq(ad, md);
    Tensor ties = reduce_raw(kernels::ReduceOp::sum, is_max, plan);
    return {mul(is_max, div(g[0].reshape(plan.kept_shape), ties))};
  }, {ad, md});
  return out;
}

Tensor logsumexp(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  check_float(a, "logsumexp");
  Tensor m;
  {
    NoGradGuard guard;
    m = amax(a, dims, true);
    // rows that are all -inf: shift by 0 instead of -inf so the result is -inf, not NaN
    Tensor ninf = Tensor::full({}, -std::numeric_limits<double>::infinity(), a.dtype(), a.device());
    m = where(eq(m, ninf), Tensor::zeros({}, a.dtype(), a.device()), m);
  }
  Tensor out = add(log(sum(exp(sub(a, m)), dims, true)), m);
  if (!keepdim) {
    ReducePlan p = plan_reduce(a, dims, keepdim, "logsumexp");
    out = out.reshape(p.out_shape);
  }
  return out;
}

}  // namespace longtape
