// CUDA backend against the CPU backend: every op forward and backward, in f32 and bf16 (cast on
// the device), with the CPU computing a float64 reference from the same (rounded) values.
// Tolerances are normwise relative errors derived from the dtype and the reduction length.
// Also: same seed => same random numbers and dropout masks on both devices, and the same GPU
// computation run twice gives bitwise equal results. Every GPU test skips when no GPU is visible.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "tensor/backend_options.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

const Device kGpu = Device::cuda(0);
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Fills the caching pool with NaN-filled blocks of many sizes and frees them, so outputs that a
// kernel forgets to write show up as NaN instead of passing with stale or zero memory.
void poison_gpu_pool() {
  std::vector<Tensor> blocks;
  for (int64_t n : {64, 1000, 16000, 250000, 4000000})
    for (int k = 0; k < 3; ++k) blocks.push_back(Tensor::full({n}, kNaN, DType::f32, kGpu));
}

// Normwise relative tolerance for outputs that each sum about `len` terms.
double tolerance(DType dt, int64_t len) {
  const double growth = std::sqrt(static_cast<double>(std::max<int64_t>(len, 1)));
  switch (dt) {
    case DType::f32: return 1e-5 * growth;
    case DType::bf16: return 3e-2;  // 8-bit mantissa: each rounding is up to 4e-3; f32 accumulation
    default: return 1e-12 * growth;
  }
}

// ||got - ref|| / ||ref|| on the host in f64. A NaN or inf that the reference does not have
// (at the same place) is an infinite error.
double rel_err(const Tensor& got, const Tensor& ref) {
  const std::vector<double> g = got.to_vector(), r = ref.to_vector();
  REQUIRE(g.size() == r.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (!std::isfinite(r[i]) || !std::isfinite(g[i])) {
      const bool same = (std::isnan(r[i]) && std::isnan(g[i])) || r[i] == g[i];
      if (!same) return std::numeric_limits<double>::infinity();
      continue;
    }
    num += (g[i] - r[i]) * (g[i] - r[i]);
    den += r[i] * r[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

void check_close(const Tensor& got, const Tensor& ref, double tol, const std::string& what) {
  REQUIRE(got.defined());
  REQUIRE(ref.defined());
  INFO(what);
  CHECK(got.shape() == ref.shape());
  const double err = rel_err(got, ref);
  INFO("relative error ", err, " vs tolerance ", tol);
  CHECK(err <= tol);
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  for (size_t i = 0; i < x.size(); ++i)
    if (!(x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i])))) return false;
  return true;
}

using ParityFn = std::function<Tensor(const std::vector<Tensor>& inputs)>;

struct ParityCase {
  std::string name;
  std::vector<Tensor> inputs;  // CPU f64 values (floating inputs get gradients) or integer indices
  ParityFn fn;
  int64_t len = 1;       // terms summed per forward output (tolerance)
  int64_t grad_len = 0;  // terms summed per gradient element; 0 = len
  bool backward = true;
  double tol = 0;  // overrides the derived tolerance when set
};

// Runs fn on the GPU with the floating inputs cast to `dt` there, and on the CPU in f64 with the
// very same (rounded) values; compares the outputs, then the input gradients for one random
// upstream gradient (rounded the same way).
void check_parity(const ParityCase& c, DType dt) {
  INFO(c.name, " in ", dtype_name(dt));
  std::vector<Tensor> gpu_in, cpu_in;
  for (const Tensor& x : c.inputs) {
    if (is_floating(x.dtype())) {
      Tensor g = x.to(kGpu).to(dt).detach();
      Tensor r = g.cpu().to(DType::f64).detach();
      if (c.backward) {
        g.requires_grad_();
        r.requires_grad_();
      }
      gpu_in.push_back(g);
      cpu_in.push_back(r);
    } else {
      gpu_in.push_back(x.to(kGpu));
      cpu_in.push_back(x);
    }
  }
  Tensor yg = c.fn(gpu_in);
  Tensor yr = c.fn(cpu_in);
  CHECK(yg.device() == kGpu);
  check_close(yg, yr, c.tol > 0 ? c.tol : tolerance(dt, c.len), "forward");
  if (!c.backward) return;
  REQUIRE(yg.requires_grad());
  Tensor up = Tensor::randn(yr.shape(), DType::f64);
  Tensor up_g = up.to(kGpu).to(yg.dtype());
  Tensor up_r = up_g.cpu().to(DType::f64);
  yg.backward(up_g);
  yr.backward(up_r);
  for (size_t i = 0; i < gpu_in.size(); ++i) {
    if (!gpu_in[i].requires_grad()) continue;
    const Tensor gg = gpu_in[i].grad(), gr = cpu_in[i].grad();
    REQUIRE(gg.defined() == gr.defined());
    if (!gg.defined()) continue;
    CHECK(gg.device() == kGpu);
    const double tol = c.tol > 0 ? c.tol : tolerance(dt, c.grad_len ? c.grad_len : c.len);
    check_close(gg, gr, tol, "gradient of input " + std::to_string(i));
  }
}

