// A small dense tensor: row-major, contiguous, reference-counted storage.
//
// Views share storage (reshape, a slice along the first dimension); every other op returns a new
// tensor. Buffers come from a size-bucketed pool, so a forward pass that allocates the same shapes
// again (the next layer, the next image) reuses memory instead of going back to the system.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/device.h"

namespace vf {

enum class DType : uint8_t { F32, F64, F16, BF16, I64, I32, I16, I8, U8, Bool };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);  // throws on overflow or negative dims

// Thrown for anything the caller handed us that is wrong (files, shapes, options).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::I64; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::Bool; };

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(Shape shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor zeros(Shape shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(Shape shape, float value);
  // Wraps memory owned by `owner` (an mmap'd file, another tensor, a device buffer) without copying.
  static Tensor wrap(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner,
                     Device device = Device::cpu());
  template <class T>
  static Tensor from(Shape shape, std::initializer_list<T> values) {
    return from_vector<T>(std::move(shape), std::vector<T>(values));
  }
  template <class T>
  static Tensor from_vector(Shape shape, const std::vector<T>& values) {
    Tensor t = empty(std::move(shape), dtype_of<T>::value);
    if (static_cast<int64_t>(values.size()) != t.numel())
      throw Error("Tensor::from_vector: " + std::to_string(values.size()) + " values for shape " +
                  shape_str(t.shape()));
    std::copy(values.begin(), values.end(), t.data<T>());
    return t;
  }

  bool defined() const { return holder_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_cpu() const { return device_.is_cpu(); }

  // A copy on `d` (this tensor itself when it is there already).
  Tensor to(Device d) const;
  Tensor cpu() const { return to(Device::cpu()); }
  // For parameters: this tensor on `d`, copied at the first call and kept for as long as this
  // tensor's memory lives, so a weight used on a device every forward is uploaded once. Only for
  // tensors nobody writes to after their first use on the device.
  Tensor on(Device d) const;
  // The object that keeps this tensor's memory alive (shared by its views).
  const std::shared_ptr<void>& storage_owner() const { return holder_; }
  // The same memory seen as being on `d`: only between the CPU and the emulated device, which
  // share host memory (the emulated backend runs the CPU kernels through it).
  Tensor retagged(Device d) const;

  // Host data: throws for a tensor on a device (call cpu() first). raw() is the address on the
  // tensor's own device, for backends.
  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <class T> T* data() { check_host(dtype_of<T>::value); return static_cast<T*>(data_); }
  template <class T> const T* data() const {
    check_host(dtype_of<T>::value);
    return static_cast<const T*>(data_);
  }
  float* f32() { return data<float>(); }
  const float* f32() const { return data<float>(); }

  // Views (no copy).
  Tensor reshape(Shape shape) const;         // one dim may be -1
  Tensor slice0(int64_t begin, int64_t end) const;  // rows [begin, end) of dim 0
  Tensor operator[](int64_t i) const;       // row i of dim 0, dim 0 dropped

  Tensor clone() const;  // on the same device
  // No other tensor (a view or a copy of the handle) shares this one's storage: an op may then
  // write into it in place.
  bool sole_owner() const { return holder_ != nullptr && holder_.use_count() == 1; }
  Tensor to(DType dtype) const;  // value conversion (float <-> integer types, f16/bf16 -> f32)
  void copy_from(const Tensor& src);  // same numel and dtype; any devices
  void fill(float value);

  // Element access for small tensors and tests (slow: not for hot loops; host tensors only).
  double item() const;
  double at(int64_t flat_index) const;

 private:
  void check_dtype(DType want) const;
  void check_host(DType want) const;
  std::shared_ptr<void> holder_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_;
};

// Bytes currently held by the buffer pool (free, ready for reuse) and in use.
struct PoolStats {
  size_t cached_bytes = 0;
  size_t live_bytes = 0;
  size_t peak_live_bytes = 0;
};
PoolStats pool_stats();
void pool_release_cached();

// Host memory: `count` blocks of `bytes` each, block i from src + i * src_stride to
// dst + i * dst_stride (strides in bytes). Across threads where there is enough to move, a large
// block split in pieces: the copies of clone, cat and narrow (a transformer's residual stream, a
// token dropped or joined) would otherwise leave all threads but one waiting.
void copy_blocks(void* dst, int64_t dst_stride, const void* src, int64_t src_stride, int64_t bytes, int64_t count);

}  // namespace vf
