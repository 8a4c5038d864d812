#include "core/device.h"

#include <atomic>
#include <list>
#include <map>
#include <mutex>
#include <tuple>

#include "core/backend.h"
#include "core/device_lock.h"
#include "core/errors.h"

namespace vf {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "emu") return emulated();
  if (s == "cuda" || s.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (s.size() > 5) {
      const std::string n = s.substr(5);
      if (n.empty() || n.size() > 3 || n.find_first_not_of("0123456789") != std::string::npos)
        throw Error("device '" + s + "': expected cuda:N with N a GPU number");
      index = std::stoi(n);
    }
#ifdef VF_WITH_CUDA
    int count = cuda_device_count();
    if (index >= count)
      throw Error("device '" + s + "': " + (count ? "this machine has " + std::to_string(count) + " GPU(s)"
                                                   : std::string("no CUDA GPU is visible")));
    return cuda(index);
#else
    (void)index;
    throw Error("device '" + s + "': this build has no CUDA backend (configure with -DVF_CUDA=ON)");
#endif
  }
  throw Error("unknown device '" + s.substr(0, 40) + "' (expected cpu, cuda or cuda:N)");
}

std::string Device::str() const {
  switch (type) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda:" + std::to_string(index);
    case DeviceType::Emulated: return "emu";
  }
  return "?";
}

bool cuda_available() {
#ifdef VF_WITH_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

void synchronize(Device d) {
  if (!d.is_cpu()) backend(d).synchronize();
}

namespace {
std::atomic<int64_t> g_device_to_host_copies{0};
}  // namespace

int64_t device_to_host_copies() { return g_device_to_host_copies.load(); }
void count_device_to_host_copy() { ++g_device_to_host_copies; }

namespace {
thread_local Device t_load_device;
thread_local DType t_load_dtype = DType::F32;
}  // namespace

Device load_device() { return t_load_device; }
DType load_compute_dtype() { return t_load_dtype; }

DType parse_compute_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "f32") return DType::F32;
  if (s == "bfloat16" || s == "bf16") return DType::BF16;
  if (s == "float16" || s == "fp16" || s == "f16") return DType::F16;
  throw Error("unknown dtype '" + s.substr(0, 40) + "' (expected float32, bfloat16 or float16)");
}

void check_compute_dtype(Device d, DType t) {
  if (t == DType::F32) return;
#ifdef VF_WITH_CUDA
  if (d.is_cuda() && (t == DType::BF16 || t == DType::F16)) return check_cuda_compute_dtype(d.index, t);
#endif
  if (t != DType::BF16 && t != DType::F16)
    throw Error(std::string("layers cannot compute in ") + dtype_name(t) + " (float32, bfloat16 or float16)");
  if (d.is_cpu() || d.type == DeviceType::Emulated) return check_cpu_compute_dtype(t);  // the CPU kernels
  throw Error(std::string(dtype_name(t)) + " is not available on " + d.str() + " in this build (float32 is)");
}

LoadDeviceScope::LoadDeviceScope(Device d, DType compute) : previous_(t_load_device), previous_dtype_(t_load_dtype) {
  check_compute_dtype(d, compute);
  t_load_device = d;
  t_load_dtype = compute;
}
LoadDeviceScope::LoadDeviceScope(Device d) : LoadDeviceScope(d, DType::F32) {}
LoadDeviceScope::~LoadDeviceScope() {
  t_load_device = previous_;
  t_load_dtype = previous_dtype_;
}

DeviceMemoryStats device_memory_stats(Device d, bool reset_peak) {
  return d.is_cpu() ? DeviceMemoryStats{} : backend(d).memory_stats(reset_peak);
}

std::mutex& device_work_mutex() {
  static std::mutex m;
  return m;
}

DeviceBackend& backend(Device d) {
  switch (d.type) {
    case DeviceType::CPU: break;
    case DeviceType::Emulated: return emulated_backend();
    case DeviceType::CUDA:
#ifdef VF_WITH_CUDA
      return cuda_backend(d.index);
#else
      throw Error("a tensor on " + d.str() + " in a build without CUDA");
#endif
  }
  throw Error("backend(): the CPU ops are not a device backend");
}

Device op_device(std::initializer_list<const Tensor*> inputs) {
  for (const Tensor* t : inputs)
    if (t && t->defined() && !t->is_cpu()) return t->device();
  return Device::cpu();
}

// ---- parameters on a device ----------------------------------------------------------------------
// A copy per (address, size, type, device), valid while the source's memory lives: the entry keeps a
// weak reference to the source's owner, so memory that is freed and reused at the same address (a
// pooled buffer) never finds a stale copy. Entries whose source died are dropped whenever a new one comes.
namespace {
struct MirrorCache {
  using Key = std::tuple<const void*, size_t, int, int, int>;
  struct Entry {
    std::weak_ptr<void> source_owner;
    Tensor copy;
  };
  std::mutex mu;
  std::map<Key, Entry> entries;

  void sweep() {
    for (auto it = entries.begin(); it != entries.end();)
      it = it->second.source_owner.expired() ? entries.erase(it) : std::next(it);
  }
};
MirrorCache& mirrors() {
  static MirrorCache* c = new MirrorCache();  // never destroyed: device tensors may outlive statics
  return *c;
}
}  // namespace

Tensor Tensor::on(Device d) const {
  if (d == device_ || !defined()) return *this;
  if (!device_.is_cpu()) return to(d);
  if (d.type == DeviceType::Emulated) return retagged(d);
  auto& cache = mirrors();
  MirrorCache::Key key{data_, nbytes(), int(dtype_), int(d.type), d.index};
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.entries.find(key);
    if (it != cache.entries.end()) {
      auto owner = it->second.source_owner.lock();
      if (owner && owner == holder_) return it->second.copy.reshape(shape_);
      cache.entries.erase(it);
    }
  }
  Tensor copy = to(d);
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.sweep();  // a few hundred entries at most: cheap beside the upload
  cache.entries[key] = {holder_, copy};
  return copy;
}

}  // namespace vf
