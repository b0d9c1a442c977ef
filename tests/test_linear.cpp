// The GEMM epilogues (a bias, a starting value other than the result, A's row sums), linear (one
// node for residual + x W^T + b) and gelu_mlp's residual: against the composed ops and float64
// central differences on the CPU, and on CUDA (cases skip without a GPU) against float64 references,
// with the fused bf16 path no less accurate than the composed one.
#include <doctest/doctest.h>

#include <functional>
#include <vector>

#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/node.h"
#include "support/device_parity.h"
#include "support/test_utils.h"
#include "tensor/ops.h"
#include "tensor/ops/gemm_product.h"
#include "tensor/precision.h"

using namespace longtape;
using detail::gemm_product;
using detail::ProductEpilogue;
using testing::normwise_rel_err;

namespace {

const Device kGpu = Device::cuda(0);

Tensor randn64(const Shape& shape) { return Tensor::randn(shape, DType::f64); }

// Gradients of sum(f(inputs) * w) for leaf copies of `inputs` (undefined inputs stay undefined).
std::vector<Tensor> grads_of(const std::function<Tensor(const std::vector<Tensor>&)>& f, std::vector<Tensor> inputs,
                             const Tensor& w) {
  for (Tensor& t : inputs) t = t.detach().clone().requires_grad_();
  sum(mul(f(inputs).to(w.dtype()), w)).backward();
  std::vector<Tensor> out;
  for (Tensor& t : inputs) out.push_back(t.grad());
  return out;
}

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

// The gradients of the inputs under f32/f64 math and, for f32 inputs, under bf16 autocast (empty
// for f64).
struct Gradients {
  std::vector<Tensor> exact, low;
};

// fused equals composed (output and every input's gradient, in the inputs' dtypes) to `tol`, and
// for f32 inputs again under bf16 autocast, where the CPU rounds the same operands for both.
Gradients check_same_as_composed(const Fn& fused, const Fn& composed, const std::vector<Tensor>& inputs,
                                 const Tensor& wo, double tol) {
  Gradients out;
  CHECK(normwise_rel_err(fused(inputs), composed(inputs)) < tol);
  out.exact = grads_of(fused, inputs, wo);
  const auto gc = grads_of(composed, inputs, wo);
  for (size_t i = 0; i < out.exact.size(); ++i) {
    CAPTURE(i);
    REQUIRE(out.exact[i].defined());
    CHECK(out.exact[i].dtype() == inputs[i].dtype());
    CHECK(normwise_rel_err(out.exact[i], gc[i]) < tol);
  }
  if (inputs[0].dtype() == DType::f32) {
    AutocastScope bf16(Precision::bf16);
    CHECK(normwise_rel_err(fused(inputs), composed(inputs)) < 1e-5);
    out.low = grads_of(fused, inputs, wo);
    const auto lc = grads_of(composed, inputs, wo);
    for (size_t i = 0; i < out.low.size(); ++i) CHECK(normwise_rel_err(out.low[i], lc[i]) < 1e-5);
  }
  return out;
}

Tensor composed_linear(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r) {
  Tensor y = matmul(x, w.transpose(0, 1));
  if (b.defined()) y = add(y, b);
  if (r.defined()) y = add(y, r);
  return y;
}

// Reference product with the epilogue terms, in f64 on the CPU.
Tensor reference_product(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  Tensor a64 = a.to(Device::cpu()).to(DType::f64), b64 = b.to(Device::cpu()).to(DType::f64);
  return matmul(ta ? a64.transpose(0, 1) : a64, tb ? b64.transpose(0, 1) : b64);
}

}  // namespace

