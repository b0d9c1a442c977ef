#include "nn/optim.h"

#include <cmath>
#include <cstring>
#include <numbers>
#include <set>
#include <type_traits>

#include "tensor/autograd/grad_mode.h"
#include "tensor/capture_retain.h"
#include "tensor/ops.h"

#ifdef LONGTAPE_WITH_CUDA
#include "tensor/cuda/optim_kernels.h"
#endif

namespace longtape::nn {

// ---------------------------------------------------------------- Optimizer

Optimizer::Optimizer(NamedTensors parameters, double lr) : parameters_(std::move(parameters)), lr_(lr) {
  LT_CHECK(std::isfinite(lr) && lr >= 0, "Optimizer: lr must be finite and >= 0, got ", lr);
  std::set<std::string> names;
  std::set<const TensorImpl*> seen;
  for (auto& [name, p] : parameters_) {
    LT_CHECK(p.defined(), "Optimizer: parameter '", name, "' is undefined");
    LT_CHECK(is_floating(p.dtype()), "Optimizer: parameter '", name, "' must be floating, got ",
             dtype_name(p.dtype()));
    LT_CHECK(p.is_leaf(), "Optimizer: parameter '", name, "' must be a leaf tensor (not the result of an op)");
    LT_CHECK(names.insert(name).second, "Optimizer: parameter name '", name, "' appears twice");
    LT_CHECK(seen.insert(p.impl_ptr().get()).second, "Optimizer: parameter '", name,
             "' is the same tensor as an earlier one (pass tied weights once)");
  }
  slots_.resize(parameters_.size());
}

void Optimizer::zero_grad(bool set_to_none) {
  NoGradGuard guard;
  for (auto& [name, p] : parameters_) {
    if (set_to_none || !p.grad().defined()) p.set_grad(Tensor());
    else p.grad().zero_();
  }
}

void Optimizer::set_lr(double lr) {
  LT_CHECK(std::isfinite(lr) && lr >= 0, "Optimizer::set_lr: lr must be finite and >= 0, got ", lr);
  lr_ = lr;
}

void Optimizer::set_step_count(int64_t steps) {
  LT_CHECK(steps >= 0, "Optimizer::set_step_count: expected >= 0, got ", steps);
  step_count_ = steps;
}

static DType state_dtype(DType parameter) { return is_half_precision(parameter) ? DType::f32 : parameter; }

Tensor& Optimizer::slot(size_t i, const std::string& name) {
  auto& slots = slots_[i];
  auto it = slots.find(name);
  if (it == slots.end()) {
    const Tensor& p = parameters_[i].second;
    it = slots.emplace(name, Tensor::zeros(p.shape(), state_dtype(p.dtype()), p.device())).first;
  }
  return it->second;
}

bool Optimizer::has_slot(size_t i, const std::string& name) const { return slots_[i].count(name) > 0; }

Tensor Optimizer::grad_of(size_t i) const {
  const auto& [name, p] = parameters_[i];
  Tensor g = p.grad();
  if (!g.defined()) return g;
  LT_CHECK(g.shape() == p.shape() && g.device() == p.device(), type_name(), ": gradient of '", name,
           "' has shape ", shape_str(g.shape()), " on ", g.device().str(), ", expected ", shape_str(p.shape()),
           " on ", p.device().str());
  const DType want = state_dtype(p.dtype());
  return g.dtype() == want ? g : cast(g, want);
}

std::map<std::string, Tensor> Optimizer::state() const {
  std::map<std::string, Tensor> out;
  for (size_t i = 0; i < parameters_.size(); ++i)
    for (auto& [slot_name, t] : slots_[i]) out[parameters_[i].first + "." + slot_name] = t;
  return out;
}

namespace {
std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (auto& n : names) out += (out.empty() ? "" : "|") + n;
  return out;
}
}  // namespace

void Optimizer::check_state(const std::map<std::string, Tensor>& state) const {
  const std::vector<std::string> slots = slot_names();
  std::map<std::string, size_t> known;
  for (size_t i = 0; i < parameters_.size(); ++i)
    for (auto& s : slots) known[parameters_[i].first + "." + s] = i;
  for (auto& [key, value] : state) {
    auto it = known.find(key);
    LT_CHECK(it != known.end(), type_name(), ": state entry '", key,
             "' is not <parameter>.<", joined(slots), "> for any parameter of this optimizer");
    const Tensor& p = parameters_[it->second].second;
    LT_CHECK(value.defined() && value.shape() == p.shape(), type_name(), ": state entry '", key, "' has shape ",
             value.defined() ? shape_str(value.shape()) : std::string("undefined"), ", its parameter has ",
             shape_str(p.shape()));
  }
}

