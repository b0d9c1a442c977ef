// The op table: one row per op case (name, the op as a lambda, input shapes, input domain), used
// three ways: its backward against float64 central differences (gradcheck); its CUDA forward and
// backward against the CPU's (skipped without a GPU), in float64 and in f32 and bf16 against a
// float64 reference, at the table's shapes and at larger ones that reach the kernels' other paths;
// and a perf mode that times every row (LONGTAPE_OP_PERF=<scale>, off by default). Plus tests
// showing that the checker itself can fail.
//
//   LONGTAPE_OP_PERF=32 build-cpu/bin/test_op_table -tc="op table: time*"
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/gradcheck.h"
#include "tensor/autograd/node.h"
#include "support/device_parity.h"
#include "tensor/ops.h"

using namespace longtape;
using autograd::GradcheckOptions;
using autograd::GradcheckResult;
using testing::check_normwise_close;
using testing::dtype_tolerance;
using Ts = std::vector<Tensor>;

namespace {

// How a case's inputs are drawn.
enum class Inputs {
  normal,    // randn
  positive,  // uniform in [0.5, 1.5]: log, sqrt, rsqrt, pow bases, divisors
  off_zero,  // randn pushed at least 0.2 away from 0: relu's kink
  distinct,  // all elements of all inputs distinct and >= 0.1 apart: maximum, amax (no ties)
};

struct OpCase {
  std::string name;
  autograd::GradcheckFn fn;
  std::vector<Shape> shapes;  // one f64 input requiring grad per shape
  Inputs inputs = Inputs::normal;
  GradcheckOptions options = {};
  bool draws_in_dtype = false;  // random draws depend on the dtype (dropout): float64 parity only
};

// For ops whose result passes through f32 rounding: a larger step and tolerances to match.
const GradcheckOptions kLoose{.eps = 1e-3, .atol = 1e-3, .rtol = 1e-2};

// The device a row's fixed tensors (indices, masks) are made on: that of its inputs.
Device& case_device() {
  static Device device = Device::cpu();
  return device;
}
Tensor on_case_device(const Tensor& t) { return t.to(case_device()); }

Tensor i64(const std::vector<int64_t>& values, const Shape& shape) {
  return on_case_device(Tensor::from_vector(values, shape));
}

// A fixed boolean mask (as f64 0/1) of the given shape, with both values present.
Tensor fixed_mask(const Shape& shape, uint64_t seed) {
  manual_seed(seed);
  return on_case_device(gt(Tensor::randn(shape, DType::f64), Tensor::zeros({}, DType::f64)));
}

std::vector<Tensor> make_inputs(const OpCase& c, uint64_t seed) {
  manual_seed(seed);
  std::vector<Tensor> xs;
  for (const Shape& s : c.shapes) {
    switch (c.inputs) {
      case Inputs::normal:
      case Inputs::distinct:
        xs.push_back(Tensor::randn(s, DType::f64));
        break;
      case Inputs::positive:
        xs.push_back(add(Tensor::rand(s, DType::f64), 0.5));
        break;
      case Inputs::off_zero: {
        std::vector<double> v = Tensor::randn(s, DType::f64).to_vector();
        for (double& x : v) x += x >= 0 ? 0.2 : -0.2;
        xs.push_back(Tensor::from_vector(v, s));
        break;
      }
    }
  }
  if (c.inputs == Inputs::distinct) {
    // Rank the random draws over all inputs together and replace each by its spaced rank.
    std::vector<double> all;
    for (const Tensor& x : xs)
      for (double v : x.to_vector()) all.push_back(v);
    std::vector<size_t> order(all.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return all[a] < all[b]; });
    std::vector<double> spaced(all.size());
    for (size_t r = 0; r < order.size(); ++r)
      spaced[order[r]] = -1.0 + 0.1 * static_cast<double>(r) + 0.01 * std::sin(static_cast<double>(r));
    size_t at = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      std::vector<double> v(spaced.begin() + static_cast<long>(at),
                            spaced.begin() + static_cast<long>(at + xs[i].numel()));
      at += static_cast<size_t>(xs[i].numel());
      xs[i] = Tensor::from_vector(v, c.shapes[i]);
    }
  }
  for (Tensor& x : xs) x.requires_grad_();
  return xs;
}

// Seed from the case name (FNV-1a), so adding a line never changes another case's inputs.
uint64_t seed_of(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return h;
}

std::string shapes_str(const std::vector<Shape>& shapes) {
  std::string s;
  for (const Shape& sh : shapes) s += (s.empty() ? "" : ", ") + shape_str(sh);
  return s;
}