TEST_CASE("gemm epilogues on the CPU: bias, a separate starting value and A's row sums, every transpose") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t m = 7, n = 5, k = 9;
  for (DType dt : {DType::f64, DType::f32})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        CAPTURE(ta);
        CAPTURE(tb);
        Tensor a = randn64(ta ? Shape{k, m} : Shape{m, k}).to(dt), b = randn64(tb ? Shape{n, k} : Shape{k, n}).to(dt);
        Tensor bias = randn64({n}).to(dt), c_in = randn64({m, n}).to(dt);
        const Tensor ref = reference_product(a, ta, b, tb);
        const double tol = dt == DType::f64 ? 1e-13 : 1e-5;
        ProductEpilogue e;
        e.bias = bias;
        e.c_in = c_in;
        const Tensor c_before = c_in.clone();
        Tensor y = gemm_product(a, ta, b, tb, e);
        CHECK(normwise_rel_err(y, add(add(ref, bias.to(DType::f64)), c_in.to(DType::f64))) < tol);
        CHECK(normwise_rel_err(c_in, c_before) == 0);  // read, not written
        // Row sums of op(A) next to the product, written into a given result and added to it.
        ProductEpilogue s;
        s.a_sums = Tensor::full({m}, 1e30, dt);
        s.into = c_in.clone();
        s.accumulate = true;
        Tensor z = gemm_product(a, ta, b, tb, s);
        CHECK(normwise_rel_err(z, add(ref, c_in.to(DType::f64))) < tol);
        Tensor a64 = a.to(DType::f64);
        CHECK(normwise_rel_err(s.a_sums, sum(ta ? a64.transpose(0, 1) : a64, {1})) < tol);
        // Both at once: the bias still arrives.
        ProductEpilogue both;
        both.bias = bias;
        both.a_sums = Tensor::empty({m}, dt);
        CHECK(normwise_rel_err(gemm_product(a, ta, b, tb, both), add(ref, bias.to(DType::f64))) < tol);
        CHECK(normwise_rel_err(both.a_sums, sum(ta ? a64.transpose(0, 1) : a64, {1})) < tol);
      }
  // An empty reduction leaves only the epilogue's terms.
  ProductEpilogue e;
  e.bias = randn64({3});
  e.c_in = randn64({2, 3});
  e.a_sums = Tensor::full({2}, 7.0, DType::f64);
  Tensor y = gemm_product(Tensor::empty({2, 0}, DType::f64), false, Tensor::empty({0, 3}, DType::f64), false, e);
  CHECK(normwise_rel_err(y, add(e.c_in, e.bias)) == 0);
  CHECK(normwise_rel_err(e.a_sums, Tensor::zeros({2}, DType::f64)) == 0);
  ProductEpilogue bad;
  bad.bias = randn64({4});
  CHECK_THROWS_WITH_AS(gemm_product(randn64({2, 3}), false, randn64({3, 5}), false, bad),
                       doctest::Contains("gemm_product: bias must be a contiguous f64 [5]"), Error);
}

TEST_CASE("linear is one node equal to matmul + bias + residual, forward and backward (f64, f32, bf16 on the CPU)") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t in = 11, out = 6;
  for (DType dt : {DType::f64, DType::f32})
    for (int variant = 0; variant < 4; ++variant) {
      CAPTURE(variant);
      const bool with_bias = variant & 1, with_residual = variant & 2;
      Tensor x = randn64({3, 4, in}).to(dt), w = randn64({out, in}).to(dt), wo = randn64({3, 4, out}).to(dt);
      Tensor b = with_bias ? randn64({out}).to(dt) : Tensor(), r = with_residual ? randn64({3, 4, out}).to(dt) : Tensor();
      std::vector<Tensor> inputs{x, w};
      if (with_bias) inputs.push_back(b);
      if (with_residual) inputs.push_back(r);
      auto pick = [&](const std::vector<Tensor>& in, bool present, size_t& at) { return present ? in[at++] : Tensor(); };
      auto fused = [&](const std::vector<Tensor>& in) {
        size_t at = 2;
        Tensor bb = pick(in, with_bias, at);
        return linear(in[0], in[1], bb, pick(in, with_residual, at));
      };
      auto composed = [&](const std::vector<Tensor>& in) {
        size_t at = 2;
        Tensor bb = pick(in, with_bias, at);
        return composed_linear(in[0], in[1], bb, pick(in, with_residual, at));
      };
      const Gradients g = check_same_as_composed(fused, composed, inputs, wo, dt == DType::f64 ? 1e-13 : 1e-5);
      // Under bf16 the weight's gradient moves away from f32's at bf16's scale.
      if (dt == DType::f32) CHECK(normwise_rel_err(g.low[1], g.exact[1]) > 1e-5);
    }
  Tensor x = randn64({5, 4}).requires_grad_(), w = randn64({3, 4}).requires_grad_(), b = randn64({3}).requires_grad_(),
         r = randn64({5, 3}).requires_grad_();
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return linear(in[0], in[1], in[2], in[3]); },
                            {x, w, b, r});
  autograd::check_gradcheck([](const std::vector<Tensor>& in) { return linear(in[0], in[1]); }, {x, w});
  Tensor y = linear(x, w, b, r);
  REQUIRE(y.grad_fn() != nullptr);
  CHECK(y.grad_fn()->op_name == "linear");
  for (const auto& edge : y.grad_fn()->next_edges)  // straight to the leaves: one node
    CHECK(dynamic_cast<autograd::AccumulateGrad*>(edge.node.get()) != nullptr);
  CHECK_THROWS_WITH_AS(linear(randn64({5, 4}), randn64({3, 5})),
                       doctest::Contains("linear: expected x (..., in) and weight (out, in), got x [5, 4] and weight [3, 5]"),
                       Error);
  CHECK_THROWS_WITH_AS(linear(randn64({5, 4}), randn64({3, 4}), randn64({4})),
                       doctest::Contains("linear: bias must be a f64 [3], got f64 [4]"), Error);
  CHECK_THROWS_WITH_AS(linear(randn64({5, 4}), randn64({3, 4}), Tensor(), randn64({5, 4})),
                       doctest::Contains("linear: residual must be a f64 [5, 3], got f64 [5, 4]"), Error);
  CHECK_THROWS_WITH_AS(linear(Tensor::randn({5, 4}), randn64({3, 4})), doctest::Contains("linear: x must be f64"),
                       Error);
  CHECK_THROWS_WITH_AS(linear(randn64({5, 4}), randn64({3, 4}), Tensor(), Tensor(), DType::f32),
                       doctest::Contains("linear: out_dtype f32 differs from x's f64"), Error);
}

