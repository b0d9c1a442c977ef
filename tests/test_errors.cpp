// Bad input raises longtape::Error whose message names the op, what it expected and what it got.
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "tensor/autograd/node.h"
#include "nn/data.h"
#include "models/language_model.h"
#include "tensor/checked_math.h"
#include "tensor/ops.h"

using namespace longtape;
using doctest::Contains;

namespace {

Tensor randn(const Shape& shape, DType dtype = DType::f32) { return Tensor::randn(shape, dtype); }
Tensor i64(const std::vector<int64_t>& values, const Shape& shape) { return Tensor::from_vector(values, shape); }

// A tensor that claims to live on `device` but owns no memory: enough for the checks that run
// before any data is touched, in builds with or without a GPU.
Tensor metadata_only(const Shape& shape, DType dtype, Device device) {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  impl->device = device;
  return Tensor(std::move(impl));
}

}  // namespace

TEST_CASE("shape mismatch in binary ops and matmul") {
  manual_seed(1);
  CHECK_THROWS_WITH_AS(add(randn({2, 3}), randn({4})),
                       Contains("add: shapes [2, 3] and [4] cannot be broadcast together (dim 1: 3 vs 4)"), Error);
  CHECK_THROWS_WITH_AS(mul(randn({2, 3, 4}), randn({3, 2})), Contains("mul: shapes [2, 3, 4] and [3, 2]"), Error);
  CHECK_THROWS_WITH_AS(sub(randn({5}), randn({3, 4})), Contains("sub: shapes [5] and [3, 4]"), Error);
  CHECK_THROWS_WITH_AS(where(randn({3}), randn({2, 2}), randn({2, 2})), Contains("where: shapes [3] and [2, 2]"),
                       Error);
  CHECK_THROWS_WITH_AS(matmul(randn({2, 3}), randn({4, 5})), Contains("matmul: inner dims differ: [2, 3] @ [4, 5]"),
                       Error);
  CHECK_THROWS_WITH_AS(matmul(randn({3}), randn({4})), Contains("matmul: inner dims differ: [3] @ [4]"), Error);
  CHECK_THROWS_WITH_AS(matmul(randn({2, 3, 4}), randn({3, 4, 5})),
                       Contains("matmul: batch dims of [2, 3, 4] and [3, 4, 5] cannot be broadcast"), Error);
  CHECK_THROWS_WITH_AS(matmul(Tensor::scalar(2.0), randn({3})),
                       Contains("matmul: both operands need at least 1 dim, got shapes [] and [3]"), Error);
  CHECK_THROWS_WITH_AS(stack({randn({2, 3}), randn({3, 2})}, 0), Contains("stack: tensor 1 has shape [3, 2]"), Error);
  CHECK_THROWS_WITH_AS(cat({randn({2, 3}), randn({3, 2})}, 0), Contains("cat: tensor 1 has shape [3, 2]"), Error);
  CHECK_THROWS_WITH_AS(split(randn({2, 5}), {2, 2}, 1), Contains("split: sizes [2, 2] sum to 4"), Error);
  CHECK_THROWS_WITH_AS(layer_norm(randn({4, 6}), randn({5}), Tensor()),
                       Contains("layer_norm: weight must have shape [6] to match input [4, 6], got [5]"), Error);
  CHECK_THROWS_WITH_AS(cross_entropy(randn({4, 5}), i64({0, 1, 2}, {3})),
                       Contains("cross_entropy: targets must have shape [4] for logits of shape [4, 5], got [3]"),
                       Error);
}

