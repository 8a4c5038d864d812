// Convolutions cuDNN runs slowly in exact float32: depthwise (ConvNeXt's 7x7). The generic kernel
// takes one thread per output value, channels innermost so a warp reads 32 neighbouring channels of
// one pixel; depthwise_row_kernel is the fast path of stride 1 with kw 3, 5 or 7.
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

// The common case (stride 1, no dilation, kw in {3, 5, 7}): a thread computes P consecutive outputs
// of one row for V channels (V = 4: a float4, channels a multiple of 4 and aligned; V = 1: any). Per
// kernel row it loads the KW taps' weights once and walks the P + KW - 1 input columns once, adding
// every column to the outputs whose window holds it: each output still sums its taps row by row,
// left to right, skipping those outside the image, with fmaf as the generic kernel, so every (P, V)
// gives the same bits.
template <int V>
struct Lanes {
  float v[V];
};

template <int V>
__device__ __forceinline__ Lanes<V> load_lanes(const float* p) {
  Lanes<V> r;
  if constexpr (V == 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    r.v[0] = q.x, r.v[1] = q.y, r.v[2] = q.z, r.v[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = __ldg(p + k);
  }
  return r;
}

template <int V>
__device__ __forceinline__ void store_lanes(float* p, const Lanes<V>& r) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = r.v[k];
  }
}

template <int KW, int P, int V>
__global__ void depthwise_row_kernel(float* __restrict__ y, const float* __restrict__ x,
                                     const float* __restrict__ w, const float* __restrict__ bias,
                                     const float* __restrict__ residual, int64_t n, int64_t h, int64_t wd, int64_t c,
                                     int64_t oh, int64_t ow, int kh, int pt, int pl, Act a) {
  const int64_t cv = c / V, tiles = (ow + P - 1) / P;
  VF_GRID_STRIDE(i, n * oh * tiles * cv) {
    // Rows before tiles: the threads of a block then share the input rows of neighbouring output
    // rows, which each read kh times, through L1.
    const int64_t ch = (i % cv) * V, oy = (i / cv) % oh, tile = (i / (cv * oh)) % tiles,
                  b = i / (cv * oh * tiles);
    const int64_t ox0 = tile * P, ix0 = ox0 - pl;
    Lanes<V> acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int k = 0; k < V; ++k) acc[p].v[k] = 0.f;
    for (int ky = 0; ky < kh; ++ky) {
      const int64_t iy = oy - pt + ky;
      if (iy < 0 || iy >= h) continue;
      Lanes<V> wk[KW];
      const float* wr = w + ky * KW * c + ch;
#pragma unroll
      for (int kx = 0; kx < KW; ++kx) wk[kx] = load_lanes<V>(wr + kx * c);
      const float* row = x + ((b * h + iy) * wd) * c + ch;
#pragma unroll
      for (int j = 0; j < P + KW - 1; ++j) {
        const int64_t ix = ix0 + j;
        if (ix < 0 || ix >= wd) continue;
        const Lanes<V> v = load_lanes<V>(row + ix * c);
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const int kx = j - p;
          if (kx < 0 || kx >= KW) continue;
#pragma unroll
          for (int k = 0; k < V; ++k) acc[p].v[k] = fmaf(v.v[k], wk[kx].v[k], acc[p].v[k]);
        }
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      if (ox0 + p >= ow) break;
      const int64_t o = ((b * oh + oy) * ow + ox0 + p) * c + ch;
      Lanes<V> r = acc[p];
      if (bias) {
        const Lanes<V> bv = load_lanes<V>(bias + ch);
#pragma unroll
        for (int k = 0; k < V; ++k) r.v[k] += bv.v[k];
      }
      if (residual) {
        const Lanes<V> q = load_lanes<V>(residual + o);
#pragma unroll
        for (int k = 0; k < V; ++k) r.v[k] += q.v[k];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = apply_act(r.v[k], a);
      store_lanes<V>(y + o, r);
    }
  }
}

constexpr int kRowThreads = 128;

template <int KW, int P, int V>
void launch_depthwise_rows(int64_t threads, float* y, const float* x, const float* w, const float* bias,
                           const float* residual, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t oh,
                           int64_t ow, int kh, int pt, int pl, Act a, cudaStream_t s) {
  depthwise_row_kernel<KW, P, V><<<grid_for(threads, kRowThreads), kRowThreads, 0, s>>>(y, x, w, bias, residual, n, h,
                                                                                       wd, c, oh, ow, kh, pt, pl, a);
}

// More outputs and channels a thread read each input column fewer times, but leave fewer threads:
// at batch 1, ConvNeXt's later stages (14x14x384, 7x7x768) gave 40 or 20 blocks of a 132-SM GPU
// four channels and four outputs a thread, and each kernel waited on the loads of its few threads.
// So the widest split that still has enough threads to fill the GPU (float4 only where aligned),
// else one channel and one output a thread.
template <int KW>
void depthwise_rows(bool vec4, float* y, const float* x, const float* w, const float* bias, const float* residual,
                    int64_t n, int64_t h, int64_t wd, int64_t c, int64_t oh, int64_t ow, int kh, int pt, int pl,
                    Act a, cudaStream_t s) {
  constexpr int64_t enough = 64 * 1024;
  auto threads = [&](int p, int v) { return n * oh * ((ow + p - 1) / p) * (c / v); };
  auto run = [&]<int P, int V>() {
    launch_depthwise_rows<KW, P, V>(threads(P, V), y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  };
  if (vec4 && threads(8, 4) >= 2 * enough) return run.template operator()<8, 4>();
  if (vec4 && threads(4, 4) >= enough) return run.template operator()<4, 4>();
  if (threads(4, 1) >= enough) return run.template operator()<4, 1>();
  if (threads(2, 1) >= enough) return run.template operator()<2, 1>();
  run.template operator()<1, 1>();
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
  const bool rows = stride_h == 1 && stride_w == 1 && dil_h == 1 && dil_w == 1;
  const bool vec4 = c % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(w) && (!bias || aligned16(bias)) &&
                    (!residual || aligned16(residual));
  const int pt = pad_top, pl = pad_left;
  if (rows && kw == 7) return depthwise_rows<7>(vec4, y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  if (rows && kw == 5) return depthwise_rows<5>(vec4, y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  if (rows && kw == 3) return depthwise_rows<3>(vec4, y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, pt, pl, a, s);
  depthwise_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, w, bias, residual, n, h, wd, c, oh, ow, kh, kw, stride_h,
                                                        stride_w, pad_top, pad_left, dil_h, dil_w, a);
}

void attention_pointers(const void** out, const AttentionPointers& p, int64_t B, int64_t H, cudaStream_t s) {
  attention_pointers_kernel<<<grid_for(6 * B * H), kThreads, 0, s>>>(out, p, B, H);
}

}  // namespace vf::cuda