TEST_CASE("gelu_mlp's residual is the output's starting value and receives the output gradient") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t E = 6, H = 16, Eo = 6;
  for (DType dt : {DType::f64, DType::f32})
    for (int64_t chunk : {0, 4}) {
      CAPTURE(chunk);
      Tensor x = randn64({2, 5, E}).to(dt), w1 = randn64({H, E}).to(dt), b1 = randn64({H}).to(dt),
             w2 = randn64({Eo, H}).to(dt), b2 = randn64({Eo}).to(dt), r = randn64({2, 5, Eo}).to(dt),
             wo = randn64({2, 5, Eo}).to(dt);
      auto fused = [&](const std::vector<Tensor>& in) {
        return gelu_mlp(in[0], in[1], in[2], in[3], in[4], GeluApprox::erf, chunk, in[5]);
      };
      auto composed = [&](const std::vector<Tensor>& in) {
        return add(in[5], add(matmul(bias_gelu(matmul(in[0], in[1].transpose(0, 1)), in[2]), in[3].transpose(0, 1)),
                              in[4]));
      };
      const std::vector<Tensor> inputs{x, w1, b1, w2, b2, r};
      check_same_as_composed(fused, composed, inputs, wo, dt == DType::f64 ? 1e-12 : 1e-5);
    }
  Tensor x = randn64({7, 3}).requires_grad_(), w1 = randn64({8, 3}).requires_grad_(),
         b1 = randn64({8}).requires_grad_(), w2 = randn64({4, 8}).requires_grad_(), r = randn64({7, 4}).requires_grad_();
  autograd::check_gradcheck(
      [](const std::vector<Tensor>& in) {
        return gelu_mlp(in[0], in[1], in[2], in[3], Tensor(), GeluApprox::tanh, 3, in[4]);
      },
      {x, w1, b1, w2, r});
  CHECK_THROWS_WITH_AS(gelu_mlp(x, w1, b1, w2, Tensor(), GeluApprox::erf, 0, randn64({7, 3})),
                       doctest::Contains("gelu_mlp: residual must be f64 [7, 4] on cpu, got f64 [7, 3]"), Error);
}

// ---- CUDA ----

namespace {

struct LinearCase {
  Tensor x, w, b, r, wo;  // f64 on the CPU
};

// y and the gradients (x, w, b, r) of sum(y * wo) on the GPU under `precision`, fused or composed,
// with the pool poisoned first so that an unwritten output shows up as NaN.
std::vector<Tensor> linear_on_gpu(const LinearCase& c, Precision precision, bool fused, DType out_dtype) {
  testing::poison_gpu_pool();
  std::vector<Tensor> in{c.x.to(DType::f32).to(kGpu), c.w.to(DType::f32).to(kGpu), c.b.to(DType::f32).to(kGpu),
                         c.r.to(out_dtype).to(kGpu)};
  for (Tensor& t : in) t = t.detach().requires_grad_();
  Tensor y;
  {
    AutocastScope scope(precision);
    y = fused ? linear(in[0], in[1], in[2], in[3], out_dtype) : composed_linear(in[0], in[1], in[2], in[3]);
  }
  sum(mul(y.to(DType::f32), c.wo.to(DType::f32).to(kGpu))).backward();
  return {y, in[0].grad(), in[1].grad(), in[2].grad(), in[3].grad()};
}

std::vector<Tensor> linear_reference(const LinearCase& c) {
  std::vector<Tensor> in{c.x, c.w, c.b, c.r};
  for (Tensor& t : in) t = t.detach().clone().requires_grad_();
  Tensor y = composed_linear(in[0], in[1], in[2], in[3]);
  sum(mul(y, c.wo)).backward();
  return {y, in[0].grad(), in[1].grad(), in[2].grad(), in[3].grad()};
}

const char* const kLinearNames[] = {"y", "dx", "dw", "db", "dresidual"};

}  // namespace

