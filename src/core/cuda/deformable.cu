// Multi-scale deformable attention's sampling (deformable_attention.cpp's ms_deform_attn): one
// thread per output channel (b, q, head, d), so that a warp reads consecutive channels of a value
// row. Each thread walks the levels and points in the CPU's order and accumulates as it does;
// products and sums use the _rn intrinsics so that nvcc does not fuse them into FMAs.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

#include <cmath>

namespace vf::cuda {

namespace {

__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float sub(float a, float b) { return __fsub_rn(a, b); }

// value [B, S, NH, D]; loc [B, Q, NH, NL, NP, 2]; aw [B, Q, NH, NL, NP]; out [B, Q, NH * D].
__global__ void ms_deform_attn_kernel(float* __restrict__ out, const float* __restrict__ value,
                                      const int64_t* __restrict__ levels, const float* __restrict__ loc,
                                      const float* __restrict__ aw, int64_t S, int64_t NH, int64_t D, int64_t NL,
                                      int64_t Q, int64_t NP, int64_t total) {
  const int64_t row = NH * D;  // floats between two positions of the value sequence
  VF_GRID_STRIDE(o, total) {
    const int64_t d = o % D, h = (o / D) % NH, bq = o / row;
    const float* vb = value + (bq / Q) * S * row + h * D + d;
    float acc = 0.f;
    for (int64_t l = 0; l < NL; ++l) {
      const int64_t H = levels[3 * l], W = levels[3 * l + 1], start = levels[3 * l + 2];
      const float* vl = vb + start * row;
      // grid_sample(align_corners=False) unnormalises g = 2*loc - 1 as (g + 1) * size/2 - 0.5.
      const float scale_x = static_cast<float>(W) / 2, scale_y = static_cast<float>(H) / 2;
      for (int64_t p = 0; p < NP; ++p) {
        const int64_t k = ((bq * NH + h) * NL + l) * NP + p;
        const float gx = sub(mul(2.f, loc[2 * k]), 1.f), gy = sub(mul(2.f, loc[2 * k + 1]), 1.f);
        const float x = sub(mul(add(gx, 1.f), scale_x), 0.5f), y = sub(mul(add(gy, 1.f), scale_y), 0.5f);
        if (!(x > -1.f && x < static_cast<float>(W) && y > -1.f && y < static_cast<float>(H))) continue;  // all zero
        const float a = aw[k];
        const float x0f = floorf(x), y0f = floorf(y);
        const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
        const float fx = sub(x, x0f), fy = sub(y, y0f);  // distances to the west / north neighbours
        const float c[4] = {mul(sub(1.f, fy), sub(1.f, fx)), mul(sub(1.f, fy), fx), mul(fy, sub(1.f, fx)),
                            mul(fy, fx)};  // nw, ne, sw, se
        const bool in_x[2] = {x0 >= 0, x0 + 1 < W}, in_y[2] = {y0 >= 0, y0 + 1 < H};
        for (int j = 0; j < 4; ++j) {
          const int dx = j & 1, dy = j >> 1;
          if (!in_x[dx] || !in_y[dy]) continue;  // zero padding
          const float v = vl[((y0 + dy) * W + (x0 + dx)) * row];
          acc = add(acc, mul(v, mul(c[j], a)));
        }
      }
    }
    out[o] = acc;
  }
}

}  // namespace

void ms_deform_attn(float* out, const float* value, const int64_t* level_hw_start, const float* locations,
                    const float* weights, int64_t B, int64_t S, int64_t heads, int64_t D, int64_t L, int64_t Q,
                    int64_t P, cudaStream_t s) {
  const int64_t total = B * Q * heads * D;
  if (total <= 0) return;
  ms_deform_attn_kernel<<<grid_for(total), kThreads, 0, s>>>(out, value, level_hw_start, locations, weights, S,
                                                                heads, D, L, Q, P, total);
}

}  // namespace vf::cuda
