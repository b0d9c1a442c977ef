#include "tensor/tensor.h"

#include <cmath>
#include <iomanip>
#include <mutex>
#include <sstream>

#include "tensor/autograd/grad_mode.h"
#include "tensor/autograd/node.h"
#include "tensor/checked_math.h"
#include "tensor/device_checks.h"
#include "tensor/kernels.h"
#include "tensor/ops.h"

namespace longtape {

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string describe_tensor(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return shape_str(t.shape()) + " " + dtype_name(t.dtype()) + " on " + t.device().str();
}

int64_t shape_numel(const Shape& s) {
  // Fast path for the common small shapes; anything unusual goes through the full checks, which
  // refuse negative dims and overflow of the non-zero dims' product (even beside a zero dim).
  int64_t n = 1;
  bool ok = true;
  for (int64_t d : s) ok &= d > 0 && !__builtin_mul_overflow(n, d, &n);
  return ok ? n : checked::numel(s, "shape");
}

Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    LT_CHECK(s[i] >= 0, "contiguous_strides: expected non-negative sizes, got ", s[i], " at dim ", i,
             " of shape ", shape_str(s));
    st[i] = acc;
    LT_CHECK(!__builtin_mul_overflow(acc, std::max<int64_t>(s[i], 1), &acc), "contiguous_strides: shape ",
             shape_str(s), " overflows 64 bits: the product of its dims from dim ", i,
             " on exceeds the limit ", checked::kInt64Max);
  }
  return st;
}

int64_t normalize_dim(int64_t dim, int64_t ndim, const char* op) {
  int64_t lo = ndim == 0 ? -1 : -ndim, hi = ndim == 0 ? 0 : ndim - 1;
  LT_CHECK(dim >= lo && dim <= hi, op, ": dim must be in [", lo, ", ", hi, "] for a ", ndim,
           "-d tensor, got ", dim);
  return dim < 0 ? dim + std::max<int64_t>(ndim, 1) : dim;
}

TensorImpl& Tensor::impl() const {
  LT_CHECK(impl_ != nullptr, "tensor: operation on an undefined tensor");
  return *impl_;
}

static void check_shape(const Shape& shape, const char* op) {
  LT_CHECK(shape.size() <= static_cast<size_t>(kernels::kMaxDims), op, ": at most ", kernels::kMaxDims,
           " dims are supported, got shape ", shape_str(shape));
  for (int64_t d : shape) LT_CHECK(d >= 0, op, ": sizes must be >= 0, got shape ", shape_str(shape));
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  check_shape(shape, "empty");
  const int64_t numel = checked::numel_for_bytes(shape, dtype_size(dtype), "empty");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = allocate_storage(device, static_cast<size_t>(numel) * dtype_size(dtype));
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  impl->device = device;
  return Tensor(std::move(impl));
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}
Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor Tensor::scalar(double value, DType dtype, Device device) { return full({}, value, dtype, device); }

Tensor Tensor::arange(double start, double end, double step, DType dtype, Device device) {
  LT_CHECK(step != 0, "arange: step must be nonzero");
  double n = std::ceil((end - start) / step);
  int64_t count = n > 0 ? static_cast<int64_t>(n) : 0;
  std::vector<double> values(count);
  for (int64_t i = 0; i < count; ++i) values[i] = start + step * static_cast<double>(i);
  return from_vector(values, {count}, device).to(dtype);
}

namespace {
std::mutex g_rng_mutex;
PhiloxState g_rng{0x5eed, 0};
thread_local PhiloxState* g_thread_rng = nullptr;  // set by ThreadGeneratorScope
}  // namespace

void manual_seed(uint64_t seed) {
  if (g_thread_rng) {
    *g_thread_rng = {seed, 0};
    return;
  }
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  g_rng = {seed, 0};
}

PhiloxState next_philox(uint64_t blocks) {
  if (g_thread_rng) {
    PhiloxState s = *g_thread_rng;
    g_thread_rng->offset += blocks;
    return s;
  }
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  PhiloxState s = g_rng;
  g_rng.offset += blocks;
  return s;
}