TEST_CASE("cuda: gemm epilogues (bias, starting value, A's row sums) match float64, bf16 and f32" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t m = 96, n = 80, k = 200;
  for (DType dt : {DType::f32, DType::bf16})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        CAPTURE(dtype_name(dt));
        CAPTURE(ta);
        CAPTURE(tb);
        testing::poison_gpu_pool();
        Tensor a = randn64(ta ? Shape{k, m} : Shape{m, k}), b = randn64(tb ? Shape{n, k} : Shape{k, n});
        Tensor bias = randn64({n}), c_in = randn64({m, n});
        const Tensor ag = a.to(dt).to(kGpu), bg = b.to(dt).to(kGpu);
        // The reference multiplies the operands the GPU reads (bf16-rounded) in f64.
        const Tensor ref = reference_product(ag, ta, bg, tb);
        for (bool f32_out : {false, true}) {
          if (f32_out && dt != DType::bf16) continue;
          const DType out_dtype = f32_out ? DType::f32 : dt;
          const double tol = out_dtype == DType::bf16 ? 8e-3 : 1e-5;
          ProductEpilogue e;
          e.f32_out = f32_out;
          e.bias = bias.to(DType::f32).to(kGpu);
          e.c_in = c_in.to(out_dtype).to(kGpu);
          Tensor y = gemm_product(ag, ta, bg, tb, e);
          CHECK(y.dtype() == out_dtype);
          CHECK(normwise_rel_err(y, add(add(ref, bias.to(DType::f32).to(DType::f64)),
                                        e.c_in.to(Device::cpu()).to(DType::f64))) < tol);
          ProductEpilogue s;
          s.f32_out = f32_out;
          s.a_sums = Tensor::full({m}, std::numeric_limits<double>::quiet_NaN(), DType::f32, kGpu);
          s.into = Tensor::full({m, n}, std::numeric_limits<double>::quiet_NaN(), out_dtype, kGpu);
          gemm_product(ag, ta, bg, tb, s);
          CHECK(normwise_rel_err(s.into, ref) < tol);
          Tensor a64 = ag.to(Device::cpu()).to(DType::f64);
          CHECK(normwise_rel_err(s.a_sums, sum(ta ? a64.transpose(0, 1) : a64, {1})) < 1e-5);
        }
      }
}

