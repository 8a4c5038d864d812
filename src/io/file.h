// Opening input files safely: only regular files are read, so a FIFO, a device (/dev/zero), a socket or
// a directory given where a file is expected is one clear vf::InputError instead of a hang, an endless
// read or a confusing I/O failure. Every loader of user-given paths (images, configs, weights) should
// open through here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace vf {

// An open, read-only regular file. Closes its descriptor when destroyed.
class RegularFile {
 public:
  RegularFile() = default;
  RegularFile(int fd, uint64_t size) : fd_(fd), size_(size) {}
  RegularFile(RegularFile&& o) noexcept : fd_(o.fd_), size_(o.size_) { o.fd_ = -1; }
  RegularFile& operator=(RegularFile&& o) noexcept;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile();

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }  // at open time

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Opens `path` without blocking (O_NONBLOCK, so a FIFO with no writer cannot hang the open), then
// requires a regular file (symlinks are followed: a link to /dev/zero is refused as a device).
// `what` names the file's role in messages ("image file", "config file", ...). Throws InputError
// naming the path and what it is instead.
RegularFile open_regular_file(const std::string& path, const std::string& what);

// A read-only view of a whole regular file, mapped (not read) so that only the pages a decoder touches
// are ever loaded: a small image followed by gigabytes of padding costs what the image needs.
struct FileView {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> owner;  // munmaps when released
};
FileView map_regular_file(const std::string& path, const std::string& what);

}  // namespace vf