ThreadGeneratorScope::ThreadGeneratorScope(PhiloxState initial) : state_(initial), previous_(g_thread_rng) {
  g_thread_rng = &state_;
}
ThreadGeneratorScope::~ThreadGeneratorScope() { g_thread_rng = previous_; }

uint64_t derive_stream_seed(uint64_t seed, uint64_t offset, uint64_t stream) {
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(seed) ^ offset) ^ stream);
}

// A new floating tensor filled by fill(view, seed, offset) from fresh Philox counter blocks: one
// block per `per_block` values, and one more.
template <typename Fill>
static Tensor random_tensor(const char* op, const Shape& shape, DType dtype, Device device, int64_t per_block,
                            Fill fill) {
  LT_CHECK(is_floating(dtype), op, ": expected a floating dtype, got ", dtype_name(dtype));
  Tensor t = Tensor::empty(shape, dtype, device);
  PhiloxState s = next_philox(static_cast<uint64_t>(t.numel() + per_block - 1) / per_block + 1);
  fill(kernels::make_view(t), s.seed, s.offset);
  return t;
}

Tensor Tensor::rand(const Shape& shape, DType dtype, Device device) {
  return random_tensor("rand", shape, dtype, device, 4, [](const auto& view, uint64_t seed, uint64_t offset) {
    kernels::uniform(view, seed, offset, 0.0, 1.0);
  });
}

Tensor Tensor::randn(const Shape& shape, DType dtype, Device device) {
  return random_tensor("randn", shape, dtype, device, 2, [](const auto& view, uint64_t seed, uint64_t offset) {
    kernels::normal(view, seed, offset, 0.0, 1.0);
  });
}

template <typename T>
static Tensor from_host(const std::vector<T>& values, const Shape& shape, DType dtype, Device device) {
  check_shape(shape, "from_vector");
  LT_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape), "from_vector: shape ",
           shape_str(shape), " needs ", shape_numel(shape), " values, got ", values.size());
  Tensor t = Tensor::empty(shape, dtype, device);
  copy_bytes(t.raw_data(), device, values.data(), Device::cpu(), values.size() * sizeof(T));
  return t;
}
Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& s, Device d) { return from_host(v, s, DType::f32, d); }
Tensor Tensor::from_vector(const std::vector<double>& v, const Shape& s, Device d) { return from_host(v, s, DType::f64, d); }
Tensor Tensor::from_vector(const std::vector<int64_t>& v, const Shape& s, Device d) { return from_host(v, s, DType::i64, d); }
Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& s, Device d) { return from_host(v, s, DType::i32, d); }

int64_t Tensor::size(int64_t d) const { return shape()[normalize_dim(d, dim(), "size")]; }

