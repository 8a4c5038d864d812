// Shape rules shared by the CPU ops and the device backends: each op checks its inputs and works out
// its output once, here, whichever device then computes it.
#pragma once

#include <cstdint>
#include <vector>

#include "core/ops.h"
#include "core/tensor.h"

namespace vf {

// matmul(a, b, trans_b): [B..., M, K] x [B..., K, N] (or [B..., N, K]) -> [B..., M, N].
struct MatmulShape {
  int64_t batch = 1, M = 0, N = 0, K = 0;
  Shape out;
};
MatmulShape matmul_shape(const Tensor& a, const Tensor& b, bool trans_b);

// numpy broadcasting of a and b: the output's shape and, over it, each input's element strides (0
// on a broadcast dimension). `name` names the op in errors.
struct BroadcastShape {
  Shape out;
  std::vector<int64_t> a_strides, b_strides;
};
BroadcastShape broadcast_shape(const Tensor& a, const Tensor& b, const char* name);

// cat(xs, dim): the output's shape; `dim` is made non-negative.
Shape cat_shape(const std::vector<Tensor>& xs, int64_t& dim);

// permute(x, perm): the output's shape; `src_strides` (if given) gets, over it, x's element strides.
Shape permute_shape(const Tensor& x, const std::vector<int>& perm, std::vector<int64_t>* src_strides = nullptr);

// max_pool2d's output length along one axis of `size` with padding lo/hi (torch's rule for ceil_mode:
// the last window starts inside the input or the left padding).
int64_t max_pool_out_size(int64_t size, int k, int s, int lo, int hi, bool ceil_mode);

// A convolution's padding (TF 'SAME' worked out for this input when opt.dynamic_same) and output size.
struct ConvGeometry {
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t out_h = 0, out_w = 0;
};
ConvGeometry conv_geometry(const Conv2dOptions& opt, int64_t kh, int64_t kw, int64_t h, int64_t w);

}  // namespace vf