void check_parity_all(const std::vector<ParityCase>& cases) {
  for (const ParityCase& c : cases) {
    check_parity(c, DType::f32);
    check_parity(c, DType::bf16);
  }
}

Tensor randn64(const Shape& s) { return Tensor::randn(s, DType::f64); }
Tensor positive64(const Shape& s) { return add(Tensor::rand(s, DType::f64), 0.5); }  // in (0.5, 1.5)

Tensor random_indices(const Shape& s, int64_t limit) {
  std::vector<double> u = Tensor::rand(s, DType::f64).to_vector();
  std::vector<int64_t> v;
  for (double x : u) v.push_back(std::min<int64_t>(limit - 1, static_cast<int64_t>(x * static_cast<double>(limit))));
  return Tensor::from_vector(v, s);
}

}  // namespace

TEST_CASE("TF32 for f32 matmuls is off by default and can be switched") {
  CHECK_FALSE(allow_tf32());
  set_allow_tf32(true);
  CHECK(allow_tf32());
  set_allow_tf32(false);
  CHECK_FALSE(allow_tf32());
}

TEST_CASE("cuda: unary ops match the CPU forward and backward, contiguous and strided" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(101);
  const Shape s{7, 33};
  std::vector<ParityCase> cases = {
      {"neg", {randn64(s)}, [](const auto& x) { return neg(x[0]); }},
      {"exp", {randn64(s)}, [](const auto& x) { return exp(x[0]); }},
      {"log", {positive64(s)}, [](const auto& x) { return log(x[0]); }},
      {"sqrt", {positive64(s)}, [](const auto& x) { return sqrt(x[0]); }},
      {"rsqrt", {positive64(s)}, [](const auto& x) { return rsqrt(x[0]); }},
      {"tanh", {randn64(s)}, [](const auto& x) { return tanh(x[0]); }},
      {"relu", {randn64(s)}, [](const auto& x) { return relu(x[0]); }},
      {"sigmoid", {randn64(s)}, [](const auto& x) { return sigmoid(x[0]); }},
      {"gelu erf", {randn64(s)}, [](const auto& x) { return gelu(x[0], GeluApprox::erf); }},
      {"gelu tanh", {randn64(s)}, [](const auto& x) { return gelu(x[0], GeluApprox::tanh); }},
      {"bias_gelu erf", {randn64(s), randn64({s.back()})}, [](const auto& x) { return bias_gelu(x[0], x[1]); }, 1,
       s[0]},
      {"bias_gelu tanh", {randn64(s), randn64({s.back()})},
       [](const auto& x) { return bias_gelu(x[0], x[1], GeluApprox::tanh); }, 1, s[0]},
      {"pow 3", {randn64(s)}, [](const auto& x) { return pow(x[0], 3.0); }},
      {"pow 0.5", {positive64(s)}, [](const auto& x) { return pow(x[0], 0.5); }},
      {"add scalar", {randn64(s)}, [](const auto& x) { return add(x[0], 1.5); }},
      {"mul scalar", {randn64(s)}, [](const auto& x) { return mul(x[0], -2.25); }},
      {"exp of a transposed view", {randn64({5, 9, 4})}, [](const auto& x) { return exp(x[0].transpose(0, 2)); }},
      {"tanh of a strided slice", {randn64({8, 20})}, [](const auto& x) { return tanh(x[0].slice(1, 1, 19, 3)); }},
  };
  check_parity_all(cases);
}

