// Row reductions: layer norm, softmax, and the attention probabilities. One warp per row: the rows
// here are a few dozen to a few thousand wide, and a warp's shuffles need no shared memory.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

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

// NaN-propagating max, like std::max over a row that holds one (the row then becomes NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b); }

__device__ void softmax_row(float* row, int64_t n, float factor, int lane) {
  float m = -INFINITY;
  for (int64_t i = lane; i < n; i += 32) m = nan_max(m, row[i]);
  for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
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
                                         const float* batch_bias, int64_t M, const float* head_mask) {
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
    softmax_row(row, Lk, head_mask ? head_mask[h] : 1.0f, lane);
  }
}

}  // namespace

void layer_norm(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t cols, float eps,
                cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  layer_norm_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(y, x, w, b, rows, cols, eps);
}

void softmax_rows(float* x, int64_t rows, int64_t cols, cudaStream_t s) {
  if (rows == 0 || cols == 0) return;
  softmax_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(x, rows, cols);
}

void attention_softmax(float* scores, int64_t B, int64_t H, int64_t Lq, int64_t Lk, float scale, const float* bias,
                       const float* batch_bias, int64_t M, const float* head_mask, cudaStream_t s) {
  (void)scale;  // applied as the alpha of Q K^T, as the CPU kernel does
  const int64_t rows = B * H * Lq;
  if (rows == 0 || Lk == 0) return;
  attention_softmax_kernel<<<warp_blocks(rows), 32 * kWarpsPerBlock, 0, s>>>(scores, B, H, Lq, Lk, bias, batch_bias,
                                                                             M, head_mask);
}

}  // namespace vf::cuda