TEST_CASE("dtype mismatch") {
  manual_seed(2);
  CHECK_THROWS_WITH_AS(add(randn({2, 3}), randn({2, 3}, DType::f64)),
                       Contains("add: both tensors must have one dtype, got f32 and f64"), Error);
  CHECK_THROWS_WITH_AS(mul(randn({3}, DType::f64), randn({3})),
                       Contains("mul: both tensors must have one dtype, got f64 and f32"), Error);
  CHECK_THROWS_WITH_AS(matmul(randn({2, 3}), randn({3, 2}, DType::f64)),
                       Contains("matmul: operand dtypes differ: f32 and f64"), Error);
  CHECK_THROWS_WITH_AS(layer_norm(randn({2, 4}), randn({4}, DType::f64), Tensor()),
                       Contains("layer_norm: weight must have dtype f32, got f64"), Error);
  CHECK_THROWS_WITH_AS(scatter_add(randn({2, 3}), 1, i64({0, 1}, {2, 1}), randn({2, 1}, DType::f64)),
                       Contains("scatter_add: src must have dtype f32 like the input, got f64"), Error);
  CHECK_THROWS_WITH_AS(index_select(randn({4, 2}), 0, randn({2})),
                       Contains("index_select: index must be an i64 or i32 tensor, got f32"), Error);
}

TEST_CASE("integer tensors into floating ops") {
  Tensor ints = i64({1, 2, 3, 4}, {2, 2});
  CHECK_THROWS_WITH_AS(exp(ints), Contains("exp: expected a floating tensor (f32, f64, bf16, f16), got i64"), Error);
  CHECK_THROWS_WITH_AS(tanh(Tensor::from_vector(std::vector<int32_t>{1, 2}, {2})),
                       Contains("tanh: expected a floating tensor (f32, f64, bf16, f16), got i32"), Error);
  CHECK_THROWS_WITH_AS(sum(ints), Contains("sum: expected a floating tensor, got i64"), Error);
  CHECK_THROWS_WITH_AS(matmul(ints, ints), Contains("matmul: expected floating operands, got i64"), Error);
  CHECK_THROWS_WITH_AS(softmax(ints), Contains("softmax: input must be a floating tensor (f32, f64, bf16, f16), got i64"),
                       Error);
  CHECK_THROWS_WITH_AS(Tensor::randn({2}, DType::i64), Contains("randn: expected a floating dtype, got i64"), Error);
}

TEST_CASE("out-of-range and repeated dims") {
  manual_seed(3);
  Tensor x = randn({2, 3});
  CHECK_THROWS_WITH_AS(sum(x, {5}), Contains("sum: dim must be in [-2, 1] for a 2-d tensor, got 5"), Error);
  CHECK_THROWS_WITH_AS(mean(x, {-3}), Contains("mean: dim must be in [-2, 1] for a 2-d tensor, got -3"), Error);
  CHECK_THROWS_WITH_AS(amax(x, {1, -1}), Contains("amax: dim -1 given twice"), Error);
  CHECK_THROWS_WITH_AS(x.permute({0, 0}), Contains("permute: dim 0 appears twice"), Error);
  CHECK_THROWS_WITH_AS(x.permute({1, 0, 2}), Contains("permute: expected 2 dims, got 3"), Error);
  CHECK_THROWS_WITH_AS(x.transpose(0, 2), Contains("transpose: dim must be in [-2, 1] for a 2-d tensor, got 2"),
                       Error);
  CHECK_THROWS_WITH_AS(x.unsqueeze(4), Contains("unsqueeze: dim must be in [-3, 2] for a 3-d tensor, got 4"), Error);
  CHECK_THROWS_WITH_AS(softmax(x, 2), Contains("softmax: dim must be in [-2, 1] for a 2-d tensor, got 2"), Error);
  CHECK_THROWS_WITH_AS(cat({x, x}, 2), Contains("cat: dim must be in [-2, 1] for a 2-d tensor, got 2"), Error);
}

