// Tensor operations. All take and return contiguous float32 tensors unless stated otherwise.
//
// Layouts: spatial feature maps inside the models are channels-last, [N, H, W, C] ("NHWC"): it is
// the layout oneDNN's convolutions run fastest on without reorders, layer norm over channels reads
// contiguous rows, and a 1x1 convolution is a plain matrix product. Models convert to the
// reference's [N, C, H, W] only for the outputs they return (`nhwc_to_nchw`).
//
// Weighted layers (Conv2d, Linear) are objects built once at load: the weights are reordered into
// the layout oneDNN prefers and primitives are cached per input shape, so forward() does no setup.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace vf {

// ---- threads ------------------------------------------------------------------------------------
void set_num_threads(int n);  // <= 0: all cores
int num_threads();

// ---- activations --------------------------------------------------------------------------------
enum class Act {
  None, Relu, Gelu, GeluTanh, Silu, Selu, Sigmoid, Tanh, QuickGelu, Relu6, LeakyRelu,
  GeluClip10, HardSwish, Mish, Relu2, Laplace, SqrtSoftplus
};
// transformers' ACT2FN names: "relu", "gelu"/"gelu_python", "gelu_new"/"gelu_pytorch_tanh"/
// "gelu_python_tanh"/"gelu_fast"/"gelu_accurate", "gelu_10", "silu"/"swish", "selu", "sigmoid",
// "tanh", "quick_gelu", "relu6", "relu2", "leaky_relu", "hardswish", "mish", "laplace",
// "sqrtsoftplus", "linear". Unknown names throw, and so do "prelu" and "xielu" (learned parameters).
Act act_from_name(const std::string& name);
// The logistic function of one value, as Act::Sigmoid computes it (and the heads and losses that
// take it element by element).
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
void act_inplace(Tensor& x, Act act);
Tensor act(const Tensor& x, Act act);

// ---- convolution and matrix products (oneDNN) --------------------------------------------------
struct Conv2dOptions {
  int stride_h = 1, stride_w = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int dilation_h = 1, dilation_w = 1;
  int groups = 1;
  // TensorFlow 'SAME': padding computed from each input's size (what BiT's DynamicPad2d does).
  bool dynamic_same = false;
  Act act = Act::None;  // fused after the bias (and after the residual sum)
  // The layer will run on BlockedMaps: its weights take the blocked kernels' layout at load (the
  // NHWC forward()s still work, with a second copy of the weights made at their first run).
  bool blocked_maps = false;
};

// A feature map passed between convolutions in the layout oneDNN's kernels pick for them (on an
// AVX-512 CPU channel-blocked, nChw16c: sixteen channels of a pixel side by side, one plane of
// them after another), so that a chain of Conv2d (a ResNet's blocks) runs without reordering its
// maps to and from NHWC around every layer. Opaque: a model makes one from its input, passes it from
// layer to layer and converts the maps it reads back to NHWC. Where a layer runs elsewhere (a
// device, bfloat16 compute) the map simply holds the NHWC tensor that layer takes and returns.
class BlockedMap {
 public:
  BlockedMap() = default;
  static BlockedMap from_nhwc(Tensor x);  // [N, H, W, C]
  static BlockedMap from_nchw(Tensor x);  // [N, C, H, W] (e.g. pixel_values): read in place when it can be
  // float32 [N, H, W, C] (a copy unless the map holds a float32 NHWC tensor).
  Tensor to_nhwc() const;
  // The logical shape, [N, H, W, C].
  const Shape& shape() const { return shape_; }
  bool defined() const { return data_.defined(); }
  struct Layout;

 private:
  friend class Conv2d;
  friend BlockedMap max_pool2d(const BlockedMap& x, int kernel, int stride, int pad);
  enum class Form { Nhwc, Nchw, Blocked };
  Form form_ = Form::Nhwc;
  Tensor data_;  // the NHWC / NCHW tensor, or the blocked map's bytes (flat float32)
  std::shared_ptr<const Layout> layout_;  // Blocked: oneDNN's description of the bytes
  Shape shape_;
};

