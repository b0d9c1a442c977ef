#include "nn/dist/tcp_communicator.h"

#include <cstring>
#include <utility>

#include "tensor/autograd/grad_mode.h"
#include "nn/dist/message_communicator.h"
#include "nn/dist/tcp_mesh.h"
#include "tensor/error.h"
#include "tensor/ops.h"

namespace longtape::dist {

namespace {

using detail::Mesh;
using detail::Message;

// Below this many elements per rank an all_reduce gathers whole tensors (one round); above, it
// reduce-scatters chunks (each rank moves 2 (P - 1) / P of the tensor instead of P - 1 times it).
constexpr int64_t kChunkedReduceMinPerRank = 4096;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Tensor host(const Tensor& t) {
  NoGradGuard no_grad;
  Tensor d = t.detach();
  if (!d.device().is_cpu()) d = d.to(Device::cpu());
  return d.contiguous();
}

class TcpCommunicator final : public detail::MessageCommunicator {
 public:
  TcpCommunicator(std::shared_ptr<Mesh> mesh, std::vector<int> members, int64_t group_id, int rank)
      : MessageCommunicator(rank), mesh_(std::move(mesh)), members_(std::move(members)), group_id_(group_id) {}

  int size() const override { return static_cast<int>(members_.size()); }
  const CommOptions& options() const override { return mesh_->options(); }

  std::unique_ptr<PendingRecv> exchange(const Tensor& tensor, int dst, const Shape& shape, DType dtype, Device device,
                                        int src, int tag) override {
    // The send is queued on dst's sender thread and src's receiver thread is already reading, so
    // the default (send now, receive in wait()) overlaps the transfer with whatever the caller
    // computes before wait(); the source is checked now rather than in wait().
    std::unique_ptr<PendingRecv> pending = Communicator::exchange(tensor, dst, shape, dtype, device, src, tag);
    check_peer(src, "exchange", "source");
    return pending;
  }

  Tensor all_reduce(const Tensor& tensor, ReduceOp op) override {
    LT_CHECK(tensor.defined(), "dist all_reduce: rank ", rank_, " was given an undefined tensor");
    LT_CHECK(op == ReduceOp::sum || is_floating(tensor.dtype()), "dist all_reduce: mean needs a floating tensor, got ",
             describe_tensor(tensor));
    NoGradGuard no_grad;
    Tensor total = tensor.numel() >= kChunkedReduceMinPerRank * size() ? chunked_sum(tensor) : gathered_sum(tensor);
    if (op == ReduceOp::mean) total = mul(total, 1.0 / size());
    return arrive(total, tensor.device());
  }

  void abort(const std::string& why) override { mesh_->abort(why); }

 private:
  // Small tensors: every rank sends its whole tensor to every other and sums in rank order.
  Tensor gathered_sum(const Tensor& tensor) {
    const int64_t tag = next_collective("all_reduce");
    post_to_others(tag, tensor, "all_reduce");
    Tensor total;
    for (int s = 0; s < size(); ++s) {
      const Tensor part = s == rank_ ? host(tensor) : expect_like(s, tag, "all_reduce", tensor).tensor;
      total = s == 0 ? part.clone() : add(total, part);
    }
    return total;
  }

  // Large tensors: chunk c of every rank goes to rank c, which sums the chunks in rank order
  // (elementwise, so the bits equal the whole-tensor sum) and sends its reduced chunk to everyone.
  Tensor chunked_sum(const Tensor& tensor) {
    const int64_t tag = next_collective("all_reduce");
    const Tensor flat = host(tensor).reshape({-1});
    const int64_t n = flat.numel(), p = size();
    auto chunk = [&](int c) { return flat.narrow(0, n * c / p, n * (c + 1) / p - n * c / p); };
    // A fingerprint first, so ranks with different shapes fail clearly.
    post_to_others(tag, shape_tensor(tensor), "all_reduce");
    for (int d = 0; d < size(); ++d)
      if (d != rank_) post(d, tag, chunk(d), "all_reduce", collective_name("all_reduce", tag));
    for (int s = 0; s < size(); ++s) {
      if (s == rank_) continue;
      Message m = expect(s, tag, "all_reduce");
      LT_CHECK(m.tensor.to_vector_as<int64_t>() == shape_tensor(tensor).to_vector_as<int64_t>(),
               "dist all_reduce: rank ", rank_, " has ", describe_tensor(tensor), " but rank ", s,
               " contributed another shape or dtype (every rank must contribute the same shape and dtype)");
    }
    Tensor mine;
    for (int s = 0; s < size(); ++s) {
      const Tensor part = s == rank_ ? chunk(rank_) : expect(s, tag, "all_reduce").tensor;
      mine = s == 0 ? part.clone() : add(mine, part);
    }
    post_to_others(tag, mine, "all_reduce");
    std::vector<Tensor> reduced(static_cast<size_t>(size()));
    for (int s = 0; s < size(); ++s) reduced[static_cast<size_t>(s)] = s == rank_ ? mine : expect(s, tag, "all_reduce").tensor;
    return cat(reduced, 0).reshape(tensor.shape());
  }

