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

// The same sums, four channels a thread (float4 loads of the value rows: a warp reads 128 bytes of
// four queries' taps) and 32-bit index arithmetic: a quarter of the threads repeat the location
// arithmetic, for head sizes of a multiple of 4 and tensors under 2^31 elements.
__global__ void ms_deform_attn4_kernel(float4* __restrict__ out, const float* __restrict__ value,
                                       const int64_t* __restrict__ levels, const float* __restrict__ loc,
                                       const float* __restrict__ aw, int S, int NH, int D4, int NL, int Q, int NP,
                                       int total4) {
  const int row = NH * D4 * 4;  // floats between two positions of the value sequence
  for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < total4; o += blockDim.x * gridDim.x) {
    const int d4 = o % D4, h = (o / D4) % NH, bq = o / (NH * D4);
    const float* vb = value + size_t(bq / Q) * S * row + h * D4 * 4 + d4 * 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int l = 0; l < NL; ++l) {
      const int H = int(levels[3 * l]), W = int(levels[3 * l + 1]), start = int(levels[3 * l + 2]);
      const float* vl = vb + size_t(start) * row;
      const float scale_x = static_cast<float>(W) / 2, scale_y = static_cast<float>(H) / 2;
      for (int p = 0; p < NP; ++p) {
        const int k = ((bq * NH + h) * NL + l) * NP + p;
        const float gx = sub(mul(2.f, loc[2 * k]), 1.f), gy = sub(mul(2.f, loc[2 * k + 1]), 1.f);
        const float x = sub(mul(add(gx, 1.f), scale_x), 0.5f), y = sub(mul(add(gy, 1.f), scale_y), 0.5f);
        if (!(x > -1.f && x < static_cast<float>(W) && y > -1.f && y < static_cast<float>(H))) continue;
        const float a = aw[k];
        const float x0f = floorf(x), y0f = floorf(y);
        const int x0 = static_cast<int>(x0f), y0 = static_cast<int>(y0f);
        const float fx = sub(x, x0f), fy = sub(y, y0f);
        const float c[4] = {mul(sub(1.f, fy), sub(1.f, fx)), mul(sub(1.f, fy), fx), mul(fy, sub(1.f, fx)),
                            mul(fy, fx)};
        const bool in_x[2] = {x0 >= 0, x0 + 1 < W}, in_y[2] = {y0 >= 0, y0 + 1 < H};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int dx = j & 1, dy = j >> 1;
          if (!in_x[dx] || !in_y[dy]) continue;
          const float4 v = *reinterpret_cast<const float4*>(vl + size_t((y0 + dy) * W + (x0 + dx)) * row);
          const float w = mul(c[j], a);
          acc[0] = add(acc[0], mul(v.x, w)), acc[1] = add(acc[1], mul(v.y, w));
          acc[2] = add(acc[2], mul(v.z, w)), acc[3] = add(acc[3], mul(v.w, w));
        }
      }
    }
    out[o] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  }
}

}  // namespace

void ms_deform_attn(float* out, const float* value, const int64_t* level_hw_start, const float* locations,
                    const float* weights, int64_t B, int64_t S, int64_t heads, int64_t D, int64_t L, int64_t Q,
                    int64_t P, cudaStream_t s) {
  const int64_t total = B * Q * heads * D;
  if (total <= 0) return;
  const int64_t limit = int64_t(1) << 31;
  if (D % 4 == 0 && aligned16(out) && aligned16(value) && total < limit && B * S * heads * D < limit &&
      B * Q * heads * L * P * 2 < limit) {
    ms_deform_attn4_kernel<<<grid_for(total / 4), kThreads, 0, s>>>(
        reinterpret_cast<float4*>(out), value, level_hw_start, locations, weights, int(S), int(heads), int(D / 4),
        int(L), int(Q), int(P), int(total / 4));
    return;
  }
  ms_deform_attn_kernel<<<grid_for(total), kThreads, 0, s>>>(out, value, level_hw_start, locations, weights, S,
                                                                heads, D, L, Q, P, total);
}

}  // namespace vf::cuda
