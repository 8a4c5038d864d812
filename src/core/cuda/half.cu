// The 16-bit side of Conv2d and Linear under --dtype bfloat16 / float16: float32 activations rounded
// to the layer's 16-bit type before a tensor-core product, and a 16-bit convolution output widened
// back to float32 in the same pass as its bias, residual and activation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

template <typename T>
__device__ __forceinline__ T narrow(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename T>
__global__ void to_16bit_kernel(T* y, const float* x, int64_t n) {
  VF_GRID_STRIDE(i, n) y[i] = narrow<T>(x[i]);
}

// Eight values at a time (32 bytes in, 16 out): n8 groups of 8.
template <typename T>
__global__ void to_16bit8_kernel(T* y, const float* x, int64_t n8) {
  VF_GRID_STRIDE(i, n8) {
    const float4 lo = reinterpret_cast<const float4*>(x)[2 * i], hi = reinterpret_cast<const float4*>(x)[2 * i + 1];
    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    alignas(16) T o[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = narrow<T>(v[k]);
    reinterpret_cast<uint4*>(y)[i] = *reinterpret_cast<const uint4*>(o);
  }
}

// The convolution epilogue of bias_act (residual before the activation), reading the 16-bit sum.
template <typename T>
__global__ void bias_act_16bit_kernel(float* y, const T* src, const float* bias, const float* residual, int64_t rows,
                                      int64_t cols, Act a) {
  VF_GRID_STRIDE(i, rows * cols) {
    float v = widen(src[i]);
    if (bias) v += bias[i % cols];
    if (residual) v += residual[i];
    y[i] = apply_act(v, a);
  }
}

// In place on a 16-bit y [rows, cols]: y = act(y + bias[c]) (bias may be null), rounded once.
template <typename T>
__global__ void bias_act_16bit_inplace_kernel(T* y, const float* bias, int64_t rows, int64_t cols, Act a) {
  VF_GRID_STRIDE(i, rows * cols) {
    float v = widen(y[i]);
    if (bias) v += bias[i % cols];
    y[i] = narrow<T>(apply_act(v, a));
  }
}

// The same, eight values (16 bytes) at a time, for rows of a multiple of 8: the grid's y dimension
// walks rows, x the groups of a row, so no division per value. The activation is a template
// argument where it is one of a Linear's usual two.
template <typename T, int kAct>
__global__ void bias_act_16bit8_kernel(T* y, const float* bias, int64_t rows, int64_t groups, Act a) {
  const int64_t cols = groups * 8;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    uint4* row = reinterpret_cast<uint4*>(y + r * cols);
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
      alignas(16) T v[8];
      *reinterpret_cast<uint4*>(v) = row[g];
      float add[8] = {};
      if (bias) {
        const float4 lo = reinterpret_cast<const float4*>(bias)[2 * g], hi = reinterpret_cast<const float4*>(bias)[2 * g + 1];
        add[0] = lo.x, add[1] = lo.y, add[2] = lo.z, add[3] = lo.w, add[4] = hi.x, add[5] = hi.y, add[6] = hi.z,
        add[7] = hi.w;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float x = widen(v[k]) + add[k];
        v[k] = narrow<T>(kAct == 0 ? x : kAct == 1 ? device_gelu_erf(x) : apply_act(x, a));
      }
      row[g] = *reinterpret_cast<const uint4*>(v);
    }
  }
}

template <typename T>
void bias_act_16bit_inplace_t(T* y, const float* bias, int64_t rows, int64_t cols, Act a, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (cols % 8 == 0 && aligned16(y) && (!bias || aligned16(bias))) {
    const int64_t groups = cols / 8;
    // A block size that divides the row's groups where one does (no idle threads in the last block).
    unsigned threads = groups <= 256 ? unsigned((groups + 31) / 32 * 32) : 128;
    for (unsigned t : {256u, 192u, 128u, 96u})
      if (groups > 256 && groups % t == 0) {
        threads = t;
        break;
      }
    const dim3 grid(unsigned((groups + threads - 1) / threads), unsigned(std::min<int64_t>(rows, 65535)));
    if (a == Act::None) return bias_act_16bit8_kernel<T, 0><<<grid, threads, 0, s>>>(y, bias, rows, groups, a);
    if (a == Act::Gelu) return bias_act_16bit8_kernel<T, 1><<<grid, threads, 0, s>>>(y, bias, rows, groups, a);
    return bias_act_16bit8_kernel<T, 2><<<grid, threads, 0, s>>>(y, bias, rows, groups, a);
  }
  bias_act_16bit_inplace_kernel<<<grid_for(n), kThreads, 0, s>>>(y, bias, rows, cols, a);
}

}  // namespace

void bias_act_16bit_inplace(void* y, bool bf16, const float* bias, int64_t rows, int64_t cols, Act a,
                            cudaStream_t s) {
  if (rows * cols == 0) return;
  if (bf16) return bias_act_16bit_inplace_t(static_cast<__nv_bfloat16*>(y), bias, rows, cols, a, s);
  bias_act_16bit_inplace_t(static_cast<__half*>(y), bias, rows, cols, a, s);
}

void to_16bit(void* y, const float* x, int64_t n, bool bf16, cudaStream_t s) {
  if (n == 0) return;
  if (n % 8 == 0 && aligned16(y) && aligned16(x)) {
    if (bf16) return to_16bit8_kernel<<<grid_for(n / 8), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(y), x, n / 8);
    return to_16bit8_kernel<<<grid_for(n / 8), kThreads, 0, s>>>(static_cast<__half*>(y), x, n / 8);
  }
  if (bf16)
    to_16bit_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(y), x, n);
  else
    to_16bit_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<__half*>(y), x, n);
}

void bias_act_from_16bit(float* y, const void* src, bool bf16, const float* bias, const float* residual, int64_t rows,
                         int64_t cols, Act a, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  if (bf16)
    bias_act_16bit_kernel<<<grid_for(n), kThreads, 0, s>>>(y, static_cast<const __nv_bfloat16*>(src), bias, residual,
                                                            rows, cols, a);
  else
    bias_act_16bit_kernel<<<grid_for(n), kThreads, 0, s>>>(y, static_cast<const __half*>(src), bias, residual, rows,
                                                            cols, a);
}

}  // namespace vf::cuda
