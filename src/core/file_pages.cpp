#include "core/file_pages.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <map>
#include <mutex>

namespace vf {

namespace {
struct Registry {
  std::mutex mu;
  std::map<uintptr_t, uintptr_t> ranges;  // begin -> end
};
Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: mappings may outlive static destruction
  return *r;
}

bool inside_mapping(uintptr_t begin, uintptr_t end) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.ranges.upper_bound(begin);
  if (it == r.ranges.begin()) return false;
  --it;
  return begin >= it->first && end <= it->second;
}
}  // namespace

void register_file_mapping(const void* data, size_t size) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const uintptr_t b = reinterpret_cast<uintptr_t>(data);
  r.ranges[b] = b + size;
}

void unregister_file_mapping(const void* data) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.ranges.erase(reinterpret_cast<uintptr_t>(data));
}

bool is_file_backed(const Tensor& t) {
  if (!t.defined() || t.nbytes() == 0) return false;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.raw());
  return inside_mapping(b, b + t.nbytes());
}

void release_file_pages(const Tensor& t) {
  if (!is_file_backed(t)) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.raw()), end = begin + t.nbytes();
  // Only whole pages: the partial ones at either end hold neighbouring tensors too.
  const uintptr_t lo = (begin + page - 1) / page * page, hi = end / page * page;
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

}  // namespace vf