void Optimizer::load_state(const std::map<std::string, Tensor>& state, int64_t step_count) {
  NoGradGuard guard;
  check_state(state);
  LT_CHECK(step_count >= 0, type_name(), "::load_state: step_count must be >= 0, got ", step_count);
  std::map<std::string, std::pair<size_t, std::string>> known;
  for (size_t i = 0; i < parameters_.size(); ++i)
    for (auto& s : slot_names()) known[parameters_[i].first + "." + s] = {i, s};
  for (auto& slots : slots_) slots.clear();
  for (auto& [key, value] : state) {
    auto [i, s] = known.at(key);
    const Tensor& p = parameters_[i].second;
    Tensor t = Tensor::empty(p.shape(), state_dtype(p.dtype()), p.device());
    t.copy_(value);
    slots_[i][s] = t;
  }
  step_count_ = step_count;
}

// ---------------------------------------------------------------- SGD

SGD::SGD(NamedTensors parameters, SGDOptions options) : Optimizer(std::move(parameters), options.lr), options_(options) {
  LT_CHECK(options.momentum >= 0, "SGD: momentum must be >= 0, got ", options.momentum);
  LT_CHECK(options.weight_decay >= 0, "SGD: weight_decay must be >= 0, got ", options.weight_decay);
  LT_CHECK(!options.nesterov || (options.momentum > 0 && options.dampening == 0),
           "SGD: nesterov needs momentum > 0 and dampening 0, got momentum ", options.momentum, " and dampening ",
           options.dampening);
}

void SGD::step() {
  NoGradGuard guard;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    Tensor& stored = parameters_[i].second;
    Tensor g = grad_of(i);
    if (!g.defined()) continue;
    Tensor p = cast(stored, g.dtype());  // the update's arithmetic runs in the state dtype
    if (options_.weight_decay != 0) g = add(g, mul(p, options_.weight_decay));
    if (options_.momentum != 0) {
      const bool first = !has_slot(i, "momentum_buffer");
      Tensor& buf = slot(i, "momentum_buffer");
      if (first) buf.copy_(g);
      else buf.copy_(add(mul(buf, options_.momentum), mul(g, 1.0 - options_.dampening)));
      g = options_.nesterov ? add(g, mul(buf, options_.momentum)) : buf;
    }
    stored.copy_(sub(p, mul(g, lr_)));
  }
  ++step_count_;
}

// ---------------------------------------------------------------- AdamW

bool decay_matrices_only(const std::string&, const Tensor& parameter) { return parameter.dim() >= 2; }

#ifdef LONGTAPE_WITH_CUDA
namespace {
// A table of kernel arguments with its device copy. A copy to the device waits for the stream, so
// the copy is redone only when an entry changes (the pool hands the same blocks back step after
// step, so pointers and sizes rarely do).
template <class Item>
struct DeviceTable {
  std::vector<Item> host;
  Tensor device;  // an i64 tensor used as raw device memory

  void update(const std::vector<Item>& fresh, Device on) {
    const size_t bytes = fresh.size() * sizeof(Item);
    const bool same = host.size() == fresh.size() && device.defined() && device.device() == on &&
                      std::memcmp(host.data(), fresh.data(), bytes) == 0;
    if (same) return;
    host = fresh;
    device = Tensor::empty({static_cast<int64_t>((bytes + 7) / 8)}, DType::i64, on);
    copy_bytes(device.raw_data(), on, fresh.data(), Device::cpu(), bytes);
  }
  const Item* data() const { return static_cast<const Item*>(device.raw_data()); }
};
}  // namespace

struct AdamW::FusedTable {
  DeviceTable<cuda::AdamWTensor> tensors;
  DeviceTable<cuda::TensorChunk> chunks;
};
#else
struct AdamW::FusedTable {};
#endif

