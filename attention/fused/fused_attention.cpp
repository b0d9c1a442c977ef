#include "attention/fused/fused_attention.h"

#include <cmath>
#include <deque>
#include <limits>
#include <mutex>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/backend_options.h"
#include "tensor/capture_retain.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::attention {

fused::Strides strides_of(const Tensor& x) { return {x.strides()[0], x.strides()[1], x.strides()[2]}; }

DType fused_lse_dtype(DType input) { return input == DType::f64 ? DType::f64 : DType::f32; }

AttentionOutput attach_forward_outputs(fused::Problem& p, Device device) {
  AttentionOutput r{Tensor::empty({p.batch, p.seq_q, p.heads, p.head_dim}, p.dtype, device),
                    Tensor::empty({p.batch, p.heads, p.seq_q}, fused_lse_dtype(p.dtype), device)};
  p.out = r.out.raw_data();
  p.out_stride = strides_of(r.out);
  p.lse = r.lse.raw_data();
  return r;
}

GradientOutputs attach_gradient_outputs(fused::BackwardProblem& bp, DType dtype, Device device) {
  const fused::Problem& p = bp.forward;
  GradientOutputs g{Tensor::empty({p.batch, p.seq_q, p.heads, p.head_dim}, dtype, device),
                    Tensor::empty({p.batch, p.seq_k, p.heads, p.head_dim}, dtype, device),
                    Tensor::empty({p.batch, p.seq_k, p.heads, p.head_dim}, dtype, device)};
  bp.dq = g.dq.raw_data();
  bp.dk = g.dk.raw_data();
  bp.dv = g.dv.raw_data();
  bp.dq_stride = strides_of(g.dq);
  bp.dk_stride = strides_of(g.dk);
  bp.dv_stride = strides_of(g.dv);
  return g;
}

namespace {

using fused::BackwardProblem;
using fused::Problem;

// The kernels read rows with a contiguous last dim; anything else is copied once.
Tensor rows_ready(const Tensor& x) { return x.strides().back() == 1 ? x : x.contiguous(); }

// Block lists in CSR form (forward lists and their transpose), int32, on the inputs' device.
struct BlockCsr {
  Tensor row_begin, col_index, col_begin, row_index;
  int64_t nqb = 0, nkb = 0;
};

struct HostCsr {
  std::vector<int32_t> row_begin, col_index, col_begin, row_index;
};

HostCsr host_csr(const std::vector<BlockLists>& lists, int64_t nqb, int64_t nkb) {
  HostCsr c;
  for (const BlockLists& list : lists) {
    LT_CHECK(static_cast<int64_t>(list.size()) == nqb, "fused attention: a block list must have ", nqb,
             " query blocks, got ", list.size());
    std::vector<std::vector<int32_t>> by_key(static_cast<size_t>(nkb));
    for (int64_t I = 0; I < nqb; ++I) {
      c.row_begin.push_back(static_cast<int32_t>(c.col_index.size()));
      for (int64_t J : list[static_cast<size_t>(I)]) {
        LT_CHECK(J >= 0 && J < nkb, "fused attention: key block ", J, " of query block ", I, " is outside [0, ", nkb,
                 ")");
        c.col_index.push_back(static_cast<int32_t>(J));
        by_key[static_cast<size_t>(J)].push_back(static_cast<int32_t>(I));
      }
    }
    c.row_begin.push_back(static_cast<int32_t>(c.col_index.size()));
    for (const auto& rows : by_key) {
      c.col_begin.push_back(static_cast<int32_t>(c.row_index.size()));
      c.row_index.insert(c.row_index.end(), rows.begin(), rows.end());
    }
    c.col_begin.push_back(static_cast<int32_t>(c.row_index.size()));
  }
  return c;
}

BlockCsr upload(HostCsr c, int64_t nqb, int64_t nkb, Device device) {
  auto tensor = [&](std::vector<int32_t>& values) {
    if (values.empty()) values.push_back(0);  // a valid pointer even with no active pair
    return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}).to(device);
  };
  return {tensor(c.row_begin), tensor(c.col_index), tensor(c.col_begin), tensor(c.row_index), nqb, nkb};
}

