// Layer norm with a bf16 result and layer_norm_residual (one node handing its input on as the
// residual branch, whose gradient the layer-norm backward kernel adds): against their composed
// forms (layer_norm then cast; layer_norm plus the identity's gradient), float64 central
// differences, and on CUDA (skipped without a GPU) against a float64 reference and the composed
// path on every kernel path (one warp per row, one block per row with and without parameters).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/node.h"
#include "nn/layers.h"
#include "support/device_parity.h"
#include "support/test_utils.h"
#include "tensor/ops.h"

using namespace longtape;
using longtape::testing::normwise_rel_err;

namespace {

// Random values, never zeros: N(shift, scale^2).
Tensor random_values(const Shape& shape, DType dtype, double scale = 1.0, double shift = 0.0) {
  return add(mul(Tensor::randn(shape, dtype), scale), shift);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  REQUIRE(x.size() == y.size());
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

Tensor leaf(const Tensor& t) { return t.detach().clone().requires_grad_(); }

}  // namespace

TEST_CASE("layer_norm writes bf16 directly: the same values as layer_norm then cast, gradients in f32") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Tensor x = random_values({3, 5, 48}, DType::f32, 2.0, 0.5), w = random_values({48}, DType::f32);
  const Tensor b = random_values({48}, DType::f32), gy = random_values({3, 5, 48}, DType::f32);
  const Tensor gy_bf16 = cast(gy, DType::bf16);

  Tensor xf = leaf(x), wf = leaf(w), bf = leaf(b);
  Tensor fused = layer_norm(xf, wf, bf, 1e-5, DType::bf16);
  CHECK(fused.dtype() == DType::bf16);
  CHECK(fused.grad_fn()->op_name == "layer_norm");
  const Tensor composed = cast(layer_norm(x, w, b, 1e-5), DType::bf16);
  CHECK(max_abs_diff(fused, composed) == 0.0);  // same f32 value, rounded once

  // The bf16 gradient is read as such; the composed path widens it to f32 first.
  const auto g_fused = autograd::grad({fused}, {xf, wf, bf}, {gy_bf16});
  Tensor xc = leaf(x), wc = leaf(w), bc = leaf(b);
  const auto g_composed = autograd::grad({layer_norm(xc, wc, bc, 1e-5)}, {xc, wc, bc}, {cast(gy_bf16, DType::f32)});
  for (size_t i = 0; i < 3; ++i) {
    CHECK(g_fused[i].dtype() == DType::f32);
    CHECK(normwise_rel_err(g_fused[i], g_composed[i]) < 1e-6);
  }
  // An f32 gradient arriving at the bf16 output is read too.
  Tensor xg = leaf(x), wg = leaf(w), bg = leaf(b);
  const auto g_f32 = autograd::grad({layer_norm(xg, wg, bg, 1e-5, DType::bf16)}, {xg, wg, bg}, {gy});
  Tensor xr = leaf(x), wr = leaf(w), br = leaf(b);
  const auto g_ref = autograd::grad({layer_norm(xr, wr, br, 1e-5)}, {xr, wr, br}, {gy});
  for (size_t i = 0; i < 3; ++i) CHECK(normwise_rel_err(g_f32[i], g_ref[i]) < 1e-6);

  // The default keeps x's dtype, and the module forwards the choice.
  CHECK(layer_norm(x, w, b).dtype() == DType::f32);
  nn::LayerNorm module(48);
  CHECK(module.forward(x, DType::bf16).dtype() == DType::bf16);
  CHECK(max_abs_diff(module.forward(x, DType::bf16), cast(module.forward(x), DType::bf16)) == 0.0);
}