AdamW::AdamW(NamedTensors parameters, AdamWOptions options)
    : Optimizer(std::move(parameters), options.lr), options_(std::move(options)) {
  LT_CHECK(options_.beta1 >= 0 && options_.beta1 < 1, "AdamW: beta1 must be in [0, 1), got ", options_.beta1);
  LT_CHECK(options_.beta2 >= 0 && options_.beta2 < 1, "AdamW: beta2 must be in [0, 1), got ", options_.beta2);
  LT_CHECK(options_.eps > 0, "AdamW: eps must be > 0, got ", options_.eps);
  LT_CHECK(options_.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ", options_.weight_decay);
}

AdamW::~AdamW() = default;

bool AdamW::decays(size_t i) const {
  if (options_.weight_decay == 0) return false;
  return !options_.decays || options_.decays(parameters_[i].first, parameters_[i].second);
}

void AdamW::step_with_ops(const std::vector<size_t>& which, double bias1, double bias2) {
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double step_size = lr_ / bias1, bias2_sqrt = std::sqrt(bias2);
  for (size_t i : which) {
    Tensor& stored = parameters_[i].second;
    Tensor g = grad_of(i);
    Tensor p = cast(stored, g.dtype());  // bf16 parameters update in f32 and are rounded once
    Tensor& m = slot(i, "exp_avg");
    Tensor& v = slot(i, "exp_avg_sq");
    m.copy_(add(mul(m, b1), mul(g, 1.0 - b1)));
    v.copy_(add(mul(v, b2), mul(mul(g, g), 1.0 - b2)));
    Tensor denom = add(mul(sqrt(v), 1.0 / bias2_sqrt), options_.eps);
    Tensor decayed = decays(i) ? mul(p, 1.0 - lr_ * options_.weight_decay) : p;
    stored.copy_(sub(decayed, mul(div(m, denom), step_size)));
  }
}

void AdamW::step() {
  NoGradGuard guard;
  const int64_t t = step_count_ + 1;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t));
  const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t));
  std::vector<size_t> composed;
#ifdef LONGTAPE_WITH_CUDA
  // Contiguous f32 parameters on one CUDA device go to the fused kernel; everything else (CPU,
  // other dtypes, strided tensors) takes the composed path, which computes the same update.
  std::vector<size_t> fused;
  Device fused_device;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const Tensor& p = parameters_[i].second;
    if (!p.grad().defined()) continue;
    const bool eligible = options_.fused && p.device().is_cuda() && p.dtype() == DType::f32 && p.is_contiguous() &&
                          (fused.empty() || p.device() == fused_device);
    if (eligible) {
      fused_device = p.device();
      fused.push_back(i);
    } else {
      composed.push_back(i);
    }
  }
  if (!fused.empty()) {
    constexpr int64_t kChunk = 4096;
    if (!fused_table_) fused_table_ = std::make_unique<FusedTable>();
    std::vector<cuda::AdamWTensor> tensors;
    std::vector<cuda::TensorChunk> chunks;
    std::vector<Tensor> keep_alive;  // gradients made contiguous for this step
    for (size_t i : fused) {
      Tensor& p = parameters_[i].second;
      Tensor g = grad_of(i).contiguous();
      keep_alive.push_back(g);
      Tensor& m = slot(i, "exp_avg");
      Tensor& v = slot(i, "exp_avg_sq");
      const float wd = decays(i) ? static_cast<float>(options_.weight_decay) : 0.0f;
      const int64_t index = static_cast<int64_t>(tensors.size());
      tensors.push_back({p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), p.numel(), wd});
      for (int64_t start = 0; start < p.numel(); start += kChunk) chunks.push_back({index, start});
    }
    FusedTable& table = *fused_table_;
    table.tensors.update(tensors, fused_device);
    table.chunks.update(chunks, fused_device);
    retain_during_capture(table.tensors.device);
    retain_during_capture(table.chunks.device);
    cuda::AdamWHyper hyper{static_cast<float>(lr_),   static_cast<float>(options_.beta1),
                           static_cast<float>(options_.beta2), static_cast<float>(options_.eps),
                           static_cast<float>(bias1), static_cast<float>(std::sqrt(bias2))};
    if (device_scalars_on_) {
      LT_CHECK(composed.empty() && device_scalars_.device() == fused_device, "AdamW: device scalars need every ",
               "parameter on the fused kernel (", fused_blocker(), ")");
      hyper.device_scalars = device_scalars_.data<float>();
    }
    if (skip_gate_.defined()) {
      LT_CHECK(skip_gate_.device() == fused_device && skip_gate_.dtype() == DType::f32 && skip_gate_.numel() == 1,
               "AdamW: the skip gate must be one f32 value on ", fused_device.str(), ", got ",
               dtype_name(skip_gate_.dtype()), " ", shape_str(skip_gate_.shape()), " on ", skip_gate_.device().str());
      hyper.skip_unless_finite = skip_gate_.data<float>();
    }
    cuda::fused_adamw(table.tensors.data(), table.chunks.data(), static_cast<int64_t>(chunks.size()), kChunk, hyper);
    // The kernel wrote the parameters in place: graphs that saved them must see it.
    for (size_t i : fused) parameters_[i].second.bump_version();
    ++fused_steps_;
  }
