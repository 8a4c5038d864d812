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

}  // namespace

void bias_act_16bit_inplace(void* y, bool bf16, const float* bias, int64_t rows, int64_t cols, Act a,
                            cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  if (bf16)
    bias_act_16bit_inplace_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(y), bias, rows, cols,
                                                                     a);
  else
    bias_act_16bit_inplace_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<__half*>(y), bias, rows, cols, a);
}

void to_16bit(void* y, const float* x, int64_t n, bool bf16, cudaStream_t s) {
  if (n == 0) return;
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
