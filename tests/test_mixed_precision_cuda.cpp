// Mixed precision and the fused training ops on CUDA (every case skips without a GPU): bf16
// training routes attention through the fused kernels and stays within 3% of f32 on the recall
// task; bf16 products read bf16 operands and write f32 with f32 gradients; tf32 products stay
// near f32; out-of-range targets and token ids are raised at the next read of a value instead of
// stopping every step.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "models/language_model.h"
#include "nn/data.h"
#include "nn/optim.h"
#include "nn/trainer.h"
#include "support/device_parity.h"
#include "support/test_utils.h"
#include "tensor/device_checks.h"
#include "tensor/ops.h"
#include "tensor/precision.h"

using namespace longtape;
using testing::normwise_rel_err;

namespace {

const Device kGpu = Device::cuda(0);

nn::RecallTaskConfig recall_1024() {
  return {.seq_len = 1024, .num_keys = 16, .num_values = 8, .num_filler = 8, .num_pairs = 4, .num_queries = 4,
          .seed = 5};
}

// A small causal LM whose attention the fused CUDA kernels can run (head_dim 32).
models::LanguageModelConfig small_model(int64_t vocab, int64_t seq_len) {
  models::LanguageModelConfig c{
      .vocab_size = vocab, .max_seq_len = seq_len, .embed_dim = 128, .num_layers = 2, .num_heads = 4, .attention = "dilated"};
  c.attention_config.segment_lengths = {256, seq_len};
  c.attention_config.dilation_rates = {1, 2};
  return c;
}

struct Run {
  std::vector<double> losses;
  std::string backend;
  double eval_loss = 0;
};

Run train_on_gpu(Precision precision, int64_t steps) {
  manual_seed(11);
  nn::RecallTask task(recall_1024());
  models::LanguageModel model(small_model(task.vocab_size(), task.seq_len()));
  model.to(kGpu);
  nn::AdamW optimizer(model.named_parameters(),
                      {.lr = 3e-3, .weight_decay = 0.01, .decays = nn::decay_matrices_only});
  nn::TrainerOptions to;
  to.steps = steps;
  to.batch_size = 8;
  to.eval_batches = 4;
  to.precision = precision;
  nn::Trainer trainer(model, optimizer, nn::CosineSchedule{3e-3, 3e-4, 30, steps}, to);
  Run run;
  trainer.on_step = [&](const nn::StepResult& r) {
    run.losses.push_back(r.loss);
    if (r.step == 1) run.backend = model.attention_layer(0)->core().last_backend();
  };
  trainer.fit(nn::batches_of(task, kGpu));
  run.eval_loss = trainer.evaluate(nn::batches_of(task, kGpu)).loss;
  for (const auto& [name, p] : model.named_parameters()) {
    INFO(name);
    CHECK(p.dtype() == DType::f32);  // master weights stay f32
  }
  return run;
}

double tail_mean(const std::vector<double>& v, size_t n) {
  double s = 0;
  for (size_t i = v.size() - n; i < v.size(); ++i) s += v[i];
  return s / static_cast<double>(n);
}

}  // namespace

TEST_CASE("cuda: bf16 and f32 training route attention through the fused kernels" *
          doctest::skip(!cuda_available())) {
  const Run bf16 = train_on_gpu(Precision::bf16, 2);
  CHECK(bf16.backend == "fused-cuda");
  const Run f32 = train_on_gpu(Precision::f32, 2);
  CHECK(f32.backend == "fused-cuda");  // the exact-f32 kernels
  for (double l : bf16.losses) CHECK(std::isfinite(l));
  for (double l : f32.losses) CHECK(std::isfinite(l));
}

