#include "nn/dist/message_communicator.h"

#include <algorithm>
#include <utility>

#include "tensor/error.h"

namespace longtape::dist::detail {

void MessageCommunicator::send(const Tensor& tensor, int dst, int tag) {
  check_peer(dst, "send", "destination");
  LT_CHECK(tag >= 0, "dist send: tag must be >= 0, got ", tag);
  LT_CHECK(tensor.defined(), "dist send: rank ", rank_, " was given an undefined tensor to send to rank ", dst);
  post(dst, tag, tensor, "send", "send to rank " + std::to_string(dst));
}

Tensor MessageCommunicator::recv(const Shape& shape, DType dtype, Device device, int src, int tag) {
  check_peer(src, "recv", "source");
  LT_CHECK(tag >= 0, "dist recv: tag must be >= 0, got ", tag);
  Message m = take(src, tag, "a message with tag " + std::to_string(tag));
  LT_CHECK(m.tensor.shape() == shape && m.tensor.dtype() == dtype, "dist recv: rank ", rank_, " expected ",
           shape_str(shape), " ", dtype_name(dtype), " from rank ", src, " (tag ", tag, "), got ",
           describe_tensor(m.tensor));
  return arrive(m.tensor, device);
}

std::vector<Tensor> MessageCommunicator::all_gather(const Tensor& tensor) {
  LT_CHECK(tensor.defined(), "dist all_gather: rank ", rank_, " was given an undefined tensor");
  const int64_t tag = next_collective("all_gather");
  post_to_others(tag, tensor, "all_gather");
  std::vector<Tensor> result(static_cast<size_t>(size()));
  for (int s = 0; s < size(); ++s)
    result[static_cast<size_t>(s)] =
        s == rank_ ? own_copy(tensor) : arrive(expect_like(s, tag, "all_gather", tensor).tensor, tensor.device());
  return result;
}

std::vector<Tensor> MessageCommunicator::all_to_all(const std::vector<Tensor>& to_each) {
  LT_CHECK(static_cast<int>(to_each.size()) == size(), "dist all_to_all: rank ", rank_,
           " must give one tensor per rank (", size(), "), got ", to_each.size());
  for (size_t d = 0; d < to_each.size(); ++d)
    LT_CHECK(to_each[d].defined(), "dist all_to_all: rank ", rank_, " gave an undefined tensor for rank ", d);
  const int64_t tag = next_collective("all_to_all");
  for (int d = 0; d < size(); ++d)
    if (d != rank_) post(d, tag, to_each[static_cast<size_t>(d)], "all_to_all", collective_name("all_to_all", tag));
  const Device device = to_each[static_cast<size_t>(rank_)].device();
  std::vector<Tensor> result(static_cast<size_t>(size()));
  for (int s = 0; s < size(); ++s)
    result[static_cast<size_t>(s)] =
        s == rank_ ? own_copy(to_each[static_cast<size_t>(s)]) : arrive(expect(s, tag, "all_to_all").tensor, device);
  return result;
}

std::unique_ptr<Communicator::PendingAllToAll> MessageCommunicator::start_all_to_all(const std::vector<Tensor>& to_each,
                                                                                    const std::vector<Tensor>& into) {
  check_all_to_all_into(to_each, into);
  const int64_t tag = next_collective("all_to_all");
  for (int d = 0; d < size(); ++d)
    if (d != rank_) post(d, tag, to_each[static_cast<size_t>(d)], "all_to_all", collective_name("all_to_all", tag));
  receive_into(to_each[static_cast<size_t>(rank_)], into[static_cast<size_t>(rank_)], rank_);
  return receive_later(
      [this, tag, into](int s) {
        return arrive(expect(s, tag, "all_to_all").tensor, into[static_cast<size_t>(s)].device());
      },
      into);
}

Tensor MessageCommunicator::broadcast(const Tensor& tensor, int root) {
  check_peer(root, "broadcast", "root");
  LT_CHECK(tensor.defined(), "dist broadcast: rank ", rank_, " was given an undefined tensor");
  const int64_t tag = next_collective("broadcast");
  if (rank_ == root) {
    post_to_others(tag, tensor, "broadcast");
    return own_copy(tensor);
  }
  Message m = expect(root, tag, "broadcast");
  LT_CHECK(m.tensor.shape() == tensor.shape() && m.tensor.dtype() == tensor.dtype(), "dist broadcast: rank ", rank_,
           " expected ", describe_tensor(tensor), " but root ", root, " sent ", describe_tensor(m.tensor));
  return arrive(m.tensor, tensor.device());
}

void MessageCommunicator::barrier() {
  const int64_t tag = next_collective("barrier");
  post_to_others(tag, Tensor::zeros({1}), "barrier");
  for (int s = 0; s < size(); ++s)
    if (s != rank_) expect(s, tag, "barrier");
}

std::shared_ptr<Communicator> MessageCommunicator::split(int64_t color, int64_t key) {
  const int64_t tag = next_collective("split");
  post_to_others(tag, Tensor::from_vector(std::vector<int64_t>{color, key}, {2}), "split");
  // (key, rank) of every rank with my color, in the order of the new ranks.
  std::vector<std::pair<int64_t, int>> same;
  for (int s = 0; s < size(); ++s) {
    const std::vector<int64_t> ck =
        s == rank_ ? std::vector<int64_t>{color, key} : expect(s, tag, "split").tensor.to_vector_as<int64_t>();
    if (ck[0] == color) same.emplace_back(ck[1], s);
  }
  std::sort(same.begin(), same.end());
  std::vector<int> ranks;
  int new_rank = 0;
  for (size_t i = 0; i < same.size(); ++i) {
    ranks.push_back(same[i].second);
    if (same[i].second == rank_) new_rank = static_cast<int>(i);
  }
  return make_sub_group(tag, color, ranks, new_rank);
}

void MessageCommunicator::check_peer(int peer, const char* op, const char* role) const {
  LT_CHECK(peer >= 0 && peer < size(), "dist ", op, ": ", role, " rank must be in [0, ", size(), "), got ", peer);
}

int64_t MessageCommunicator::next_collective(const char* op) {
  const int64_t tag = -1 - collective_count_++;
  ensure_usable(collective_name(op, tag));
  return tag;
}

std::string MessageCommunicator::collective_name(const char* op, int64_t tag) {
  return std::string(op) + " (collective #" + std::to_string(-1 - tag) + ")";
}

void MessageCommunicator::post_to_others(int64_t tag, const Tensor& tensor, const char* op) {
  for (int d = 0; d < size(); ++d)
    if (d != rank_) post(d, tag, tensor, op, collective_name(op, tag));
}

Message MessageCommunicator::expect(int src, int64_t tag, const char* op) {
  const std::string what = collective_name(op, tag);
  Message m = take(src, tag, what);
  LT_CHECK(m.op == op, "dist: collective mismatch: rank ", rank_, " called ", what, " but rank ", src, " called ", m.op,
           " at the same position (every rank must call the same collectives in the same order)");
  return m;
}

Message MessageCommunicator::expect_like(int src, int64_t tag, const char* op, const Tensor& like) {
  Message m = expect(src, tag, op);
  LT_CHECK(m.tensor.shape() == like.shape() && m.tensor.dtype() == like.dtype(), "dist ", op, ": rank ", rank_, " has ",
           describe_tensor(like), " but rank ", src, " sent ", describe_tensor(m.tensor),
           " (every rank must contribute the same shape and dtype)");
  return m;
}

}  // namespace longtape::dist::detail