  static Tensor shape_tensor(const Tensor& t) {
    std::vector<int64_t> d{static_cast<int64_t>(t.dtype()), t.dim()};
    d.insert(d.end(), t.shape().begin(), t.shape().end());
    return Tensor::from_vector(d, {static_cast<int64_t>(d.size())});
  }

  std::string who() const {
    std::string text = "rank " + std::to_string(rank_);
    if (static_cast<int>(members_.size()) == mesh_->size()) return text;
    return text + " of a sub-group (process rank " + std::to_string(mesh_->rank()) + ")";
  }

  void post(int dst, int64_t tag, const Tensor& tensor, const char* op, const std::string& what) override {
    LT_CHECK(tensor.dim() <= detail::kTcpMaxDims, "dist: the TCP group sends tensors of at most ", detail::kTcpMaxDims,
             " dims, got ", describe_tensor(tensor));
    detail::TcpOutgoing o;
    // A private copy: the caller may change its tensor once send returns (buffered semantics).
    o.tensor = tensor.device().is_cpu() ? host(tensor).clone() : host(tensor);
    o.header.dtype = static_cast<uint8_t>(o.tensor.dtype());
    o.header.ndim = static_cast<uint16_t>(o.tensor.dim());
    o.header.group = group_id_;
    o.header.tag = tag;
    o.header.nbytes = o.tensor.nbytes();
    for (int64_t i = 0; i < o.tensor.dim(); ++i) o.header.dims[i] = o.tensor.size(i);
    std::strncpy(o.header.op, op, sizeof o.header.op - 1);
    mesh_->post(members_[static_cast<size_t>(dst)], std::move(o), who() + ": " + what);
  }

  Message take(int src, int64_t tag, const std::string& what) override {
    return mesh_->take(group_id_, members_[static_cast<size_t>(src)], tag, who(), what);
  }

  void ensure_usable(const std::string& what) override { mesh_->ensure_usable(what); }

  Tensor own_copy(const Tensor& tensor) override {
    NoGradGuard no_grad;
    return tensor.detach().clone();
  }

  Tensor arrive(const Tensor& message, Device device) override {
    NoGradGuard no_grad;
    return message.device() == device ? message : message.to(device);
  }

  // Every member derives the same group id from (this group, this split, color).
  std::shared_ptr<Communicator> make_sub_group(int64_t tag, int64_t color, const std::vector<int>& ranks,
                                               int new_rank) override {
    std::vector<int> members;
    for (int r : ranks) members.push_back(members_[static_cast<size_t>(r)]);
    const int64_t id = static_cast<int64_t>(
        mix(mix(static_cast<uint64_t>(group_id_) ^ static_cast<uint64_t>(tag)) ^ static_cast<uint64_t>(color)));
    return std::make_shared<TcpCommunicator>(mesh_, members, id, new_rank);
  }

  std::shared_ptr<Mesh> mesh_;
  const std::vector<int> members_;  // process ranks, by rank in this group
  const int64_t group_id_;
};

}  // namespace

std::shared_ptr<Communicator> make_tcp_process_group(TcpStore& store, int rank, int size, const CommOptions& options,
                                                     const std::string& prefix) {
  LT_CHECK(size >= 1 && rank >= 0 && rank < size, "dist: expected 0 <= rank < size, got rank ", rank, " and size ",
           size);
  LT_CHECK(options.timeout.count() > 0, "dist: the timeout must be > 0 ms, got ", options.timeout.count());
  auto mesh = std::make_shared<Mesh>(rank, size, options);
  mesh->connect(store, prefix);
  std::vector<int> everyone(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) everyone[static_cast<size_t>(r)] = r;
  return std::make_shared<TcpCommunicator>(mesh, everyone, 0, rank);
}

}  // namespace longtape::dist
