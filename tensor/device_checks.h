#pragma once
// Index checks whose verdict stays on the device until the host reads device values anyway.
// Reading an index tensor back to validate it would stop the host until the GPU has caught up, on
// every training step (embedding lookups, loss targets). Instead a kernel records the first bad
// position in a device word, and the check is raised by the next Tensor::item() or to_vector() on
// this thread (which waits for the device regardless), or by raise_device_checks(). The kernels
// that read such indices skip or zero the out-of-range ones, so nothing is read or written out of
// bounds before the error is raised; results computed from a batch with a bad index are not used.
// On the CPU the check is immediate.
#include <cstdint>
#include <memory>
#include <string>

#include "tensor/tensor.h"

namespace longtape {

// Checks that every entry of `index` (contiguous i64) lies in [0, limit) or equals `allowed`
// (pass a value inside the range when there is no extra one). The error reads
// "<op>: <what> <value> at position <i> is out of range [0, <limit>)<suffix>".
void check_indices_deferred(const Tensor& index, int64_t limit, int64_t allowed, const std::string& op,
                            const std::string& what, const std::string& suffix = "");

// Raises the first failed check still pending on this thread (waits for the device); none pending
// = no cost.
void raise_device_checks();

// Number of checks pending on this thread (for tests).
size_t pending_device_checks();

// CUDA graphs: the checks queued while a step was captured are taken off this thread's list and
// queued again after each replay (the replay refills their device words), so the read after every
// replayed step raises them as it does for an ordinary step.
struct DeviceCheckList;
std::shared_ptr<const DeviceCheckList> take_device_checks();
void requeue_device_checks(const DeviceCheckList& checks);

}  // namespace longtape
