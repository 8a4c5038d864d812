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
#include "io/file.h"

namespace vf {

MappedFile MappedFile::open(const std::string& path) {
  RegularFile file = open_regular_file(path, "weights file");
  const int fd = file.fd();
  MappedFile m;
  m.size = static_cast<size_t>(file.size());
  if (m.size == 0) {
    m.owner = std::make_shared<int>(0);
    return m;
  }
  void* p = ::mmap(nullptr, m.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
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