TEST_CASE("cuda: binary ops with broadcasting, comparisons and where match the CPU" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(102);
  const Shape sa{3, 1, 5}, sb{4, 5};
  std::vector<ParityCase> cases = {
      {"add", {randn64(sa), randn64(sb)}, [](const auto& x) { return add(x[0], x[1]); }, 1, 4},
      {"sub", {randn64(sa), randn64(sb)}, [](const auto& x) { return sub(x[0], x[1]); }, 1, 4},
      {"mul", {randn64(sa), randn64(sb)}, [](const auto& x) { return mul(x[0], x[1]); }, 1, 4},
      {"div", {randn64(sa), positive64(sb)}, [](const auto& x) { return div(x[0], x[1]); }, 1, 4},
      {"pow", {positive64(sa), randn64(sb)}, [](const auto& x) { return pow(x[0], x[1]); }, 1, 4},
      {"maximum", {randn64(sa), randn64(sb)}, [](const auto& x) { return maximum(x[0], x[1]); }, 1, 4},
      {"gt", {randn64(sa), randn64(sb)}, [](const auto& x) { return gt(x[0], x[1]); }, 1, 0, false},
      {"lt", {randn64(sa), randn64(sb)}, [](const auto& x) { return lt(x[0], x[1]); }, 1, 0, false},
      {"eq", {randn64(sa), randn64(sb)}, [](const auto& x) { return eq(x[0], maximum(x[0], x[1])); }, 1, 0, false},
      {"where", {randn64({3, 1, 5}), randn64({4, 5}), randn64({3, 4, 1})},
       [](const auto& x) {
         Tensor zero = Tensor::zeros({}, x[0].dtype(), x[0].device());
         return where(gt(x[0], zero), x[1], x[2]);
       },
       1, 5},
      {"masked_fill", {randn64({6, 7}), randn64({6, 7})},
       [](const auto& x) { return masked_fill(x[0], gt(x[1], Tensor::zeros({}, x[1].dtype(), x[1].device())), -3.0); }},
      {"broadcast chain on views", {randn64({6, 4}), randn64({4})},
       [](const auto& x) { return mul(add(x[0].transpose(0, 1), 1.0), x[1].unsqueeze(1)); }, 1, 6},
  };
  check_parity_all(cases);
}

TEST_CASE("cuda: casts and copies agree bit for bit with the CPU, including bf16 and integers" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(103);
  Tensor x = mul(Tensor::randn({37, 19}), 50.0);  // f32 on the CPU
  Tensor xg = x.to(kGpu);
  // f32 -> bf16 rounds to nearest even on both devices; and back is exact.
  Tensor b_cpu = x.to(DType::bf16), b_gpu = xg.to(DType::bf16);
  CHECK(b_gpu.dtype() == DType::bf16);
  CHECK(bitwise_equal(b_gpu, b_cpu));
  CHECK(bitwise_equal(b_gpu.to(DType::f32), b_cpu.to(DType::f32)));
  CHECK_FALSE(bitwise_equal(b_gpu.to(DType::f32), xg));  // rounding did happen
  // A view that starts off a 16-byte boundary (the element-wise path, not the four-wide one).
  CHECK(bitwise_equal(xg.narrow(0, 1, 36).to(DType::bf16), x.narrow(0, 1, 36).to(DType::bf16)));
  CHECK(bitwise_equal(b_gpu.narrow(0, 1, 36).to(DType::f32), b_cpu.narrow(0, 1, 36).to(DType::f32)));
  // Float -> integer truncates toward zero; integer -> float and between integer widths.
  for (DType it : {DType::i32, DType::i64}) {
    Tensor i_cpu = x.to(it), i_gpu = xg.to(it);
    CHECK(bitwise_equal(i_gpu, i_cpu));
    CHECK(bitwise_equal(i_gpu.to(DType::f64), i_cpu.to(DType::f64)));
    CHECK(bitwise_equal(i_gpu.to(DType::bf16), i_cpu.to(DType::bf16)));
    CHECK(bitwise_equal(b_gpu.to(it), b_cpu.to(it)));
  }
  CHECK(bitwise_equal(xg.to(DType::i32).to(DType::i64), x.to(DType::i32).to(DType::i64)));
  // Strided copies: permuted, sliced and broadcast sources, and copy_ into a strided destination.
  Tensor p = Tensor::randn({4, 6, 8});
  Tensor pg = p.to(kGpu);
  auto views = [](const Tensor& t) {
    return t.permute({2, 0, 1}).narrow(0, 1, 5).slice(2, 0, 6, 2).contiguous();
  };
  CHECK(views(pg).is_contiguous());
  CHECK(bitwise_equal(views(pg), views(p)));
  CHECK(bitwise_equal(p.narrow(1, 2, 3).expand({2, 4, 3, 8}).contiguous(),
                      pg.narrow(1, 2, 3).expand({2, 4, 3, 8}).contiguous()));
  Tensor dst_cpu = Tensor::zeros({8, 4}), dst_gpu = Tensor::zeros({8, 4}, DType::f32, kGpu);
  dst_cpu.transpose(0, 1).copy_(p.select(1, 3).select(1, 5).unsqueeze(1).expand({4, 8}));
  dst_gpu.transpose(0, 1).copy_(pg.select(1, 3).select(1, 5).unsqueeze(1).expand({4, 8}));
  CHECK(bitwise_equal(dst_gpu, dst_cpu));
  // copy_ converts dtypes across devices, fill_ writes every dtype.
  Tensor bf = Tensor::empty({5, 3}, DType::bf16, kGpu);
  bf.copy_(x.narrow(0, 0, 5).narrow(1, 0, 3));
  CHECK(bitwise_equal(bf, x.narrow(0, 0, 5).narrow(1, 0, 3).to(DType::bf16)));
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64}) {
    Tensor f = Tensor::empty({3, 7}, dt, kGpu);
    f.transpose(0, 1).fill_(-2.75);
    Tensor ref = Tensor::full({3, 7}, -2.75, dt);
    CHECK(bitwise_equal(f, ref));
  }
}