bool Tensor::is_contiguous() const {
  const auto& sh = shape();
  const auto& st = strides();
  int64_t expected = 1;
  for (size_t i = sh.size(); i-- > 0;) {
    if (sh[i] == 1) continue;
    if (st[i] != expected) return false;
    expected *= sh[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  const TensorImpl& t = impl();
  if (!t.storage || !t.storage->data) return nullptr;
  return static_cast<char*>(t.storage->data) + t.offset * static_cast<int64_t>(dtype_size(t.dtype));
}

double Tensor::item() const {
  LT_CHECK(numel() == 1, "item: expected a tensor with one element, got shape ", shape_str(shape()));
  return to_vector()[0];
}

std::vector<double> Tensor::to_vector() const {
  NoGradGuard guard;
  Tensor host = detach().to(Device::cpu()).to(DType::f64).contiguous();
  // The read waited for the device: the index checks it holds are answered now (device_checks.h).
  if (device().is_cuda()) raise_device_checks();
  const double* p = host.data<double>();
  return std::vector<double>(p, p + host.numel());
}

template <typename T>
std::vector<T> Tensor::to_vector_as() const {
  std::vector<double> v = to_vector();
  return std::vector<T>(v.begin(), v.end());
}
template std::vector<float> Tensor::to_vector_as<float>() const;
template std::vector<int64_t> Tensor::to_vector_as<int64_t>() const;
template std::vector<int32_t> Tensor::to_vector_as<int32_t>() const;

Tensor& Tensor::requires_grad_(bool on) {
  LT_CHECK(!on || is_floating(dtype()), "requires_grad_: only floating tensors can require grad, got ",
           dtype_name(dtype()));
  LT_CHECK(is_leaf(), "requires_grad_: can only be changed on leaf tensors (this one has grad_fn '",
           impl().grad_fn->op_name, "'); use detach() first");
  impl().requires_grad = on;
  return *this;
}

Tensor Tensor::grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }

void Tensor::set_grad(const Tensor& g) {
  if (g.defined())
    LT_CHECK(g.shape() == shape(), "set_grad: gradient shape ", shape_str(g.shape()),
             " does not match tensor shape ", shape_str(shape()));
  impl().grad = g.defined() ? g.impl_ptr() : nullptr;
}

void Tensor::retain_grad() {
  LT_CHECK(requires_grad(), "retain_grad: tensor does not require grad");
  if (is_leaf()) return;
  impl().grad_fn->retained[impl().output_nr] = impl_;
  impl().retains_grad = true;
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>();
  const TensorImpl& src = this->impl();
  impl->storage = src.storage;
  impl->shape = src.shape;
  impl->strides = src.strides;
  impl->offset = src.offset;
  impl->dtype = src.dtype;
  impl->device = src.device;
  return Tensor(std::move(impl));
}

void Tensor::backward(const Tensor& grad_output, bool retain_graph) const {
  autograd::run_backward({*this}, {grad_output}, retain_graph);
}

Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  const TensorImpl& src = base.impl();
  impl->storage = src.storage;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = src.dtype;
  impl->device = src.device;
  return Tensor(std::move(impl));
}

Tensor& Tensor::copy_(const Tensor& src) {
  LT_CHECK(src.defined(), "copy_: source is undefined");
  NoGradGuard guard;
  Tensor s = src.detach();
  if (s.device() != device()) s = s.to(device());
  Tensor b = s.shape() == shape() ? s : s.expand(shape());
  kernels::copy(kernels::make_view(*this), kernels::make_view(b));
  bump_version();
  return *this;
}

Tensor& Tensor::fill_(double value) {
  kernels::fill(kernels::make_view(*this), value);
  bump_version();
  return *this;
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  std::ostringstream os;
  os << "Tensor(shape=" << shape_str(shape()) << ", dtype=" << dtype_name(dtype())
     << ", device=" << device().str();
  if (requires_grad()) os << ", requires_grad";
  if (grad_fn()) os << ", grad_fn=" << grad_fn()->op_name;
  os << ")\n";
  std::vector<double> v = to_vector();
  const Shape& sh = shape();
  const int64_t max_items = 64;
  if (sh.empty()) {
    os << v[0];
    return os.str();
  }
  // Print the last dim as rows, prefixed by the leading index; elide past max_items.
  int64_t cols = sh.back(), rows = cols ? static_cast<int64_t>(v.size()) / cols : 0;
  int64_t printed = 0;
  os << std::setprecision(5);
  for (int64_t r = 0; r < rows && printed < max_items; ++r) {
    os << "  [";
    for (int64_t c = 0; c < cols; ++c) {
      if (c == 8 && cols > 10) {
        os << ", ...";
        c = cols - 2;
        continue;
      }
      os << (c ? ", " : "") << v[r * cols + c];
    }
    os << "]\n";
    printed += std::min<int64_t>(cols, 10);
  }
  if (printed < static_cast<int64_t>(v.size()) && rows > 1) os << "  ... (" << v.size() << " values)\n";
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.str(); }

}  // namespace longtape
