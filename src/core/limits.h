// Memory limits of a forward pass.
#pragma once

#include <cstdint>

namespace vf {

// The most memory one tensor may take, and the largest attention score matrix the reference
// would build: VF_MAX_FORWARD_BYTES (bytes, or with a K, M, G or T suffix: powers of 1024), by
// default the smaller of 16 GiB and half the physical memory. Past it, a vf::InputError (an input
// or config that asks for too much), not an allocation that takes the machine down.
uint64_t max_forward_bytes();

}  // namespace vf