TEST_CASE("cuda: sum, mean, amax and logsumexp over dim sets match the CPU" * doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(104);
  const Shape s{6, 37, 129};
  std::vector<ParityCase> cases = {
      {"sum all", {randn64(s)}, [](const auto& x) { return sum(x[0]); }, 6 * 37 * 129},
      {"sum dim 0", {randn64(s)}, [](const auto& x) { return sum(x[0], {0}); }, 6},
      {"sum dim 1", {randn64(s)}, [](const auto& x) { return sum(x[0], {1}); }, 37},
      {"sum dim -1", {randn64(s)}, [](const auto& x) { return sum(x[0], {-1}); }, 129},
      {"sum dims 0,2 keepdim", {randn64(s)}, [](const auto& x) { return sum(x[0], {0, 2}, true); }, 6 * 129},
      {"mean dims 1,2", {randn64(s)}, [](const auto& x) { return mean(x[0], {1, 2}); }, 37 * 129},
      {"amax dim -1", {randn64(s)}, [](const auto& x) { return amax(x[0], {-1}); }},
      {"amax dims 0,1", {randn64(s)}, [](const auto& x) { return amax(x[0], {0, 1}); }},
      {"logsumexp dim -1", {randn64(s)}, [](const auto& x) { return logsumexp(x[0], {-1}); }, 129},
      {"logsumexp dims 0,1 keepdim", {randn64(s)}, [](const auto& x) { return logsumexp(x[0], {0, 1}, true); }, 6 * 37},
      {"sum of a transposed view", {randn64(s)}, [](const auto& x) { return sum(x[0].transpose(0, 2), {0, 1}); }, 129 * 37},
      // Long rows split into chunks, and columns (strided reductions) split into chunks.
      {"sum of 2^20 elements", {randn64({1 << 20})}, [](const auto& x) { return sum(x[0]); }, 1 << 20},
      {"sum of 3 long rows", {randn64({3, 70001})}, [](const auto& x) { return sum(x[0], {1}); }, 70001},
      {"sum of 5 long columns", {randn64({40000, 5})}, [](const auto& x) { return sum(x[0], {0}); }, 40000},
      {"amax of long columns", {randn64({20000, 3})}, [](const auto& x) { return amax(x[0], {0}); }},
      {"sum over the middle dim", {randn64({16, 300, 40})}, [](const auto& x) { return sum(x[0], {1}); }, 300},
  };
  check_parity_all(cases);
}

