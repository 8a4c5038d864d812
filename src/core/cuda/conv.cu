// Convolutions cuDNN runs slowly in exact float32: depthwise (ConvNeXt's 7x7), one thread per
// output value, channels innermost so a warp reads 32 neighbouring channels of one pixel.
#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

__global__ void depthwise_kernel(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ bias, const float* __restrict__ residual, int64_t n,
                                 int64_t h, int64_t wd, int64_t c, int64_t oh, int64_t ow, int kh, int kw, int sh,
                                 int sw, int pt, int pl, int dh, int dw, Act a) {
  VF_GRID_STRIDE(i, n * oh * ow * c) {
    const int64_t ch = i % c, ox = (i / c) % ow, oy = (i / (c * ow)) % oh, b = i / (c * ow * oh);
    const float* wc = w + ch * kh * kw;
    float acc = 0.f;
    for (int ky = 0; ky < kh; ++ky) {
      const int64_t iy = oy * sh - pt + ky * dh;
      if (iy < 0 || iy >= h) continue;
      const float* row = x + ((b * h + iy) * wd) * c + ch;
      for (int kx = 0; kx < kw; ++kx) {
        const int64_t ix = ox * sw - pl + kx * dw;
        if (ix < 0 || ix >= wd) continue;
        acc = fmaf(row[ix * c], wc[ky * kw + kx], acc);
      }
    }
    if (bias) acc += bias[ch];
    if (residual) acc += residual[i];
    y[i] = apply_act(acc, a);
  }
}

__global__ void attention_pointers_kernel(const void** out, AttentionPointers p, int64_t B, int64_t H) {
  VF_GRID_STRIDE(i, 6 * B * H) {
    const int64_t j = i / (B * H), bh = i % (B * H);
    out[i] = p.base[j] + (bh / H) * p.batch_stride[j] + (bh % H) * p.head_stride[j];
  }
}

}  // namespace

void depthwise_conv_nhwc(float* y, const float* x, const float* w, const float* bias, const float* residual,
                         int64_t n, int64_t h, int64_t wd, int64_t c, int64_t oh, int64_t ow, int kh, int kw,
                         int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w, Act a,
                         cudaStream_t s) {
  const int64_t total = n * oh * ow * c;
  if (total == 0) return;
  depthwise_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, kw, stride_h,
                                                        stride_w, pad_top, pad_left, dil_h, dil_w, a);
}

void attention_pointers(const void** out, const AttentionPointers& p, int64_t B, int64_t H, cudaStream_t s) {
  attention_pointers_kernel<<<grid_for(6 * B * H), kThreads, 0, s>>>(out, p, B, H);
}

}  // namespace vf::cuda
