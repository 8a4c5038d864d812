#include "core/tensor.h"

#include "core/backend.h"
#include "core/bfloat16.h"
#include "core/errors.h"
#include "core/limits.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unistd.h>

#include <omp.h>

#include <malloc.h>
#include <sys/mman.h>

namespace vf {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::Bool: return 1;
  }
  return 1;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I64: return "int64";
    case DType::I32: return "int32";
    case DType::I16: return "int16";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::Bool: return "bool";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    if (d < 0) throw Error("negative dimension in shape " + shape_str(s));
    if (d != 0 && n > INT64_MAX / d) throw Error("shape " + shape_str(s) + " overflows");
    n *= d;
  }
  return n;
}

// ---- buffer pool ------------------------------------------------------------------------------
// Buffers are bucketed by their byte size (rounded up to 64). Forward passes allocate the same few
// sizes over and over, so exact buckets hit nearly always; a request may also take a cached buffer
// up to twice its size.
namespace {
struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> free_list;
  PoolStats stats;
  static constexpr size_t kMaxCached = size_t(2) << 30;

  // Buffers of 2 MB and more are rounded to whole 2 MB and backed by transparent huge pages where
  // the kernel gives them on request (its "madvise" mode): the first touch of a fresh buffer then
  // faults once per 2 MB rather than once per 4 KB page, which on a first forward (an empty pool)
  // of a large input took a good part of the time.
  static constexpr size_t kHugePage = size_t(2) << 20;

  // `bytes` in: the size wanted; out: the size of the buffer handed out (what put() takes back).
  void* get(size_t& bytes) {
    const bool huge = bytes >= kHugePage;
    if (huge) bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mu);
      // The smallest cached buffer that fits, if it is at most twice the size: a pass over a large
      // input makes many sizes once each, and caching every one of them apart would hold a
      // multiple of what is ever live at once.
      auto it = free_list.lower_bound(bytes);
      if (it != free_list.end() && it->first / 2 <= bytes) {
        void* p = it->second;
        bytes = it->first;
        free_list.erase(it);
        stats.cached_bytes -= bytes;
        note_live(bytes);
        return p;
      }
    }
    void* p = std::aligned_alloc(huge ? kHugePage : 64, bytes);
    if (!p) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without huge pages nothing changes
    std::lock_guard<std::mutex> lock(mu);
    note_live(bytes);
    return p;
  }
  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    stats.live_bytes -= bytes;
    if (stats.cached_bytes + bytes > kMaxCached) {
      std::free(p);
      return;
    }
    // First among its size: the buffer freed last is handed out next, while its lines are warm.
    free_list.emplace_hint(free_list.lower_bound(bytes), bytes, p);
    stats.cached_bytes += bytes;
  }
  void note_live(size_t bytes) {
    stats.live_bytes += bytes;
    stats.peak_live_bytes = std::max(stats.peak_live_bytes, stats.live_bytes);
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [n, p] : free_list) std::free(p);
    free_list.clear();
    stats.cached_bytes = 0;
  }
  ~Pool() { release(); }
};
Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction order
  return *p;
}
}  // namespace

PoolStats pool_stats() {
  std::lock_guard<std::mutex> lock(pool().mu);
  return pool().stats;
}
void pool_release_cached() {
  pool().release();
  // Large buffers freed in the middle of the heap stay resident until trimmed.
  malloc_trim(0);
}

uint64_t max_forward_bytes() {
  static const uint64_t limit = [] {
    uint64_t v = uint64_t(16) << 30;
    long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) v = std::min<uint64_t>(v, uint64_t(pages) * uint64_t(page) / 2);
    if (const char* env = std::getenv("VF_MAX_FORWARD_BYTES"); env && *env) {
      char* end = nullptr;
      unsigned long long n = std::strtoull(env, &end, 10);
      int shift = 0;
      if (*end == 'K' || *end == 'k') shift = 10;
      else if (*end == 'M' || *end == 'm') shift = 20;
      else if (*end == 'G' || *end == 'g') shift = 30;
      else if (*end == 'T' || *end == 't') shift = 40;
      if (shift) ++end;
      if (end != env && *end == '\0' && n > 0 && n <= (~0ull >> shift)) v = uint64_t(n) << shift;
    }
    return v;
  }();
  return limit;
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  size_t n = static_cast<size_t>(shape_numel(t.shape_));
  if (n > (SIZE_MAX / 2) / dtype_size(dtype)) throw Error("tensor of shape " + shape_str(t.shape_) + " is too large");
  if (n * dtype_size(dtype) > max_forward_bytes())
    throw InputError("a tensor of shape " + shape_str(t.shape_) + " would take " + std::to_string(n * dtype_size(dtype)) +
                     " bytes, more than the limit of " + std::to_string(max_forward_bytes()) +
                     " (VF_MAX_FORWARD_BYTES): the input or config asks for too much memory");
  size_t bytes = std::max<size_t>(64, (n * dtype_size(dtype) + 63) / 64 * 64);
  if (device.type == DeviceType::CUDA) {
    t.holder_ = backend(device).allocate(bytes);
    t.data_ = t.holder_.get();
    return t;
  }
  void* p = pool().get(bytes);
  t.data_ = p;
  t.holder_ = std::shared_ptr<void>(p, [bytes](void* q) { pool().put(q, bytes); });
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  if (device.type == DeviceType::CUDA) backend(device).fill(t, 0.0f);
  else std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::full(Shape shape, float value) {
  Tensor t = empty(std::move(shape), DType::F32);
  std::fill_n(t.f32(), t.numel(), value);
  return t;
}