TEST_CASE("cuda: reduce kernels (sum, max, min) match the CPU and propagate NaN" * doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(105);
  for (int64_t cols : {1, 31, 700, 20000}) {
    Tensor x = Tensor::randn({9, cols});
    Tensor xg = x.to(kGpu);
    for (auto op : {kernels::ReduceOp::sum, kernels::ReduceOp::max, kernels::ReduceOp::min}) {
      Tensor oc = Tensor::empty({9}), og = Tensor::empty({9}, DType::f32, kGpu);
      kernels::reduce(op, kernels::make_view(oc), kernels::make_view(x), 1);
      kernels::reduce(op, kernels::make_view(og), kernels::make_view(xg), 1);
      INFO("cols ", cols, " op ", static_cast<int>(op));
      if (op == kernels::ReduceOp::sum) check_close(og, oc, tolerance(DType::f32, cols), "sum");
      else CHECK(bitwise_equal(og, oc));  // max and min are exact
    }
  }
  Tensor x = Tensor::randn({4, 50});
  x.narrow(0, 2, 1).narrow(1, 17, 1).fill_(kNaN);
  Tensor xg = x.to(kGpu);
  for (auto op : {kernels::ReduceOp::sum, kernels::ReduceOp::max, kernels::ReduceOp::min}) {
    Tensor og = Tensor::empty({4}, DType::f32, kGpu);
    kernels::reduce(op, kernels::make_view(og), kernels::make_view(xg), 1);
    std::vector<double> v = og.to_vector();
    CHECK(std::isnan(v[2]));
    CHECK_FALSE(std::isnan(v[0]));
  }
  // Zero-size: an empty sum is 0; nothing to reduce is a no-op.
  CHECK(bitwise_equal(sum(Tensor::zeros({0, 5}, DType::f32, kGpu), {0}), Tensor::zeros({5})));
  CHECK(sum(Tensor::zeros({5, 0}, DType::f32, kGpu), {0}).shape() == Shape{0});
}

TEST_CASE("cuda: matmul 2-D, batched and broadcast, with TF32 off and on, matches the CPU" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(106);
  REQUIRE_FALSE(allow_tf32());
  std::vector<ParityCase> cases = {
      {"2-D", {randn64({37, 53}), randn64({53, 29})}, [](const auto& x) { return matmul(x[0], x[1]); }, 53, 37},
      {"batched", {randn64({4, 37, 53}), randn64({4, 53, 29})}, [](const auto& x) { return matmul(x[0], x[1]); }, 53, 37},
      {"broadcast batch", {randn64({2, 1, 5, 7}), randn64({3, 7, 4})}, [](const auto& x) { return matmul(x[0], x[1]); }, 7, 15},
      {"vector @ matrix", {randn64({53}), randn64({53, 29})}, [](const auto& x) { return matmul(x[0], x[1]); }, 53, 29},
      {"matrix @ vector", {randn64({29, 53}), randn64({53})}, [](const auto& x) { return matmul(x[0], x[1]); }, 53, 29},
      {"transposed operands", {randn64({53, 37}), randn64({29, 53})},
       [](const auto& x) { return matmul(x[0].transpose(0, 1), x[1].transpose(0, 1)); }, 53, 37},
  };
  check_parity_all(cases);

  // TF32: looser, and measurably less exact than the default f32 path on a large product.
  Tensor a = randn64({256, 512}), b = randn64({512, 256});
  Tensor ref = matmul(a, b);
  Tensor ag = a.to(kGpu).to(DType::f32), bg = b.to(kGpu).to(DType::f32);
  const double err_f32 = rel_err(matmul(ag, bg), ref);
  set_allow_tf32(true);
  Tensor tf = matmul(ag, bg);
  set_allow_tf32(false);
  const double err_tf32 = rel_err(tf, ref);
  INFO("f32 error ", err_f32, ", tf32 error ", err_tf32);
  CHECK(err_f32 <= tolerance(DType::f32, 512));
  CHECK(err_tf32 <= 1e-2);
  CHECK(err_tf32 > 10 * err_f32);
  set_allow_tf32(true);
  check_parity({"batched with TF32", {randn64({3, 37, 53}), randn64({3, 53, 29})},
                [](const auto& x) { return matmul(x[0], x[1]); }, 53, 37, true, 1e-2},
               DType::f32);
  set_allow_tf32(false);
  // k = 0 gives zeros; an empty batch gives an empty result.
  CHECK(bitwise_equal(matmul(Tensor::zeros({3, 0}, DType::f32, kGpu), Tensor::zeros({0, 4}, DType::f32, kGpu)),
                      Tensor::zeros({3, 4})));
  CHECK(matmul(Tensor::zeros({0, 3, 2}, DType::f32, kGpu), Tensor::zeros({0, 2, 4}, DType::f32, kGpu)).shape() ==
        Shape{0, 3, 4});
  CHECK_THROWS_AS(matmul(ag, b.to(DType::f32)), Error);
}

