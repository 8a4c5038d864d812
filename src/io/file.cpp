#include "io/file.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/errors.h"

namespace vf {

RegularFile& RegularFile::operator=(RegularFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_, size_ = o.size_;
    o.fd_ = -1;
  }
  return *this;
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {
const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace

RegularFile open_regular_file(const std::string& path, const std::string& what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    int err = errno;
    throw InputError("cannot open " + what + " '" + path + "': " + std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw InputError("cannot stat " + what + " '" + path + "': " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(what + " '" + path + "' is " + kind_of(st.st_mode) + ", not a regular file");
  }
  // Reads of a regular file never block; clearing the flag keeps later reads ordinary anyway.
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return RegularFile(fd, static_cast<uint64_t>(st.st_size));
}

FileView map_regular_file(const std::string& path, const std::string& what) {
  RegularFile file = open_regular_file(path, what);
  FileView view;
  if (file.size() == 0) return view;
  if (file.size() > SIZE_MAX) throw InputError(what + " '" + path + "' is too large to map");
  view.size = static_cast<size_t>(file.size());
  void* p = ::mmap(nullptr, view.size, PROT_READ, MAP_PRIVATE, file.fd(), 0);
  if (p == MAP_FAILED) {
    int err = errno;
    throw InputError("cannot map " + what + " '" + path + "' (" + std::to_string(view.size) +
                     " bytes): " + std::strerror(err));
  }
  const size_t n = view.size;
  view.data = static_cast<const uint8_t*>(p);
  view.owner = std::shared_ptr<void>(p, [n](void* q) { ::munmap(q, n); });
  return view;
}

}  // namespace vf