// Device copies of the most recently used block lists, found by the identity of the (immutable)
// list object: a layer's fixed pattern is converted and uploaded once instead of on every call (an
// upload from pageable memory waits until the stream has drained, and the conversion is host time
// during which the GPU may run dry).
BlockCsr device_csr(const std::shared_ptr<const std::vector<BlockLists>>& lists, int64_t nqb, int64_t nkb,
                    Device device) {
  if (!device.is_cuda()) return upload(host_csr(*lists, nqb, nkb), nqb, nkb, device);
  struct Entry {
    Device device;
    std::weak_ptr<const std::vector<BlockLists>> lists;
    BlockCsr csr;
  };
  constexpr size_t kEntries = 8;
  static std::mutex mutex;
  // Most recent first; never destroyed, so no device tensor outlives the CUDA runtime at exit.
  static auto& cache = *new std::deque<Entry>();
  std::lock_guard<std::mutex> lock(mutex);
  // A graph captured now reads these tables on every replay, after the cache may have dropped them.
  const auto retained = [](const BlockCsr& csr) {
    for (const Tensor* t : {&csr.row_begin, &csr.col_index, &csr.col_begin, &csr.row_index}) retain_during_capture(*t);
    return csr;
  };
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->device == device && it->csr.nqb == nqb && it->csr.nkb == nkb && it->lists.lock() == lists) {
      Entry hit = std::move(*it);
      cache.erase(it);
      cache.push_front(std::move(hit));
      return retained(cache.front().csr);
    }
  }
  BlockCsr csr = upload(host_csr(*lists, nqb, nkb), nqb, nkb, device);
  cache.push_front({device, lists, csr});
  if (cache.size() > kEntries) cache.pop_back();
  return retained(csr);
}

struct Inputs {
  Tensor q, k, v, bias;
};

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  LT_CHECK(q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
           "fused attention: q, k, v must be 4-d (batch, length, heads, head_dim), got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
           "fused attention: q, k, v must share one floating dtype, got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
  LT_CHECK(k.device() == q.device() && v.device() == q.device(),
           "fused attention: q, k, v must be on one device, got q ", describe_tensor(q), ", k ", describe_tensor(k),
           ", v ", describe_tensor(v));
  LT_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(2) == q.size(2) &&
               k.size(3) == q.size(3) && v.size(3) == q.size(3) && v.size(1) == k.size(1),
           "fused attention: q (B, Nq, H, D), k and v (B, Nk, H, D) must agree, got q ", describe_tensor(q), ", k ",
           describe_tensor(k), ", v ", describe_tensor(v));
}

}  // namespace

// The problem of q, k, v and the key set, without output pointers.
Problem describe_problem(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                         const CoreOptions& options) {
  Problem p;
  p.dtype = q.dtype();
  p.batch = q.size(0);
  p.seq_q = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.seq_k = k.size(1);
  p.scale = options.scale;
  p.causal = options.causal;
  p.key_set = keys.kind;
  p.q = q.raw_data();
  p.k = k.raw_data();
  p.v = v.raw_data();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  // The outputs are allocated contiguous (B, Nq, H, D).
  p.out_stride = {p.seq_q * p.heads * p.head_dim, p.heads * p.head_dim, p.head_dim};
  if (keys.kind == fused::KeySet::dilated) {
    const int G = static_cast<int>(keys.branches.size());
    LT_CHECK(G >= 1 && G <= fused::kMaxBranches, "fused attention: expected 1 to ", fused::kMaxBranches,
             " dilated branches, got ", G);
    LT_CHECK(p.heads <= fused::kMaxHeads, "fused attention: at most ", fused::kMaxHeads, " heads, got ", p.heads);
    validate_branches(keys.branches);
    auto& d = p.dilated;
    d.num_branches = G;
    d.mixing = keys.mixing;
    d.head_offset = keys.head_offset;
    const int64_t n = std::max(p.seq_q, p.seq_k);
    for (int i = 0; i < G; ++i) {
      d.segment[i] = std::max<int64_t>(1, effective_segment(n, keys.branches[static_cast<size_t>(i)].segment));
      d.dilation[i] = keys.branches[static_cast<size_t>(i)].dilation;
    }
    if (keys.mixing == fused::BranchMixing::head_groups) {
      const int total = static_cast<int>(keys.total_heads > 0 ? keys.total_heads : p.heads);
      for (int64_t h = 0; h < p.heads; ++h) {
        const int g = head_group_of(static_cast<int>(keys.head_offset + h), total, G);
        d.branch_of_head[h] = static_cast<int8_t>(g);
        d.offset_of_head[h] = static_cast<int32_t>(g % d.dilation[g]);
      }
    }
  } else if (keys.kind == fused::KeySet::blocks) {
    LT_CHECK(keys.block_size > 0, "fused attention: block_size must be > 0, got ", keys.block_size);
    LT_CHECK(keys.block_lists != nullptr, "fused attention: block lists are required for a block key set");
    const int64_t lists = static_cast<int64_t>(keys.block_lists->size());
    LT_CHECK(lists == 1 || lists == p.heads || lists == p.batch * p.heads,
             "fused attention: expected 1, H = ", p.heads, " or B*H = ", p.batch * p.heads, " block lists, got ", lists);
    p.blocks.block_size = keys.block_size;
    p.blocks.num_query_blocks = num_blocks_for(p.seq_q, keys.block_size);
    p.blocks.num_key_blocks = num_blocks_for(p.seq_k, keys.block_size);
    p.blocks.num_lists = lists;
  }
  return p;
}

