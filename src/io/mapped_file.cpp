#include "io/mapped_file.h"

#include "core/errors.h"
#include "core/file_pages.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/tensor.h"

namespace vf {

MappedFile MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw InputError(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file");
  }
  MappedFile m;
  m.size = static_cast<size_t>(st.st_size);
  if (m.size == 0) {
    ::close(fd);
    m.owner = std::make_shared<int>(0);
    return m;
  }
  void* p = ::mmap(nullptr, m.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw InputError(path + ": cannot mmap " + std::to_string(m.size) + " bytes: " + std::strerror(err));
  size_t n = m.size;
  m.data = static_cast<const uint8_t*>(p);
  // Nothing writes to checkpoint bytes: pages of tensors that layers copied can be handed back.
  register_file_mapping(p, n);
  m.owner = std::shared_ptr<void>(p, [n](void* q) {
    unregister_file_mapping(q);
    ::munmap(q, n);
  });
  return m;
}

}  // namespace vf