class Conv2d {
 public:
  Conv2d() = default;
  // weight [out, in/groups, kh, kw] (PyTorch layout); bias [out] or undefined.
  Conv2d(const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt);
  // x: [N, H, W, in] -> [N, OH, OW, out]. `residual` (same shape as the output) is added before act.
  Tensor forward(const Tensor& x, const Tensor* residual = nullptr) const;
  // The same, the sum accumulating in the residual's own storage when no other tensor shares it (a
  // residual block's shortcut, dead after the sum): no copy of a full feature map.
  Tensor forward(const Tensor& x, Tensor&& residual) const;
  // For an output that only another Conv2d or Linear reads (a bottleneck's inner convolutions): in
  // the layer's compute dtype, so bfloat16 when it was built so (the next layer takes it without a
  // conversion, and half the bytes move); otherwise what forward() returns.
  Tensor forward_to_layer(const Tensor& x) const;
  // The same with a residual sum: on a bfloat16 CPU layer the sum (and activation) run in float32 on
  // the accumulator and the result is rounded to bfloat16 (a residual stream held in bfloat16, as
  // PyTorch's autocast holds it; the residual is read in bfloat16 too); otherwise forward(x, residual).
  Tensor forward_to_layer(const Tensor& x, Tensor&& residual) const;
  // The same four on blocked maps: a float32 CPU layer reads its input in the layout it prefers
  // (reordered once when it is another) and writes its output in the layout it picks; the sum
  // accumulates in the residual's storage when it already has the output's layout and nothing else
  // shares it. Elsewhere these run the NHWC forward()s above.
  BlockedMap forward(const BlockedMap& x) const;
  BlockedMap forward(const BlockedMap& x, BlockedMap&& residual) const;
  BlockedMap forward_to_layer(const BlockedMap& x) const;
  BlockedMap forward_to_layer(const BlockedMap& x, BlockedMap&& residual) const;
  int64_t out_channels() const { return out_; }
  int64_t in_channels() const { return in_; }
  // What forward() reads without a conversion: BF16 for a CPU layer built to compute in bfloat16 (an op
  // producing its input can write that directly), else F32.
  DType input_dtype() const;
  bool defined() const { return impl_ != nullptr; }
  struct Impl;

 private:
  Tensor forward(const Tensor& x, const Tensor* residual, bool in_place, bool to_layer = false) const;
  // oneDNN, host tensors
  Tensor forward_cpu(const Tensor& x, const Tensor* residual, bool in_place, bool to_layer) const;
  BlockedMap forward(const BlockedMap& x, BlockedMap* residual, bool to_layer) const;
  std::shared_ptr<Impl> impl_;
  int64_t out_ = 0, in_ = 0;
};

class Linear {
 public:
  Linear() = default;
  // weight [out, in] (PyTorch layout); bias [out] or undefined.
  Linear(const Tensor& weight, const Tensor& bias, Act act = Act::None);
  // x: [..., in] -> [..., out]: y = act(x W^T + b) + residual (the order of a residual branch).
  Tensor forward(const Tensor& x, const Tensor* residual = nullptr) const;
  // The same, the sum accumulating in the residual's own storage when it is float32 on the host and
  // no other tensor shares it (a transformer layer's residual stream, dead after the sum): no copy.
  Tensor forward(const Tensor& x, Tensor&& residual) const;
  // For an output that only another Linear or Conv2d reads (an MLP's hidden layer): in the layer's
  // compute dtype (see Conv2d::forward_to_layer).
  Tensor forward_to_layer(const Tensor& x) const;
  // The same with a residual sum, for a residual stream that layers of this compute dtype (and norms)
  // read: on a bfloat16 CPU layer the sum runs in float32 on the accumulator and the result is
  // rounded to bfloat16, the residual read in bfloat16 (in its own storage when nothing else shares
  // it); otherwise forward(x, std::move(residual)).
  Tensor forward_to_layer(const Tensor& x, Tensor&& residual) const;
  // For an output that only attention reads (Q, K, V or packed Q|K|V): in the layer's compute dtype,
  // which attention's two products then run in (float32 accumulation; the probabilities rounded to
  // it after a float32 softmax).
  Tensor forward_to_attention(const Tensor& x) const;
  // What forward() reads without a conversion (see Conv2d::input_dtype).
  DType input_dtype() const;
  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }
  bool defined() const { return impl_ != nullptr; }
  struct Impl;

 private:
  Tensor forward(const Tensor& x, const Tensor* residual, bool to_layer, bool in_place = false) const;
  // oneDNN, host tensors
  Tensor forward_cpu(const Tensor& x, const Tensor* residual, bool to_layer, bool in_place) const;
  std::shared_ptr<Impl> impl_;
  int64_t out_ = 0, in_ = 0;
};