TEST_CASE("cuda: softmax, log_softmax and layer_norm match the CPU forward and backward" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(107);
  std::vector<ParityCase> cases;
  for (int64_t cols : {7, 1000, 5000}) {
    const Shape s{13, cols};
    cases.push_back({"softmax cols " + std::to_string(cols), {mul(randn64(s), 3.0)},
                     [](const auto& x) { return softmax(x[0], -1); }, cols});
    cases.push_back({"log_softmax cols " + std::to_string(cols), {mul(randn64(s), 3.0)},
                     [](const auto& x) { return log_softmax(x[0], -1); }, cols});
  }
  cases.push_back({"softmax over dim 0", {randn64({50, 6})}, [](const auto& x) { return softmax(x[0], 0); }, 50});
  cases.push_back({"layer_norm with weight and bias", {randn64({300, 768}), add(randn64({768}), 1.0), randn64({768})},
                   [](const auto& x) { return layer_norm(x[0], x[1], x[2]); }, 768, 768});
  cases.push_back({"layer_norm without parameters", {add(mul(randn64({7, 5, 33}), 2.0), 0.7)},
                   [](const auto& x) { return layer_norm(x[0], Tensor(), Tensor()); }, 33});
  cases.push_back({"layer_norm of one long row", {randn64({1, 5000}), randn64({5000}), randn64({5000})},
                   [](const auto& x) { return layer_norm(x[0], x[1], x[2], 1e-3); }, 5000});
  // Rows of 384 (one warp each, 12 values a lane) over more rows than one block's chunk.
  cases.push_back({"layer_norm of 3000 rows of 384", {randn64({3000, 384}), add(randn64({384}), 1.0), randn64({384})},
                   [](const auto& x) { return layer_norm(x[0], x[1], x[2]); }, 384, 3000});
  // Many rows: the backward's chunks (one block each) and the last block's sum over them.
  cases.push_back({"layer_norm of 70000 short rows", {randn64({70000, 12}), randn64({12}), randn64({12})},
                   [](const auto& x) { return layer_norm(x[0], x[1], x[2]); }, 12, 70000});
  check_parity_all(cases);
}

TEST_CASE("cuda: embedding, cross_entropy, cat, split, index_select, gather and scatter_add match the CPU" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(108);
  Tensor targets = random_indices({37}, 11);
  {
    std::vector<int64_t> t = targets.to_vector_as<int64_t>();
    t[3] = t[20] = -100;  // ignored rows
    targets = Tensor::from_vector(t, {37});
  }
  std::vector<ParityCase> cases = {
      {"embedding", {randn64({50, 16}), random_indices({4, 33}, 50)},
       [](const auto& x) { return embedding(x[0], x[1]); }, 1, 132},
      {"embedding with i32 indices", {randn64({9, 4}), random_indices({70}, 9).to(DType::i32)},
       [](const auto& x) { return embedding(x[0], x[1]); }, 1, 70},
      {"cross_entropy (N, C) with ignored rows", {mul(randn64({37, 11}), 2.0), targets},
       [](const auto& x) { return cross_entropy(x[0], x[1]); }, 37 * 11},
      {"cross_entropy (B, T, C)", {randn64({2, 9, 11}), random_indices({2, 9}, 11)},
       [](const auto& x) { return cross_entropy(x[0], x[1]); }, 2 * 9 * 11},
      {"cat", {randn64({3, 4, 5}), randn64({3, 2, 5}), randn64({3, 6, 5})},
       [](const auto& x) { return cat({x[0], mul(x[1], 2.0), x[2]}, 1); }},
      {"split", {randn64({4, 9})},
       [](const auto& x) {
         std::vector<Tensor> parts = split(x[0], std::vector<int64_t>{2, 3, 4}, 1);
         return cat({mul(parts[2], 2.0), parts[0], mul(parts[1], -1.0)}, 1);
       }},
      {"index_select with repeats", {randn64({6, 10, 4}), random_indices({15}, 10)},
       [](const auto& x) { return index_select(x[0], 1, x[1]); }, 1, 15},
      {"gather", {randn64({5, 7}), random_indices({5, 3}, 7)}, [](const auto& x) { return gather(x[0], 1, x[1]); }, 1, 3},
      {"gather along dim 0", {randn64({8, 6, 3}), random_indices({20, 6, 3}, 8)},
       [](const auto& x) { return gather(x[0], 0, x[1]); }, 1, 20},
      {"scatter_add", {randn64({5, 7}), random_indices({5, 12}, 7), randn64({5, 12})},
       [](const auto& x) { return scatter_add(x[0], 1, x[1], x[2]); }, 12},
      {"scatter_add along dim 0", {randn64({4, 3, 2}), random_indices({30, 3, 2}, 4), randn64({30, 3, 2})},
       [](const auto& x) { return scatter_add(x[0], 0, x[1], x[2]); }, 30},
  };
  check_parity_all(cases);
}

