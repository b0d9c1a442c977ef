#pragma once
// The collectives of Communicator written once over whole-tensor messages, for the groups that move
// tensors that way: the in-process group (communicator.cpp) and the TCP process group
// (tcp_communicator.cpp). A group supplies the transport (post a buffered message to one rank, take
// the next one from a rank by tag), how a tensor becomes this rank's own, and how a split's
// sub-group is made; point-to-point calls, all_gather, all_to_all, broadcast, barrier and the
// member exchange of split are defined here. Collective number c travels on tag -1 - c (user tags
// are >= 0), and every message names its operation, so ranks that call different collectives at
// the same position fail with a clear error instead of mixing up their data.
//
// Internal to nn/dist: not part of the library's interface.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nn/dist/communicator.h"

namespace longtape::dist::detail {

struct Message {
  Tensor tensor;
  std::string op;  // "send" or the collective's name, to detect ranks calling different collectives
};

class MessageCommunicator : public Communicator {
 public:
  explicit MessageCommunicator(int rank) : rank_(rank) {}

  int rank() const override { return rank_; }

  void send(const Tensor& tensor, int dst, int tag) override;
  Tensor recv(const Shape& shape, DType dtype, Device device, int src, int tag) override;
  std::vector<Tensor> all_gather(const Tensor& tensor) override;
  std::vector<Tensor> all_to_all(const std::vector<Tensor>& to_each) override;
  // Posts now (the transport buffers) and receives in wait(): the transfer overlaps the caller's
  // work in between.
  std::unique_ptr<PendingAllToAll> start_all_to_all(const std::vector<Tensor>& to_each,
                                                    const std::vector<Tensor>& into) override;
  Tensor broadcast(const Tensor& tensor, int root) override;
  void barrier() override;
  std::shared_ptr<Communicator> split(int64_t color, int64_t key) override;

 protected:
  // ---- what a group supplies ----
  // Queues a copy of `tensor` for rank `dst` of this group (buffered: returns without waiting);
  // `what` names the call in errors.
  virtual void post(int dst, int64_t tag, const Tensor& tensor, const char* op, const std::string& what) = 0;
  // The next message from rank `src` of this group with `tag`; throws on timeout or failure.
  virtual Message take(int src, int64_t tag, const std::string& what) = 0;
  // Throws when the group can no longer communicate.
  virtual void ensure_usable(const std::string& what) = 0;
  // A private, history-free copy of this rank's own tensor, returned as its share of a result.
  virtual Tensor own_copy(const Tensor& tensor) = 0;
  // A received tensor as one this rank owns, on `device`.
  virtual Tensor arrive(const Tensor& message, Device device) = 0;
  // This rank's communicator of the sub-group made by the split on collective `tag` for `color`:
  // `ranks` are its members' ranks in this group, in their new order; this rank is new_rank.
  virtual std::shared_ptr<Communicator> make_sub_group(int64_t tag, int64_t color, const std::vector<int>& ranks,
                                                       int new_rank) = 0;

  // ---- shared by the collectives ----
  void check_peer(int peer, const char* op, const char* role) const;
  // Every collective starts here: even one with nothing to exchange (a single rank) fails when the
  // group can no longer communicate. Returns the collective's tag.
  int64_t next_collective(const char* op);
  static std::string collective_name(const char* op, int64_t tag);
  // Posts `tensor` to every other rank of the group.
  void post_to_others(int64_t tag, const Tensor& tensor, const char* op);
  // The message of collective `tag` from `src`; throws when `src` called another collective there.
  Message expect(int src, int64_t tag, const char* op);
  // The same, and throws unless the message has the shape and dtype of `like`.
  Message expect_like(int src, int64_t tag, const char* op, const Tensor& like);

  const int rank_;

 private:
  int64_t collective_count_ = 0;
};

}  // namespace longtape::dist::detail