TEST_CASE("cuda: bf16 vs f32, 300 steps on the recall task (N=1024): final loss within 3%" *
          doctest::skip(!cuda_available())) {
  const Run f32 = train_on_gpu(Precision::f32, 300);
  const Run bf16 = train_on_gpu(Precision::bf16, 300);
  const double a = tail_mean(f32.losses, 20), b = tail_mean(bf16.losses, 20);
  INFO("f32 " << a << ", bf16 " << b << "; held-out f32 " << f32.eval_loss << ", bf16 " << bf16.eval_loss);
  CHECK(a < 0.9 * tail_mean(std::vector<double>(f32.losses.begin(), f32.losses.begin() + 20), 20));  // it learned
  CHECK(std::abs(b - a) <= 0.03 * a);
  CHECK(std::abs(bf16.eval_loss - f32.eval_loss) <= 0.03 * f32.eval_loss);
}

namespace {

// a @ b under bf16 on the CPU (the reference: the same rounded values in f32) and on the GPU, with
// the gradients of sum(y * go).
struct Bf16Products {
  Tensor y_cpu, y_gpu, ga_cpu, ga_gpu, gb_cpu, gb_gpu;
};
Bf16Products bf16_products(const Tensor& a, const Tensor& b, const Tensor& go) {
  Tensor ac = a.clone().requires_grad_(), bc = b.clone().requires_grad_();
  Tensor ag = a.to(kGpu).detach().requires_grad_(), bg = b.to(kGpu).detach().requires_grad_();
  Tensor yc, yg;
  {
    AutocastScope scope(Precision::bf16);
    yc = matmul(ac, bc);
    yg = matmul(ag, bg);
  }
  yc.backward(go);
  yg.backward(go.to(kGpu));
  return {yc, yg, ac.grad(), ag.grad(), bc.grad(), bg.grad()};
}

// The GPU's product and b's gradient in f32, a's gradient in ga_dtype, all within 1e-5 of the CPU's
// (a's gradient within ga_tolerance).
void check_bf16_products(const Bf16Products& r, DType ga_dtype, double ga_tolerance) {
  CHECK(r.y_gpu.dtype() == DType::f32);
  CHECK(r.ga_gpu.dtype() == ga_dtype);
  CHECK(r.gb_gpu.dtype() == DType::f32);
  CHECK(normwise_rel_err(r.y_gpu, r.y_cpu) < 1e-5);
  CHECK(normwise_rel_err(r.ga_gpu, r.ga_cpu) < ga_tolerance);
  CHECK(normwise_rel_err(r.gb_gpu, r.gb_cpu) < 1e-5);
}

}  // namespace

TEST_CASE("cuda: bf16 matmul reads bf16 operands, accumulates and writes f32, and returns f32 gradients" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  Tensor a = Tensor::randn({64, 300}), b = Tensor::randn({300, 48}), go = Tensor::randn({64, 48});
  const Bf16Products r = bf16_products(a, b, go);
  check_bf16_products(r, DType::f32, 1e-5);
  CHECK(normwise_rel_err(r.y_gpu, matmul(a, b)) > 1e-5);  // rounded: not the f32 product
}

TEST_CASE("cuda: a bf16 operand meets an f32 one under bf16: f32 result, the bf16 input's gradient in bf16" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const Bf16Products r =
      bf16_products(Tensor::randn({40, 96}).to(DType::bf16), Tensor::randn({96, 24}), Tensor::randn({40, 24}));
  // The CPU rounds its f32 gradient to bf16 afterwards, CUDA writes bf16 from the f32 accumulator.
  check_bf16_products(r, DType::bf16, 1e-2);
}

