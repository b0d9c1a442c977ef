#pragma once
// Tensor = shared storage + shape + element strides + offset + dtype + device, plus the autograd
// fields. Views share storage; contiguous() is the one copy. Differentiable operations live in
// tensor/ops.h; each op's backward is written beside its forward in tensor/ops/*.cpp.
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "tensor/allocator.h"
#include "tensor/device.h"
#include "tensor/dtype.h"

namespace longtape {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);
Shape contiguous_strides(const Shape& s);

namespace autograd {
struct Node;
struct GradHooks;
}

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;  // in elements
  int64_t offset = 0;  // in elements
  DType dtype = DType::f32;
  Device device;

  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;           // accumulated gradient (leaves, or retain_grad)
  std::shared_ptr<autograd::Node> grad_fn;    // producer of this tensor (non-leaf)
  uint32_t output_nr = 0;                     // which output of grad_fn
  bool retains_grad = false;
  std::shared_ptr<autograd::GradHooks> grad_hooks;  // leaves: autograd::register_post_accumulate_grad_hook
  std::string name;                           // optional, used in error messages
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation (see also ops.h for the differentiable builders) ----
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32,
                     Device device = Device::cpu());
  static Tensor arange(double start, double end, double step = 1.0, DType dtype = DType::f32,
                       Device device = Device::cpu());
  // Seeded random: uses the default generator (manual_seed) unless a seed is given.
  static Tensor rand(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor randn(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape,
                            Device device = Device::cpu());
  static Tensor from_vector(const std::vector<double>& values, const Shape& shape,
                            Device device = Device::cpu());
  static Tensor from_vector(const std::vector<int64_t>& values, const Shape& shape,
                            Device device = Device::cpu());
  static Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape,
                            Device device = Device::cpu());
  static Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu());

  // ---- metadata ----
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t size(int64_t dim) const;
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t numel() const { return shape_numel(impl().shape); }
  int64_t offset() const { return impl().offset; }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().device; }
  bool is_contiguous() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }
  // Pointer to the first element (storage + offset). Host pointer only on CPU tensors.
  void* raw_data() const;
  template <typename T>
  T* data() const { return static_cast<T*>(raw_data()); }
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }

  // ---- views (differentiable, share storage) ----
  Tensor view(const Shape& shape) const;     // needs compatible strides; -1 infers one dim
  Tensor reshape(const Shape& shape) const;  // view when possible, else copy
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t dim, int64_t index) const;
  Tensor expand(const Shape& shape) const;
  Tensor squeeze(int64_t dim) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor flatten(int64_t start_dim = 0, int64_t end_dim = -1) const;
  Tensor contiguous() const;  // differentiable copy when not contiguous
  Tensor clone() const;       // differentiable copy, always

  // ---- conversion ----
  Tensor to(Device device) const;  // differentiable
  Tensor to(DType dtype) const;    // differentiable cast for floating types
  Tensor cpu() const { return to(Device::cpu()); }
  // Reads of CUDA values also raise the index checks pending on this thread (tensor/device_checks.h).
  double item() const;             // one element, any dtype/device
  std::vector<double> to_vector() const;  // all elements, row-major, as double
  template <typename T>
  std::vector<T> to_vector_as() const;

  // ---- autograd ----
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& requires_grad_(bool on = true);
  Tensor grad() const;                 // undefined Tensor when none
  void set_grad(const Tensor& g);      // replaces the accumulated gradient (undefined clears)
  void zero_grad_() { set_grad(Tensor()); }
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  void retain_grad();
  Tensor detach() const;               // shares storage, no history
  void backward(const Tensor& grad_output = Tensor(), bool retain_graph = false) const;
  const std::shared_ptr<autograd::Node>& grad_fn() const { return impl().grad_fn; }

  // ---- in-place, not recorded by autograd (for optimizers and initialisation) ----
  Tensor& copy_(const Tensor& src);  // src broadcast to this shape, dtype cast, cross-device
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  // In-place modification count of this tensor's storage, shared by all its views (like torch's
  // _version). copy_, fill_, zero_ and every other in-place write bump it; an op that saved the
  // tensor for backward compares it with the count at save time and refuses a stale tensor.
  uint64_t version() const {
    const Storage* s = impl().storage.get();
    return s ? s->version.load(std::memory_order_relaxed) : 0;
  }
  // Marks an in-place write: code that writes a tensor's memory in place through raw pointers or
  // kernels (outside copy_/fill_) must call it.
  void bump_version() const {
    if (Storage* s = impl().storage.get()) s->version.fetch_add(1, std::memory_order_relaxed);
  }

  std::string str() const;  // readable printing
  TensorImpl& impl() const;
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// Default random generator (counter-based Philox): the same seed gives the same tensors.
void manual_seed(uint64_t seed);
struct PhiloxState {
  uint64_t seed;
  uint64_t offset;  // in 128-bit counter blocks
};
// Reserves `blocks` counter blocks of the default generator and returns where they start.
// On a thread inside a ThreadGeneratorScope (each rank of dist::run_ranks), the thread's own stream.
PhiloxState next_philox(uint64_t blocks);

// A random stream of the calling thread's own. While the scope lives, manual_seed and next_philox
// (so rand, randn, dropout, module initialisation) on this thread use `initial` and its
// continuation instead of the shared default generator, which stays untouched; scopes nest.
// dist::run_ranks gives every rank one, so ranks simulated as threads draw reproducibly whatever
// the interleaving of the threads.
class ThreadGeneratorScope {
 public:
  explicit ThreadGeneratorScope(PhiloxState initial);
  ~ThreadGeneratorScope();
  ThreadGeneratorScope(const ThreadGeneratorScope&) = delete;
  ThreadGeneratorScope& operator=(const ThreadGeneratorScope&) = delete;
  const PhiloxState& state() const { return state_; }

 private:
  PhiloxState state_;
  PhiloxState* previous_;
};
// The seed of stream `stream` derived from (seed, offset): a SplitMix64 mix, so different
// streams (ranks) and different starting points give unrelated Philox keys.
uint64_t derive_stream_seed(uint64_t seed, uint64_t offset, uint64_t stream);

// Makes a tensor from its parts (used by ops to build views).
Tensor make_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);
int64_t normalize_dim(int64_t dim, int64_t ndim, const char* op);

// "[2, 3] f32 on cpu", or "undefined": how error messages name a tensor they were given.
std::string describe_tensor(const Tensor& t);

}  // namespace longtape
