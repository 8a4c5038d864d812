// A whole file mapped into memory, kept alive by a shared owner (tensors that wrap the mapping hold it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace vf {

struct MappedFile {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> owner;  // munmaps when the last user lets go

  // Maps `path` copy-on-write: tensors wrapping it may be written to without touching the file.
  // Throws vf::Error naming the file when it cannot be opened or mapped.
  static MappedFile open(const std::string& path);
};

}  // namespace vf
