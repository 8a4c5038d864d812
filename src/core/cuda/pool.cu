// Pooling and the NHWC normalisations (GroupNorm, GRN) of ops.cpp. The float arithmetic is written
// with the _rn intrinsics where the CPU code has a product next to a sum: nvcc would otherwise fuse
// them into FMAs, which round differently from the reference.
#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

#include <cmath>

namespace vf::cuda {

namespace {

// ---- pooling ----

__global__ void max_pool_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t c,
                                int64_t oh, int64_t ow, int k, int s, int pt, int pl, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t ch = o % c;
    int64_t t = o / c;
    const int64_t ox = t % ow;
    t /= ow;
    const int64_t oy = t % oh;
    const int64_t i = t / oh;
    float m = -INFINITY;
    for (int64_t ky = 0; ky < k; ++ky) {
      const int64_t iy = oy * s - pt + ky;
      if (iy < 0 || iy >= h) continue;
      for (int64_t kx = 0; kx < k; ++kx) {
        const int64_t ix = ox * s - pl + kx;
        if (ix < 0 || ix >= w) continue;
        const float v = x[((i * h + iy) * w + ix) * c + ch];
        if (v > m || isnan(v)) m = v;  // a NaN in the window is the maximum, as PyTorch
      }
    }
    y[o] = m;
  }
}

__global__ void avg_pool_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t c,
                                int64_t oh, int64_t ow, int k, int s, int pad, bool count_include_pad,
                                int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t ch = o % c;
    int64_t t = o / c;
    const int64_t ox = t % ow;
    t /= ow;
    const int64_t oy = t % oh;
    const int64_t i = t / oh;
    float acc = 0.f;
    int64_t cnt = 0;
    for (int64_t ky = 0; ky < k; ++ky) {
      const int64_t iy = oy * s - pad + ky;
      for (int64_t kx = 0; kx < k; ++kx) {
        const int64_t ix = ox * s - pad + kx;
        const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
        if (inside) acc += x[((i * h + iy) * w + ix) * c + ch];
        if (inside || count_include_pad) ++cnt;
      }
    }
    const float inv = 1.0f / float(cnt > 1 ? cnt : 1);
    y[o] = acc * inv;
  }
}

// Per (image, channel) sums over the hw pixels in double: of x (mode 0, then y = float(sum / hw),
// global average pooling) or of x^2 (mode 1, then y = float(sqrt(sum)), GRN's L2 norm). A block of
// kColLanes x kRowLanes threads covers kColLanes channels, its rows splitting the pixels; the
// partial sums meet in shared memory in a fixed order, so the result is deterministic (its order
// differs from the CPU's sequential sum, which double precision absorbs before the float rounding).
constexpr int kColLanes = 32, kRowLanes = 16;

template <int kMode>
__global__ void column_sum_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n, int64_t hw,
                                  int64_t c) {
  __shared__ double part[kRowLanes][kColLanes];
  const int64_t k = int64_t{blockIdx.x} * kColLanes + threadIdx.x;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {  // the grid's y is capped at 65535 images
    double acc = 0.0;
    if (k < c) {
      const float* px = x + i * hw * c + k;
      for (int64_t p = threadIdx.y; p < hw; p += kRowLanes) {
        const float v = px[p * c];
        acc += kMode == 0 ? double(v) : double(v) * v;
      }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && k < c) {
      double sum = 0.0;
      for (int r = 0; r < kRowLanes; ++r) sum += part[r][threadIdx.x];
      y[i * c + k] = kMode == 0 ? float(sum / double(hw)) : float(sqrt(sum));
    }
    __syncthreads();  // part is rewritten for the next image
  }
}

template <int kMode>
void column_sum(float* y, const float* x, int64_t n, int64_t hw, int64_t c, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((c + kColLanes - 1) / kColLanes),
                  static_cast<unsigned>(n < 65535 ? n : 65535));
  column_sum_kernel<kMode><<<grid, dim3(kColLanes, kRowLanes), 0, s>>>(y, x, n, hw, c);
}

// ---- GroupNorm ----

// One block per (image, group): the sums in double as the CPU code (their order differs, which
// double precision absorbs before the float rounding); writes float(mean) and the float 1/std.
__global__ void group_stats_kernel(float* __restrict__ stats, const float* __restrict__ x, int64_t hw, int64_t c,
                                   int groups, float eps) {
  __shared__ double s_sum[kThreads], s_sq[kThreads];
  const int64_t ig = blockIdx.x, i = ig / groups, g = ig % groups;
  const int64_t cg = c / groups, count = hw * cg;
  const float* base = x + i * hw * c + g * cg;
  double sum = 0, sq = 0;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const float v = base[(e / cg) * c + e % cg];
    sum += v;
    sq += double(v) * v;
  }
  s_sum[threadIdx.x] = sum;
  s_sq[threadIdx.x] = sq;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
      s_sq[threadIdx.x] += s_sq[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double cnt = double(count);
    const double mean = s_sum[0] / cnt;
    double var = s_sq[0] / cnt - mean * mean;
    if (var < 0.0) var = 0.0;
    stats[2 * ig] = float(mean);
    stats[2 * ig + 1] = float(1.0 / sqrt(var + eps));
  }
}

