#include "tensor/device_checks.h"

#include <deque>

#include "tensor/error.h"
#include "tensor/kernels.h"

namespace longtape {

namespace {

struct PendingCheck {
  Tensor index;       // kept alive so the bad value can be read back
  Tensor first_bad;   // i64 scalar: n when every entry passed, else the first bad position
  int64_t limit = 0;
  std::string op, what, suffix;
};

// Pending checks beyond this many are raised at once (a loop that never reads a value).
constexpr size_t kMaxPending = 256;

thread_local std::deque<PendingCheck> t_pending;

void raise_if_failed(const PendingCheck& c) {
  int64_t position = 0;
  copy_bytes(&position, Device::cpu(), c.first_bad.raw_data(), c.first_bad.device(), sizeof position);
  if (position >= c.index.numel()) return;
  int64_t value = 0;
  copy_bytes(&value, Device::cpu(), static_cast<const int64_t*>(c.index.raw_data()) + position, c.index.device(),
             sizeof value);
  throw Error(detail::concat(c.op, ": ", c.what, " ", value, " at position ", position, " is out of range [0, ",
                             c.limit, ")", c.suffix));
}

}  // namespace

void check_indices_deferred(const Tensor& index, int64_t limit, int64_t allowed, const std::string& op,
                            const std::string& what, const std::string& suffix) {
  LT_CHECK(index.defined() && index.dtype() == DType::i64 && index.is_contiguous(), op,
           ": index check needs a contiguous i64 tensor");
  const int64_t n = index.numel();
  if (n == 0) return;
  PendingCheck c{index, Tensor::full({}, static_cast<double>(n), DType::i64, index.device()), limit, op, what, suffix};
  kernels::flag_bad_indices(static_cast<int64_t*>(c.first_bad.raw_data()),
                            static_cast<const int64_t*>(index.raw_data()), n, limit, allowed, index.device());
  if (index.device().is_cpu()) {
    raise_if_failed(c);
    return;
  }
  t_pending.push_back(std::move(c));
  if (t_pending.size() > kMaxPending) raise_device_checks();
}

void raise_device_checks() {
  // Taken off the list first: the error leaves nothing pending, and reads cannot re-enter.
  std::deque<PendingCheck> pending;
  pending.swap(t_pending);
  for (const PendingCheck& c : pending) raise_if_failed(c);
}

size_t pending_device_checks() { return t_pending.size(); }

struct DeviceCheckList {
  std::deque<PendingCheck> checks;
};

std::shared_ptr<const DeviceCheckList> take_device_checks() {
  auto list = std::make_shared<DeviceCheckList>();
  list->checks.swap(t_pending);
  return list;
}

void requeue_device_checks(const DeviceCheckList& list) {
  for (const PendingCheck& c : list.checks) t_pending.push_back(c);
  if (t_pending.size() > kMaxPending) raise_device_checks();
}

}  // namespace longtape