TEST_CASE("layer_norm_residual is one node; the residual aliases x; gradients match the composed form") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Tensor x = random_values({4, 3, 17}, DType::f64, 1.5, 0.7), w = random_values({17}, DType::f64);
  const Tensor b = random_values({17}, DType::f64);
  const Tensor g_res = random_values({4, 3, 17}, DType::f64), g_y = random_values({4, 3, 17}, DType::f64);

  Tensor xf = leaf(x), wf = leaf(w), bf = leaf(b);
  auto [residual, y] = layer_norm_residual(xf, wf, bf, 1e-5);
  CHECK(residual.raw_data() == xf.raw_data());  // no copy
  CHECK(residual.storage() == xf.storage());
  CHECK(residual.shape() == x.shape());
  CHECK(max_abs_diff(residual, x) == 0.0);
  CHECK(max_abs_diff(y, layer_norm(x, w, b, 1e-5)) == 0.0);
  REQUIRE(residual.grad_fn() != nullptr);
  CHECK(residual.grad_fn() == y.grad_fn());
  CHECK(y.grad_fn()->op_name == "layer_norm_residual");
  CHECK(y.grad_fn()->outputs.size() == 2);
  for (const auto& edge : y.grad_fn()->next_edges)
    CHECK(dynamic_cast<autograd::AccumulateGrad*>(edge.node.get()) != nullptr);

  // Composed: the identity's gradient plus layer_norm's.
  const auto g_fused = autograd::grad({residual, y}, {xf, wf, bf}, {g_res, g_y}, true);
  Tensor xc = leaf(x), wc = leaf(w), bc = leaf(b);
  const auto g_ln = autograd::grad({layer_norm(xc, wc, bc, 1e-5)}, {xc, wc, bc}, {g_y});
  CHECK(normwise_rel_err(g_fused[0], add(g_ln[0], g_res)) < 1e-13);
  CHECK(normwise_rel_err(g_fused[1], g_ln[1]) < 1e-13);
  CHECK(normwise_rel_err(g_fused[2], g_ln[2]) < 1e-13);

  // Either incoming gradient may be missing: then it is the layer-norm backward alone, or the identity.
  const auto only_y = y.grad_fn()->apply({Tensor(), g_y});
  CHECK(normwise_rel_err(only_y[0], g_ln[0]) < 1e-13);
  CHECK(normwise_rel_err(only_y[1], g_ln[1]) < 1e-13);
  const auto only_residual = y.grad_fn()->apply({g_res, Tensor()});
  CHECK(max_abs_diff(only_residual[0], g_res) == 0.0);
  CHECK_FALSE(only_residual[1].defined());
  CHECK_FALSE(only_residual[2].defined());

  // A pre-LN residual block h = x + f(LN(x)) through the fused op and through x + f(layer_norm(x)).
  auto block = [](const std::vector<Tensor>& in) {
    auto [res, normed] = layer_norm_residual(in[0], in[1], in[2], 1e-5);
    return add(res, mul(normed, normed));
  };
  auto block_composed = [](const std::vector<Tensor>& in) {
    Tensor normed = layer_norm(in[0], in[1], in[2], 1e-5);
    return add(in[0], mul(normed, normed));
  };
  const Tensor weights = random_values({4, 3, 17}, DType::f64);
  std::vector<Tensor> a = {leaf(x), leaf(w), leaf(b)}, c = {leaf(x), leaf(w), leaf(b)};
  sum(mul(block(a), weights)).backward();
  sum(mul(block_composed(c), weights)).backward();
  for (size_t i = 0; i < 3; ++i) CHECK(normwise_rel_err(a[i].grad(), c[i].grad()) < 1e-12);

  autograd::check_gradcheck(block, {leaf(random_values({5, 6}, DType::f64, 1.3, -0.4)),
                                    leaf(random_values({6}, DType::f64)), leaf(random_values({6}, DType::f64))});
  auto residual_times_y = [](const std::vector<Tensor>& in) {  // both outputs, no parameters
    auto [res, normed] = layer_norm_residual(in[0], Tensor(), Tensor(), 1e-5);
    return mul(res, normed);
  };
  autograd::check_gradcheck(residual_times_y, {leaf(random_values({3, 7}, DType::f64, 0.8, 0.3))});
}