TEST_CASE("invalid view shapes") {
  manual_seed(4);
  Tensor x = randn({2, 3});
  CHECK_THROWS_WITH_AS(x.view({5, 5}), Contains("view: shape [5, 5] needs 25 elements, the tensor has 6"), Error);
  CHECK_THROWS_WITH_AS(x.view({-1, -1}), Contains("view: only one dim can be -1, got [-1, -1]"), Error);
  CHECK_THROWS_WITH_AS(x.view({-1, 4}), Contains("view: cannot infer -1 in [-1, 4] for 6 elements"), Error);
  CHECK_THROWS_WITH_AS(x.view({-2, 3}), Contains("view: sizes must be >= 0 or -1, got [-2, 3]"), Error);
  CHECK_THROWS_WITH_AS(x.transpose(0, 1).view({6}),
                       Contains("view: shape [6] is not compatible with the strides of a [3, 2] tensor"), Error);
  CHECK_THROWS_WITH_AS(x.reshape({7}), Contains("reshape: shape [7] needs 7 elements, the tensor has 6"), Error);
  CHECK_THROWS_WITH_AS(randn({3, 2}).expand({3, 4}),
                       Contains("expand: cannot expand shape [3, 2] to [3, 4] (dim 1: 2 vs 4)"), Error);
  CHECK_THROWS_WITH_AS(x.expand({3}), Contains("expand: cannot expand shape [2, 3] to [3]"), Error);
  CHECK_THROWS_WITH_AS(Tensor::empty({2, -1}), Contains("empty: sizes must be >= 0, got shape [2, -1]"), Error);
}

TEST_CASE("view and reshape shape inference refuses ambiguous, negative and overflowing shapes") {
  manual_seed(5);
  Tensor x = randn({2, 3});
  CHECK_THROWS_WITH_AS(x.view({-1, 2, -1}), Contains("only one dim can be -1, got [-1, 2, -1] (dims 0 and 2)"), Error);
  CHECK_THROWS_WITH_AS(x.reshape({3, -5}), Contains("reshape: sizes must be >= 0 or -1, got [3, -5] (dim 1 is -5)"),
                       Error);
  CHECK_THROWS_WITH_AS(x.view({-1, 4}), Contains("6 is not a multiple of 4"), Error);
  // An empty tensor: with a zero-size dim any value of -1 fits, so it is refused as ambiguous.
  Tensor empty = Tensor::empty({0, 6});
  CHECK_THROWS_WITH_AS(empty.view({0, -1}), Contains("-1 is ambiguous"), Error);
  CHECK_THROWS_WITH_AS(empty.reshape({-1, 0, 3}), Contains("-1 is ambiguous"), Error);
  CHECK(empty.view({6, 0}).shape() == Shape{6, 0});
  CHECK(empty.view({-1, 6}).shape() == Shape{0, 6});
  // Products past int64 are refused with the shape, whether or not another dim is 0 or -1.
  const int64_t big = int64_t{1} << 62;
  CHECK_THROWS_WITH_AS(x.view({big, big, -1}), Contains("has more elements than int64 can count"), Error);
  CHECK_THROWS_WITH_AS(empty.view({0, big, big}), Contains("has more elements than int64 can count"), Error);
  CHECK_THROWS_WITH_AS(x.reshape({big, 8}), Contains("has more elements than int64 can count"), Error);
  // Valid inference still works.
  CHECK(x.view({-1}).shape() == Shape{6});
  CHECK(x.reshape({3, -1}).shape() == Shape{3, 2});
}

TEST_CASE("narrow, slice and select out of range") {
  manual_seed(5);
  Tensor x = randn({2, 3});
  CHECK_THROWS_WITH_AS(x.narrow(1, 2, 3), Contains("narrow: range [2, 5) is outside dim 1 of size 3"), Error);
  CHECK_THROWS_WITH_AS(x.narrow(0, -1, 1), Contains("narrow: range [-1, 0) is outside dim 0 of size 2"), Error);
  CHECK_THROWS_WITH_AS(x.narrow(2, 0, 1), Contains("narrow: dim must be in [-2, 1]"), Error);
  CHECK_THROWS_WITH_AS(x.select(0, 2), Contains("select: index 2 is out of range for dim 0 of size 2"), Error);
  CHECK_THROWS_WITH_AS(x.select(1, -4), Contains("select: index -4 is out of range for dim 1 of size 3"), Error);
  CHECK_THROWS_WITH_AS(x.slice(1, 0, 3, 0), Contains("slice: step must be > 0, got 0"), Error);
}

