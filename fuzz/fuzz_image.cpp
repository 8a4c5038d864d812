// libFuzzer harness: vf::fuzz::image (see entries.h). A vf::Error is a clean refusal.
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"
#include "entries.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    vf::fuzz::image(data, size);
  } catch (const vf::Error&) {
  }
  return 0;
}