TEST_CASE("layer_norm_residual with a bf16 output: bf16 and f32 gradients summed in the one backward pass") {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Tensor x = random_values({6, 40}, DType::f32, 1.7, -0.3), w = random_values({40}, DType::f32);
  const Tensor b = random_values({40}, DType::f32);
  const Tensor g_res = random_values({6, 40}, DType::f32), g_y = cast(random_values({6, 40}, DType::f32), DType::bf16);

  nn::LayerNorm module(40);
  {
    NoGradGuard guard;
    module.weight.copy_(w);
    module.bias.copy_(b);
  }
  Tensor xf = leaf(x);
  auto [residual, y] = module.forward_residual(xf, DType::bf16);
  CHECK(residual.dtype() == DType::f32);
  CHECK(y.dtype() == DType::bf16);
  CHECK(max_abs_diff(y, cast(layer_norm(x, w, b, 1e-5), DType::bf16)) == 0.0);
  const auto g = autograd::grad({residual, y}, {xf, module.weight, module.bias}, {g_res, g_y});
  Tensor xc = leaf(x), wc = leaf(w), bc = leaf(b);
  const auto g_ln = autograd::grad({layer_norm(xc, wc, bc, 1e-5)}, {xc, wc, bc}, {cast(g_y, DType::f32)});
  CHECK(g[0].dtype() == DType::f32);
  CHECK(normwise_rel_err(g[0], add(g_ln[0], g_res)) < 1e-6);
  CHECK(normwise_rel_err(g[1], g_ln[1]) < 1e-6);
  CHECK(normwise_rel_err(g[2], g_ln[2]) < 1e-6);
}

TEST_CASE("layer norm output dtypes and residual misuse are refused with clear messages") {
  const Tensor x = Tensor::randn({2, 4}), w = Tensor::randn({4});
  CHECK_THROWS_WITH_AS(layer_norm(x, w, Tensor(), 1e-5, DType::f16),
                       doctest::Contains("layer_norm: out_dtype must be the input's dtype (f32) or bf16 with f32 "
                                         "input, got f16"),
                       Error);
  CHECK_THROWS_WITH_AS(layer_norm(Tensor::randn({2, 4}, DType::f64), Tensor(), Tensor(), 1e-5, DType::bf16),
                       doctest::Contains("layer_norm: out_dtype must be the input's dtype (f64) or bf16 with f32 "
                                         "input, got bf16"),
                       Error);
  CHECK_THROWS_WITH_AS(layer_norm_residual(x, Tensor::randn({5}), Tensor()),
                       doctest::Contains("layer_norm_residual: weight must have shape [4] to match input [2, 4], "
                                         "got [5]"),
                       Error);
  CHECK_THROWS_WITH_AS(layer_norm_residual(Tensor(), w, Tensor()),
                       doctest::Contains("layer_norm_residual: input is an undefined tensor"), Error);
  // The backward reads x: writing into the residual (x's storage) makes it refuse.
  Tensor xl = leaf(x);
  auto [residual, y] = layer_norm_residual(xl, w, Tensor());
  Tensor loss = sum(mul(y, y));
  {
    NoGradGuard guard;
    residual.fill_(0.25);
  }
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("modified by an in-place operation"), Error);
}

// ---- CUDA ----

namespace {

const Device kGpu = Device::cuda(0);

struct Shapes {
  int64_t rows, cols;
  bool affine;
};

// One warp per row (100 and 384 columns), one block per row (1500 columns) with parameters (the
// fused backward) and without (the dx-only backward).
const Shapes kCudaShapes[] = {{333, 100, true}, {2048, 384, true}, {150, 1500, true}, {70, 1500, false}};

}  // namespace

TEST_CASE("layer_norm on CUDA writes bf16 no less accurately than layer_norm in f32 then cast" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  for (const Shapes& s : kCudaShapes) {
    INFO("rows " << s.rows << ", cols " << s.cols << ", affine " << s.affine);
    const Tensor x = random_values({s.rows, s.cols}, DType::f32, 2.5, 0.8);
    const Tensor w = s.affine ? random_values({s.cols}, DType::f32) : Tensor();
    const Tensor b = s.affine ? random_values({s.cols}, DType::f32) : Tensor();
    auto to64 = [](const Tensor& t) { return t.defined() ? cast(t, DType::f64) : Tensor(); };
    const Tensor ref = layer_norm(to64(x), to64(w), to64(b), 1e-5);
    auto gpu = [](const Tensor& t) { return t.defined() ? t.to(kGpu) : Tensor(); };
    testing::poison_gpu_pool();
    const Tensor fused = layer_norm(gpu(x), gpu(w), gpu(b), 1e-5, DType::bf16);
    const Tensor composed = cast(layer_norm(gpu(x), gpu(w), gpu(b), 1e-5), DType::bf16);
    CHECK(fused.dtype() == DType::bf16);
    const double err_fused = normwise_rel_err(fused.to(Device::cpu()), ref);
    const double err_composed = normwise_rel_err(composed.to(Device::cpu()), ref);
    INFO("error of the bf16 result " << err_fused << ", of f32 then cast " << err_composed);
    CHECK(std::isfinite(err_fused));
    CHECK(err_composed > 0);  // bf16 rounding is visible: the comparison below means something
    CHECK(err_fused <= 2 * err_composed);
  }
}