TEST_CASE("index out of range in index_select, gather, scatter_add, embedding, cross_entropy") {
  manual_seed(6);
  Tensor x = randn({5, 3});
  CHECK_THROWS_WITH_AS(index_select(x, 0, i64({1, 7}, {2})),
                       Contains("index_select: index 7 at position 1 is out of range [0, 5)"), Error);
  CHECK_THROWS_WITH_AS(index_select(x, 1, i64({-1}, {1})),
                       Contains("index_select: index -1 at position 0 is out of range [0, 3)"), Error);
  CHECK_THROWS_WITH_AS(gather(x, 1, i64({0, 1, 3, 2}, {2, 2})),
                       Contains("gather: index 3 at position 2 is out of range [0, 3)"), Error);
  CHECK_THROWS_WITH_AS(gather(x, 1, i64({0, 1}, {2})),
                       Contains("gather: index must have the same number of dims as input (2)"), Error);
  CHECK_THROWS_WITH_AS(scatter_add(x, 0, i64({5, 0}, {1, 2}), randn({1, 2})),
                       Contains("scatter_add: index 5 at position 0 is out of range [0, 5)"), Error);
  CHECK_THROWS_WITH_AS(embedding(x, i64({0, 4, 5}, {3})),
                       Contains("embedding: index 5 at position 2 is out of range [0, 5)"), Error);
  CHECK_THROWS_WITH_AS(embedding(x, randn({2})), Contains("embedding: indices must be an i64 or i32 tensor, got f32"),
                       Error);
  CHECK_THROWS_WITH_AS(cross_entropy(randn({2, 4}), i64({1, 4}, {2})),
                       Contains("cross_entropy: target 4 at position 1 is out of range [0, 4)"), Error);
}

TEST_CASE("device mismatch, and CUDA tensors in a build without CUDA") {
  manual_seed(7);
  Tensor cpu = randn({2, 3});
  Tensor on_gpu = metadata_only({2, 3}, DType::f32, Device::cuda(0));
  CHECK_THROWS_WITH_AS(add(cpu, on_gpu), Contains("add: both tensors must be on one device, got cpu and cuda:0"), Error);
  CHECK_THROWS_WITH_AS(mul(on_gpu, cpu), Contains("mul: both tensors must be on one device, got cuda:0 and cpu"), Error);
  CHECK_THROWS_WITH_AS(matmul(cpu, metadata_only({3, 2}, DType::f32, Device::cuda(0))),
                       Contains("matmul: operands on cpu and cuda:0"), Error);
  CHECK_THROWS_WITH_AS(layer_norm(randn({2, 4}), metadata_only({4}, DType::f32, Device::cuda(0)), Tensor()),
                       Contains("layer_norm: weight must be on cpu, got cuda:0"), Error);
  CHECK_THROWS_WITH_AS(index_select(cpu, 0, metadata_only({1}, DType::i64, Device::cuda(0))),
                       Contains("index_select: index must be on cpu like the input, got cuda:0"), Error);
#ifndef LONGTAPE_WITH_CUDA
  CHECK_FALSE(cuda_available());
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}, DType::f32, Device::cuda(0)),
                       Contains("this build of longtape has no CUDA backend (rebuild with -DLONGTAPE_CUDA=ON); "
                                "asked for cuda:0"),
                       Error);
  CHECK_THROWS_WITH_AS(cpu.to(Device::cuda(0)), Contains("no CUDA backend"), Error);
  CHECK_THROWS_WITH_AS(Tensor::randn({2}, DType::f32, Device::cuda(1)), Contains("asked for cuda:1"), Error);
#else
  if (cuda_available()) {
    Tensor real = Tensor::randn({2, 3}, DType::f32, Device::cuda(0));
    CHECK_THROWS_WITH_AS(add(cpu, real), Contains("add: both tensors must be on one device, got cpu and cuda:0"),
                         Error);
    CHECK_THROWS_WITH_AS(matmul(real, randn({3, 2})), Contains("matmul: operands on cuda:0 and cpu"), Error);
  }
