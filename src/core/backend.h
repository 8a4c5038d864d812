// The interface a device backend implements: memory, copies, and every op of ops.h, attention.h and
// deformable_attention.h for tensors that live on its device.
//
// The public ops (ops.h) check their inputs' device first and hand device tensors to the backend;
// the CPU code stays where it was. An input that is still on the CPU (a parameter) is brought over
// with Tensor::on(device), which copies it once and keeps the copy for as long as the parameter lives.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

#include "core/attention.h"
#include "core/deformable_attention.h"
#include "core/device.h"
#include "core/ops.h"
#include "core/tensor.h"

namespace vf {

enum class BinaryOp { Add, Sub, Mul, Div };
enum class Interp { Nearest, Bilinear, BilinearAlignCorners, Bicubic };

// A Conv2d or Linear whose weights were prepared for a device at load.
class DeviceLayer {
 public:
  virtual ~DeviceLayer() = default;
  virtual Tensor forward(const Tensor& x, const Tensor* residual) const = 0;
  // Linear/Conv2d::forward_to_layer: the output in the layer's compute dtype.
  virtual Tensor forward_to_layer(const Tensor& x) const { return forward(x, nullptr); }
  // The dtype of inputs the layer reads as they are (float32 inputs are always taken).
  virtual DType input_dtype() const { return DType::F32; }
};

// Work recorded once and replayed (a CUDA graph): the same kernels on the same memory.
class DeviceGraph {
 public:
  virtual ~DeviceGraph() = default;
  virtual void replay() = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // ---- memory ----
  // `bytes` of device memory; the returned owner frees it (back to the backend's pool).
  virtual std::shared_ptr<void> allocate(size_t bytes) = 0;
  // Copies between host and device or within the device; returns when `dst` may be read on the host
  // (a copy to the host) or is ordered before every later op (a copy to the device).
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill(Tensor& x, float value) = 0;  // float32; other dtypes: value 0 only
  virtual Tensor convert(const Tensor& x, DType to) = 0;
  virtual void synchronize() = 0;
  // Records what `enqueue` puts on the device into a graph instead of running it. The memory that
  // work allocates belongs to the graph (tensors made inside stay valid and are rewritten by each
  // replay). nullptr when the work cannot be recorded: it waited for the device, copied from the
  // host, or the backend has no graphs.
  virtual std::shared_ptr<DeviceGraph> capture(const std::function<void()>& enqueue) { return nullptr; }
  // What allocate() has handed out and not had back, now and at most (device_memory_stats()).
  virtual DeviceMemoryStats memory_stats(bool reset_peak) { return {}; }
  // An upload beside the work in flight: starts copying a host tensor to the device on a stream of
  // its own (through page-locked memory), so that the next input travels while the current forward
  // runs, and returns the device tensor. Ops may read it only after await_upload(t), which orders
  // the compute stream after the copy without waiting on the host. An undefined tensor where the
  // backend has no second stream (then upload as usual).
  virtual Tensor upload_beside(const Tensor& host) { return Tensor(); }
  virtual void await_upload(const Tensor& t) {}

  // ---- weighted layers ----
  // nullptr: the backend runs the layer through the CPU objects (the emulated device does).
  virtual std::shared_ptr<DeviceLayer> make_conv2d(const Tensor& weight, const Tensor& bias,
                                                   const Conv2dOptions& opt) = 0;
  virtual std::shared_ptr<DeviceLayer> make_linear(const Tensor& weight, const Tensor& bias, Act act) = 0;

