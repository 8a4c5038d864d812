// The patches of a convolution as the rows of a matrix (im2col), so that a KxK convolution becomes
// one matrix product on cuBLAS. cuDNN's exact float32 kernels for NHWC maps are slow on the ResNet
// and BiT 3x3 and 7x7 shapes (a direct stencil engine); the product runs at the GEMM's speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/errors.h"

namespace vf::cuda {

namespace {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Row m = (b, oy, ox) of the patch matrix, column k = (ky, kx, channel group of V): the order of the
// [out, kh, kw, in] weights, so that the product is cols [M, K] x weights [out, K]^T.
template <typename T, int V>
__global__ void im2col_kernel(T* __restrict__ col, const float* __restrict__ x, int64_t row0, int64_t rows,
                              int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow, int kh, int kw, int sh, int sw,
                              int pt, int pl, int dh, int dw) {
  const int64_t cv = c / V, kv = int64_t(kh) * kw * cv;
  VF_GRID_STRIDE(i, rows * kv) {
    const int64_t r = i / kv, k = i % kv;
    const int64_t m = row0 + r;
    const int64_t ox = m % ow, oy = (m / ow) % oh, b = m / (ow * oh);
    const int64_t ch = (k % cv) * V, tap = k / cv;
    const int64_t iy = oy * sh - pt + (tap / kw) * dh, ix = ox * sw - pl + (tap % kw) * dw;
    T* out = col + r * (kv * V) + k * V;
    if (iy < 0 || iy >= h || ix < 0 || ix >= w) {
#pragma unroll
      for (int v = 0; v < V; ++v) out[v] = from_float<T>(0.f);
      continue;
    }
    const float* in = x + ((b * h + iy) * w + ix) * c + ch;
    if constexpr (V == 4) {
      const float4 q = *reinterpret_cast<const float4*>(in);
      out[0] = from_float<T>(q.x), out[1] = from_float<T>(q.y), out[2] = from_float<T>(q.z), out[3] = from_float<T>(q.w);
    } else {
      out[0] = from_float<T>(in[0]);
    }
  }
}

template <typename T>
void launch(T* col, const float* x, const Im2col& g, int64_t row0, int64_t rows, cudaStream_t s) {
  const bool vec = g.c % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t n = rows * g.kh * g.kw * g.c / (vec ? 4 : 1);
  if (n == 0) return;
  if (vec)
    im2col_kernel<T, 4><<<grid_for(n), kThreads, 0, s>>>(col, x, row0, rows, g.h, g.w, g.c, g.oh, g.ow, g.kh, g.kw,
                                                         g.sh, g.sw, g.pt, g.pl, g.dh, g.dw);
  else
    im2col_kernel<T, 1><<<grid_for(n), kThreads, 0, s>>>(col, x, row0, rows, g.h, g.w, g.c, g.oh, g.ow, g.kh, g.kw,
                                                         g.sh, g.sw, g.pt, g.pl, g.dh, g.dw);
}

}  // namespace

void im2col_nhwc(void* col, DType dtype, const float* x, const Im2col& g, int64_t row0, int64_t rows, cudaStream_t s) {
  switch (dtype) {
    case DType::F32: launch(static_cast<float*>(col), x, g, row0, rows, s); break;
    case DType::BF16: launch(static_cast<__nv_bfloat16*>(col), x, g, row0, rows, s); break;
    case DType::F16: launch(static_cast<__half*>(col), x, g, row0, rows, s); break;
    default: throw Error(std::string("im2col_nhwc: no ") + dtype_name(dtype) + " patches");
  }
}

}  // namespace vf::cuda