#endif
}

TEST_CASE("autograd misuse") {
  manual_seed(8);
  Tensor x = randn({2, 3}, DType::f64).requires_grad_();
  Tensor y = exp(x);
  CHECK_THROWS_WITH_AS(y.backward(),
                       Contains("backward: a gradient must be given for a non-scalar root; root 0 has shape [2, 3]"),
                       Error);
  CHECK_THROWS_WITH_AS(y.backward(randn({3}, DType::f64)),
                       Contains("backward: gradient for root 0 must have shape [2, 3], got [3]"), Error);

  Tensor loss = sum(exp(x));
  loss.backward();
  CHECK_THROWS_WITH_AS(loss.backward(), Contains("backward through 'sum' a second time"), Error);
  CHECK_THROWS_WITH_AS(loss.backward(), Contains("pass retain_graph=true"), Error);

  CHECK_THROWS_WITH_AS(sum(randn({3})).backward(), Contains("backward: root tensor 0 does not require grad"), Error);
  Tensor ints = i64({1, 2}, {2});
  CHECK_THROWS_WITH_AS(ints.requires_grad_(),
                       Contains("requires_grad_: only floating tensors can require grad, got i64"), Error);
  CHECK_FALSE(ints.requires_grad());
  CHECK_THROWS_WITH_AS(y.requires_grad_(false), Contains("requires_grad_: can only be changed on leaf tensors"),
                       Error);
  Tensor constant = randn({2, 3}, DType::f64);
  CHECK_THROWS_WITH_AS(autograd::grad({sum(exp(x))}, {constant}), Contains("grad: input 0 does not require grad"),
                       Error);
  CHECK_THROWS_WITH_AS(x.set_grad(randn({3}, DType::f64)),
                       Contains("set_grad: gradient shape [3] does not match tensor shape [2, 3]"), Error);
}

TEST_CASE("item on a multi-element tensor") {
  manual_seed(9);
  CHECK_THROWS_WITH_AS(randn({2, 3}).item(), Contains("item: expected a tensor with one element, got shape [2, 3]"),
                       Error);
  CHECK_THROWS_WITH_AS(Tensor::empty({0}).item(), Contains("item: expected a tensor with one element, got shape [0]"),
                       Error);
  // the one-element cases work
  Tensor one = Tensor::from_vector(std::vector<double>{2.5}, {1, 1});
  CHECK(one.item() == 2.5);
}

TEST_CASE("size arithmetic refuses overflow and negative sizes instead of wrapping") {
  const int64_t big = int64_t{1} << 62;
  // Every partial product of the non-zero dims is checked: a zero does not hide the overflow.
  CHECK_THROWS_WITH_AS(shape_numel({0, big, big, 4}), Contains("overflows 64 bits"), Error);
  CHECK_THROWS_WITH_AS(shape_numel({0, big, big, 4}), Contains("9223372036854775807"), Error);
  CHECK_THROWS_WITH_AS(shape_numel({int64_t{1} << 32, int64_t{1} << 32}), Contains("overflows 64 bits"), Error);
  CHECK_THROWS_WITH_AS(shape_numel({2, -3}), Contains("expected non-negative dimensions, got -3 at axis 1"), Error);
  CHECK(shape_numel({}) == 1);
  CHECK(shape_numel({0, int64_t{1} << 40}) == 0);
  CHECK(shape_numel({3, 4, 5}) == 60);
  CHECK(shape_numel({big, 1}) == big);
  CHECK_THROWS_WITH_AS(contiguous_strides({int64_t{1} << 32, int64_t{1} << 32}), Contains("overflows 64 bits"), Error);
  CHECK_THROWS_WITH_AS(contiguous_strides({0, big, big}), Contains("contiguous_strides"), Error);
  CHECK_THROWS_WITH_AS(contiguous_strides({2, -1}), Contains("expected non-negative sizes, got -1"), Error);
  CHECK(contiguous_strides({2, 0, 3}) == Shape{3, 3, 1});
  CHECK(contiguous_strides({}) == Shape{});
  // Element count fits, byte count does not: used to allocate a wrapped-around (tiny) buffer.
  CHECK_THROWS_WITH_AS(Tensor::empty({int64_t{1} << 61, 2}, DType::f64), Contains("byte size"), Error);
  CHECK_THROWS_WITH_AS(Tensor::zeros({0, big, big}), Contains("overflow"), Error);
  CHECK(Tensor::empty({0, 1 << 20, 1 << 20}).numel() == 0);

  CHECK(checked::mul(6, 7, "x") == 42);
  CHECK_THROWS_WITH_AS(checked::mul(big, 4, "flag --a * --b"),
                       Contains("flag --a * --b: 4611686018427387904 * 4 overflows int64 (limit 9223372036854775807)"),
                       Error);
  CHECK_THROWS_WITH_AS(checked::mul(-1, 4, "n"), Contains("expected non-negative sizes"), Error);
  CHECK_THROWS_WITH_AS(checked::add(INT64_MAX, 1, "n"), Contains("overflows int64"), Error);
}