TEST_CASE("cuda: gelu_mlp matches the composed MLP on the GPU (f32 and bf16) and the CPU" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  const int64_t rows = 333, E = 64, H = 256;
  Tensor x = Tensor::randn({rows, E}), w1 = mul(Tensor::randn({H, E}), 0.1), b1 = Tensor::randn({H}),
         w2 = mul(Tensor::randn({E, H}), 0.1), go = Tensor::randn({rows, E});
  auto composed = [](const std::vector<Tensor>& in) {
    return matmul(bias_gelu(matmul(in[0], in[1].transpose(0, 1)), in[2]), in[3].transpose(0, 1));
  };
  auto fused = [](const std::vector<Tensor>& in) {
    return gelu_mlp(in[0], in[1], in[2], in[3], Tensor(), GeluApprox::erf, 100);
  };
  auto run = [&](auto&& f, Device device, Precision precision) {
    std::vector<Tensor> in;
    for (const Tensor& t : {x, w1, b1, w2}) in.push_back(t.to(device).detach().requires_grad_());
    Tensor y;
    {
      AutocastScope scope(precision);
      y = f(in);
    }
    y.backward(go.to(device));
    std::vector<Tensor> out{y.to(Device::cpu())};
    for (const Tensor& t : in) out.push_back(t.grad().to(Device::cpu()));
    return out;
  };
  // f32: fused, composed and the CPU agree to rounding. bf16: the fused node writes its
  // pre-activation in bf16 (one more rounding than the composed ops), so both are measured against
  // an f64 reference and the fused error may be at most twice the composed one.
  std::vector<Tensor> reference;
  {
    std::vector<Tensor> in;
    for (const Tensor& t : {x, w1, b1, w2}) in.push_back(t.to(DType::f64).detach().requires_grad_());
    Tensor y = composed(in);
    y.backward(go.to(DType::f64));
    reference.push_back(y);
    for (const Tensor& t : in) reference.push_back(t.grad());
  }
  for (Precision p : {Precision::f32, Precision::bf16}) {
    CAPTURE(precision_name(p));
    const auto gpu_fused = run(fused, kGpu, p), gpu_composed = run(composed, kGpu, p), cpu = run(composed, Device::cpu(), p);
    for (size_t i = 0; i < gpu_fused.size(); ++i) {
      CAPTURE(i);
      CHECK(gpu_fused[i].dtype() == DType::f32);
      if (p == Precision::f32) {
        CHECK(normwise_rel_err(gpu_fused[i], gpu_composed[i]) < 1e-5);
        CHECK(normwise_rel_err(gpu_fused[i], cpu[i]) < 1e-5);
      } else {
        const Tensor want = reference[i].to(DType::f32);
        const double fused_err = normwise_rel_err(gpu_fused[i], want), composed_err = normwise_rel_err(gpu_composed[i], want);
        CAPTURE(fused_err);
        CAPTURE(composed_err);
        CHECK(composed_err > 0.0);
        CHECK(fused_err <= 2.0 * composed_err);
        CHECK(normwise_rel_err(cpu[i], want) <= 2.0 * composed_err);
      }
    }
  }
}

TEST_CASE("cuda: gradient norm and clipping over many parameters (two launches) match the CPU" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  std::vector<Tensor> cpu_params, gpu_params;
  for (int64_t n : {1, 7, 16384, 16385, 40000, 3}) {  // chunk edges and a gradient-less parameter
    Tensor p = Tensor::randn({n}), g = Tensor::randn({n});
    Tensor pc = p.clone().requires_grad_(), pg = p.to(kGpu).detach().requires_grad_();
    if (n != 3) {
      pc.set_grad(g.clone());
      pg.set_grad(g.to(kGpu));
    }
    cpu_params.push_back(pc);
    gpu_params.push_back(pg);
  }
  const double cpu_norm = nn::grad_norm_tensor(cpu_params).item();
  const double gpu_norm = nn::grad_norm_tensor(gpu_params).item();
  CHECK(cpu_norm > 100.0);
  CHECK(std::abs(gpu_norm - cpu_norm) <= 1e-5 * cpu_norm);
  CHECK(nn::grad_norm_tensor(gpu_params).item() == gpu_norm);  // the same bits again
  nn::scale_grads_to_norm(cpu_params, cpu_norm, 1.0);
  nn::scale_grads_to_norm(gpu_params, gpu_norm, 1.0);
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    CAPTURE(i);
    CHECK(cpu_params[i].grad().defined() == gpu_params[i].grad().defined());
    if (cpu_params[i].grad().defined())
      CHECK(normwise_rel_err(gpu_params[i].grad().to(Device::cpu()), cpu_params[i].grad()) < 1e-5);
  }
  CHECK(std::abs(nn::grad_norm_tensor(gpu_params).item() - 1.0) < 1e-4);
}

