// libFuzzer harness: vf::fuzz::shard_index (see entries.h). A vf::Error is a clean refusal.
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"
#include "entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    vf::fuzz::shard_index(data, size);
  } catch (const vf::Error&) {
  }
  return 0;
}