TEST_CASE("data and model sizes from flags are overflow-checked") {
  using nn::RecallTask;
  // The vocabulary size used to wrap around (signed overflow).
  CHECK_THROWS_WITH_AS(RecallTask({.num_filler = INT64_MAX - 10}), Contains("num_keys + num_values + num_filler"),
                       Error);
  CHECK_THROWS_WITH_AS(RecallTask({.num_values = int64_t{1} << 40}), Contains("exceeds the limit 2147483647"), Error);
  CHECK_THROWS_WITH_AS(RecallTask({.num_keys = int64_t{1} << 40}), Contains("num_keys 1099511627776 exceeds the limit"),
                       Error);
  RecallTask task({.seq_len = 32});
  CHECK_THROWS_WITH_AS(task.batch(INT64_MAX / 2, 0), Contains("batch_size * seq_len"), Error);
  // A product that fits but cannot be allocated is an out-of-memory error, not std::bad_alloc.
  CHECK_THROWS_AS(task.batch(int64_t{1} << 50, 0), OutOfMemoryError);
  CHECK(task.batch(2, 0).inputs.shape() == Shape{2, 32});

  nn::CharTextDataset text(std::vector<uint8_t>(100, 'a'), 8);
  CHECK_THROWS_WITH_AS(text.batch(INT64_MAX / 4, 0), Contains("batch_size * seq_len"), Error);

  models::LanguageModelConfig mc;
  mc.vocab_size = int64_t{1} << 62;
  mc.embed_dim = 8;
  mc.num_heads = 1;
  mc.num_layers = 0;
  CHECK_THROWS_WITH_AS(models::LanguageModel{mc}, Contains("vocab_size * embed_dim"), Error);
  mc.vocab_size = 16;
  mc.max_seq_len = int64_t{1} << 61;
  CHECK_THROWS_WITH_AS(models::LanguageModel{mc}, Contains("max_seq_len * embed_dim"), Error);
}

TEST_CASE("the text dataset reads only regular files") {
  // /dev/zero never ends; a FIFO blocks on open until a writer comes.
  CHECK_THROWS_WITH_AS(nn::CharTextDataset("/dev/zero", 8), Contains("expected a regular file, got a character device"),
                       Error);
  std::string dir_pattern = (std::filesystem::temp_directory_path() / "longtape_err_XXXXXX").string();
  REQUIRE(::mkdtemp(dir_pattern.data()) != nullptr);
  const std::filesystem::path dir = dir_pattern;
  const std::string fifo = (dir / "fifo.txt").string();
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_THROWS_WITH_AS(nn::CharTextDataset(fifo, 8), Contains("fifo.txt': expected a regular file, got a FIFO"), Error);
  CHECK_THROWS_WITH_AS(nn::CharTextDataset(dir.string(), 8), Contains("got a directory"), Error);
  CHECK_THROWS_WITH_AS(nn::CharTextDataset((dir / "absent.txt").string(), 8), Contains("No such file"), Error);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}
