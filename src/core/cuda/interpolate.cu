// Resampling of NCHW maps as ops.cpp's interpolate_nearest / _bilinear / _bicubic: each thread
// recomputes its taps with the CPU's float formulas. Products and sums use the _rn intrinsics so
// that nvcc does not fuse them into FMAs: a fused source index can land on the other side of an
// integer and pick another pixel.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

#include <cmath>

namespace vf::cuda {

namespace {

__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float sub(float a, float b) { return __fsub_rn(a, b); }

// torch 'nearest': floor(dst * (in / out)) in float, kept inside the map.
__device__ inline int64_t nearest_index(int64_t o, int64_t in, int64_t out) {
  const float sc = float(in) / float(out);
  const int64_t i = static_cast<int64_t>(floorf(mul(float(o), sc)));
  return i < in - 1 ? i : in - 1;
}

struct LinearTap {
  int64_t i0, i1;
  float l0, l1;
};

__device__ inline LinearTap linear_tap(int64_t o, int64_t in, int64_t out, bool align_corners) {
  const float sc = align_corners ? (out > 1 ? float(in - 1) / float(out - 1) : 0.f) : float(in) / float(out);
  const float src = align_corners ? mul(float(o), sc) : fmaxf(sub(mul(add(float(o), 0.5f), sc), 0.5f), 0.f);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in - 1) i0 = in - 1;
  const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
  const float l1 = sub(src, float(i0));
  return {i0, i1, sub(1.f, l1), l1};
}

struct CubicTaps {
  int64_t i[4];
  float wt[4];
};

// Keys' cubic convolution with A = -0.75 (torch's), written as in ops.cpp.
__device__ inline float cubic_near(float d) {  // |d| <= 1: ((A + 2) d - (A + 3)) d d + 1
  constexpr float A = -0.75f;
  return add(mul(mul(sub(mul(A + 2, d), A + 3), d), d), 1.f);
}
__device__ inline float cubic_far(float d) {  // 1 < |d| < 2: ((A d - 5A) d + 8A) d - 4A
  constexpr float A = -0.75f;
  return sub(mul(add(mul(sub(mul(A, d), 5 * A), d), 8 * A), d), 4 * A);
}

__device__ inline CubicTaps cubic_taps(int64_t o, int64_t in, int64_t out) {
  const float scale = float(in) / float(out);
  const float src = sub(mul(scale, add(float(o), 0.5f)), 0.5f);  // not clamped at 0 for cubic, as torch
  const float f = floorf(src);
  const float d = sub(src, f);
  CubicTaps t;
  t.wt[0] = cubic_far(add(d, 1.f));
  t.wt[1] = cubic_near(d);
  t.wt[2] = cubic_near(sub(1.f, d));
  t.wt[3] = cubic_far(sub(2.f, d));
  for (int k = 0; k < 4; ++k) {
    int64_t i = static_cast<int64_t>(f) - 1 + k;
    i = i < 0 ? 0 : (i > in - 1 ? in - 1 : i);
    t.i[k] = i;
  }
  return t;
}

__global__ void nearest_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t oh,
                               int64_t ow, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t ox = o % ow, oy = (o / ow) % oh, p = o / (ow * oh);
    y[o] = x[(p * h + nearest_index(oy, h, oh)) * w + nearest_index(ox, w, ow)];
  }
}

__global__ void bilinear_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t oh,
                                int64_t ow, bool align_corners, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t ox = o % ow, oy = (o / ow) % oh, p = o / (ow * oh);
    const LinearTap a = linear_tap(oy, h, oh, align_corners), b = linear_tap(ox, w, ow, align_corners);
    const float* in = x + p * h * w;
    const float top = add(mul(b.l0, in[a.i0 * w + b.i0]), mul(b.l1, in[a.i0 * w + b.i1]));
    const float bottom = add(mul(b.l0, in[a.i1 * w + b.i0]), mul(b.l1, in[a.i1 * w + b.i1]));
    y[o] = add(mul(a.l0, top), mul(a.l1, bottom));
  }
}

__global__ void bicubic_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t oh,
                               int64_t ow, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t ox = o % ow, oy = (o / ow) % oh, p = o / (ow * oh);
    const CubicTaps a = cubic_taps(oy, h, oh), b = cubic_taps(ox, w, ow);
    const float* in = x + p * h * w;
    float acc = 0.f;
    for (int j = 0; j < 4; ++j) {
      const float* row = in + a.i[j] * w;
      float r = 0.f;
      for (int k = 0; k < 4; ++k) r = add(r, mul(row[b.i[k]], b.wt[k]));
      acc = add(acc, mul(r, a.wt[j]));
    }
    y[o] = acc;
  }
}

}  // namespace

void interpolate(float* y, const float* x, int64_t nc, int64_t h, int64_t w, int64_t oh, int64_t ow, int mode,
                 cudaStream_t s) {
  const int64_t total = nc * oh * ow;
  if (total <= 0 || h <= 0 || w <= 0) return;
  const unsigned nb = grid_for(total);
  switch (mode) {
    case 0: nearest_kernel<<<nb, kThreads, 0, s>>>(y, x, h, w, oh, ow, total); break;
    case 1: bilinear_kernel<<<nb, kThreads, 0, s>>>(y, x, h, w, oh, ow, false, total); break;
    case 2: bilinear_kernel<<<nb, kThreads, 0, s>>>(y, x, h, w, oh, ow, true, total); break;
    case 3: bicubic_kernel<<<nb, kThreads, 0, s>>>(y, x, h, w, oh, ow, total); break;
    default: break;
  }
}

}  // namespace vf::cuda
