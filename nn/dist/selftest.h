#pragma once
// A check of a communicator end to end, for `longtape dist-check` and the tests: every operation
// of the Communicator interface runs on inputs that every rank can recompute (rank r's tensors
// come from a random stream keyed by (seed, r)), and each result is compared with a float64
// reference computed locally (gathers, all-to-all, broadcast and point-to-point exactly; sums to
// rounding). The results are returned by name so that two backends can be compared bitwise
// (a process group against the in-process group).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "nn/dist/communicator.h"

namespace longtape::dist {

// Throws longtape::Error naming the operation, the rank and the largest difference on a mismatch.
// Collective: every rank of `comm` calls it with the same seed. Inputs are made on the CPU and
// moved to `device`.
std::vector<std::pair<std::string, Tensor>> check_collectives(Communicator& comm, Device device, uint64_t seed);

}  // namespace longtape::dist