TEST_CASE("cuda: embedding and index_select backward in f32 equal the CPU's bit for bit" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(109);
  // Repeated indices are accumulated in index order on both devices: the same f32 additions.
  Tensor w = Tensor::randn({40, 24}).requires_grad_();
  Tensor wg = w.detach().to(kGpu).requires_grad_();
  Tensor idx = random_indices({5, 300}, 40);
  Tensor up = Tensor::randn({5, 300, 24});
  embedding(w, idx).backward(up);
  embedding(wg, idx.to(kGpu)).backward(up.to(kGpu));
  CHECK(bitwise_equal(wg.grad(), w.grad()));
  Tensor x = Tensor::randn({3, 12, 5}).requires_grad_();
  Tensor xg = x.detach().to(kGpu).requires_grad_();
  Tensor sel = random_indices({200}, 12);
  Tensor up2 = Tensor::randn({3, 200, 5});
  index_select(x, 1, sel).backward(up2);
  index_select(xg, 1, sel.to(kGpu)).backward(up2.to(kGpu));
  CHECK(bitwise_equal(xg.grad(), x.grad()));
}

TEST_CASE("cuda: the same seed gives the same random numbers and dropout masks on CPU and GPU" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    INFO(dtype_name(dt));
    manual_seed(77);
    Tensor uc = Tensor::rand({3, 1001}, dt);
    manual_seed(77);
    Tensor ug = Tensor::rand({3, 1001}, dt, kGpu);
    CHECK(bitwise_equal(ug, uc));
    manual_seed(78);
    Tensor nc = Tensor::randn({2001}, dt);
    manual_seed(78);
    Tensor ng = Tensor::randn({2001}, dt, kGpu);
    // Box-Muller's log/sin/cos may differ in a double's last bit between the C library and CUDA.
    check_close(ng, nc, dt == DType::f64 ? 1e-14 : 1e-7, "normal");
  }
  Tensor x = add(Tensor::rand({64, 257}), 0.5);
  for (std::optional<uint64_t> seed : {std::optional<uint64_t>(1234), std::optional<uint64_t>()}) {
    manual_seed(5);
    Tensor yc = dropout(x, 0.3, true, seed);
    manual_seed(5);
    Tensor yg = dropout(x.to(kGpu), 0.3, true, seed);
    CHECK(bitwise_equal(yg, yc));
    const std::vector<double> v = yg.to_vector();
    const double dropped = static_cast<double>(std::count(v.begin(), v.end(), 0.0)) / static_cast<double>(v.size());
    CHECK(dropped == doctest::Approx(0.3).epsilon(0.1));
  }
}