// Batched matrix product: a [B..., M, K] x b [B..., K, N] -> [B..., M, N]; with trans_b, b is
// [B..., N, K]. Batch dims must match exactly. `alpha` scales the product.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_b = false, float alpha = 1.0f);

// ---- normalisation ----------------------------------------------------------------------------
// Over the last dimension (nn.LayerNorm, and ConvNeXt's channels_last on NHWC). On the CPU,
// `out_dtype` BF16 writes the result rounded to bfloat16 for a layer that reads it as it is
// (Linear::input_dtype), as group_norm_nhwc does; on a device the result is float32.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, DType out_dtype = DType::F32);
// GroupNorm on NHWC: x [N, H, W, C], groups over C. Optional fused activation. On the CPU, `out_dtype`
// BF16 writes the result rounded to bfloat16, for a layer that reads it as it is (see
// Conv2d::input_dtype); on a device the result is float32.
Tensor group_norm_nhwc(const Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps,
                       Act act = Act::None, DType out_dtype = DType::F32);
// y = x * scale[c] + shift[c] (a folded batch norm) over the last dim, optional activation.
Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift, Act act = Act::None);
// ConvNeXt V2's global response norm on NHWC. On the CPU x may be bfloat16 (a bfloat16 layer's
// forward_to_layer), and `out_dtype` BF16 writes the result rounded to bfloat16 for the layer that
// reads it (see layer_norm); on a device the result is float32.
Tensor grn_nhwc(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps = 1e-6f,
                DType out_dtype = DType::F32);
// Softmax over the last dimension, in place.
void softmax_lastdim_inplace(Tensor& x);

// ---- pooling (NHWC) -----------------------------------------------------------------------------
// Max pooling: the padding of each side is left out of every window (PyTorch's -inf padding) and a
// NaN in a window gives NaN, as PyTorch; a model whose reference pads with zeros (BiT's dynamic
// padding) pads with pad_nhwc first. ceil_mode as PyTorch's (no window starts in the end padding).
Tensor max_pool2d_nhwc(const Tensor& x, int kernel, int stride, int pad_top, int pad_left, int pad_bottom,
                       int pad_right, bool ceil_mode = false);
Tensor avg_pool2d_nhwc(const Tensor& x, int kernel, int stride, int pad, bool count_include_pad = true);
// Max pooling of a blocked map (a ResNet stem's), padding excluded from every window, a NaN in a
// window giving NaN (PyTorch's rule, as max_pool2d_nhwc), in the map's own layout; a map that holds an
// NHWC tensor (or bytes in a layout other than channel blocks) goes through max_pool2d_nhwc.
BlockedMap max_pool2d(const BlockedMap& x, int kernel, int stride, int pad);
// Adaptive average to 1x1 -> [N, C].
Tensor global_avg_pool_nhwc(const Tensor& x);

// ---- layout and shape ---------------------------------------------------------------------------
Tensor nchw_to_nhwc(const Tensor& x);
Tensor nhwc_to_nchw(const Tensor& x);
// General permutation (any rank, any dtype of size 1/2/4/8).
Tensor permute(const Tensor& x, const std::vector<int>& perm);
Tensor transpose_last2(const Tensor& x);
// Constant padding of an NHWC map (nn.functional.pad on the H and W dims).
Tensor pad_nhwc(const Tensor& x, int top, int left, int bottom, int right, float value = 0.0f);
// Swin's window partition of a cyclically shifted map (torch.roll by -shift on H and W, then
// window_partition): x [B, H, W, C], H and W multiples of `window` -> [B * nh * nw, window^2, C]
// (nh = H / window, nw = W / window), windows image-major then row-major, tokens row-major inside a
// window. Token (i, j) of window (a, c) is x[(a*window + i + shift) mod H, (c*window + j + shift) mod W].
Tensor window_partition(const Tensor& x, int64_t window, int64_t shift = 0);
// The inverse (window_reverse, then torch.roll by +shift), keeping only the top-left out_h x out_w
// (the unpadded map): windows [B * nh * nw, window^2, C] of an H x W map -> [B, out_h, out_w, C].
Tensor window_reverse(const Tensor& windows, int64_t window, int64_t H, int64_t W, int64_t shift, int64_t out_h,
                      int64_t out_w);
