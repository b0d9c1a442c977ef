// The parts of Communicator::start_all_to_all (nn/dist/communicator.h) that backends share: the
// argument checks, the placing of what arrived, the default that exchanges at once, and the
// pending exchange of the backends that send at once and receive in wait().
#include "nn/dist/communicator.h"

#include "tensor/autograd/grad_mode.h"
#include "tensor/error.h"

namespace longtape::dist {

namespace {
class ExchangedNow final : public Communicator::PendingAllToAll {
 public:
  void wait() override {}
};

}  // namespace

void Communicator::check_all_to_all_into(const std::vector<Tensor>& to_each, const std::vector<Tensor>& into) const {
  LT_CHECK(static_cast<int>(to_each.size()) == size() && static_cast<int>(into.size()) == size(),
           "dist start_all_to_all: rank ", rank(), " must give one tensor to send and one to receive into per rank (",
           size(), "), got ", to_each.size(), " to send and ", into.size(), " to receive into");
  for (size_t d = 0; d < to_each.size(); ++d)
    LT_CHECK(to_each[d].defined() && into[d].defined(), "dist start_all_to_all: rank ", rank(),
             " gave an undefined tensor ", to_each[d].defined() ? "to receive into from" : "to send to", " rank ", d);
}

void Communicator::receive_into(const Tensor& arrived, const Tensor& into, int src) const {
  LT_CHECK(arrived.shape() == into.shape() && arrived.dtype() == into.dtype(), "dist start_all_to_all: rank ", rank(),
           " expected ", describe_tensor(into), " from rank ", src, ", got ", describe_tensor(arrived));
  NoGradGuard no_grad;
  Tensor target = into;
  target.copy_(arrived);
}

namespace {
class ReceivingLater final : public Communicator::PendingAllToAll {
 public:
  ReceivingLater(std::shared_ptr<Communicator> comm, std::function<Tensor(int)> receive,
                 std::function<void(const Tensor&, const Tensor&, int)> place, std::vector<Tensor> into)
      : comm_(std::move(comm)), receive_(std::move(receive)), place_(std::move(place)), into_(std::move(into)) {}
  void wait() override {
    for (int s = 0; s < comm_->size() && !done_; ++s)
      if (s != comm_->rank()) place_(receive_(s), into_[static_cast<size_t>(s)], s);
    done_ = true;
  }

 private:
  std::shared_ptr<Communicator> comm_;
  std::function<Tensor(int)> receive_;
  std::function<void(const Tensor&, const Tensor&, int)> place_;
  std::vector<Tensor> into_;
  bool done_ = false;
};
}  // namespace

std::unique_ptr<Communicator::PendingAllToAll> Communicator::receive_later(std::function<Tensor(int)> receive,
                                                                          std::vector<Tensor> into) {
  std::shared_ptr<Communicator> self = shared_from_this();
  Communicator* raw = self.get();
  return std::make_unique<ReceivingLater>(
      std::move(self), std::move(receive),
      [raw](const Tensor& arrived, const Tensor& target, int src) { raw->receive_into(arrived, target, src); },
      std::move(into));
}

std::unique_ptr<Communicator::PendingAllToAll> Communicator::start_all_to_all(const std::vector<Tensor>& to_each,
                                                                             const std::vector<Tensor>& into) {
  check_all_to_all_into(to_each, into);
  const std::vector<Tensor> received = all_to_all(to_each);
  for (size_t s = 0; s < received.size(); ++s) receive_into(received[s], into[s], static_cast<int>(s));
  return std::make_unique<ExchangedNow>();
}

namespace {
class PendingGroup final : public Communicator::PendingAllToAll {
 public:
  explicit PendingGroup(std::vector<std::unique_ptr<Communicator::PendingAllToAll>> parts) : parts_(std::move(parts)) {}
  void wait() override {
    for (auto& p : parts_) p->wait();
  }

 private:
  std::vector<std::unique_ptr<Communicator::PendingAllToAll>> parts_;
};
}  // namespace

void Communicator::check_all_to_all_many(const std::vector<std::vector<Tensor>>& to_each,
                                         const std::vector<std::vector<Tensor>>& into) const {
  LT_CHECK(!to_each.empty() && to_each.size() == into.size(), "dist start_all_to_all_many: rank ", rank(),
           " must give as many lists to receive into as lists to send (at least one), got ", to_each.size(),
           " to send and ", into.size(), " to receive into");
  for (size_t i = 0; i < to_each.size(); ++i) check_all_to_all_into(to_each[i], into[i]);
}

std::unique_ptr<Communicator::PendingAllToAll> Communicator::start_all_to_all_many(
    const std::vector<std::vector<Tensor>>& to_each, const std::vector<std::vector<Tensor>>& into) {
  check_all_to_all_many(to_each, into);
  std::vector<std::unique_ptr<PendingAllToAll>> parts;
  for (size_t i = 0; i < to_each.size(); ++i) parts.push_back(start_all_to_all(to_each[i], into[i]));
  return std::make_unique<PendingGroup>(std::move(parts));
}

}  // namespace longtape::dist
