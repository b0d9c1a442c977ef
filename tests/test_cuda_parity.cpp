// CUDA backend against the CPU backend beyond the per-op parity of the op table
// (tests/test_op_table.cpp): casts and copies bit for bit, the reduce kernels and NaN, TF32
// matmuls, bitwise equal index accumulation, same seed => same random numbers and dropout masks
// on both devices, zero-size tensors, clear errors, and the same GPU computation run twice giving
// bitwise equal results. Every GPU test skips when no GPU is visible.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "tensor/autograd/grad_mode.h"
#include "support/device_parity.h"
#include "tensor/backend_options.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

using namespace longtape;

namespace {

using testing::bitwise_equal;
using testing::check_normwise_close;
using testing::dtype_tolerance;
using testing::normwise_rel_err;
using testing::poison_gpu_pool;

const Device kGpu = Device::cuda(0);
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

Tensor randn64(const Shape& s) { return Tensor::randn(s, DType::f64); }

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

TEST_CASE("cuda: strided copies of whole 16-byte rows (head slices, permuted rows) equal the CPU's bit for bit" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(104);
  for (DType dt : {DType::bf16, DType::f32, DType::f64}) {
    INFO(dtype_name(dt));
    // (B, N, H, D) with heads split over 2 ranks: rows of 3 heads x 8 values, 16-byte multiples.
    const Tensor x = Tensor::randn({2, 10, 6, 8}).to(dt), xg = x.to(kGpu);
    auto heads = [](const Tensor& t, int64_t first, int64_t count) {
      return t.reshape({2, 10, 2, 3, 8}).narrow(3, first, count).permute({2, 0, 1, 3, 4});
    };
    CHECK(bitwise_equal(heads(xg, 0, 3).contiguous(), heads(x, 0, 3).contiguous()));
    CHECK(bitwise_equal(heads(xg, 1, 2).contiguous(), heads(x, 1, 2).contiguous()));
    CHECK(bitwise_equal(xg.narrow(1, 3, 5).contiguous(), x.narrow(1, 3, 5).contiguous()));  // batch 2: 3-d rows
    // Into strided destinations: one rank's heads of a chunk of tokens.
    Tensor dst = Tensor::zeros({2, 10, 6, 8}, dt), dst_g = Tensor::zeros({2, 10, 6, 8}, dt, kGpu);
    const Tensor piece = Tensor::randn({2, 4, 3, 8}).to(dt);
    dst.narrow(1, 2, 4).narrow(2, 3, 3).copy_(piece);
    dst_g.narrow(1, 2, 4).narrow(2, 3, 3).copy_(piece.to(kGpu));
    CHECK(bitwise_equal(dst_g, dst));
    // Rows that start off a 16-byte boundary or are not whole 16-byte units: the element path.
    CHECK(bitwise_equal(xg.narrow(3, 1, 7).contiguous(), x.narrow(3, 1, 7).contiguous()));
    CHECK(bitwise_equal(xg.narrow(3, 0, 3).contiguous(), x.narrow(3, 0, 3).contiguous()));
    CHECK(bitwise_equal(xg.permute({0, 2, 1, 3}).contiguous(), x.permute({0, 2, 1, 3}).contiguous()));
  }
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
      if (op == kernels::ReduceOp::sum) check_normwise_close(og, oc, dtype_tolerance(DType::f32, cols), "sum");
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

TEST_CASE("cuda: TF32 matmuls are looser than f32 but within 1e-2, forward and backward" *
          doctest::skip(!cuda_available())) {
  poison_gpu_pool();
  manual_seed(106);
  REQUIRE_FALSE(allow_tf32());
  // Measurably less exact than the default f32 path on a large product.
  Tensor a = randn64({256, 512}), b = randn64({512, 256});
  Tensor ref = matmul(a, b);
  Tensor ag = a.to(kGpu).to(DType::f32), bg = b.to(kGpu).to(DType::f32);
  const double err_f32 = normwise_rel_err(matmul(ag, bg), ref);
  set_allow_tf32(true);
  Tensor tf = matmul(ag, bg);
  set_allow_tf32(false);
  const double err_tf32 = normwise_rel_err(tf, ref);
  INFO("f32 error ", err_f32, ", tf32 error ", err_tf32);
  CHECK(err_f32 <= dtype_tolerance(DType::f32, 512));
  CHECK(err_tf32 <= 1e-2);
  CHECK(err_tf32 > 10 * err_f32);
  // A batched product and its gradients against float64 from the same f32 values.
  Tensor x = randn64({3, 37, 53}).to(DType::f32), y = randn64({3, 53, 29}).to(DType::f32);
  Tensor up = randn64({3, 37, 29}).to(DType::f32);
  Tensor xg = x.to(kGpu).requires_grad_(), yg = y.to(kGpu).requires_grad_();
  Tensor xr = x.to(DType::f64).requires_grad_(), yr = y.to(DType::f64).requires_grad_();
  set_allow_tf32(true);
  Tensor outg = matmul(xg, yg);
  outg.backward(up.to(kGpu));
  set_allow_tf32(false);
  Tensor outr = matmul(xr, yr);
  outr.backward(up.to(DType::f64));
  check_normwise_close(outg, outr, 1e-2, "tf32 forward");
  check_normwise_close(xg.grad(), xr.grad(), 1e-2, "tf32 gradient of the first operand");
  check_normwise_close(yg.grad(), yr.grad(), 1e-2, "tf32 gradient of the second operand");
  // k = 0 gives zeros; an empty batch gives an empty result.
  CHECK(bitwise_equal(matmul(Tensor::zeros({3, 0}, DType::f32, kGpu), Tensor::zeros({0, 4}, DType::f32, kGpu)),
                      Tensor::zeros({3, 4})));
  CHECK(matmul(Tensor::zeros({0, 3, 2}, DType::f32, kGpu), Tensor::zeros({0, 2, 4}, DType::f32, kGpu)).shape() ==
        Shape{0, 3, 4});
  CHECK_THROWS_AS(matmul(ag, b.to(DType::f32)), Error);
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
    check_normwise_close(ng, nc, dt == DType::f64 ? 1e-14 : 1e-7, "normal");
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

TEST_CASE("cuda: zero-size tensors" * doctest::skip(!cuda_available())) {
  poison_gpu_pool();
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
