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

// The same four channels at a time (float4), for channel counts of a multiple of 4: a quarter of the
// index arithmetic, 16-byte loads. A ResNet stem's pool (400x533x64) is memory-bound this way.
__device__ __forceinline__ float max_or_nan(float m, float v) { return v > m || isnan(v) ? v : m; }

__global__ void max_pool4_kernel(float4* __restrict__ y, const float4* __restrict__ x, int h, int w, int c4, int oh,
                                 int ow, int k, int s, int pt, int pl, int64_t total) {
  VF_GRID_STRIDE(o, total) {
    const int ch = int(o % c4);
    const int64_t t = o / c4;
    const int ox = int(t % ow), oy = int((t / ow) % oh);
    const int64_t i = t / (int64_t(ow) * oh);
    float4 m = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    for (int ky = 0; ky < k; ++ky) {
      const int iy = oy * s - pt + ky;
      if (iy < 0 || iy >= h) continue;
      const float4* row = x + ((i * h + iy) * w) * c4 + ch;
      for (int kx = 0; kx < k; ++kx) {
        const int ix = ox * s - pl + kx;
        if (ix < 0 || ix >= w) continue;
        const float4 v = row[int64_t(ix) * c4];
        m.x = max_or_nan(m.x, v.x), m.y = max_or_nan(m.y, v.y), m.z = max_or_nan(m.z, v.z), m.w = max_or_nan(m.w, v.w);
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

// The sums in double as the CPU code (their order differs, which double precision absorbs before the
// float rounding). A group is cut into chunks of pixels, one block each, so that even one image's
// few groups fill the GPU: partial[2 * (ig * chunks + k)] gets chunk k's sum, + 1 its sum of squares.
template <bool Vec>
__global__ void group_partial_kernel(double* __restrict__ partial, const float* __restrict__ x, int64_t hw,
                                     int64_t c, int groups, int64_t chunk_pixels, int64_t chunks) {
  __shared__ double s_sum[kThreads], s_sq[kThreads];
  const int64_t ig = blockIdx.x / chunks, k = blockIdx.x % chunks, i = ig / groups, g = ig % groups;
  const int64_t cg = c / groups, p0 = k * chunk_pixels, pixels = std::min(chunk_pixels, hw - p0);
  const float* base = x + (i * hw + p0) * c + g * cg;
  double sum = 0, sq = 0;
  if constexpr (Vec) {
    const int64_t cg4 = cg / 4;
    for (int64_t e = threadIdx.x; e < pixels * cg4; e += blockDim.x) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(base + (e / cg4) * c) + e % cg4);
      sum += v.x;
      sq += double(v.x) * v.x;
      sum += v.y;
      sq += double(v.y) * v.y;
      sum += v.z;
      sq += double(v.z) * v.z;
      sum += v.w;
      sq += double(v.w) * v.w;
    }
  } else {
    for (int64_t e = threadIdx.x; e < pixels * cg; e += blockDim.x) {
      const float v = base[(e / cg) * c + e % cg];
      sum += v;
      sq += double(v) * v;
    }
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
    partial[2 * blockIdx.x] = s_sum[0];
    partial[2 * blockIdx.x + 1] = s_sq[0];
  }
}

// One thread per (image, group): the chunks' sums, then float(mean) and the float 1/std.
__global__ void group_stats_kernel(float* __restrict__ stats, const double* __restrict__ partial, int64_t count,
                                   int64_t chunks, int64_t n_groups, float eps) {
  VF_GRID_STRIDE(ig, n_groups) {
    double sum = 0, sq = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sum += partial[2 * (ig * chunks + k)];
      sq += partial[2 * (ig * chunks + k) + 1];
    }
    const double cnt = double(count);
    const double mean = sum / cnt;
    double var = sq / cnt - mean * mean;
    if (var < 0.0) var = 0.0;
    stats[2 * ig] = float(mean);
    stats[2 * ig + 1] = float(1.0 / sqrt(var + eps));
  }
}

__device__ __forceinline__ float group_apply_one(float v, const float* stats, const float* w, const float* b,
                                                 int64_t ig, int64_t ch, Act a) {
  const float mean = stats[2 * ig], inv = stats[2 * ig + 1];
  // scale = inv * w; shift = b - mean * inv * w; y = x * scale + shift (ops.cpp, left to right).
  const float scale = __fmul_rn(inv, w[ch]);
  const float shift = __fsub_rn(b[ch], __fmul_rn(__fmul_rn(mean, inv), w[ch]));
  return apply_act(__fadd_rn(__fmul_rn(v, scale), shift), a);
}

__global__ void group_apply_kernel(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ stats,
                                   const float* __restrict__ w, const float* __restrict__ b, int64_t hw, int64_t c,
                                   int groups, Act a, int64_t total) {
  const int64_t cg = c / groups;
  VF_GRID_STRIDE(o, total) {
    const int64_t ch = o % c, i = o / (hw * c);
    y[o] = group_apply_one(x[o], stats, w, b, i * groups + ch / cg, ch, a);
  }
}

// The same, four channels a thread (c % 4 == 0; the four may straddle groups). The group steps from
// one channel to the next without a division: the kernel is memory-bound only if its index
// arithmetic is cheap.
__global__ void group_apply4_kernel(float* __restrict__ y, const float* __restrict__ x,
                                    const float* __restrict__ stats, const float* __restrict__ w,
                                    const float* __restrict__ b, int64_t hw, int64_t c, int groups, Act a,
                                    int64_t total4) {
  const int64_t cg = c / groups;
  VF_GRID_STRIDE(o4, total4) {
    const int64_t pixel = (o4 * 4) / c, ch = o4 * 4 - pixel * c;
    int64_t ig = (pixel / hw) * groups + ch / cg, in_group = ch % cg;
    float4 v = __ldg(reinterpret_cast<const float4*>(x) + o4);
    auto next = [&](float value, int64_t k) {
      const float r = group_apply_one(value, stats, w, b, ig, k, a);
      if (++in_group == cg) in_group = 0, ++ig;
      return r;
    };
    v.x = next(v.x, ch);
    v.y = next(v.y, ch + 1);
    v.z = next(v.z, ch + 2);
    v.w = next(v.w, ch + 3);
    reinterpret_cast<float4*>(y)[o4] = v;
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
  if (c % 4 == 0 && aligned16(y) && aligned16(x) && h < (1 << 30) && w < (1 << 30)) {
    max_pool4_kernel<<<grid_for(total / 4), kThreads, 0, s>>>(reinterpret_cast<float4*>(y),
                                                               reinterpret_cast<const float4*>(x), int(h), int(w),
                                                               int(c / 4), int(oh), int(ow), k, stride, pad_top,
                                                               pad_left, total / 4);
    return;
  }
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
  // Chunks of about 2048 values (8 a thread), up to about 1024 blocks in all.
  const int64_t cg = c / groups, n_groups = n * groups;
  int64_t chunks = std::max<int64_t>(1, std::min((1024 + n_groups - 1) / n_groups, (hw * cg + 2047) / 2048));
  const int64_t chunk_pixels = (hw + chunks - 1) / chunks;
  chunks = (hw + chunk_pixels - 1) / chunk_pixels;  // none empty
  double* partial = nullptr;
  // A failed allocation leaves its error for the backend's cudaGetLastError.
  const size_t bytes = sizeof(double) * 2 * n_groups * chunks + sizeof(float) * 2 * n_groups;
  if (cudaMallocAsync(reinterpret_cast<void**>(&partial), bytes, s) != cudaSuccess) return;
  float* stats = reinterpret_cast<float*>(partial + 2 * n_groups * chunks);
  const unsigned blocks = static_cast<unsigned>(n_groups * chunks);
  if (cg % 4 == 0 && c % 4 == 0 && aligned16(x))
    group_partial_kernel<true><<<blocks, kThreads, 0, s>>>(partial, x, hw, c, groups, chunk_pixels, chunks);
  else
    group_partial_kernel<false><<<blocks, kThreads, 0, s>>>(partial, x, hw, c, groups, chunk_pixels, chunks);
  group_stats_kernel<<<grid_for(n_groups), kThreads, 0, s>>>(stats, partial, hw * cg, chunks, n_groups, eps);
  if (c % 4 == 0 && aligned16(x) && aligned16(y))
    group_apply4_kernel<<<grid_for(total / 4), kThreads, 0, s>>>(y, x, stats, w, b, hw, c, groups, a, total / 4);
  else
    group_apply_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, stats, w, b, hw, c, groups, a, total);
  cudaFreeAsync(partial, s);
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
