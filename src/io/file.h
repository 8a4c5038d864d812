// Opening input files and writing output files the way a program that reads files from strangers
// must: inputs are regular files (a FIFO or device named config.json would block or never end),
// and outputs appear complete or not at all, never through a link planted where a temporary goes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

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

// Opens `path` for reading. Anything but a regular file (FIFO, socket, device, directory) is
// refused with one InputError naming the path and `what` it is ("config file", ...), without
// blocking: the file is opened O_NONBLOCK (a FIFO without writer would otherwise block open()
// forever), checked with fstat, and only then set back to blocking reads.
RegularFile open_regular_file(const std::string& path, const std::string& what);

// A read-only view of a whole regular file, mapped (not read) so that only the pages a decoder touches
// are ever loaded: a small image followed by gigabytes of padding costs what the image needs.
struct FileView {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> owner;  // munmaps when released
};
FileView map_regular_file(const std::string& path, const std::string& what);

// The whole content of a regular file of at most `max_bytes` bytes (InputError otherwise).
std::string read_regular_file(const std::string& path, const std::string& what, size_t max_bytes);

// `relative` (a file name read from a file inside `root`, e.g. a shard of an index) resolved with
// its symbolic links. It must stay inside `root` (also resolved) or, when `root` is a snapshot of
// a Hugging Face cache (.../models--<name>/snapshots/<revision>, whose files are links into
// ../../blobs), inside that repository's blobs/ folder; anything else is an InputError naming
// `origin` (the file that named it). Absolute names and `..` are refused before resolving.
std::string resolve_inside_model_folder(const std::string& root, const std::string& relative,
                                        const std::string& origin);

// Whether the resolved `path` lies inside the model folder `root` as above.
bool path_inside_model_folder(const std::string& root, const std::string& path);

// Output files written atomically: each is created exclusively (O_EXCL | O_NOFOLLOW, a fresh
// random name) in the folder of its destination, and renamed into place by commit(), all of them
// at the end, so a failure anywhere leaves no new or half-written file behind (temporaries are
// removed by the destructor if commit() did not run).
class AtomicOutputs {
 public:
  AtomicOutputs() = default;
  AtomicOutputs(const AtomicOutputs&) = delete;
  AtomicOutputs& operator=(const AtomicOutputs&) = delete;
  ~AtomicOutputs();

  // A temporary file that will become `path`, open for writing. InputError when its folder does
  // not exist or is not writable.
  std::FILE* add(const std::string& path);
  // Closes every file (a write error is an Error naming its destination) and renames them into
  // place; a rename that fails removes the files this call already renamed.
  void commit();

 private:
  struct Pending {
    std::string path, tmp;
    std::FILE* file = nullptr;
  };
  void discard();
  std::vector<Pending> pending_;
};

// Writes `bytes` to `path` atomically (as AtomicOutputs).
void write_file_atomically(const std::string& path, const std::string& bytes);

}  // namespace vf