// Concatenate along `dim` (all other dims equal, same dtype).
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);
// Sub-range along any dim: [begin, begin + length). On the host, where the range is contiguous (every
// dim before `dim` of size 1: a batch of one), a view of x's memory, like reshape (ops that write in
// place check sole_owner(), which a view is not); else a copy.
Tensor narrow(const Tensor& x, int64_t dim, int64_t begin, int64_t length);
// Rows of each batch entry: x [B, S, C] (float32) and idx [B, K] (int64) -> y [B, K, C] with
// y[b, k] = x[b, idx[b, k]] (torch.gather of whole rows), on x's device. idx is on the host or on x's
// device (what topk_rows / level_nms_proposals return there: nothing is read back). Host indices are
// checked (an Error when out of range); a device's cannot be without waiting for it, so a GPU writes
// NaN rows for indices out of range, and the emulated device, which can look, throws.
Tensor gather_rows(const Tensor& x, const Tensor& idx);

// ---- elementwise --------------------------------------------------------------------------------
// Broadcasting binary ops (numpy rules). Any float32 shapes.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
void add_inplace(Tensor& a, const Tensor& b);  // same shape
Tensor scale(const Tensor& x, float s);
// y = x * gamma[c] over the last dim (layer scale), optionally + residual.
Tensor mul_lastdim(const Tensor& x, const Tensor& gamma);

// ---- resampling (NCHW, like torch.nn.functional.interpolate) -------------------------------------
Tensor interpolate_bilinear(const Tensor& x, int64_t out_h, int64_t out_w, bool align_corners = false);
Tensor interpolate_nearest(const Tensor& x, int64_t out_h, int64_t out_w);
// torch's bicubic (align_corners=False, no antialias): Keys' cubic with A = -0.75 on the four
// neighbours around (dst + 0.5) * in / out - 0.5, neighbour indices clamped to the border.
Tensor interpolate_bicubic(const Tensor& x, int64_t out_h, int64_t out_w);

// ---- reductions ---------------------------------------------------------------------------------
// Over the planes x[0], x[1], ... of a float32 x [K, ...] (K >= 1), each weighed by plane_scale[k]
// (float32 [K], any device; undefined: 1), the value compared being the float32 product
// x[k][i] * plane_scale[k] (segmentation post-processing: a query's mask times its score):
// at each position, the index of the first largest plane (torch.argmax's tie rule; a NaN never
// wins), `out` I32 or I64, shaped x.shape[1:] ...
Tensor argmax_planes(const Tensor& x, const Tensor& plane_scale = Tensor(), DType out = DType::I64);
// ... and per plane, how many positions have x[k][i] * plane_scale[k] >= threshold: int64 [K].
Tensor count_at_least(const Tensor& x, const Tensor& plane_scale, float threshold);
// How many of idx's values (int32 or int64, any shape) equal 0, 1, ..., bins - 1: int64 [bins] on
// idx's device (torch.bincount with minlength = bins; values outside are not counted).
Tensor bincount(const Tensor& idx, int64_t bins);

double max_abs(const Tensor& x);
double max_abs_diff(const Tensor& a, const Tensor& b);

// ---- selection ----------------------------------------------------------------------------------
// torch's descending order of scores (torch.sort / torch.topk): a NaN before every number, then the
// larger first. Equal values, -0 and +0, and two NaNs are not ordered by it: every caller keeps those
// in index order (a stable sort), and the device kernels do the same.
inline bool score_above(float a, float b) { return std::isnan(a) ? !std::isnan(b) : a > b; }
// The indices of the min(k, n) largest of v[0 .. n), largest first, as torch.topk orders them: a NaN
// above every number, equal values in index order.
std::vector<int64_t> topk_indices(const float* v, int64_t n, int64_t k);
// topk_indices of every row of scores [B, S] (float32), k <= S -> int64 [B, k] on scores' device.
Tensor topk_rows(const Tensor& scores, int64_t k);

}  // namespace vf
