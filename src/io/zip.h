// A read-only view of a zip archive held in memory (a mapped file), for torch.save checkpoints:
// stored (uncompressed) entries only, zip64 supported, every offset and size bounds-checked.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace vf {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;     // 0 = stored
  const uint8_t* data = nullptr;  // the entry's bytes (valid for stored entries)
  uint64_t size = 0;       // uncompressed size
};

class ZipReader {
 public:
  // Parses the central directory of `data[0, size)`. `origin` names the file in errors.
  ZipReader(const uint8_t* data, size_t size, std::string origin);

  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(const std::string& name) const;
  // The bytes of a stored entry; throws vf::Error for a missing or compressed one.
  const ZipEntry& stored(const std::string& name) const;

 private:
  std::string origin_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t> index_;
};

}  // namespace vf