// clang-format off
std::vector<OpCase> op_table() {
  const Inputs N = Inputs::normal, P = Inputs::positive, Z = Inputs::off_zero, D = Inputs::distinct;
  return {
    // ---- binary ops, same shape and broadcast ----
    {"add",                    [](const Ts& x) { return add(x[0], x[1]); }, {{3, 4}, {3, 4}}},
    {"add (3,1)+(4)",          [](const Ts& x) { return add(x[0], x[1]); }, {{3, 1}, {4}}},
    {"add (2,3,4)+(3,1)",      [](const Ts& x) { return add(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}},
    {"add ()+(2,3)",           [](const Ts& x) { return add(x[0], x[1]); }, {{}, {2, 3}}},
    {"add (2,3)+()",           [](const Ts& x) { return add(x[0], x[1]); }, {{2, 3}, {}}},
    {"add x+x",                [](const Ts& x) { return add(x[0], x[0]); }, {{3, 4}}},
    {"add scalar",             [](const Ts& x) { return add(x[0], 1.75); }, {{3, 4}}},
    {"sub",                    [](const Ts& x) { return sub(x[0], x[1]); }, {{3, 4}, {3, 4}}},
    {"sub (3,1)-(4)",          [](const Ts& x) { return sub(x[0], x[1]); }, {{3, 1}, {4}}},
    {"sub (2,3,4)-(3,1)",      [](const Ts& x) { return sub(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}},
    {"sub ()-(2,3)",           [](const Ts& x) { return sub(x[0], x[1]); }, {{}, {2, 3}}},
    {"sub (2,3)-()",           [](const Ts& x) { return sub(x[0], x[1]); }, {{2, 3}, {}}},
    {"mul",                    [](const Ts& x) { return mul(x[0], x[1]); }, {{3, 4}, {3, 4}}},
    {"mul (3,1)*(4)",          [](const Ts& x) { return mul(x[0], x[1]); }, {{3, 1}, {4}}},
    {"mul (2,3,4)*(3,1)",      [](const Ts& x) { return mul(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}},
    {"mul ()*(2,3)",           [](const Ts& x) { return mul(x[0], x[1]); }, {{}, {2, 3}}},
    {"mul (2,3)*()",           [](const Ts& x) { return mul(x[0], x[1]); }, {{2, 3}, {}}},
    {"mul x*x",                [](const Ts& x) { return mul(x[0], x[0]); }, {{3, 4}}},
    {"mul scalar",             [](const Ts& x) { return mul(x[0], -2.5); }, {{3, 4}}},
    {"div",                    [](const Ts& x) { return div(x[0], x[1]); }, {{3, 4}, {3, 4}}, P},
    {"div (3,1)/(4)",          [](const Ts& x) { return div(x[0], x[1]); }, {{3, 1}, {4}}, P},
    {"div (2,3,4)/(3,1)",      [](const Ts& x) { return div(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}, P},
    {"div ()/(2,3)",           [](const Ts& x) { return div(x[0], x[1]); }, {{}, {2, 3}}, P},
    {"div (2,3)/()",           [](const Ts& x) { return div(x[0], x[1]); }, {{2, 3}, {}}, P},
    {"div negative numerator", [](const Ts& x) { return div(neg(x[0]), x[1]); }, {{3, 4}, {3, 4}}, P},
    {"pow",                    [](const Ts& x) { return pow(x[0], x[1]); }, {{3, 4}, {3, 4}}, P},
    {"pow (3,1)^(4)",          [](const Ts& x) { return pow(x[0], x[1]); }, {{3, 1}, {4}}, P},
    {"pow (2,3,4)^(3,1)",      [](const Ts& x) { return pow(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}, P},
    {"pow ()^(2,3)",           [](const Ts& x) { return pow(x[0], x[1]); }, {{}, {2, 3}}, P},
    {"pow (2,3)^()",           [](const Ts& x) { return pow(x[0], x[1]); }, {{2, 3}, {}}, P},
    {"pow negative exponent",  [](const Ts& x) { return pow(x[0], neg(x[1])); }, {{3, 4}, {3, 4}}, P},
    {"pow scalar 2.5",         [](const Ts& x) { return pow(x[0], 2.5); }, {{3, 4}}, P},
    {"pow scalar -1.5",        [](const Ts& x) { return pow(x[0], -1.5); }, {{3, 4}}, P},
    {"pow scalar 3 (any sign)",[](const Ts& x) { return pow(x[0], 3.0); }, {{3, 4}}},
    {"maximum",                [](const Ts& x) { return maximum(x[0], x[1]); }, {{3, 4}, {3, 4}}, D},
    {"maximum (3,1),(4)",      [](const Ts& x) { return maximum(x[0], x[1]); }, {{3, 1}, {4}}, D},
    {"maximum (2,3,4),(3,1)",  [](const Ts& x) { return maximum(x[0], x[1]); }, {{2, 3, 4}, {3, 1}}, D},
    {"maximum (),(2,3)",       [](const Ts& x) { return maximum(x[0], x[1]); }, {{}, {2, 3}}, D},
    {"maximum (2,3),()",       [](const Ts& x) { return maximum(x[0], x[1]); }, {{2, 3}, {}}, D},
    // ---- unary ops ----
    {"neg",                    [](const Ts& x) { return neg(x[0]); }, {{3, 4}}},
    {"exp",                    [](const Ts& x) { return exp(x[0]); }, {{3, 4}}},
    {"exp of a transposed view", [](const Ts& x) { return exp(x[0].transpose(0, 1)); }, {{3, 4}}},
    {"log",                    [](const Ts& x) { return log(x[0]); }, {{3, 4}}, P},
    {"sqrt",                   [](const Ts& x) { return sqrt(x[0]); }, {{3, 4}}, P},
    {"rsqrt",                  [](const Ts& x) { return rsqrt(x[0]); }, {{3, 4}}, P},
    {"tanh",                   [](const Ts& x) { return tanh(x[0]); }, {{3, 4}}},
    {"relu",                   [](const Ts& x) { return relu(x[0]); }, {{3, 4}}, Z},
    {"sigmoid",                [](const Ts& x) { return sigmoid(x[0]); }, {{3, 4}}},
    {"gelu erf",               [](const Ts& x) { return gelu(x[0], GeluApprox::erf); }, {{3, 4}}},
    {"gelu tanh",              [](const Ts& x) { return gelu(x[0], GeluApprox::tanh); }, {{3, 4}}},
    {"gelu of a strided slice", [](const Ts& x) { return gelu(x[0].slice(1, 0, 4, 2)); }, {{3, 4}}},
    {"composite x*exp(x)+x",   [](const Ts& x) { return add(mul(x[0], exp(x[0])), x[0]); }, {{3, 4}}},
    // ---- selection and casts ----
    {"where",                  [](const Ts& x) { return where(fixed_mask({3, 4}, 11), x[0], x[1]); }, {{3, 4}, {3, 4}}},
    {"where broadcast (3,1),(4)", [](const Ts& x) { return where(fixed_mask({3, 4}, 12), x[0], x[1]); }, {{3, 1}, {4}}},
    {"where mask (4), (),(3,4)", [](const Ts& x) { return where(fixed_mask({4}, 13), x[0], x[1]); }, {{}, {3, 4}}},
    {"gt as a where mask",     [](const Ts& x) { return where(gt(x[0], x[1]), x[0], x[1]); }, {{3, 1, 5}, {4, 5}}, D},
    {"lt as a where mask",     [](const Ts& x) { return where(lt(x[0], x[1]), x[0], x[1]); }, {{3, 1, 5}, {4, 5}}, D},
    {"eq as a where mask",     [](const Ts& x) { return where(eq(x[0], maximum(x[0], x[1])), x[1], x[0]); }, {{3, 1, 5}, {4, 5}}, D},
    {"masked_fill",            [](const Ts& x) { return masked_fill(x[0], fixed_mask({3, 4}, 14), -2.5); }, {{3, 4}}},
    {"masked_fill broadcast mask (4)", [](const Ts& x) { return masked_fill(x[0], fixed_mask({4}, 15), 7.0); }, {{3, 4}}},
    {"cast f64->f32->f64",     [](const Ts& x) { return cast(cast(x[0], DType::f32), DType::f64); }, {{3, 4}}, N, kLoose},
    {"exp in f32",             [](const Ts& x) { return cast(exp(x[0].to(DType::f32)), DType::f64); }, {{3, 4}}, N, kLoose},
    // ---- reductions ----
    {"sum all",                [](const Ts& x) { return sum(x[0]); }, {{2, 3, 4}}},
    {"sum all keepdim",        [](const Ts& x) { return sum(x[0], {}, true); }, {{2, 3, 4}}},
    {"sum dim 0",              [](const Ts& x) { return sum(x[0], {0}); }, {{2, 3, 4}}},
    {"sum dim -1 keepdim",     [](const Ts& x) { return sum(x[0], {-1}, true); }, {{2, 3, 4}}},
    {"sum dims {0,2}",         [](const Ts& x) { return sum(x[0], {0, 2}); }, {{2, 3, 4}}},
    {"sum dims {2,1} keepdim", [](const Ts& x) { return sum(x[0], {2, 1}, true); }, {{2, 3, 4}}},
    {"sum of a permuted view", [](const Ts& x) { return sum(x[0].permute({2, 0, 1}), {1}); }, {{2, 3, 4}}},
    {"mean all",               [](const Ts& x) { return mean(x[0]); }, {{2, 3, 4}}},
    {"mean dim 1",             [](const Ts& x) { return mean(x[0], {1}); }, {{2, 3, 4}}},
    {"mean dims {0,-1} keepdim", [](const Ts& x) { return mean(x[0], {0, -1}, true); }, {{2, 3, 4}}},
    {"amax all",               [](const Ts& x) { return amax(x[0]); }, {{2, 3, 4}}, D},
    {"amax dim 1",             [](const Ts& x) { return amax(x[0], {1}); }, {{2, 3, 4}}, D},
    {"amax dim -1 keepdim",    [](const Ts& x) { return amax(x[0], {-1}, true); }, {{2, 3, 4}}, D},
    {"amax dims {0,2}",        [](const Ts& x) { return amax(x[0], {0, 2}); }, {{2, 3, 4}}, D},
    {"amax dim 0",             [](const Ts& x) { return amax(x[0], {0}); }, {{4, 3}}, D},
    {"logsumexp dim -1",       [](const Ts& x) { return logsumexp(x[0], {-1}); }, {{2, 3, 4}}},
    {"logsumexp dim 0 keepdim", [](const Ts& x) { return logsumexp(x[0], {0}, true); }, {{2, 3, 4}}},
    {"logsumexp dims {0,2}",   [](const Ts& x) { return logsumexp(x[0], {0, 2}); }, {{2, 3, 4}}},
    {"logsumexp all dims",     [](const Ts& x) { return logsumexp(x[0], {0, 1, 2}); }, {{2, 3, 4}}},
    // ---- matmul ----
    {"matmul 2-d",             [](const Ts& x) { return matmul(x[0], x[1]); }, {{3, 4}, {4, 5}}},
    {"matmul batched",         [](const Ts& x) { return matmul(x[0], x[1]); }, {{2, 3, 4}, {2, 4, 5}}},
    {"matmul broadcast batch (2,1,3,4)@(3,4,2)", [](const Ts& x) { return matmul(x[0], x[1]); }, {{2, 1, 3, 4}, {3, 4, 2}}},
    {"matmul 2-d @ batched",   [](const Ts& x) { return matmul(x[0], x[1]); }, {{3, 4}, {2, 4, 5}}},
    {"matmul 1-d @ 2-d",       [](const Ts& x) { return matmul(x[0], x[1]); }, {{4}, {4, 5}}},
    {"matmul 2-d @ 1-d",       [](const Ts& x) { return matmul(x[0], x[1]); }, {{3, 4}, {4}}},
    {"matmul 1-d @ 1-d",       [](const Ts& x) { return matmul(x[0], x[1]); }, {{4}, {4}}},
    {"matmul 1-d @ batched",   [](const Ts& x) { return matmul(x[0], x[1]); }, {{4}, {2, 4, 3}}},
    {"matmul transposed operand", [](const Ts& x) { return matmul(x[0].transpose(0, 1), x[1]); }, {{4, 3}, {4, 5}}},
    {"matmul x @ x^T",         [](const Ts& x) { return matmul(x[0], x[0].transpose(0, 1)); }, {{3, 4}}},
    // ---- views ----
    {"view",                   [](const Ts& x) { return x[0].view({6, 4}); }, {{2, 3, 4}}},
    {"view -1",                [](const Ts& x) { return x[0].view({-1, 2}); }, {{2, 3, 4}}},
    {"reshape contiguous",     [](const Ts& x) { return x[0].reshape({4, 6}); }, {{2, 3, 4}}},
    {"reshape transposed (copies)", [](const Ts& x) { return x[0].transpose(0, 2).reshape({24}); }, {{2, 3, 4}}},
    {"permute",                [](const Ts& x) { return x[0].permute({2, 0, 1}); }, {{2, 3, 4}}},
    {"transpose",              [](const Ts& x) { return x[0].transpose(0, 2); }, {{2, 3, 4}}},
    {"transpose negative dims", [](const Ts& x) { return x[0].transpose(-1, -2); }, {{2, 3, 4}}},
    {"narrow",                 [](const Ts& x) { return x[0].narrow(1, 1, 2); }, {{2, 3, 4}}},
    {"slice step 2",           [](const Ts& x) { return x[0].slice(2, 0, 4, 2); }, {{2, 3, 4}}},
    {"slice start 1 step 2",   [](const Ts& x) { return x[0].slice(-1, 1, 4, 2); }, {{2, 3, 5}}},
    {"slice negative start",   [](const Ts& x) { return x[0].slice(0, -2, 3); }, {{3, 4}}},
    {"select",                 [](const Ts& x) { return x[0].select(1, 2); }, {{2, 3, 4}}},
    {"select negative index",  [](const Ts& x) { return x[0].select(0, -1); }, {{2, 3, 4}}},
    {"expand (3,1)->(2,3,4)",  [](const Ts& x) { return x[0].expand({2, 3, 4}); }, {{3, 1}}},
    {"expand () -> (2,3)",     [](const Ts& x) { return x[0].expand({2, 3}); }, {{}}},
    {"expand -1",              [](const Ts& x) { return x[0].expand({5, -1}); }, {{1, 4}}},
    {"squeeze",                [](const Ts& x) { return x[0].squeeze(1); }, {{3, 1, 4}}},
    {"unsqueeze",              [](const Ts& x) { return x[0].unsqueeze(-1); }, {{3, 4}}},
    {"flatten",                [](const Ts& x) { return x[0].flatten(); }, {{2, 3, 4}}},
    {"flatten 1..2",           [](const Ts& x) { return x[0].flatten(1, 2); }, {{2, 3, 4}}},
    {"contiguous",             [](const Ts& x) { return x[0].transpose(0, 1).contiguous(); }, {{3, 4}}},
    {"clone",                  [](const Ts& x) { return x[0].clone(); }, {{3, 4}}},
    {"view chain",             [](const Ts& x) { return x[0].permute({1, 0, 2}).narrow(2, 1, 3).select(0, 1).unsqueeze(0); }, {{2, 3, 4}}},
    // ---- neural-network functions ----
    {"softmax dim -1",         [](const Ts& x) { return softmax(x[0], -1); }, {{3, 5}}},
    {"softmax dim 0",          [](const Ts& x) { return softmax(x[0], 0); }, {{3, 5}}},
    {"softmax dim 1 of 3-d",   [](const Ts& x) { return softmax(x[0], 1); }, {{2, 3, 4}}},
    {"softmax of a transposed view", [](const Ts& x) { return softmax(x[0].transpose(0, 1), -1); }, {{3, 5}}},
    {"log_softmax dim -1",     [](const Ts& x) { return log_softmax(x[0], -1); }, {{3, 5}}},
    {"log_softmax dim 0",      [](const Ts& x) { return log_softmax(x[0], 0); }, {{3, 5}}},
    {"log_softmax dim 1 of 3-d", [](const Ts& x) { return log_softmax(x[0], 1); }, {{2, 3, 4}}},
    {"layer_norm weight+bias", [](const Ts& x) { return layer_norm(x[0], x[1], x[2]); }, {{2, 3, 6}, {6}, {6}}},
    {"layer_norm no affine",   [](const Ts& x) { return layer_norm(x[0], Tensor(), Tensor()); }, {{4, 6}}},
    {"layer_norm weight only", [](const Ts& x) { return layer_norm(x[0], x[1], Tensor()); }, {{4, 6}, {6}}},
    {"layer_norm bias only",   [](const Ts& x) { return layer_norm(x[0], Tensor(), x[1]); }, {{4, 6}, {6}}},
    {"embedding (weight)",     [](const Ts& x) { return embedding(x[0], i64({0, 2, 4, 2, 2, 1}, {2, 3})); }, {{5, 3}}},
    {"embedding i32 indices",  [](const Ts& x) { return embedding(x[0], on_case_device(Tensor::from_vector(std::vector<int32_t>{3, 0, 3}, {3}))); }, {{4, 2}}},
    {"cross_entropy (N,C)",    [](const Ts& x) { return cross_entropy(x[0], i64({1, 0, 4, 2}, {4})); }, {{4, 5}}},
    {"cross_entropy ignore -100", [](const Ts& x) { return cross_entropy(x[0], i64({1, -100, 4, 2}, {4})); }, {{4, 5}}},
    {"cross_entropy (B,T,C) ignore 2", [](const Ts& x) { return cross_entropy(x[0], i64({0, 2, 3, 1, 2, 4}, {2, 3}), 2); }, {{2, 3, 5}}},
    {"bias_gelu erf",          [](const Ts& x) { return bias_gelu(x[0], x[1]); }, {{2, 3, 6}, {6}}},
    {"bias_gelu tanh",         [](const Ts& x) { return bias_gelu(x[0], x[1], GeluApprox::tanh); }, {{4, 5}, {5}}},
    {"dropout seed",           [](const Ts& x) { return dropout(x[0], 0.3, true, 1234); }, {{4, 5}}, N, {}, true},
    {"dropout default generator", [](const Ts& x) { manual_seed(77); return dropout(x[0], 0.5); }, {{4, 5}}, N, {}, true},
    {"dropout eval is identity", [](const Ts& x) { return dropout(x[0], 0.5, false); }, {{4, 5}}},
    // ---- joining and indexing ----
    {"cat dim 1",              [](const Ts& x) { return cat({x[0], x[1], x[2]}, 1); }, {{2, 3}, {2, 1}, {2, 4}}},
    {"cat dim 0",              [](const Ts& x) { return cat({x[0], x[1]}, 0); }, {{1, 3}, {2, 3}}},
    {"cat same tensor twice",  [](const Ts& x) { return cat({x[0], x[0]}, -1); }, {{2, 3}}},
    {"split sizes (one piece used)", [](const Ts& x) { return split(x[0], {1, 3}, 1)[1]; }, {{3, 4}}},
    {"split chunk (both pieces)", [](const Ts& x) { auto p = split(x[0], 3, 1); return add(mul(p[0], 2.0), exp(p[1])); }, {{4, 6}}},
    {"split chunk dim 0 uneven", [](const Ts& x) { auto p = split(x[0], 2, 0); return mul(p[2], p[0].narrow(0, 0, 1)); }, {{5, 3}}},
    {"stack dim 0",            [](const Ts& x) { return stack({x[0], x[1]}, 0); }, {{2, 3}, {2, 3}}},
    {"stack dim -1",           [](const Ts& x) { return stack({x[0], x[1], x[0]}, -1); }, {{2, 3}, {2, 3}}},
    {"index_select dim 0",     [](const Ts& x) { return index_select(x[0], 0, i64({4, 0, 4, 2}, {4})); }, {{5, 3}}},
    {"index_select dim 1",     [](const Ts& x) { return index_select(x[0], 1, i64({2, 2, 0}, {3})); }, {{2, 3, 2}}},
    {"gather dim 1",           [](const Ts& x) { return gather(x[0], 1, i64({0, 3, 3, 1, 2, 2}, {3, 2})); }, {{3, 4}}},
    {"gather dim 0",           [](const Ts& x) { return gather(x[0], 0, i64({2, 0, 1, 1, 2, 0}, {2, 3})); }, {{3, 3}}},
    {"gather index smaller than input", [](const Ts& x) { return gather(x[0], 1, i64({3, 0, 1, 1}, {2, 2})); }, {{3, 4}}},
    {"scatter_add dim 1",      [](const Ts& x) { return scatter_add(x[0], 1, i64({0, 0, 3, 1, 2, 2}, {3, 2}), x[1]); }, {{3, 4}, {3, 2}}},
    {"scatter_add dim 0",      [](const Ts& x) { return scatter_add(x[0], 0, i64({1, 0, 1, 1}, {2, 2}), x[1]); }, {{2, 3}, {2, 2}}},
    {"scatter_add src larger than index", [](const Ts& x) { return scatter_add(x[0], 1, i64({3, 3, 0, 2}, {2, 2}), x[1]); }, {{3, 4}, {3, 3}}},
  };
}
// clang-format on

// A square whose recorded backward returns `factor` * x instead of 2x: factor 2 is correct.
Tensor square_with_backward_factor(const Tensor& x, double factor) {
  Tensor out = mul(x.detach(), x.detach());
  Tensor xd = x.detach();
  autograd::record("square_custom", {x}, {out}, [xd, factor](const Ts& g) -> Ts { return {mul(mul(g[0], xd), factor)}; });
  return out;
}

}  // namespace

TEST_CASE("gradcheck: every op of the table matches central differences") {
  const std::vector<OpCase> table = op_table();
  int passed = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    const OpCase& c = table[i];
    CAPTURE(c.name);
    INFO("input shapes: " << shapes_str(c.shapes));
    GradcheckResult r;
    try {
      r = autograd::gradcheck(c.fn, make_inputs(c, seed_of(c.name)), c.options);
    } catch (const std::exception& e) {
      FAIL_CHECK("threw: " << e.what());
      continue;
    }
    CHECK_MESSAGE(r.passed, r.message);
    int64_t expected_elements = 0;
    for (const Shape& s : c.shapes) expected_elements += shape_numel(s);
    CHECK(r.checked_elements == expected_elements);
    if (r.passed) ++passed;
  }
  MESSAGE(passed << " of " << table.size() << " op cases passed gradcheck");
  CHECK(passed == static_cast<int>(table.size()));
}

namespace {

// Output and input gradients of one row on `device` in `dtype` (inputs converted there): the
// gradients of sum(out * w) for a fixed random w, as gradcheck scalarises. w is drawn in float64
// and rounded to `w_dtype`, so that a float64 reference can use the weights of a low-precision run.
struct RowRun {
  Tensor out;
  std::vector<Tensor> grads;
};
RowRun run_row(const OpCase& c, const std::vector<Tensor>& inputs, Device device, DType dtype = DType::f64,
               DType w_dtype = DType::f64) {
  case_device() = device;
  std::vector<Tensor> xs;
  for (const Tensor& x : inputs) xs.push_back(x.detach().to(device).to(dtype).requires_grad_());
  RowRun r;
  r.out = c.fn(xs);
  manual_seed(seed_of(c.name) ^ 0x5eed);
  Tensor w = Tensor::randn(r.out.shape(), DType::f64).to(w_dtype).to(r.out.dtype()).to(device);
  sum(mul(r.out, w)).backward();
  for (const Tensor& x : xs) r.grads.push_back(x.grad().defined() ? x.grad().to(Device::cpu()) : Tensor());
  r.out = r.out.detach().to(Device::cpu());
  case_device() = Device::cpu();
  return r;
}

// Largest |a - b| / max(1, |b|) over the elements (a, b on the CPU, same shape).
double scaled_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<double> av = cast(a, DType::f64).to_vector(), bv = cast(b, DType::f64).to_vector();
  double worst = 0;
  for (size_t i = 0; i < av.size(); ++i)
    worst = std::max(worst, std::abs(av[i] - bv[i]) / std::max(1.0, std::abs(bv[i])));
  return worst;
}

// The row's shapes with every dimension above 1 multiplied by `factor`, halved until at most
// 2^22 elements per input: broadcast dims (1) stay 1 and equal dims stay equal.
std::vector<Shape> scaled_shapes(const std::vector<Shape>& shapes, int64_t factor) {
  for (;; factor = std::max<int64_t>(1, factor / 2)) {
    std::vector<Shape> out;
    bool small = true;
    for (const Shape& s : shapes) {
      Shape t = s;
      for (auto& d : t) d = d > 1 ? d * factor : d;
      small = small && shape_numel(t) <= (int64_t{1} << 22);
      out.push_back(t);
    }
    if (small || factor == 1) return out;
  }
}

// Larger inputs for rows whose function takes any shape, chosen to reach the CUDA kernels' other
// paths: several warps per row, long rows and long columns split into chunks, LayerNorm rows of a
// warp (up to 1024 columns) and of a block (longer; dx alone, or with the parameter gradients over
// several chunks of rows), the LayerNorm backward's many row chunks. Parity only; gradcheck at
// these sizes would take minutes.
struct LargeShapes {
  std::string row;
  std::vector<Shape> shapes;
  int64_t len;  // most terms summed into one output or gradient element: sets the f32 tolerance
};
std::vector<LargeShapes> large_shapes() {
  return {
      {"sum all", {{1 << 20}}, 1 << 20},
      {"sum all", {{6, 37, 129}}, 6 * 37 * 129},
      {"sum dim 0", {{40000, 5}}, 40000},
      {"sum dim 0", {{6, 37, 129}}, 6},
      {"sum dim -1 keepdim", {{3, 70001}}, 70001},
      {"sum dims {0,2}", {{6, 37, 129}}, 6 * 129},
      {"sum of a permuted view", {{16, 40, 300}}, 16},
      {"mean dim 1", {{16, 300, 40}}, 300},
      {"amax dim 0", {{20000, 3}}, 1},
      {"amax dim -1 keepdim", {{6, 37, 129}}, 1},
      {"logsumexp dim -1", {{6, 37, 129}}, 129},
      {"logsumexp dims {0,2}", {{6, 37, 129}}, 6 * 129},
      {"softmax dim -1", {{13, 1000}}, 1000},
      {"softmax dim -1", {{13, 5000}}, 5000},
      {"softmax dim 0", {{50, 6}}, 50},
      {"log_softmax dim -1", {{13, 1000}}, 1000},
      {"log_softmax dim -1", {{13, 5000}}, 5000},
      {"layer_norm weight+bias", {{300, 768}, {768}, {768}}, 768},
      {"layer_norm weight+bias", {{3000, 384}, {384}, {384}}, 3000},
      {"layer_norm weight+bias", {{1, 5000}, {5000}, {5000}}, 5000},
      {"layer_norm weight+bias", {{40, 1500}, {1500}, {1500}}, 1500},
      {"layer_norm weight+bias", {{70000, 12}, {12}, {12}}, 70000},
      {"layer_norm no affine", {{7, 5, 33}}, 33},
      {"layer_norm no affine", {{3, 2000}}, 2000},
      {"bias_gelu erf", {{7, 33}, {33}}, 7},
      {"matmul 2-d", {{37, 53}, {53, 29}}, 53},
      {"matmul batched", {{4, 37, 53}, {4, 53, 29}}, 53},
      {"matmul broadcast batch (2,1,3,4)@(3,4,2)", {{2, 1, 5, 7}, {3, 7, 4}}, 15},
      {"matmul 1-d @ 2-d", {{53}, {53, 29}}, 53},
      {"matmul 2-d @ 1-d", {{29, 53}, {53}}, 53},
      {"matmul transposed operand", {{53, 37}, {53, 29}}, 53},
      {"exp of a transposed view", {{9, 20}}, 1},
      {"gelu of a strided slice", {{8, 20}}, 1},
  };
}

const OpCase& row_named(const std::vector<OpCase>& table, const std::string& name) {
  for (const OpCase& c : table)
    if (c.name == name) return c;
  throw Error("op table: no row named " + name);
}

// One row in `dt` on `device` against float64 on the CPU from the same rounded inputs and upstream
// weights: forward and input gradients, to a normwise tolerance from dt and `len` terms per
// element (0: as many as the largest input has elements).
void check_row_in_dtype(const OpCase& row, const std::vector<Shape>& shapes, Device device, DType dt,
                        int64_t len = 0) {
  OpCase c = row;
  c.shapes = shapes;
  CAPTURE(c.name);
  INFO(dtype_name(dt) << " on " << device.str() << ", input shapes: " << shapes_str(shapes));
  std::vector<Tensor> rounded;
  int64_t largest = 1;
  for (const Tensor& x : make_inputs(c, seed_of(c.name))) {
    rounded.push_back(x.detach().to(dt).to(DType::f64));
    largest = std::max(largest, x.numel());
  }
  if (len == 0) len = largest;
  const double tolerance = dtype_tolerance(dt, len);
  try {
    const RowRun ref = run_row(c, rounded, Device::cpu(), DType::f64, dt);
    const RowRun got = run_row(c, rounded, device, dt, dt);
    check_normwise_close(got.out, ref.out, tolerance, "forward");
    REQUIRE(got.grads.size() == ref.grads.size());
    for (size_t i = 0; i < ref.grads.size(); ++i) {
      REQUIRE(got.grads[i].defined() == ref.grads[i].defined());
      if (ref.grads[i].defined())
        check_normwise_close(got.grads[i], ref.grads[i], tolerance, "gradient of input " + std::to_string(i));
    }
  } catch (const std::exception& e) {
    case_device() = Device::cpu();
    FAIL_CHECK("threw: " << e.what());
  }
}

// Every row (but those drawing random numbers in their dtype) in each of `dtypes` on `device`.
int check_table_in_low_precision(Device device, const std::vector<DType>& dtypes) {
  int checked = 0;
  for (const DType dt : dtypes)
    for (const OpCase& c : op_table()) {
      if (c.draws_in_dtype) continue;
      check_row_in_dtype(c, c.shapes, device, dt);
      ++checked;
    }
  return checked;
}

}  // namespace

// The CPU computes in f32 and f64 only (it stores bf16 but does not compute in it).
TEST_CASE("op table: every row in f32 on the CPU stays within the dtype's tolerance of float64") {
  CHECK(check_table_in_low_precision(Device::cpu(), {DType::f32}) >= 140);
}

TEST_CASE("op table: the CUDA forward and backward of every row match the CPU in f32 and bf16" *
          doctest::skip(!cuda_available())) {
  testing::poison_gpu_pool();
  const std::vector<OpCase> table = op_table();
  const auto rows = std::count_if(table.begin(), table.end(), [](const OpCase& c) { return !c.draws_in_dtype; });
  CHECK(check_table_in_low_precision(Device::cuda(), {DType::f32, DType::bf16}) == 2 * rows);
}

TEST_CASE("op table: the CUDA forward and backward match the CPU in f32 and bf16 at larger shapes" *
          doctest::skip(!cuda_available())) {
  testing::poison_gpu_pool();
  const std::vector<OpCase> table = op_table();
  int checked = 0;
  for (const DType dt : {DType::f32, DType::bf16})
    for (const LargeShapes& large : large_shapes()) {
      check_row_in_dtype(row_named(table, large.row), large.shapes, Device::cuda(), dt, large.len);
      ++checked;
    }
  CHECK(checked == 2 * static_cast<int>(large_shapes().size()));
}

TEST_CASE("op table: every larger shape names a row of the table") {
  const std::vector<OpCase> table = op_table();
  for (const LargeShapes& large : large_shapes()) {
    CAPTURE(large.row);
    CHECK_NOTHROW(row_named(table, large.row));
    CHECK(row_named(table, large.row).shapes.size() == large.shapes.size());
  }
}

TEST_CASE("op table: the CUDA forward and backward of every row match the CPU in float64" *
          doctest::skip(!cuda_available())) {
  const std::vector<OpCase> table = op_table();
  int matched = 0;
  for (const OpCase& c : table) {
    CAPTURE(c.name);
    INFO("input shapes: " << shapes_str(c.shapes));
    const std::vector<Tensor> inputs = make_inputs(c, seed_of(c.name));
    // Rows through f32 (casts) match to f32 rounding; the rest to float64 rounding.
    const double tolerance = c.options.eps > 1e-5 ? 1e-5 : 1e-10;
    try {
      const RowRun cpu = run_row(c, inputs, Device::cpu());
      const RowRun gpu = run_row(c, inputs, Device::cuda());
      CHECK(scaled_diff(gpu.out, cpu.out) <= tolerance);
      REQUIRE(gpu.grads.size() == cpu.grads.size());
      for (size_t i = 0; i < cpu.grads.size(); ++i) {
        CAPTURE(i);
        REQUIRE(gpu.grads[i].defined() == cpu.grads[i].defined());
        if (cpu.grads[i].defined()) CHECK(scaled_diff(gpu.grads[i], cpu.grads[i]) <= tolerance);
      }
      ++matched;
    } catch (const std::exception& e) {
      case_device() = Device::cpu();
      FAIL_CHECK("threw: " << e.what());
    }
  }
  CHECK(matched == static_cast<int>(table.size()));
}

TEST_CASE("op table: time every row, forward and forward + backward (LONGTAPE_OP_PERF=<scale>)" *
          doctest::skip(std::getenv("LONGTAPE_OP_PERF") == nullptr)) {
  const int64_t factor = std::max<int64_t>(1, std::atoll(std::getenv("LONGTAPE_OP_PERF")));
  const int repeats = 5;
  std::vector<Device> devices{Device::cpu()};
  if (cuda_available()) devices.push_back(Device::cuda());
  using Clock = std::chrono::steady_clock;
  for (const Device device : devices) {
    std::printf("\n%-44s %-8s %-28s %10s %10s\n", "op (f32)", "device", "input shapes", "fwd ms", "f+b ms");
    int timed = 0;
    for (const OpCase& row : op_table()) {
      // Rows with fixed index tensors only run at their table shapes.
      for (const int64_t f : {factor, int64_t{1}}) {
        OpCase c = row;
        c.shapes = scaled_shapes(row.shapes, f);
        std::vector<Tensor> inputs;
        for (const Tensor& x : make_inputs(c, seed_of(c.name))) inputs.push_back(x.detach().to(DType::f32));
        try {
          std::vector<double> forward_ms, total_ms;
          for (int r = 0; r <= repeats; ++r) {  // the first run warms up
            case_device() = device;
            std::vector<Tensor> xs;
            for (const Tensor& x : inputs) xs.push_back(x.to(device).requires_grad_());
            const auto t0 = Clock::now();
            Tensor out = c.fn(xs);
            Tensor loss = sum(out);
            (void)loss.item();  // waits for the device
            const auto t1 = Clock::now();
            loss.backward();
            if (xs[0].grad().defined()) (void)xs[0].grad().to(Device::cpu());  // waits for the device
            const auto t2 = Clock::now();
            if (r == 0) continue;
            forward_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
            total_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
          }
          case_device() = Device::cpu();
          std::sort(forward_ms.begin(), forward_ms.end());
          std::sort(total_ms.begin(), total_ms.end());
          CHECK(total_ms[repeats / 2] > 0.0);
          std::printf("%-44s %-8s %-28s %10.4f %10.4f\n", c.name.c_str(), device.str().c_str(),
                      shapes_str(c.shapes).c_str(), forward_ms[repeats / 2], total_ms[repeats / 2]);
          ++timed;
          break;
        } catch (const std::exception&) {
          case_device() = Device::cpu();
          if (f == 1) FAIL_CHECK(row.name << " could not be timed");
        }
      }
    }
    CHECK(timed == static_cast<int>(op_table().size()));
  }
}

TEST_CASE("gradcheck: the table names are unique") {
  const std::vector<OpCase> table = op_table();
  std::vector<std::string> names;
  for (const OpCase& c : table) names.push_back(c.name);
  std::sort(names.begin(), names.end());
  CHECK(std::adjacent_find(names.begin(), names.end()) == names.end());
  CHECK(names.size() >= 140);
}

TEST_CASE("gradcheck fails for a deliberately wrong backward") {
  manual_seed(5);
  Tensor x = Tensor::randn({3, 4}, DType::f64).requires_grad_();

  GradcheckResult right = autograd::gradcheck([](const Ts& in) { return square_with_backward_factor(in[0], 2.0); }, {x});
  CHECK_MESSAGE(right.passed, right.message);
  CHECK(right.max_abs_error < 1e-7);

  GradcheckResult wrong = autograd::gradcheck([](const Ts& in) { return square_with_backward_factor(in[0], 4.0); }, {x});
  CHECK_FALSE(wrong.passed);
  // analytic = 2 * numeric everywhere, so the worst relative error is 1
  CHECK(wrong.max_rel_error == doctest::Approx(1.0).epsilon(1e-4));
  CHECK(wrong.message.find("input 0") != std::string::npos);
  CHECK(wrong.message.find("element") != std::string::npos);
  CHECK(wrong.message.find("analytic") != std::string::npos);
  CHECK(wrong.message.find("numeric") != std::string::npos);
  CHECK(wrong.message.find("12 of 12") != std::string::npos);
  CHECK_THROWS_WITH_AS(
      autograd::check_gradcheck([](const Ts& in) { return square_with_backward_factor(in[0], 4.0); }, {x}),
      doctest::Contains("differ from finite differences"), Error);
  CHECK_NOTHROW(autograd::check_gradcheck([](const Ts& in) { return square_with_backward_factor(in[0], 2.0); }, {x}));
}

TEST_CASE("gradcheck names the failing input and element") {
  // Only element [1, 2] of the second input gets a wrong gradient.
  manual_seed(6);
  Tensor a = Tensor::randn({2, 3}, DType::f64).requires_grad_();
  Tensor b = Tensor::randn({2, 3}, DType::f64).requires_grad_();
  auto fn = [](const Ts& in) {
    Tensor out = add(in[0].detach(), in[1].detach());
    autograd::record("add_wrong_at_one_element", {in[0], in[1]}, {out}, [](const Ts& g) -> Ts {
      Tensor gb = g[0].clone();
      gb.data<double>()[5] += 1.0;
      return {g[0], gb};
    });
    return out;
  };
  GradcheckResult r = autograd::gradcheck(fn, {a, b});
  CHECK_FALSE(r.passed);
  CHECK(r.message.find("input 1, element 5 (index [1, 2]") != std::string::npos);
  CHECK(r.message.find("1 of 12") != std::string::npos);
  CHECK(r.max_abs_error == doctest::Approx(1.0).epsilon(1e-6));
}

TEST_CASE("gradcheck checks only inputs that require grad and leaves the inputs untouched") {
  manual_seed(7);
  Tensor a = Tensor::randn({3}, DType::f64).requires_grad_();
  Tensor b = Tensor::randn({3}, DType::f64);  // a constant
  const std::vector<double> a_before = a.to_vector(), b_before = b.to_vector();
  GradcheckResult r = autograd::gradcheck([](const Ts& in) { return mul(exp(in[0]), in[1]); }, {a, b});
  CHECK_MESSAGE(r.passed, r.message);
  CHECK(r.checked_elements == 3);
  CHECK(a.to_vector() == a_before);
  CHECK(b.to_vector() == b_before);
  CHECK_FALSE(a.grad().defined());

  // An input that does not influence the output has a zero gradient, which gradcheck accepts.
  Tensor c = Tensor::randn({2}, DType::f64).requires_grad_();
  GradcheckResult unused = autograd::gradcheck([](const Ts& in) { return exp(in[0]); }, {a, c});
  CHECK_MESSAGE(unused.passed, unused.message);
  CHECK(unused.checked_elements == 5);
}

TEST_CASE("gradcheck rejects bad input") {
  manual_seed(8);
  Tensor f32 = Tensor::randn({3}).requires_grad_();
  CHECK_THROWS_WITH_AS(autograd::gradcheck([](const Ts& in) { return exp(in[0]); }, {f32}),
                       doctest::Contains("gradcheck: input 0 requires grad and must be f64"), Error);
  Tensor constant = Tensor::randn({3}, DType::f64);
  CHECK_THROWS_WITH_AS(autograd::gradcheck([](const Ts& in) { return exp(in[0]); }, {constant}),
                       doctest::Contains("no input requires grad"), Error);
  Tensor x = Tensor::randn({3}, DType::f64).requires_grad_();
  CHECK_THROWS_WITH_AS(autograd::gradcheck([](const Ts&) { return Tensor(); }, {x}),
                       doctest::Contains("undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(autograd::gradcheck([](const Ts& in) { return exp(in[0]); }, {x}, {.eps = 0.0}),
                       doctest::Contains("eps must be > 0"), Error);
}