#else
  for (size_t i = 0; i < parameters_.size(); ++i)
    if (parameters_[i].second.grad().defined()) composed.push_back(i);
#endif
  LT_CHECK(composed.empty() || (!device_scalars_on_ && !skip_gate_.defined()),
           "AdamW: device scalars and the skip gate need every parameter on the fused kernel (", fused_blocker(), ")");
  step_with_ops(composed, bias1, bias2);
  ++step_count_;
}

std::string AdamW::fused_blocker() const {
#ifdef LONGTAPE_WITH_CUDA
  if (!options_.fused) return "AdamWOptions::fused is off";
  Device first;
  bool any = false;
  for (const auto& [name, p] : parameters_) {
    if (!p.grad().defined()) continue;
    if (!p.device().is_cuda() || p.dtype() != DType::f32 || !p.is_contiguous())
      return detail::concat("parameter '", name, "' is ", dtype_name(p.dtype()), p.is_contiguous() ? "" : " strided",
                            " on ", p.device().str(), ", the fused kernel takes contiguous f32 on CUDA");
    if (any && p.device() != first)
      return detail::concat("parameter '", name, "' is on ", p.device().str(), ", the others on ", first.str());
    first = p.device();
    any = true;
  }
  return "";
#else
  return "this build has no CUDA backend";
#endif
}

void AdamW::use_device_scalars(bool on) {
  if (!on) {
    device_scalars_on_ = false;
    return;
  }
  const std::string blocker = fused_blocker();
  LT_CHECK(blocker.empty(), "AdamW: device scalars need every parameter on the fused CUDA kernel, but ", blocker);
  LT_CHECK(!parameters_.empty(), "AdamW: device scalars need parameters");
  const Device device = parameters_.front().second.device();
  if (!device_scalars_.defined() || device_scalars_.device() != device)
    device_scalars_ = Tensor::zeros({3}, DType::f32, device);
  device_scalars_on_ = true;
}

void AdamW::stage_device_scalars() {
  LT_CHECK(device_scalars_.defined(), "AdamW::stage_device_scalars: device scalars are off (use_device_scalars)");
#ifdef LONGTAPE_WITH_CUDA
  const int64_t t = step_count_ + 1;
  const double bias1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t));
  const double bias2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t));
  cuda::set_adamw_scalars(device_scalars_.data<float>(), static_cast<float>(lr_), static_cast<float>(bias1),
                          static_cast<float>(std::sqrt(bias2)));
  device_scalars_.bump_version();
#endif
}

// ---------------------------------------------------------------- clipping

#ifdef LONGTAPE_WITH_CUDA
namespace {
// The gradients of `parameters` as a device table for the fused clipping kernels, when all of
// them are contiguous f32 on one CUDA device (else the composed ops run).
struct GradientTable {
  const cuda::GradientRef* tensors = nullptr;  // device memory
  const cuda::TensorChunk* chunks = nullptr;
  int64_t num_chunks = 0;
  Device device;
  std::vector<Tensor> gradients;
};
constexpr int64_t kClipChunk = 16384;

bool fused_gradient_table(const std::vector<Tensor>& parameters, GradientTable& table) {
  std::vector<cuda::GradientRef> refs;
  std::vector<cuda::TensorChunk> chunks;
  for (const Tensor& p : parameters) {
    Tensor g = p.grad();
    if (!g.defined() || g.numel() == 0) continue;
    if (!g.device().is_cuda() || g.dtype() != DType::f32 || !g.is_contiguous() ||
        (!table.gradients.empty() && g.device() != table.device))
      return false;
    table.device = g.device();
    table.gradients.push_back(g);
    const int64_t index = static_cast<int64_t>(refs.size());
    refs.push_back({g.data<float>(), g.numel()});
    for (int64_t start = 0; start < g.numel(); start += kClipChunk) chunks.push_back({index, start});
  }
  if (refs.empty()) return false;
  // The last table is kept and reused while the gradients stay where they were.
  struct Cached {
    DeviceTable<cuda::GradientRef> refs;
    DeviceTable<cuda::TensorChunk> chunks;
  };
  // Never destroyed: freeing device memory at process exit would race the CUDA runtime's teardown.
  thread_local Cached& cached = *new Cached;
  cached.refs.update(refs, table.device);
  cached.chunks.update(chunks, table.device);
  retain_during_capture(cached.refs.device);  // a graph captured now reads them after the cache moved on
  retain_during_capture(cached.chunks.device);
  table.tensors = cached.refs.data();
  table.chunks = cached.chunks.data();
  table.num_chunks = static_cast<int64_t>(cached.chunks.host.size());
  return true;
}
}  // namespace
#endif

