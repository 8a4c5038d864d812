#include "io/zip.h"

#include "core/errors.h"

#include "core/tensor.h"

namespace vf {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr size_t kEocdSize = 22;
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kZip64EocdSize = 56;
constexpr uint64_t kMaxEntries = 10'000'000;

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24); }
uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | (uint64_t(rd32(p + 4)) << 32); }

}  // namespace

ZipReader::ZipReader(const uint8_t* data, size_t size, std::string origin) : origin_(std::move(origin)) {
  auto fail = [&](const std::string& what) { return InputError(origin_ + ": invalid zip archive: " + what); };
  if (size < kEocdSize) throw fail("the file is " + std::to_string(size) + " bytes, too short for a zip archive");

  // The end-of-central-directory record sits at the end, followed only by its comment (at most
  // 65535 bytes). Search backwards for a signature whose comment length reaches exactly the end.
  size_t eocd = SIZE_MAX;
  size_t lowest = size > kEocdSize + 0xffff ? size - kEocdSize - 0xffff : 0;
  for (size_t pos = size - kEocdSize + 1; pos-- > lowest;) {
    if (rd32(data + pos) == kEocdSig && pos + kEocdSize + rd16(data + pos + 20) == size) {
      eocd = pos;
      break;
    }
  }
  if (eocd == SIZE_MAX) throw fail("no end-of-central-directory record (truncated file, or not a zip archive)");
  const uint8_t* e = data + eocd;
  if (rd16(e + 4) != 0 || rd16(e + 6) != 0) throw fail("multi-disk archives are not supported");
  uint64_t count = rd16(e + 10);
  uint64_t cd_size = rd32(e + 12);
  uint64_t cd_offset = rd32(e + 16);
  uint64_t cd_end_limit = eocd;

  // zip64: a locator right before the EOCD points at the zip64 EOCD record.
  if (eocd >= kZip64LocatorSize && rd32(data + eocd - kZip64LocatorSize) == kZip64LocatorSig) {
    const uint8_t* loc = data + eocd - kZip64LocatorSize;
    uint64_t z64 = rd64(loc + 8);
    if (z64 > eocd - kZip64LocatorSize || eocd - kZip64LocatorSize - z64 < kZip64EocdSize)
      throw fail("zip64 end-of-central-directory offset " + std::to_string(z64) + " is out of bounds");
    const uint8_t* z = data + z64;
    if (rd32(z) != kZip64EocdSig) throw fail("bad zip64 end-of-central-directory signature");
    count = rd64(z + 32);
    cd_size = rd64(z + 40);
    cd_offset = rd64(z + 48);
    cd_end_limit = z64;
  } else if (count == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff) {
    throw fail("zip64 values without a zip64 end-of-central-directory locator");
  }
  if (count > kMaxEntries) throw fail(std::to_string(count) + " entries is more than the limit");
  if (cd_offset > cd_end_limit || cd_size > cd_end_limit - cd_offset)
    throw fail("central directory (offset " + std::to_string(cd_offset) + ", " + std::to_string(cd_size) +
               " bytes) lies outside the file");

  const uint8_t* p = data + cd_offset;
  const uint8_t* cd_end = p + cd_size;
  entries_.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    if (cd_end - p < 46 || rd32(p) != kCentralSig) throw fail("central directory entry " + std::to_string(i) + " is corrupt");
    uint16_t flags = rd16(p + 8);
    uint16_t method = rd16(p + 10);
    uint64_t csize = rd32(p + 20);
    uint64_t usize = rd32(p + 24);
    uint16_t name_len = rd16(p + 28), extra_len = rd16(p + 30), comment_len = rd16(p + 32);
    uint64_t local = rd32(p + 42);
    if (static_cast<size_t>(cd_end - p) < 46u + name_len + extra_len + comment_len)
      throw fail("central directory entry " + std::to_string(i) + " runs past the directory");
    ZipEntry entry;
    entry.name.assign(reinterpret_cast<const char*>(p + 46), name_len);
    entry.method = method;
    // zip64 extended information: the fields stored as 0xffffffff, in this order.
    const uint8_t* x = p + 46 + name_len;
    const uint8_t* x_end = x + extra_len;
    while (x_end - x >= 4) {
      uint16_t id = rd16(x), len = rd16(x + 2);
      if (x_end - x - 4 < len) throw fail("entry '" + entry.name + "': extra field runs past its end");
      if (id == 0x0001) {
        const uint8_t* f = x + 4;
        const uint8_t* f_end = f + len;
        auto take = [&](uint64_t& v) {
          if (v != 0xffffffff) return;
          if (f_end - f < 8) throw fail("entry '" + entry.name + "': zip64 extra field is too short");
          v = rd64(f);
          f += 8;
        };
        take(usize);
        take(csize);
        take(local);
      }
      x += 4 + len;
    }
    p += 46 + name_len + extra_len + comment_len;

    if (flags & 1) throw fail("entry '" + entry.name + "' is encrypted");
    if (local > cd_offset || cd_offset - local < 30) throw fail("entry '" + entry.name + "': local header offset out of bounds");
    const uint8_t* lh = data + local;
    if (rd32(lh) != kLocalSig) throw fail("entry '" + entry.name + "': bad local header signature");
    uint64_t start = local + 30 + uint64_t(rd16(lh + 26)) + rd16(lh + 28);
    if (start > cd_offset || csize > cd_offset - start)
      throw fail("entry '" + entry.name + "' (" + std::to_string(csize) + " bytes at " + std::to_string(start) +
                 ") runs past the end of the data (truncated file?)");
    if (method == 0 && csize != usize)
      throw fail("stored entry '" + entry.name + "' has compressed size " + std::to_string(csize) +
                 " != size " + std::to_string(usize));
    entry.data = data + start;
    entry.size = method == 0 ? usize : csize;
    if (!index_.emplace(entry.name, entries_.size()).second) throw fail("entry '" + entry.name + "' appears twice");
    entries_.push_back(std::move(entry));
  }
}

const ZipEntry* ZipReader::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const ZipEntry& ZipReader::stored(const std::string& name) const {
  const ZipEntry* e = find(name);
  if (!e) throw InputError(origin_ + ": zip archive has no entry '" + name + "'");
  if (e->method != 0)
    throw InputError(origin_ + ": zip entry '" + name + "' is compressed (method " + std::to_string(e->method) +
                "); torch.save stores entries uncompressed");
  return *e;
}

}  // namespace vf