__global__ void group_apply_kernel(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ stats,
                                   const float* __restrict__ w, const float* __restrict__ b, int64_t hw, int64_t c,
                                   int groups, Act a, int64_t total) {
  const int64_t cg = c / groups;
  VF_GRID_STRIDE(o, total) {
    const int64_t ch = o % c, i = o / (hw * c);
    const int64_t ig = i * groups + ch / cg;
    const float mean = stats[2 * ig], inv = stats[2 * ig + 1];
    // scale = inv * w; shift = b - mean * inv * w; y = x * scale + shift (ops.cpp, left to right).
    const float scale = __fmul_rn(inv, w[ch]);
    const float shift = __fsub_rn(b[ch], __fmul_rn(__fmul_rn(mean, inv), w[ch]));
    y[o] = apply_act(__fadd_rn(__fmul_rn(x[o], scale), shift), a);
  }
}

// ---- GRN ----

// One block per image: the channel mean of gx (sequential, in double, as the CPU code), then
// gx[k] becomes nx[k] = gx[k] / (float(mean) + eps) in place.
__global__ void grn_scale_kernel(float* __restrict__ gx, int64_t c, float eps) {
  __shared__ float s_den;
  float* g = gx + int64_t{blockIdx.x} * c;
  if (threadIdx.x == 0) {
    double mean = 0;
    for (int64_t k = 0; k < c; ++k) mean += g[k];
    mean /= c;
    s_den = float(mean) + eps;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < c; k += blockDim.x) g[k] = g[k] / s_den;
}

__global__ void grn_apply_kernel(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ nx,
                                 const float* __restrict__ gamma, const float* __restrict__ beta, int64_t hw,
                                 int64_t c, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int64_t k = o % c, i = o / (hw * c);
    const float v = x[o];
    // gamma * (x * nx) + beta + x
    y[o] = __fadd_rn(__fadd_rn(__fmul_rn(gamma[k], __fmul_rn(v, nx[i * c + k])), beta[k]), v);
  }
}

}  // namespace

void max_pool2d_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow,
                     int k, int stride, int pad_top, int pad_left, cudaStream_t s) {
  const int64_t total = n * oh * ow * c;
  if (total <= 0) return;
  max_pool_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, h, w, c, oh, ow, k, stride, pad_top, pad_left,
                                                       total);
}

void avg_pool2d_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow,
                     int k, int stride, int pad, bool count_include_pad, cudaStream_t s) {
  const int64_t total = n * oh * ow * c;
  if (total <= 0) return;
  avg_pool_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, h, w, c, oh, ow, k, stride, pad, count_include_pad,
                                                         total);
}

void global_avg_pool_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, cudaStream_t s) {
  const int64_t total = n * c;
  if (total <= 0) return;
  column_sum<0>(y, x, n, hw, c, s);
}

void group_norm_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, int groups, const float* w,
                     const float* b, float eps, Act a, cudaStream_t s) {
  const int64_t total = n * hw * c;
  if (total <= 0 || groups <= 0) return;
  float* stats = nullptr;
  // A failed allocation leaves its error for the backend's cudaGetLastError.
  if (cudaMallocAsync(reinterpret_cast<void**>(&stats), sizeof(float) * 2 * n * groups, s) != cudaSuccess) return;
  group_stats_kernel<<<static_cast<unsigned>(n * groups), kThreads, 0, s>>>(stats, x, hw, c, groups, eps);
  group_apply_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, stats, w, b, hw, c, groups, a, total);
  cudaFreeAsync(stats, s);
}

void grn_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, const float* gamma, const float* beta,
              float eps, cudaStream_t s) {
  const int64_t total = n * hw * c;
  if (total <= 0) return;
  float* nx = nullptr;
  if (cudaMallocAsync(reinterpret_cast<void**>(&nx), sizeof(float) * n * c, s) != cudaSuccess) return;
  column_sum<1>(nx, x, n, hw, c, s);  // gx = ||x||_2 over (H, W)
  grn_scale_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(nx, c, eps);
  grn_apply_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, nx, gamma, beta, hw, c, total);
  cudaFreeAsync(nx, s);
}

}  // namespace vf::cuda