Tensor grad_norm_tensor(const std::vector<Tensor>& parameters) {
  NoGradGuard guard;
#ifdef LONGTAPE_WITH_CUDA
  // One launch for every gradient's chunk sums of squares, then one reduction over the chunks.
  if (GradientTable table; fused_gradient_table(parameters, table)) {
    Tensor partials = Tensor::empty({table.num_chunks}, DType::f32, table.device);
    cuda::fused_sum_squares(table.tensors, table.chunks, table.num_chunks, kClipChunk, partials.data<float>());
    return sqrt(sum(partials));
  }
#endif
  // Sum of squares per gradient in f32 (f64 when a gradient is f64), added up on the first
  // gradient's device, so nothing is read back here.
  Tensor total;
  for (const Tensor& p : parameters) {
    Tensor g = p.grad();
    if (!g.defined() || g.numel() == 0) continue;
    Tensor gs = is_half_precision(g.dtype()) ? cast(g, DType::f32) : g;
    Tensor s = sum(mul(gs, gs));
    if (!total.defined()) {
      total = s;
      continue;
    }
    if (s.device() != total.device()) s = s.to(total.device());
    const DType dt = total.dtype() == DType::f64 || s.dtype() == DType::f64 ? DType::f64 : total.dtype();
    total = add(cast(total, dt), cast(s, dt));
  }
  return total.defined() ? sqrt(total) : total;
}

void scale_grads_to_norm(const std::vector<Tensor>& parameters, double norm, double max_norm) {
  LT_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  if (!std::isfinite(norm) || norm <= max_norm) return;
  NoGradGuard guard;
  const double coef = max_norm / (norm + 1e-6);
#ifdef LONGTAPE_WITH_CUDA
  if (GradientTable table; fused_gradient_table(parameters, table)) {
    cuda::fused_scale(table.tensors, table.chunks, table.num_chunks, kClipChunk, static_cast<float>(coef));
    for (const Tensor& g : table.gradients) g.bump_version();
    return;
  }
#endif
  for (const Tensor& p : parameters) {
    Tensor g = p.grad();
    if (g.defined()) g.copy_(mul(g, coef));
  }
}

void clip_grads_on_device(const std::vector<Tensor>& parameters, const Tensor& norm, double max_norm) {
  LT_CHECK(max_norm > 0, "clip_grads_on_device: max_norm must be > 0, got ", max_norm);
  LT_CHECK(norm.defined() && norm.numel() == 1 && norm.dtype() == DType::f32 && norm.device().is_cuda(),
           "clip_grads_on_device: expected the norm as one f32 value on a CUDA device, got ",
           norm.defined() ? dtype_name(norm.dtype()) + std::string(" ") + shape_str(norm.shape()) + " on " +
                                norm.device().str()
                          : std::string("an undefined tensor"));
  NoGradGuard guard;
#ifdef LONGTAPE_WITH_CUDA
  GradientTable table;
  LT_CHECK(fused_gradient_table(parameters, table) && table.device == norm.device(),
           "clip_grads_on_device: expected every gradient contiguous f32 on ", norm.device().str(),
           " (the fused clipping kernel), got another layout, dtype or device");
  cuda::fused_clip_to_norm(table.tensors, table.chunks, table.num_chunks, kClipChunk, norm.data<float>(), max_norm);
  for (const Tensor& g : table.gradients) g.bump_version();
#else
  LT_CHECK(false, "clip_grads_on_device: this build has no CUDA backend");
#endif
}

double grad_norm(const std::vector<Tensor>& parameters) {
  Tensor norm = grad_norm_tensor(parameters);
  return norm.defined() ? norm.item() : 0.0;
}

double clip_grad_norm(const std::vector<Tensor>& parameters, double max_norm) {
  LT_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  const double norm = grad_norm(parameters);
  scale_grads_to_norm(parameters, norm, max_norm);
  return norm;
}

// ---------------------------------------------------------------- schedule

double CosineSchedule::lr_at(int64_t step) const {
  LT_CHECK(step >= 0, "CosineSchedule: step must be >= 0, got ", step);
  LT_CHECK(total_steps >= 1 && warmup_steps >= 0, "CosineSchedule: need total_steps >= 1 and warmup_steps >= 0, got ",
           total_steps, " and ", warmup_steps);
  if (step < warmup_steps) return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps));
  return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace longtape::nn
