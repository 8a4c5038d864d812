// Where a tensor's memory lives and where its ops run.
//
//   cpu      host memory, the oneDNN/OpenMP kernels of ops.cpp and dnnl_ops.cpp
//   cuda:N   GPU N (built with -DVF_CUDA=ON): cuDNN, cuBLAS(Lt) and the kernels of src/core/cuda
//   emu      a test device: host memory and the CPU kernels, but a tensor on it refuses host access
//            (data<T>(), at(), item()) exactly as a GPU tensor does. Running the goldens on it proves,
//            on a machine without a GPU, that a model's forward pass touches device tensors only
//            through ops and explicit copies, which is what the CUDA backend needs.
//
// Ops run on the device of their tensor inputs. Parameters (norm weights, embeddings) stay where the
// checkpoint put them and are copied to a device once, at their first use there (Tensor::on).
// Conv2d and Linear upload their weights when they are built while a LoadDeviceScope is active.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace vf {

enum class DType : uint8_t;  // core/tensor.h

enum class DeviceType : uint8_t { CPU, CUDA, Emulated };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceType::CUDA, index}; }
  static Device emulated() { return {DeviceType::Emulated, 0}; }
  // "cpu", "cuda", "cuda:N", "emu". Throws vf::Error on anything else, and for "cuda" when this
  // build has no CUDA backend.
  static Device parse(const std::string& s);

  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  std::string str() const;
  friend bool operator==(const Device& a, const Device& b) { return a.type == b.type && a.index == b.index; }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

// True when this build has the CUDA backend and a GPU is visible.
bool cuda_available();

// Waits until the work queued on `d` is done (nothing to wait for on the CPU): for timing.
void synchronize(Device d);

// Copies from a device to the host so far, in this process (Tensor::to / copy_from / cpu()). A
// forward that is to be recorded as a CUDA graph must make none: tests count them on `emu`.
int64_t device_to_host_copies();

// The device that weighted layers (Conv2d, Linear) built on this thread prepare their weights for.
Device load_device();

// What those layers compute their products in: F32 (the default, exact: what transformers computes
// in float32), or BF16 / F16, where inputs and weights are rounded to 16 bits and products still
// accumulate in float32. Everything else (norms, softmax, activations between layers) stays float32.
DType load_compute_dtype();

// "float32" (or "fp32", "f32"), "bfloat16" ("bf16"), "float16" ("fp16", "f16"). Throws vf::Error otherwise.
DType parse_compute_dtype(const std::string& s);

// Throws vf::Error saying why when `d` cannot compute in `t` (this build, this CPU or GPU).
void check_compute_dtype(Device d, DType t);

// The bytes of device memory a backend's tensors hold (weights, activations, scratch, recorded graphs'
// buffers; not the libraries' own workspaces): now, and the most since the backend started or since
// the last call with reset_peak (which then starts from `in_use`). Zeros for the CPU.
struct DeviceMemoryStats {
  size_t in_use = 0, peak = 0;
};
DeviceMemoryStats device_memory_stats(Device d, bool reset_peak = false);

// Sets load_device() and load_compute_dtype() for the layers built in its scope (model loading).
class LoadDeviceScope {
 public:
  explicit LoadDeviceScope(Device d, DType compute);
  explicit LoadDeviceScope(Device d);  // float32
  ~LoadDeviceScope();
  LoadDeviceScope(const LoadDeviceScope&) = delete;
  LoadDeviceScope& operator=(const LoadDeviceScope&) = delete;

 private:
  Device previous_;
  DType previous_dtype_;
};

}  // namespace vf