TEST_CASE("cuda: tf32 precision keeps f32 products near f32, and only inside its scope" *
          doctest::skip(!cuda_available())) {
  manual_seed(testing::fresh_seed());
  Tensor a = Tensor::randn({256, 1024}, DType::f64), b = Tensor::randn({1024, 256}, DType::f64);
  Tensor ref = matmul(a, b);
  Tensor ag = a.to(DType::f32).to(kGpu), bg = b.to(DType::f32).to(kGpu);
  Tensor tf32;
  {
    AutocastScope scope(Precision::tf32);
    tf32 = matmul(ag, bg);
  }
  const double tf32_err = normwise_rel_err(tf32, ref), f32_err = normwise_rel_err(matmul(ag, bg), ref);
  INFO("tf32 " << tf32_err << ", f32 " << f32_err);
  CHECK(tf32_err < 5e-3);
  CHECK(f32_err < 1e-5);
}

TEST_CASE("cuda: an out-of-range target or token id is raised at the next read, not during the step" *
          doctest::skip(!cuda_available())) {
  raise_device_checks();
  Tensor logits = Tensor::randn({5, 7}).to(kGpu).requires_grad_();
  Tensor targets = Tensor::from_vector(std::vector<int64_t>{1, 2, 9, 3, -100}, {5}).to(kGpu);
  Tensor loss = cross_entropy(logits, targets);  // no throw: the check waits on the device
  CHECK(pending_device_checks() == 1);
  CHECK_THROWS_WITH_AS(loss.item(),
                       doctest::Contains("cross_entropy: target 9 at position 2 is out of range [0, 7) and is not "
                                         "ignore_index (-100)"),
                       Error);
  CHECK(pending_device_checks() == 0);
  Tensor table = Tensor::randn({6, 4}).to(kGpu);
  Tensor rows = embedding(table, Tensor::from_vector(std::vector<int64_t>{0, 5, 6, 1}, {4}).to(kGpu));
  CHECK_THROWS_WITH_AS(rows.to_vector(), doctest::Contains("embedding: index 6 at position 2 is out of range [0, 6)"),
                       Error);
  // Good inputs leave nothing behind once read.
  Tensor ok = cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{1, 2, 0, 3, -100}, {5}).to(kGpu));
  CHECK(std::isfinite(ok.item()));
  CHECK(pending_device_checks() == 0);
}

TEST_CASE("cuda: fused cross_entropy on bf16 logits returns an f32 loss and bf16 gradients near the f64 CPU" *
          doctest::skip(!cuda_available())) {
  LT_FRESH_SEED(seed);
  manual_seed(seed);
  std::mt19937_64 rng(seed);
  Tensor logits = mul(Tensor::randn({300, 50}, DType::f64), 2.0);
  std::vector<int64_t> t(300);
  for (auto& v : t) v = static_cast<int64_t>(rng() % 50);
  Tensor targets = Tensor::from_vector(t, {300});
  Tensor lc = logits.clone().requires_grad_();
  Tensor lg = logits.to(DType::bf16).to(kGpu).detach().requires_grad_();
  Tensor loss_c = cross_entropy(lc, targets), loss_g = cross_entropy(lg, targets.to(kGpu));
  CHECK(loss_g.dtype() == DType::f32);
  CHECK(loss_g.item() == doctest::Approx(loss_c.item()).epsilon(2e-2));
  loss_c.backward();
  loss_g.backward();
  CHECK(lg.grad().dtype() == DType::bf16);
  CHECK(normwise_rel_err(lg.grad(), lc.grad()) < 3e-2);
}