TEST_CASE("cuda: views, contiguous and zero-size tensors" * doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(110);
  std::vector<ParityCase> cases = {
      {"permute + contiguous", {randn64({3, 4, 5})}, [](const auto& x) { return x[0].permute({2, 0, 1}).contiguous(); }},
      {"narrow, select and reshape", {randn64({6, 8, 2})},
       [](const auto& x) { return mul(x[0].narrow(1, 2, 4).select(2, 1).reshape({3, 8}), 3.0); }},
      {"expand + contiguous", {randn64({1, 6, 1})}, [](const auto& x) { return x[0].expand({4, 6, 3}).contiguous(); }, 1, 12},
      {"stack", {randn64({3, 4}), randn64({3, 4})}, [](const auto& x) { return stack({x[0], x[1]}, 1); }},
  };
  check_parity_all(cases);
  Tensor e = Tensor::zeros({0, 3}, DType::f32, kGpu);
  CHECK(add(e, e).shape() == Shape{0, 3});
  CHECK(exp(e).shape() == Shape{0, 3});
  CHECK(softmax(e, -1).shape() == Shape{0, 3});
  CHECK(e.contiguous().numel() == 0);
}

TEST_CASE("cuda: ops on bad input throw clear errors" * doctest::skip(!cuda_available())) {
  Tensor w = Tensor::randn({10, 4}, DType::f32, kGpu);
  // Token ids are checked on the device; the next read raises it (tensor/device_checks.h).
  Tensor rows = embedding(w, Tensor::from_vector(std::vector<int64_t>{1, 12}, {2}, kGpu));
  CHECK_THROWS_WITH_AS(rows.to_vector(), doctest::Contains("embedding: index 12 at position 1 is out of range [0, 10)"),
                       Error);
  CHECK_THROWS_AS(add(w, Tensor::randn({10, 4})), Error);  // devices differ
  CHECK_THROWS_AS(matmul(w, Tensor::randn({4, 3}, DType::f32, kGpu).to(DType::bf16)), Error);
}

TEST_CASE("cuda: the same computation run twice with the same seed is bitwise identical" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  // An MLP-like chain: embedding -> layer_norm -> matmul -> gelu -> dropout -> matmul ->
  // cross_entropy + softmax terms, plus large reductions; forward and backward.
  auto run = [](DType dt) {
    manual_seed(42);
    auto leaf = [&](const Shape& s, double scale) {
      return mul(Tensor::randn(s, DType::f32, kGpu), scale).to(dt).detach().requires_grad_();
    };
    Tensor emb = leaf({64, 32}, 1.0), ln_w = leaf({32}, 0.1), ln_b = leaf({32}, 0.1);
    Tensor w1 = leaf({32, 128}, 0.2), w2 = leaf({128, 64}, 0.1), big = leaf({1 << 20}, 1.0), cols = leaf({4096, 8}, 1.0);
    std::vector<int64_t> ids, tgt;
    for (int i = 0; i < 8 * 40; ++i) {
      ids.push_back((i * 7) % 13 + (i % 3) * 20);  // many repeats
      tgt.push_back((i * 5) % 64);
    }
    Tensor idx = Tensor::from_vector(ids, {8, 40}, kGpu), targets = Tensor::from_vector(tgt, {8, 40}, kGpu);
    Tensor h = layer_norm(embedding(emb, idx), ln_w, add(ln_b, 0.0));
    h = dropout(gelu(matmul(h, w1)), 0.1);
    Tensor logits = matmul(h, w2);
    // cross_entropy returns an f32 loss for bf16 logits; the chain goes on in dt.
    Tensor loss = add(cross_entropy(logits, targets).to(dt), mean(sum(mul(softmax(logits, -1), logits), {-1})));
    loss = add(loss, mul(sum(mul(big, big)), 1e-6));
    loss = add(loss, mul(sum(sum(mul(cols, cols), {0})), 1e-4));
    loss = add(loss, mean(logsumexp(logits, {0, 1})));
    loss.backward();
    return std::vector<Tensor>{loss, emb.grad(), ln_w.grad(), ln_b.grad(), w1.grad(), w2.grad(), big.grad(), cols.grad()};
  };
  for (DType dt : {DType::f32, DType::bf16}) {
    INFO(dtype_name(dt));
    std::vector<Tensor> a = run(dt);
    poison_gpu_pool();
    std::vector<Tensor> b = run(dt);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      INFO("result ", i);
      REQUIRE(a[i].defined());
      CHECK(a[i].device() == kGpu);
      CHECK(bitwise_equal(a[i], b[i]));
    }
    CHECK(std::isfinite(a[0].item()));
  }
}