Tensor Tensor::wrap(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner, Device device) {
  Tensor t;
  t.device_ = device;
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.holder_ = owner ? std::move(owner) : std::shared_ptr<void>(data, [](void*) {});
  return t;
}

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  if (d < 0) d += n;
  if (d < 0 || d >= n) throw Error("dimension " + std::to_string(d) + " out of range for shape " + shape_str(shape_));
  return shape_[d];
}

void Tensor::check_host(DType want) const {
  if (!device_.is_cpu())
    throw Error("host access to a tensor of shape " + shape_str(shape_) + " on " + device_.str() +
                " (copy it with .cpu() first)");
  check_dtype(want);
}

Tensor Tensor::retagged(Device d) const {
  if (d.type == DeviceType::CUDA || device_.type == DeviceType::CUDA)
    throw Error("retagged: only the CPU and the emulated device share memory");
  Tensor t = *this;
  t.device_ = d;
  return t;
}

Tensor Tensor::to(Device d) const {
  if (d == device_ || !defined()) return *this;
  if (d.type != DeviceType::CUDA && device_.type != DeviceType::CUDA) {
    if (d.is_cpu()) count_device_to_host_copy();
    return clone().retagged(d);
  }
  Tensor t = empty(shape_, dtype_, d);
  t.copy_from(*this);
  return t;
}

void Tensor::check_dtype(DType want) const {
  if (want != dtype_)
    throw Error(std::string("tensor is ") + dtype_name(dtype_) + ", accessed as " + dtype_name(want));
}

Tensor Tensor::reshape(Shape shape) const {
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) throw Error("reshape: more than one -1 in " + shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) shape[infer] = known ? numel() / known : 0;
  if (shape_numel(shape) != numel())
    throw Error("reshape: cannot view " + shape_str(shape_) + " as " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  if (dim() == 0 || begin < 0 || end > shape_[0] || begin > end)
    throw Error("slice0: [" + std::to_string(begin) + ", " + std::to_string(end) + ") of " + shape_str(shape_));
  Tensor t = *this;
  int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  t.data_ = static_cast<char*>(data_) + begin * row * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  Tensor t = slice0(i, i + 1);
  t.shape_.erase(t.shape_.begin());
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  if (src.numel() != numel() || src.dtype() != dtype_)
    throw Error("copy_from: " + shape_str(src.shape()) + " " + dtype_name(src.dtype()) + " into " +
                shape_str(shape_) + " " + dtype_name(dtype_));
  if (!nbytes()) return;
  if (device_.is_cpu() && !src.device_.is_cpu()) count_device_to_host_copy();
  bool to_cuda = device_.type == DeviceType::CUDA, from_cuda = src.device_.type == DeviceType::CUDA;
  if (to_cuda && from_cuda) {
    if (device_ != src.device_) throw Error("copy_from: between two GPUs");
    backend(device_).copy_on_device(data_, src.data_, nbytes());
  } else if (to_cuda) {
    backend(device_).copy_to_device(data_, src.data_, nbytes());
  } else if (from_cuda) {
    backend(src.device_).copy_to_host(data_, src.data_, nbytes());
  } else {
    copy_blocks(data_, 0, src.data_, 0, int64_t(nbytes()), 1);
  }
}

void copy_blocks(void* dst, int64_t dst_stride, const void* src, int64_t src_stride, int64_t bytes, int64_t count) {
  if (bytes <= 0 || count <= 0) return;
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  // Below ~128 KB a parallel region costs more than it saves; pieces of at least 64 KB.
  constexpr int64_t kParallelBytes = int64_t(1) << 17, kPiece = int64_t(1) << 16;
  if (bytes * count < kParallelBytes || omp_get_max_threads() == 1 || omp_in_parallel()) {
    for (int64_t i = 0; i < count; ++i) std::memcpy(d + i * dst_stride, s + i * src_stride, size_t(bytes));
    return;
  }
  const int64_t pieces = (bytes + kPiece - 1) / kPiece;  // per block
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < count * pieces; ++t) {
    const int64_t i = t / pieces, at = (t % pieces) * kPiece;
    std::memcpy(d + i * dst_stride + at, s + i * src_stride + at, size_t(std::min(kPiece, bytes - at)));
  }
}

void Tensor::fill(float value) {
  if (device_.type == DeviceType::CUDA) {
    if (dtype_ != DType::F32 && value != 0.0f) {
      copy_from(Tensor::full(shape_, value).to(dtype_));
      return;
    }
    backend(device_).fill(*this, value);
    return;
  }
  if (!device_.is_cpu()) {
    Tensor host = retagged(Device::cpu());
    host.fill(value);
    return;
  }
  if (dtype_ == DType::F32) {
    std::fill_n(f32(), numel(), value);
    return;
  }
  Tensor f = Tensor::full(shape_, value).to(dtype_);
  std::memcpy(data_, f.data_, nbytes());
}

