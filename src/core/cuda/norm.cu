// Row reductions: layer norm, softmax, and the attention probabilities. One warp per row: the rows
// here are a few dozen to a few thousand wide, and a warp's shuffles need no shared memory.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/cuda/warp.cuh"

namespace vf::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
// Fewer rows a block for the layer norm in registers: a batch of one image has only a few hundred
// rows, and small blocks spread them over more SMs.
constexpr int kNormWarps = 4;

unsigned warp_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1 << 30));
}

// Mean, then the mean of squared deviations (two passes, as the CPU code), then the affine map.
__global__ void layer_norm_kernel(float* y, const float* x, const float* w, const float* b, int64_t rows,
                                  int64_t cols, float eps) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const float* in = x + r * cols;
    float s = 0.f;
    for (int64_t i = lane; i < cols; i += 32) s += in[i];
    const float mean = warp_sum(s) / float(cols);
    float v = 0.f;
    for (int64_t i = lane; i < cols; i += 32) {
      float d = in[i] - mean;
      v += d * d;
    }
    const float var = warp_sum(v) / float(cols);
    const float inv = 1.0f / sqrtf(var + eps);
    float* out = y + r * cols;
    for (int64_t i = lane; i < cols; i += 32) out[i] = (in[i] - mean) * inv * w[i] + b[i];
  }
}

// The same two passes over a row of at most 32 * N values held in registers: the row is read from
// memory once. Lane l holds elements l, l + 32, ... (Vec: float4 number l, l + 32, ...).
template <int N, bool Vec>
__global__ void layer_norm_regs_kernel(float* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                       const float* __restrict__ b, int64_t rows, int64_t cols, float eps) {
  constexpr int kPer = Vec ? 4 : 1, kSlots = N / kPer;
  const int lane = threadIdx.x & 31;
  const int64_t slots = cols / kPer;
  for (int64_t r = int64_t(blockIdx.x) * kNormWarps + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kNormWarps) {
    float v[N];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int64_t j = lane + 32 * k;
      if (j >= slots) {
#pragma unroll
        for (int e = 0; e < kPer; ++e) v[k * kPer + e] = 0.f;
        continue;
      }
      if constexpr (Vec) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(x + r * cols) + j);
        v[4 * k] = q.x, v[4 * k + 1] = q.y, v[4 * k + 2] = q.z, v[4 * k + 3] = q.w;
      } else {
        v[k] = __ldg(x + r * cols + j);
      }
#pragma unroll
      for (int e = 0; e < kPer; ++e) s += v[k * kPer + e];
    }
    const float mean = warp_sum(s) / float(cols);
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      if (lane + 32 * k >= slots) continue;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        float d = v[k * kPer + e] - mean;
        q += d * d;
      }
    }
    const float var = warp_sum(q) / float(cols);
    const float inv = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int64_t j = lane + 32 * k;
      if (j >= slots) continue;
      if constexpr (Vec) {
        const float4 wq = __ldg(reinterpret_cast<const float4*>(w) + j);
        const float4 bq = __ldg(reinterpret_cast<const float4*>(b) + j);
        float4 o;
        o.x = (v[4 * k] - mean) * inv * wq.x + bq.x;
        o.y = (v[4 * k + 1] - mean) * inv * wq.y + bq.y;
        o.z = (v[4 * k + 2] - mean) * inv * wq.z + bq.z;
        o.w = (v[4 * k + 3] - mean) * inv * wq.w + bq.w;
        reinterpret_cast<float4*>(y + r * cols)[j] = o;
      } else {
        y[r * cols + j] = (v[k] - mean) * inv * __ldg(w + j) + __ldg(b + j);
      }
    }
  }
}

template <int N, bool Vec>
void layer_norm_regs(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t cols, float eps,
                     cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + kNormWarps - 1) / kNormWarps, 1 << 30));
  layer_norm_regs_kernel<N, Vec><<<blocks, 32 * kNormWarps, 0, s>>>(y, x, w, b, rows, cols, eps);
}

__device__ void softmax_row(float* row, int64_t n, float factor, int lane) {
  float m = -INFINITY;
  for (int64_t i = lane; i < n; i += 32) m = nan_max(m, row[i]);
  m = warp_nan_max(m);
  float s = 0.f;
  for (int64_t i = lane; i < n; i += 32) {
    float e = expf(row[i] - m);
    row[i] = e;
    s += e;
  }
  const float mul = factor / warp_sum(s);
  for (int64_t i = lane; i < n; i += 32) row[i] *= mul;
}

__global__ void softmax_kernel(float* x, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock)
    softmax_row(x + r * cols, cols, 1.0f, lane);
}

// Rows are (b, h, i) of the [B, H, Lq, Lk] scores; the scale was applied by the product.
__global__ void attention_softmax_kernel(float* s, int64_t B, int64_t H, int64_t Lq, int64_t Lk, const float* bias,
                                         const float* batch_bias, int64_t M, const uint8_t* key_mask,
                                         const float* head_mask) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = B * H * Lq;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t i = r % Lq, h = (r / Lq) % H, b = r / (Lq * H);
    float* row = s + r * Lk;
    if (bias) {
      const float* add = bias + (h * Lq + i) * Lk;
      for (int64_t j = lane; j < Lk; j += 32) row[j] += add[j];
    }
    if (batch_bias) {
      const float* add = batch_bias + ((b % M) * Lq + i) * Lk;
      for (int64_t j = lane; j < Lk; j += 32) row[j] += add[j];
    }
    if (key_mask) {
      const uint8_t* keep = key_mask + b * Lk;
      for (int64_t j = lane; j < Lk; j += 32)
        if (!keep[j]) row[j] = -3.402823466e+38f;
    }
    softmax_row(row, Lk, head_mask ? head_mask[h] : 1.0f, lane);
  }
}

}  // namespace

void layer_norm(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t cols, float eps,
                cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  if (cols % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(w) && aligned16(b)) {
    if (cols <= 128) return layer_norm_regs<4, true>(y, x, w, b, rows, cols, eps, s);
    if (cols <= 256) return layer_norm_regs<8, true>(y, x, w, b, rows, cols, eps, s);
    if (cols <= 512) return layer_norm_regs<16, true>(y, x, w, b, rows, cols, eps, s);
    if (cols <= 1024) return layer_norm_regs<32, true>(y, x, w, b, rows, cols, eps, s);
  }
  if (cols <= 128) return layer_norm_regs<4, false>(y, x, w, b, rows, cols, eps, s);
  if (cols <= 256) return layer_norm_regs<8, false>(y, x, w, b, rows, cols, eps, s);
  if (cols <= 512) return layer_norm_regs<16, false>(y, x, w, b, rows, cols, eps, s);
  if (cols <= 1024) return layer_norm_regs<32, false>(y, x, w, b, rows, cols, eps, s);
  // Wider rows (none of the models' so far) read the row three times.
  layer_norm_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(y, x, w, b, rows, cols, eps);
}

void softmax_rows(float* x, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  softmax_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(x, rows, cols);
}

void attention_softmax(float* scores, int64_t B, int64_t H, int64_t Lq, int64_t Lk, float scale, const float* bias,
                       const float* batch_bias, int64_t M, const uint8_t* key_mask, const float* head_mask,
                       cudaStream_t s) {
  (void)scale;  // applied as the alpha of Q K^T, as the CPU kernel does
  const int64_t rows = B * H * Lq;
  if (rows == 0 || Lk == 0) return;
  attention_softmax_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(scores, B, H, Lq, Lk, bias, batch_bias,
                                                                             M, key_mask, head_mask);
}

}  // namespace vf::cuda