Impl parse_impl(const std::string& text) {
  if (text == "auto") return Impl::automatic;
  if (text == "fused") return Impl::fused;
  if (text == "composed") return Impl::composed;
  LT_CHECK(false, "attention impl must be auto, fused or composed, got \"", text, "\"");
  return Impl::automatic;
}

std::string impl_name(Impl impl) {
  switch (impl) {
    case Impl::automatic: return "auto";
    case Impl::fused: return "fused";
    case Impl::composed: return "composed";
  }
  return "auto";
}

CoreOptions core_options(const AttentionConfig& config, bool training) {
  CoreOptions core;
  core.scale = config.scale();
  core.causal = config.causal;
  core.dropout = training ? config.dropout : 0.0;
  core.impl = parse_impl(config.impl);
  return core;
}

std::string compute_precision(fused::Backend backend, DType dtype) {
  if (dtype == DType::f64) return "f64";
  if (backend == fused::Backend::cuda_fused && dtype == DType::f32) return "f32 exact (CUDA-core FMA, no TF32)";
  if (backend == fused::Backend::cuda_fused) return detail::concat(dtype_name(dtype), " tensor cores, f32 accumulation");
  if (is_half_precision(dtype)) return detail::concat("f32 (", dtype_name(dtype), " inputs upcast)");
  if (backend == fused::Backend::composed && allow_tf32()) return "tf32 matmuls, f32 softmax";
  return "f32";
}

fused::Selection select_core(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                             const CoreOptions& options) {
  fused::Selection none;
  if (options.impl == Impl::composed) {
    none.reason = "impl = composed was asked for";
    return none;
  }
  check_inputs(q, k, v);
  // Problems the fixed-size kernel parameters cannot describe run composed.
  if (keys.kind == fused::KeySet::dilated &&
      (keys.branches.size() > static_cast<size_t>(fused::kMaxBranches) || q.size(2) > fused::kMaxHeads)) {
    none.reason = detail::concat("the fused kernels take at most ", fused::kMaxBranches, " dilated branches and ",
                                 fused::kMaxHeads, " heads, got ", keys.branches.size(), " and ", q.size(2));
    return none;
  }
  Problem p = describe_problem(q, k, v, keys, options);
  if (keys.kind == fused::KeySet::blocks && keys.block_bias.defined()) p.blocks.bias = keys.block_bias.raw_data();
  // Inputs whose last dim is strided are copied before the kernel, which makes them contiguous.
  if (q.strides().back() != 1) p.q = nullptr, p.q_stride = {0, 0, 0};
  if (k.strides().back() != 1) p.k = nullptr, p.k_stride = {0, 0, 0};
  if (v.strides().back() != 1) p.v = nullptr, p.v_stride = {0, 0, 0};
  return fused::select_backend(p, q.device(), options.dropout);
}

