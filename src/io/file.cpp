#include "io/file.h"

#include "core/errors.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace vf {

namespace fs = std::filesystem;

RegularFile& RegularFile::operator=(RegularFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    size_ = o.size_;
    o.fd_ = -1;
  }
  return *this;
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {
const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}
}  // namespace

RegularFile open_regular_file(const std::string& path, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) throw InputError(path + ": cannot open " + what + ": " + std::strerror(errno));
  auto fail = [&](const std::string& msg) {
    ::close(fd);
    return InputError(path + ": " + msg);
  };
  struct stat st;
  if (::fstat(fd, &st) != 0) throw fail("cannot stat " + what + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw fail(what + " is " + file_kind(st.st_mode) + ", expected a regular file");
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
    throw fail(std::string("cannot set blocking mode: ") + std::strerror(errno));
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

std::string read_regular_file(const std::string& path, const std::string& what, size_t max_bytes) {
  RegularFile file = open_regular_file(path, what);
  if (file.size() > max_bytes)
    throw InputError(path + ": " + what + " is " + std::to_string(file.size()) + " bytes, more than the limit of " +
                     std::to_string(max_bytes));
  std::string text(static_cast<size_t>(file.size()), '\0');
  size_t got = 0;
  while (got < text.size()) {
    ssize_t n = ::read(file.fd(), text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw InputError(path + ": read failed: " + std::strerror(errno));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got != text.size())
    throw InputError(path + ": short read (" + std::to_string(got) + " of " + std::to_string(text.size()) + " bytes)");
  return text;
}

namespace {

// `p` equals `dir` or lies below it (both lexically normal absolute paths).
bool is_under(const fs::path& p, const fs::path& dir) {
  auto pi = p.begin();
  for (auto di = dir.begin(); di != dir.end(); ++di, ++pi) {
    if (di->empty() && std::next(di) == dir.end()) break;  // a trailing separator
    if (pi == p.end() || *pi != *di) return false;
  }
  return true;
}

fs::path resolved(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  return ec ? fs::path() : r;
}

}  // namespace

bool path_inside_model_folder(const std::string& root, const std::string& path) {
  const fs::path r = resolved(root), p = resolved(path);
  if (r.empty() || p.empty()) return false;
  if (is_under(p, r)) return true;
  // A Hugging Face cache snapshot: models--<org>--<name>/snapshots/<revision>/<file> are links to
  // models--<org>--<name>/blobs/<hash>.
  const fs::path snapshots = r.parent_path(), repo = snapshots.parent_path();
  if (snapshots.filename() == "snapshots" && repo.filename().string().rfind("models--", 0) == 0)
    return is_under(p, repo / "blobs");
  return false;
}

std::string resolve_inside_model_folder(const std::string& root, const std::string& relative,
                                        const std::string& origin) {
  fs::path rel(relative);
  bool bad = relative.empty() || rel.is_absolute();
  for (auto& part : rel) bad = bad || part == "..";
  if (bad)
    throw InputError(origin + ": file name '" + relative + "' must be a relative path inside the model folder");
  const std::string joined = (fs::path(root) / rel).string();
  if (!path_inside_model_folder(root, joined))
    throw InputError(origin + ": file '" + relative +
                     "' leads outside the model folder through a symbolic link (only links into the folder, or "
                     "into the blobs/ of a Hugging Face cache repository, are followed)");
  return joined;
}

// ---- atomic outputs -----------------------------------------------------------------------------

AtomicOutputs::~AtomicOutputs() { discard(); }

void AtomicOutputs::discard() {
  for (auto& p : pending_) {
    if (p.file) std::fclose(p.file);
    p.file = nullptr;
    if (!p.tmp.empty()) ::unlink(p.tmp.c_str());
  }
  pending_.clear();
}

std::FILE* AtomicOutputs::add(const std::string& path) {
  fs::path target(path);
  if (target.filename().empty()) throw InputError(path + ": output path names a folder, expected a file");
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw InputError(path + ": output folder '" + dir.string() + "' does not exist");
  if (fs::is_directory(target, ec)) throw InputError(path + ": output path is a directory, expected a file");
  // mkstemps: O_CREAT | O_EXCL with a fresh random name, so it never opens a planted link or file.
  std::string tmpl = (dir / ("." + target.filename().string() + ".XXXXXX.tmp")).string();
  int fd = ::mkostemps(tmpl.data(), 4, O_CLOEXEC);
  if (fd < 0) throw InputError(path + ": cannot create a file in '" + dir.string() + "': " + std::strerror(errno));
  // mkstemp makes the file 0600; an output gets the usual 0666 less the umask.
  mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd, 0666 & ~mask);
  std::FILE* f = ::fdopen(fd, "wb");
  if (!f) {
    int err = errno;
    ::close(fd);
    ::unlink(tmpl.c_str());
    throw Error(path + ": cannot open a stream: " + std::strerror(err));
  }
  pending_.push_back({path, tmpl, f});
  return f;
}

void AtomicOutputs::commit() {
  for (auto& p : pending_) {
    bool ok = std::fflush(p.file) == 0 && !std::ferror(p.file);
    int err = errno;
    ok = (std::fclose(p.file) == 0) && ok;
    p.file = nullptr;
    if (!ok) {
      std::string path = p.path;
      discard();
      throw Error(path + ": write failed: " + std::strerror(err));
    }
  }
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (std::rename(pending_[i].tmp.c_str(), pending_[i].path.c_str()) != 0) {
      int err = errno;
      std::string path = pending_[i].path;
      for (size_t j = 0; j < i; ++j) {
        ::unlink(pending_[j].path.c_str());
        pending_[j].tmp.clear();
      }
      discard();
      throw InputError(path + ": cannot rename the written file into place: " + std::strerror(err));
    }
    pending_[i].tmp.clear();
  }
  pending_.clear();
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  AtomicOutputs out;
  std::FILE* f = out.add(path);
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
    throw Error(path + ": write failed: " + std::strerror(errno));
  out.commit();
}

}  // namespace vf
