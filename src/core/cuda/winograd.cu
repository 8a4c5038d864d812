// Winograd's minimal filtering F(4x4, 3x3) for the 3x3 stride-1 convolutions of ResNet-style
// backbones (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): a 6x6 input
// tile d and a 3x3 filter g give the 4x4 outputs Y = A^T [(G g G^T) ⊙ (B^T d B)] A. Summed over the
// input channels, the element-wise products of the 36 tile positions are 36 matrix products
// [tiles, in] x [in, out], with 36 multiplications per 16 outputs and channel instead of 144. The
// CPU's oneDNN convolutions use the same transform (dnnl_ops.cpp); the rounding differs from the
// direct sum by a few units in the last place of the input's scale, as there.
//
// Layouts: the input transform V and the products M are [36, tiles, channels] (position-major, so
// each position is one dense matrix); U, the transformed weights, [36, out, in]; a tile t is
// (b, ty, tx), row-major, covering outputs (4 ty .. 4 ty + 3, 4 tx .. 4 tx + 3).
#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

// B^T v for one column (or row) of a 6x6 tile, in place.
template <typename T>
__device__ __forceinline__ void input_transform_1d(T& d0, T& d1, T& d2, T& d3, T& d4, T& d5) {
  const T r0 = 4 * d0 - 5 * d2 + d4;
  const T r1 = -4 * d1 - 4 * d2 + d3 + d4;
  const T r2 = 4 * d1 - 4 * d2 - d3 + d4;
  const T r3 = -2 * d1 - d2 + 2 * d3 + d4;
  const T r4 = 2 * d1 - d2 - 2 * d3 + d4;
  const T r5 = 4 * d1 - 5 * d3 + d5;
  d0 = r0, d1 = r1, d2 = r2, d3 = r3, d4 = r4, d5 = r5;
}

// A^T m: the 4 outputs of one column (or row) of the 6 products.
__device__ __forceinline__ void output_transform_1d(const float* m, float* o) {
  const float s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = m[0] + s12 + s34;
  o[1] = d12 + 2.f * d34;
  o[2] = s12 + 4.f * s34;
  o[3] = d12 + 8.f * d34 + m[5];
}

// U = G g G^T, in double (the weights are transformed once), rounded to float32.
__global__ void weights_kernel(float* __restrict__ u, const float* __restrict__ w, int64_t k, int64_t c) {
  constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                              {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                              {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6},
                              {1.0 / 24, -1.0 / 12, 1.0 / 6},
                              {0, 0, 1}};
  VF_GRID_STRIDE(i, k * c) {
    const int64_t ci = i % c, ko = i / c;
    double g[3][3], gg[6][3];
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) g[a][b] = w[((ko * 3 + a) * 3 + b) * c + ci];  // [out, 3, 3, in]
    for (int r = 0; r < 6; ++r)
      for (int b = 0; b < 3; ++b) gg[r][b] = G[r][0] * g[0][b] + G[r][1] * g[1][b] + G[r][2] * g[2][b];
    for (int r = 0; r < 6; ++r)
      for (int s = 0; s < 6; ++s)
        u[(r * 6 + s) * k * c + i] = float(gg[r][0] * G[s][0] + gg[r][1] * G[s][1] + gg[r][2] * G[s][2]);
  }
}

// One thread per (tile, channel): consecutive threads read consecutive channels of a pixel and write
// consecutive channels of a position's row.
__global__ void input_kernel(float* __restrict__ v, const float* __restrict__ x, Winograd g, int64_t t0,
                             int64_t tiles) {
  VF_GRID_STRIDE(i, tiles * g.c) {
    const int64_t ch = i % g.c, t = t0 + i / g.c;
    const int64_t tx = t % g.tw, ty = (t / g.tw) % g.th, b = t / (g.tw * g.th);
    const int64_t y0 = ty * 4 - g.pt, x0 = tx * 4 - g.pl;
    float d[6][6];
#pragma unroll
    for (int r = 0; r < 6; ++r) {
      const int64_t iy = y0 + r;
      const bool row_in = iy >= 0 && iy < g.h;
#pragma unroll
      for (int s = 0; s < 6; ++s) {
        const int64_t ix = x0 + s;
        d[r][s] = row_in && ix >= 0 && ix < g.w ? __ldg(x + ((b * g.h + iy) * g.w + ix) * g.c + ch) : 0.f;
      }
    }
#pragma unroll
    for (int s = 0; s < 6; ++s) input_transform_1d(d[0][s], d[1][s], d[2][s], d[3][s], d[4][s], d[5][s]);
#pragma unroll
    for (int r = 0; r < 6; ++r) input_transform_1d(d[r][0], d[r][1], d[r][2], d[r][3], d[r][4], d[r][5]);
    const int64_t plane = tiles * g.c;
#pragma unroll
    for (int r = 0; r < 6; ++r)
#pragma unroll
      for (int s = 0; s < 6; ++s) v[(r * 6 + s) * plane + i] = d[r][s];
  }
}

// One thread per (tile, output channel); the convolution's epilogue: act(y + bias + residual).
__global__ void output_kernel(float* __restrict__ y, const float* __restrict__ m, const float* __restrict__ bias,
                              const float* __restrict__ residual, Act a, Winograd g, int64_t t0, int64_t tiles) {
  VF_GRID_STRIDE(i, tiles * g.k) {
    const int64_t ch = i % g.k, t = t0 + i / g.k;
    const int64_t tx = t % g.tw, ty = (t / g.tw) % g.th, b = t / (g.tw * g.th);
    const int64_t plane = tiles * g.k;
    float col[6][4];  // A^T applied down each column of the 6x6 products
#pragma unroll
    for (int s = 0; s < 6; ++s) {
      float mc[6];
#pragma unroll
      for (int r = 0; r < 6; ++r) mc[r] = m[(r * 6 + s) * plane + i];
      float o[4];
      output_transform_1d(mc, o);
#pragma unroll
      for (int r = 0; r < 4; ++r) col[s][r] = o[r];
    }
    const float bv = bias ? bias[ch] : 0.f;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t oy = ty * 4 + r;
      if (oy >= g.oh) break;
      const float mr[6] = {col[0][r], col[1][r], col[2][r], col[3][r], col[4][r], col[5][r]};
      float o[4];
      output_transform_1d(mr, o);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int64_t ox = tx * 4 + s;
        if (ox >= g.ow) break;
        const int64_t at = ((b * g.oh + oy) * g.ow + ox) * g.k + ch;
        float val = o[s];
        if (bias) val += bv;
        if (residual) val += residual[at];
        y[at] = apply_act(val, a);
      }
    }
  }
}

}  // namespace

void winograd_weights(float* u, const float* w, int64_t k, int64_t c, cudaStream_t s) {
  if (k * c == 0) return;
  weights_kernel<<<grid_for(k * c), kThreads, 0, s>>>(u, w, k, c);
}

void winograd_input(float* v, const float* x, const Winograd& g, int64_t t0, int64_t tiles, cudaStream_t s) {
  if (tiles * g.c == 0) return;
  input_kernel<<<grid_for(tiles * g.c), kThreads, 0, s>>>(v, x, g, t0, tiles);
}

void winograd_output(float* y, const float* m, const float* bias, const float* residual, Act a, const Winograd& g,
                     int64_t t0, int64_t tiles, cudaStream_t s) {
  if (tiles * g.k == 0) return;
  output_kernel<<<grid_for(tiles * g.k), kThreads, 0, s>>>(y, m, bias, residual, a, g, t0, tiles);
}

}  // namespace vf::cuda