TEST_CASE("layer norm backward on CUDA reads a bf16 gradient and adds the residual's gradient in the same pass" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  auto gpu = [](const Tensor& t) { return t.defined() ? t.to(kGpu) : Tensor(); };
  for (const Shapes& s : kCudaShapes) {
    for (const DType out_dtype : {DType::bf16, DType::f32}) {
      INFO("rows " << s.rows << ", cols " << s.cols << ", affine " << s.affine << ", output "
                   << dtype_name(out_dtype));
      const Tensor x = random_values({s.rows, s.cols}, DType::f32, 1.9, -0.6);
      const Tensor w = s.affine ? random_values({s.cols}, DType::f32) : Tensor();
      const Tensor b = s.affine ? random_values({s.cols}, DType::f32) : Tensor();
      const Tensor g_res = random_values({s.rows, s.cols}, DType::f32);
      const Tensor g_y = cast(random_values({s.rows, s.cols}, DType::f32), out_dtype);

      testing::poison_gpu_pool();
      std::vector<Tensor> in = {leaf(gpu(x))};
      if (s.affine) {
        in.push_back(leaf(gpu(w)));
        in.push_back(leaf(gpu(b)));
      }
      const Tensor wg = s.affine ? in[1] : Tensor(), bg = s.affine ? in[2] : Tensor();
      auto [residual, y] = layer_norm_residual(in[0], wg, bg, 1e-5, out_dtype);
      CHECK(residual.raw_data() == in[0].raw_data());
      CHECK(y.dtype() == out_dtype);
      const auto g = autograd::grad({residual, y}, in, {gpu(g_res), gpu(g_y)}, true);

      // Composed on the same device: f32 layer norm fed the f32-widened gradient, plus the identity's.
      std::vector<Tensor> in_c;
      for (const Tensor& t : in) in_c.push_back(leaf(t));
      Tensor y_c = layer_norm(in_c[0], s.affine ? in_c[1] : Tensor(), s.affine ? in_c[2] : Tensor(), 1e-5);
      const auto g_c = autograd::grad({y_c}, in_c, {gpu(cast(g_y, DType::f32))});
      const double tol = testing::dtype_tolerance(DType::f32, s.cols);
      CHECK(normwise_rel_err(g[0].to(Device::cpu()), add(g_c[0], gpu(g_res)).to(Device::cpu())) < tol);
      if (s.affine) {
        const double tol_params = testing::dtype_tolerance(DType::f32, s.rows);
        CHECK(normwise_rel_err(g[1].to(Device::cpu()), g_c[1].to(Device::cpu())) < tol_params);
        CHECK(normwise_rel_err(g[2].to(Device::cpu()), g_c[2].to(Device::cpu())) < tol_params);
      }
      // The layer-norm gradient alone (no residual gradient), and the identity alone.
      REQUIRE(y.grad_fn() != nullptr);
      const auto only_y = y.grad_fn()->apply({Tensor(), gpu(g_y)});
      REQUIRE(only_y.size() == 3);
      CHECK(normwise_rel_err(only_y[0].to(Device::cpu()), g_c[0].to(Device::cpu())) < tol);
      const auto only_residual = y.grad_fn()->apply({gpu(g_res), Tensor()});
      CHECK(max_abs_diff(only_residual[0].to(Device::cpu()), g_res) == 0.0);
    }
  }
}
