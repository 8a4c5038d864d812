// Convolutions cuDNN runs slowly in exact float32: depthwise (ConvNeXt's 7x7). The generic kernel
// takes one thread per output value, channels innermost so a warp reads 32 neighbouring channels of
// one pixel; depthwise_row_kernel is the fast path of the common shapes.
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
    const float* wc = w + ch;
    float acc = 0.f;
    for (int ky = 0; ky < kh; ++ky) {
      const int64_t iy = oy * sh - pt + ky * dh;
      if (iy < 0 || iy >= h) continue;
      const float* row = x + ((b * h + iy) * wd) * c + ch;
      for (int kx = 0; kx < kw; ++kx) {
        const int64_t ix = ox * sw - pl + kx * dw;
        if (ix < 0 || ix >= wd) continue;
        acc = fmaf(row[ix * c], wc[(ky * kw + kx) * c], acc);
      }
    }
    if (bias) acc += bias[ch];
    if (residual) acc += residual[i];
    y[i] = apply_act(acc, a);
  }
}

// The common case (stride 1, no dilation, channels a multiple of 4, kw in {3, 5, 7}): a thread
// computes P consecutive outputs of one row for 4 channels. Per kernel row it loads the KW taps'
// weights once (a float4 each) and walks the P + KW - 1 input columns once (float4 each), adding every column to the
// outputs whose window holds it: each output still sums its taps row by row, left to right, skipping
// those outside the image, with fmaf as the generic kernel, so the results are the same bits.
template <int KW, int P>
__global__ void depthwise_row_kernel(float* __restrict__ y, const float* __restrict__ x,
                                     const float* __restrict__ w, const float* __restrict__ bias,
                                     const float* __restrict__ residual, int64_t n, int64_t h, int64_t wd, int64_t c,
                                     int64_t oh, int64_t ow, int kh, int pt, int pl, Act a) {
  const int64_t c4 = c / 4, tiles = (ow + P - 1) / P;
  VF_GRID_STRIDE(i, n * oh * tiles * c4) {
    // Rows before tiles: the threads of a block then share the input rows of neighbouring output
    // rows, which each read kh times, through L1.
    const int64_t ch = (i % c4) * 4, oy = (i / c4) % oh, tile = (i / (c4 * oh)) % tiles,
                  b = i / (c4 * oh * tiles);
    const int64_t ox0 = tile * P, ix0 = ox0 - pl;
    float4 acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int ky = 0; ky < kh; ++ky) {
      const int64_t iy = oy - pt + ky;
      if (iy < 0 || iy >= h) continue;
      float4 wk[KW];
      const float* wr = w + ky * KW * c + ch;
#pragma unroll
      for (int kx = 0; kx < KW; ++kx) wk[kx] = __ldg(reinterpret_cast<const float4*>(wr + kx * c));
      const float* row = x + ((b * h + iy) * wd) * c + ch;
#pragma unroll
      for (int j = 0; j < P + KW - 1; ++j) {
        const int64_t ix = ix0 + j;
        if (ix < 0 || ix >= wd) continue;
        const float4 v = __ldg(reinterpret_cast<const float4*>(row + ix * c));
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const int kx = j - p;
          if (kx < 0 || kx >= KW) continue;
          acc[p].x = fmaf(v.x, wk[kx].x, acc[p].x);
          acc[p].y = fmaf(v.y, wk[kx].y, acc[p].y);
          acc[p].z = fmaf(v.z, wk[kx].z, acc[p].z);
          acc[p].w = fmaf(v.w, wk[kx].w, acc[p].w);
        }
      }
    }
    float4 bv = make_float4(0.f, 0.f, 0.f, 0.f);
    if (bias) bv = make_float4(bias[ch], bias[ch + 1], bias[ch + 2], bias[ch + 3]);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      if (ox0 + p >= ow) break;
      const int64_t o = ((b * oh + oy) * ow + ox0 + p) * c + ch;
      float4 r = acc[p];
      if (bias) r.x += bv.x, r.y += bv.y, r.z += bv.z, r.w += bv.w;
      if (residual) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(residual + o));
        r.x += q.x, r.y += q.y, r.z += q.z, r.w += q.w;
      }
      r.x = apply_act(r.x, a), r.y = apply_act(r.y, a), r.z = apply_act(r.z, a), r.w = apply_act(r.w, a);
      *reinterpret_cast<float4*>(y + o) = r;
    }
  }
}

constexpr int kRowThreads = 128;

template <int KW>
void depthwise_rows(float* y, const float* x, const float* w, const float* bias, const float* residual, int64_t n,
                    int64_t h, int64_t wd, int64_t c, int64_t oh, int64_t ow, int kh, int pt, int pl, Act a,
                    cudaStream_t s) {
  // Eight outputs a thread read fewer columns twice, but a small image then has too few threads to
  // fill the GPU: four there.
  const int64_t threads8 = n * oh * ((ow + 7) / 8) * (c / 4);
  if (threads8 >= 132 * 1024) {
    depthwise_row_kernel<KW, 8><<<grid_for(threads8, kRowThreads), kRowThreads, 0, s>>>(
        y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a);
  } else {
    const int64_t threads4 = n * oh * ((ow + 3) / 4) * (c / 4);
    depthwise_row_kernel<KW, 4><<<grid_for(threads4, kRowThreads), kRowThreads, 0, s>>>(
        y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a);
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
  const bool rows = stride_h == 1 && stride_w == 1 && dil_h == 1 && dil_w == 1 && c % 4 == 0 && aligned16(y) &&
                    aligned16(x) && aligned16(w) && (!residual || aligned16(residual));
  const int pt = pad_top, pl = pad_left;
  if (rows && kw == 7) return depthwise_rows<7>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  if (rows && kw == 5) return depthwise_rows<5>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  if (rows && kw == 3) return depthwise_rows<3>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  depthwise_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, kw, stride_h,
                                                        stride_w, pad_top, pad_left, dil_h, dil_w, a);
}

void attention_pointers(const void** out, const AttentionPointers& p, int64_t B, int64_t H, cudaStream_t s) {
  attention_pointers_kernel<<<grid_for(6 * B * H), kThreads, 0, s>>>(out, p, B, H);
}

}  // namespace vf::cuda