AttentionOutput fused_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const CoreKeys& keys,
                                const CoreOptions& options) {
  check_inputs(q_in, k_in, v_in);
  const Tensor q = rows_ready(q_in), k = rows_ready(k_in), v = rows_ready(v_in);
  Problem p = describe_problem(q, k, v, keys, options);
  const Device device = q.device();

  BlockCsr csr;
  Tensor bias;
  if (keys.kind == fused::KeySet::blocks) {
    csr = device_csr(keys.block_lists, p.blocks.num_query_blocks, p.blocks.num_key_blocks, device);
    p.blocks.row_begin = csr.row_begin.data<int32_t>();
    p.blocks.col_index = csr.col_index.data<int32_t>();
    p.blocks.col_begin = csr.col_begin.data<int32_t>();
    p.blocks.row_index = csr.row_index.data<int32_t>();
    if (keys.block_bias.defined()) {
      const Shape want{p.batch, p.heads, p.blocks.num_query_blocks, p.blocks.num_key_blocks};
      LT_CHECK(keys.block_bias.shape() == want && keys.block_bias.device() == device,
               "fused attention: block_bias must be (B, H, nq_blocks, nk_blocks) = ", shape_str(want), " on ",
               device.str(), ", got ", describe_tensor(keys.block_bias));
      bias = keys.block_bias.detach().to(fused_lse_dtype(q.dtype())).contiguous();
      p.blocks.bias = bias.raw_data();
    }
  }
  const fused::Selection selection = fused::select_backend(p, device, options.dropout);
  LT_CHECK(selection.fused(), "fused attention cannot run this problem: ", selection.reason);

  const auto [out, lse] = attach_forward_outputs(p, device);
  const bool on_cuda = selection.backend == fused::Backend::cuda_fused;
  std::vector<Tensor> inputs{q_in, k_in, v_in};
  const bool bias_needs_grad = keys.block_bias.defined() && keys.block_bias.requires_grad();
  if (bias_needs_grad) inputs.push_back(keys.block_bias);
  const bool recording = autograd::any_requires_grad(inputs);
  // bf16 and f16 outputs keep their rounding residual for the backward's rowsum(dO * O).
  Tensor residual;
  if (recording && is_half_precision(q.dtype())) {
    residual = Tensor::empty(out.shape(), out.dtype(), device);
    p.out_residual = residual.raw_data();
  }
  if (on_cuda)
    fused::cuda_forward(p);
  else
    fused::cpu_forward(p);

  if (recording) {
    const Tensor qd = q.detach(), kd = k.detach(), vd = v.detach(), od = out.detach(), ld = lse.detach();
    const Tensor bias_in = keys.block_bias;
    autograd::record(
        "fused_attention", inputs, {out, lse},
        [p, qd, kd, vd, od, ld, residual, csr, bias, bias_needs_grad, bias_in, on_cuda](const std::vector<Tensor>& grads) {
          BackwardProblem bp;
          bp.forward = p;
          bp.deterministic = deterministic_algorithms();
          // dO is read at its row strides, as q, k and v are (a head slice needs no copy).
          const Tensor dout = grads[0].defined() ? rows_ready(grads[0]) : Tensor::zeros(od.shape(), od.dtype(), od.device());
          const Tensor dlse = grads[1].defined() ? grads[1].contiguous() : Tensor();
          bp.dout = dout.raw_data();
          bp.dout_stride = strides_of(dout);
          bp.dlse = dlse.defined() ? dlse.raw_data() : nullptr;
          auto [dq, dk, dv] = attach_gradient_outputs(bp, qd.dtype(), qd.device());
          Tensor dbias;
          if (bias_needs_grad) {
            dbias = Tensor::empty(bias.shape(), bias.dtype(), bias.device());
            bp.dbias = dbias.raw_data();
          }
          if (on_cuda)
            fused::cuda_backward(bp);
          else
            fused::cpu_backward(bp);
          std::vector<Tensor> result{dq, dk, dv};
          if (bias_needs_grad) result.push_back(dbias.to(bias_in.dtype()));
          return result;
        },
        {qd, kd, vd, od, ld, residual, bias});  // the backward refuses these if modified in place
  }
  return {out, lse};
}

AttentionOutput attention_core(const Tensor& q, const Tensor& k, const Tensor& v, const CoreKeys& keys,
                               const CoreOptions& options, const std::function<AttentionOutput()>& composed,
                               CoreRun& run) {
  const fused::Selection selection = select_core(q, k, v, keys, options);
  if (selection.fused()) {
    run = {fused::backend_name(selection.backend), compute_precision(selection.backend, q.dtype())};
    return fused_attention(q, k, v, keys, options);
  }
  LT_CHECK(options.impl != Impl::fused, "attention impl = fused cannot run this problem: ", selection.reason);
  run = {fused::backend_name(fused::Backend::composed), compute_precision(fused::Backend::composed, q.dtype())};
  return composed();
}

}  // namespace longtape::attention