  // ---- ops (see ops.h for their meaning) ----
  virtual void act_inplace(Tensor& x, Act a) = 0;
  virtual Tensor matmul(const Tensor& a, const Tensor& b, bool trans_b, float alpha) = 0;
  virtual Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps) = 0;
  virtual Tensor group_norm_nhwc(const Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps,
                                 Act a) = 0;
  virtual Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift, Act a) = 0;
  virtual Tensor grn_nhwc(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) = 0;
  virtual void softmax_lastdim_inplace(Tensor& x) = 0;
  virtual Tensor max_pool2d_nhwc(const Tensor& x, int k, int s, int pt, int pl, int pb, int pr, bool ceil_mode) = 0;
  virtual Tensor avg_pool2d_nhwc(const Tensor& x, int k, int s, int pad, bool count_include_pad) = 0;
  virtual Tensor global_avg_pool_nhwc(const Tensor& x) = 0;
  virtual Tensor permute(const Tensor& x, const std::vector<int>& perm) = 0;
  virtual Tensor pad_nhwc(const Tensor& x, int top, int left, int bottom, int right, float value) = 0;
  virtual Tensor window_partition(const Tensor& x, int64_t window, int64_t shift) = 0;
  virtual Tensor window_reverse(const Tensor& windows, int64_t window, int64_t H, int64_t W, int64_t shift,
                                int64_t out_h, int64_t out_w) = 0;
  virtual Tensor cat(const std::vector<Tensor>& xs, int64_t dim) = 0;
  virtual Tensor narrow(const Tensor& x, int64_t dim, int64_t begin, int64_t length) = 0;
  // idx on the host (checked) or on this device (not checked: a GPU writes NaN rows where out of range).
  virtual Tensor gather_rows(const Tensor& x, const Tensor& idx) = 0;
  virtual Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) = 0;
  virtual void add_inplace(Tensor& a, const Tensor& b) = 0;
  virtual Tensor scale(const Tensor& x, float s) = 0;
  virtual Tensor mul_lastdim(const Tensor& x, const Tensor& gamma) = 0;
  virtual Tensor interpolate(const Tensor& x, int64_t out_h, int64_t out_w, Interp mode) = 0;
  // plane_scale may be undefined or on the host; inputs checked.
  virtual Tensor argmax_planes(const Tensor& x, const Tensor& plane_scale, DType out) = 0;
  virtual Tensor count_at_least(const Tensor& x, const Tensor& plane_scale, float threshold) = 0;
  virtual Tensor bincount(const Tensor& idx, int64_t bins) = 0;
  virtual Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads,
                                      const AttentionOptions& opt) = 0;
  virtual Tensor multi_head_attention_packed(const Tensor& qkv, int64_t num_heads, const AttentionOptions& opt) = 0;
  virtual Tensor sine_expand(const Tensor& y_embed, const Tensor& x_embed, const Tensor& dim_t) = 0;  // position.h
  virtual Tensor inverse_sigmoid(const Tensor& x, float eps) = 0;                                  // boxes.h
  virtual Tensor refine_boxes(const Tensor& delta, const Tensor& reference, float eps) = 0;        // boxes.h
  // Selection: the same indices as the host code (ties in index order, NaN first), never read back.
  virtual Tensor topk_rows(const Tensor& scores, int64_t k) = 0;
  virtual Tensor level_nms_proposals(const Tensor& logits, const Tensor& coord_logits,  // boxes.h
                                     const std::vector<int64_t>& level_sizes, int64_t k, int64_t pre_nms_topk,
                                     double iou_threshold) = 0;
  virtual Tensor ms_deform_attn(const Tensor& value, const std::vector<DeformLevel>& levels,
                                const Tensor& sampling_locations, const Tensor& attention_weights) = 0;
};

// The backend of a non-CPU device (throws for the CPU, or a device this build or machine lacks).
DeviceBackend& backend(Device d);
// Counts one copy from a device to the host (device_to_host_copies() in device.h).
void count_device_to_host_copy();
// The device an op with these inputs runs on: the first input not on the CPU, else the CPU.
Device op_device(std::initializer_list<const Tensor*> inputs);

// Backends, defined in their own files.
DeviceBackend& emulated_backend();
// Throws vf::Error when this CPU cannot compute Conv2d/Linear in `t` (check_compute_dtype; dnnl_ops.cpp:
// what oneDNN finds on the CPU).
void check_cpu_compute_dtype(DType t);
#ifdef VF_WITH_CUDA
DeviceBackend& cuda_backend(int index);
int cuda_device_count();
// Throws vf::Error when GPU `index` cannot compute Conv2d/Linear in `t` (check_compute_dtype).
void check_cuda_compute_dtype(int index, DType t);
#endif

}  // namespace vf