namespace {
float half_to_float(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign << 31;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      man &= 0x3ff;
      bits = (sign << 31) | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = (sign << 31) | 0x7f800000u | (man << 13);
  } else {
    bits = (sign << 31) | ((exp - 15 + 127) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <class F>
void visit_read(const Tensor& t, F&& f) {
  const void* p = t.raw();
  int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::F32: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const float*>(p)[i])); break;
    case DType::F64: for (int64_t i = 0; i < n; ++i) f(i, static_cast<const double*>(p)[i]); break;
    case DType::F16: for (int64_t i = 0; i < n; ++i) f(i, double(half_to_float(static_cast<const uint16_t*>(p)[i]))); break;
    case DType::BF16: for (int64_t i = 0; i < n; ++i) f(i, double(as_float(static_cast<const uint16_t*>(p)[i]))); break;
    case DType::I64: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const int64_t*>(p)[i])); break;
    case DType::I32: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const int32_t*>(p)[i])); break;
    case DType::I16: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const int16_t*>(p)[i])); break;
    case DType::I8: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const int8_t*>(p)[i])); break;
    case DType::U8: for (int64_t i = 0; i < n; ++i) f(i, double(static_cast<const uint8_t*>(p)[i])); break;
    case DType::Bool: for (int64_t i = 0; i < n; ++i) f(i, static_cast<const uint8_t*>(p)[i] ? 1.0 : 0.0); break;
  }
}
}  // namespace

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  if (device_.type == DeviceType::CUDA) return backend(device_).convert(*this, dtype);
  if (!device_.is_cpu()) return retagged(Device::cpu()).to(dtype).retagged(device_);
  Tensor out = empty(shape_, dtype);
  void* q = out.data_;
  const int64_t n = numel();
  // Between float32 and bfloat16, in blocks of 128 KB of float32 across threads: a residual stream, a
  // feature map or the image entering a bfloat16 model goes through here. Rounded to nearest even, as
  // oneDNN's reorder.
  constexpr int64_t kBlock = 1 << 15;
  if (dtype_ == DType::F32 && dtype == DType::BF16) {
    const float* x = static_cast<const float*>(data_);
#pragma omp parallel for schedule(static) if (n > kBlock)
    for (int64_t b = 0; b < n; b += kBlock) bf16_from_float(x + b, static_cast<uint16_t*>(q) + b, std::min(kBlock, n - b));
    return out;
  }
  if (dtype_ == DType::BF16 && dtype == DType::F32) {  // exact: the bits are the top half of a float
    const uint16_t* x = static_cast<const uint16_t*>(data_);
    uint32_t* y = static_cast<uint32_t*>(q);
#pragma omp parallel for schedule(static) if (n > kBlock)
    for (int64_t i = 0; i < n; ++i) y[i] = uint32_t(x[i]) << 16;
    return out;
  }
  if (dtype == DType::BF16) return to(DType::F32).to(DType::BF16);
  // float -> float keeps full precision through double; integers truncate like torch's .to().
  switch (dtype) {
    case DType::F32: visit_read(*this, [&](int64_t i, double v) { static_cast<float*>(q)[i] = float(v); }); break;
    case DType::F64: visit_read(*this, [&](int64_t i, double v) { static_cast<double*>(q)[i] = v; }); break;
    case DType::I64: visit_read(*this, [&](int64_t i, double v) { static_cast<int64_t*>(q)[i] = int64_t(v); }); break;
    case DType::I32: visit_read(*this, [&](int64_t i, double v) { static_cast<int32_t*>(q)[i] = int32_t(v); }); break;
    case DType::I16: visit_read(*this, [&](int64_t i, double v) { static_cast<int16_t*>(q)[i] = int16_t(v); }); break;
    case DType::I8: visit_read(*this, [&](int64_t i, double v) { static_cast<int8_t*>(q)[i] = int8_t(v); }); break;
    case DType::U8: visit_read(*this, [&](int64_t i, double v) { static_cast<uint8_t*>(q)[i] = uint8_t(v); }); break;
    case DType::Bool: visit_read(*this, [&](int64_t i, double v) { static_cast<uint8_t*>(q)[i] = v != 0; }); break;
    case DType::F16: case DType::BF16:
      throw Error(std::string("conversion to ") + dtype_name(dtype) + " is not supported");
  }
  return out;
}

double Tensor::at(int64_t flat_index) const {
  check_host(dtype_);
  if (flat_index < 0 || flat_index >= numel()) throw Error("at: index out of range");
  double r = 0;
  Tensor one = *this;
  one.shape_ = {1};
  one.data_ = static_cast<char*>(data_) + flat_index * dtype_size(dtype_);
  visit_read(one, [&](int64_t, double v) { r = v; });
  return r;
}

double Tensor::item() const {
  if (numel() != 1) throw Error("item() on a tensor of shape " + shape_str(shape_));
  return at(0);
}

}  // namespace vf