TEST_CASE("cuda: linear (bf16 and f32) against float64; the fused bf16 path is as accurate as the composed one" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const LinearCase c{randn64({4, 300, 384}), mul(randn64({256, 384}), 0.05), randn64({256}), randn64({4, 300, 256}),
                     randn64({4, 300, 256})};
  const std::vector<Tensor> ref = linear_reference(c);
  // f32: both paths at f32's scale.
  const std::vector<Tensor> f32 = linear_on_gpu(c, Precision::f32, true, DType::f32);
  for (size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(kLinearNames[i]);
    CHECK(f32[i].dtype() == DType::f32);
    CHECK(normwise_rel_err(f32[i], ref[i]) < 1e-5);
  }
  // bf16 with an f32 result: y, dx and dW no worse than twice the composed path's error; db sums
  // dY as the bf16 products read it, so it is within bf16's rounding of the exact sums.
  const std::vector<Tensor> fused = linear_on_gpu(c, Precision::bf16, true, DType::f32);
  const std::vector<Tensor> composed = linear_on_gpu(c, Precision::bf16, false, DType::f32);
  const std::vector<Tensor> again = linear_on_gpu(c, Precision::bf16, true, DType::f32);
  for (size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(kLinearNames[i]);
    CHECK(testing::bitwise_equal(fused[i], again[i]));  // the same kernels and workspace each run
  }
  for (size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(kLinearNames[i]);
    const double ef = normwise_rel_err(fused[i], ref[i]), ec = normwise_rel_err(composed[i], ref[i]);
    INFO("fused " << ef << ", composed " << ec);
    CHECK(fused[i].dtype() == DType::f32);
    if (i == 3) CHECK(ef < 1e-2);
    else CHECK(ef <= 2 * ec + 1e-7);
  }
  // bf16 result (and bf16 residual): at bf16's scale; the residual's gradient is bf16 like it.
  const std::vector<Tensor> low = linear_on_gpu(c, Precision::bf16, true, DType::bf16);
  CHECK(low[0].dtype() == DType::bf16);
  CHECK(low[4].dtype() == DType::bf16);
  for (size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(kLinearNames[i]);
    CHECK(normwise_rel_err(low[i], ref[i]) < 2e-2);
  }
  // A bf16 x (e.g. the attention core's output) enters as is; its gradient comes back bf16.
  {
    AutocastScope scope(Precision::bf16);
    Tensor xb = c.x.to(DType::bf16).to(kGpu).requires_grad_(), w = c.w.to(DType::f32).to(kGpu).requires_grad_();
    Tensor y = linear(xb, w, Tensor(), Tensor(), DType::f32);
    CHECK(y.dtype() == DType::f32);
    sum(mul(y, c.wo.to(DType::f32).to(kGpu))).backward();
    CHECK(xb.grad().dtype() == DType::bf16);
    CHECK(w.grad().dtype() == DType::f32);
    const Tensor x64 = xb.detach().to(Device::cpu()).to(DType::f64);
    CHECK(normwise_rel_err(y, matmul(x64, c.w.transpose(0, 1))) < 1e-2);
    CHECK(normwise_rel_err(w.grad(), matmul(c.wo.reshape({-1, 256}).transpose(0, 1), x64.reshape({-1, 384}))) < 1e-2);
  }
}

TEST_CASE("cuda: gelu_mlp with a residual (bf16 and f32) against float64; fused bf16 as accurate as composed" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t E = 128, H = 512, rows = 1000;
  const std::vector<Tensor> base{randn64({rows, E}),      mul(randn64({H, E}), 0.09), randn64({H}),
                                 mul(randn64({E, H}), 0.05), randn64({E}),              randn64({rows, E})};
  const Tensor wo = randn64({rows, E});
  auto composed = [](const std::vector<Tensor>& in) {
    return add(in[5], add(matmul(bias_gelu(matmul(in[0], in[1].transpose(0, 1)), in[2]), in[3].transpose(0, 1)), in[4]));
  };
  auto run = [&](Precision precision, bool fused, int64_t chunk) {
    testing::poison_gpu_pool();
    std::vector<Tensor> in;
    for (const Tensor& t : base) in.push_back(t.to(DType::f32).to(kGpu).requires_grad_());
    Tensor y;
    {
      AutocastScope scope(precision);
      y = fused ? gelu_mlp(in[0], in[1], in[2], in[3], in[4], GeluApprox::erf, chunk, in[5]) : composed(in);
    }
    sum(mul(y, wo.to(DType::f32).to(kGpu))).backward();
    std::vector<Tensor> out{y};
    for (const Tensor& t : in) out.push_back(t.grad());
    return out;
  };
  std::vector<Tensor> ref;
  {
    std::vector<Tensor> in;
    for (const Tensor& t : base) in.push_back(t.clone().requires_grad_());
    ref.push_back(composed(in));
    sum(mul(ref[0], wo)).backward();
    for (const Tensor& t : in) ref.push_back(t.grad());
  }
  const char* names[] = {"y", "dx", "dw1", "db1", "dw2", "db2", "dresidual"};
  for (int64_t chunk : {0, 300}) {  // one chunk, and four with a short last one
    CAPTURE(chunk);
    const auto f32 = run(Precision::f32, true, chunk);
    for (size_t i = 0; i < ref.size(); ++i) {
      CAPTURE(names[i]);
      CHECK(normwise_rel_err(f32[i], ref[i]) < 1e-5);
    }
    const auto fused = run(Precision::bf16, true, chunk), comp = run(Precision::bf16, false, chunk);
    for (size_t i = 0; i < ref.size(); ++i) {
      CAPTURE(names[i]);
      const double ef = normwise_rel_err(fused[i], ref[i]), ec = normwise_rel_err(comp[i], ref[i]);
      INFO("fused " << ef << ", composed " << ec);
      CHECK(fused[i].dtype() == DType::f32);
      // The bias gradients sum the bf16 operands of the weight-gradient products.
      if (i == 3 || i == 5) CHECK(ef < 1e-2);
      else CHECK(ef <= 2 * ec + 1e-7);
    }
  }
}
