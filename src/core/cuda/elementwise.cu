// Elementwise kernels: activations, bias/residual epilogues, broadcasting arithmetic, conversions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/tensor.h"

namespace vf::cuda {

namespace {

__global__ void act_kernel(float* x, int64_t n, Act a) {
  VF_GRID_STRIDE(i, n) x[i] = apply_act(x[i], a);
}

template <bool ResidualBeforeAct>
__global__ void bias_act_kernel(float* y, const float* bias, const float* residual, int64_t rows, int64_t cols,
                                Act a) {
  VF_GRID_STRIDE(i, rows * cols) {
    float v = y[i];
    if (bias) v += bias[i % cols];
    if (ResidualBeforeAct && residual) v += residual[i];
    v = apply_act(v, a);
    if (!ResidualBeforeAct && residual) v += residual[i];
    y[i] = v;
  }
}

// The same, four columns a thread (cols % 4 == 0, y and residual 16-byte aligned).
template <bool ResidualBeforeAct>
__global__ void bias_act4_kernel(float* y, const float* bias, const float* residual, int64_t rows, int64_t cols,
                                 Act a) {
  const int64_t cols4 = cols / 4;
  VF_GRID_STRIDE(i, rows * cols4) {
    float4 v = reinterpret_cast<const float4*>(y)[i];
    if (bias) {
      const float* bc = bias + (i % cols4) * 4;
      v.x += bc[0], v.y += bc[1], v.z += bc[2], v.w += bc[3];
    }
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (residual) r = __ldg(reinterpret_cast<const float4*>(residual) + i);
    if (ResidualBeforeAct && residual) v.x += r.x, v.y += r.y, v.z += r.z, v.w += r.w;
    v.x = apply_act(v.x, a), v.y = apply_act(v.y, a), v.z = apply_act(v.z, a), v.w = apply_act(v.w, a);
    if (!ResidualBeforeAct && residual) v.x += r.x, v.y += r.y, v.z += r.z, v.w += r.w;
    reinterpret_cast<float4*>(y)[i] = v;
  }
}

struct Broadcast {
  int64_t shape[kMaxDims];
  int64_t sa[kMaxDims];
  int64_t sb[kMaxDims];
  int dims;
};

template <int Op>
__device__ __forceinline__ float binop(float x, float y) {
  if constexpr (Op == 0) return x + y;
  else if constexpr (Op == 1) return x - y;
  else if constexpr (Op == 2) return x * y;
  else return x / y;
}

template <int Op>
__global__ void binary_kernel(float* out, const float* a, const float* b, Broadcast bc, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    int64_t rem = i, oa = 0, ob = 0;
    for (int k = bc.dims - 1; k >= 0; --k) {
      int64_t idx = rem % bc.shape[k];
      rem /= bc.shape[k];
      oa += idx * bc.sa[k];
      ob += idx * bc.sb[k];
    }
    out[i] = binop<Op>(a[oa], b[ob]);
  }
}

// The same with 32-bit index arithmetic (tensors under 2^31 elements: every one of a forward's).
template <int Op>
__global__ void binary32_kernel(float* out, const float* a, const float* b, Broadcast bc, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    int rem = i, oa = 0, ob = 0;
    for (int k = bc.dims - 1; k >= 0; --k) {
      const int extent = int(bc.shape[k]), idx = rem % extent;
      rem /= extent;
      oa += idx * int(bc.sa[k]);
      ob += idx * int(bc.sb[k]);
    }
    out[i] = binop<Op>(a[oa], b[ob]);
  }
}

// Both operands contiguous in the output's order (no broadcast), four at a time.
template <int Op>
__global__ void binary_same4_kernel(float4* out, const float4* a, const float4* b, int64_t n4) {
  VF_GRID_STRIDE(i, n4) {
    const float4 x = a[i], y = b[i];
    out[i] = make_float4(binop<Op>(x.x, y.x), binop<Op>(x.y, y.y), binop<Op>(x.z, y.z), binop<Op>(x.w, y.w));
  }
}

__global__ void add_inplace_kernel(float* a, const float* b, int64_t n) {
  VF_GRID_STRIDE(i, n) a[i] += b[i];
}

__global__ void scale_kernel(float* y, const float* x, float s, int64_t n) {
  VF_GRID_STRIDE(i, n) y[i] = x[i] * s;
}

__global__ void channel_affine_kernel(float* y, const float* x, const float* scale, const float* shift, int64_t rows,
                                      int64_t cols, Act a) {
  VF_GRID_STRIDE(i, rows * cols) {
    int64_t c = i % cols;
    float v = x[i] * scale[c];
    if (shift) v += shift[c];
    y[i] = apply_act(v, a);
  }
}

__global__ void sine_expand_kernel(float* out, const float* ye, const float* xe, const float* dim_t, int64_t N,
                                   int64_t F) {
  VF_GRID_STRIDE(i, N * 2 * F) {
    const int64_t p = i / (2 * F), c = i % (2 * F), k = c < F ? c : c - F;
    const float v = (c < F ? ye[p] : xe[p]) / dim_t[k];
    out[i] = (k % 2 == 0) ? sinf(v) : cosf(v);
  }
}

__device__ float inverse_sigmoid_of(float x, float eps) {
  x = fminf(fmaxf(x, 0.f), 1.f);
  return logf(fmaxf(x, eps) / fmaxf(1.f - x, eps));
}

__global__ void inverse_sigmoid_kernel(float* y, const float* x, float eps, int64_t n) {
  VF_GRID_STRIDE(i, n) y[i] = inverse_sigmoid_of(x[i], eps);
}

__global__ void refine_boxes_kernel(float* out, const float* delta, const float* reference, int64_t nc, float eps,
                                    int64_t rows) {
  VF_GRID_STRIDE(i, rows * 4) {
    const int64_t row = i / 4, k = i % 4;
    float v = delta[i];
    if (k < nc) v += inverse_sigmoid_of(reference[row * nc + k], eps);
    out[i] = 1.f / (1.f + expf(-v));
  }
}

__global__ void fill_kernel(float* x, float v, int64_t n) {
  VF_GRID_STRIDE(i, n) x[i] = v;
}

__device__ double read_as_double(const void* p, int type, int64_t i) {
  switch (static_cast<DType>(type)) {
    case DType::F32: return double(static_cast<const float*>(p)[i]);
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::F16: return double(__half2float(static_cast<const __half*>(p)[i]));
    case DType::BF16: return double(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::I64: return double(static_cast<const int64_t*>(p)[i]);
    case DType::I32: return double(static_cast<const int32_t*>(p)[i]);
    case DType::I16: return double(static_cast<const int16_t*>(p)[i]);
    case DType::I8: return double(static_cast<const int8_t*>(p)[i]);
    case DType::U8: return double(static_cast<const uint8_t*>(p)[i]);
    case DType::Bool: return static_cast<const uint8_t*>(p)[i] ? 1.0 : 0.0;
  }
  return 0.0;
}

__global__ void convert_kernel(void* out, int to, const void* in, int from, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    double v = read_as_double(in, from, i);
    switch (static_cast<DType>(to)) {
      case DType::F32: static_cast<float*>(out)[i] = float(v); break;
      case DType::F64: static_cast<double*>(out)[i] = v; break;
      case DType::I64: static_cast<int64_t*>(out)[i] = int64_t(v); break;
      case DType::I32: static_cast<int32_t*>(out)[i] = int32_t(v); break;
      case DType::I16: static_cast<int16_t*>(out)[i] = int16_t(v); break;
      case DType::I8: static_cast<int8_t*>(out)[i] = int8_t(v); break;
      case DType::U8: static_cast<uint8_t*>(out)[i] = uint8_t(v); break;
      case DType::Bool: static_cast<uint8_t*>(out)[i] = v != 0; break;
      default: break;  // half types: refused by the caller
    }
  }
}

}  // namespace

void act_inplace(float* x, int64_t n, Act a, cudaStream_t s) {
  if (a == Act::None || n == 0) return;
  act_kernel<<<grid_for(n), kThreads, 0, s>>>(x, n, a);
}

void bias_act(float* y, const float* bias, const float* residual, int64_t rows, int64_t cols, Act a,
              bool residual_before_act, cudaStream_t s) {
  if (rows * cols == 0 || (!bias && !residual && a == Act::None)) return;
  if (cols % 4 == 0 && aligned16(y) && (!residual || aligned16(residual))) {
    const int64_t n4 = rows * cols / 4;
    if (residual_before_act)
      bias_act4_kernel<true><<<grid_for(n4), kThreads, 0, s>>>(y, bias, residual, rows, cols, a);
    else
      bias_act4_kernel<false><<<grid_for(n4), kThreads, 0, s>>>(y, bias, residual, rows, cols, a);
    return;
  }
  if (residual_before_act)
    bias_act_kernel<true><<<grid_for(rows * cols), kThreads, 0, s>>>(y, bias, residual, rows, cols, a);
  else
    bias_act_kernel<false><<<grid_for(rows * cols), kThreads, 0, s>>>(y, bias, residual, rows, cols, a);
}

template <int Op>
void launch_binary(float* out, const float* a, const float* b, const Broadcast& bc, int64_t n, cudaStream_t s) {
  const bool same = bc.dims == 1 && bc.sa[0] == 1 && bc.sb[0] == 1;
  if (same && n % 4 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
    binary_same4_kernel<Op><<<grid_for(n / 4), kThreads, 0, s>>>(reinterpret_cast<float4*>(out),
                                                                  reinterpret_cast<const float4*>(a),
                                                                  reinterpret_cast<const float4*>(b), n / 4);
  else if (n < (int64_t(1) << 31))
    binary32_kernel<Op><<<grid_for(n), kThreads, 0, s>>>(out, a, b, bc, int(n));
  else
    binary_kernel<Op><<<grid_for(n), kThreads, 0, s>>>(out, a, b, bc, n);
}

void binary(int op, float* out, const float* a, const float* b, const int64_t* shape, const int64_t* a_strides,
            const int64_t* b_strides, int dims, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  // Fewer dims for the index arithmetic: size-1 dims dropped, and a dim merged into the one outside
  // it where both operands continue across the boundary ([N, C] + [C] stays two dims, [B, L, C] +
  // [B, L, C] becomes one).
  Broadcast bc{};
  for (int i = 0; i < dims; ++i) {
    if (shape[i] == 1) continue;
    const int k = bc.dims - 1;
    if (k >= 0 && bc.sa[k] == a_strides[i] * shape[i] && bc.sb[k] == b_strides[i] * shape[i]) {
      bc.shape[k] *= shape[i];
      bc.sa[k] = a_strides[i];
      bc.sb[k] = b_strides[i];
      continue;
    }
    bc.shape[bc.dims] = shape[i];
    bc.sa[bc.dims] = a_strides[i];
    bc.sb[bc.dims] = b_strides[i];
    ++bc.dims;
  }
  if (bc.dims == 0) bc.dims = 1, bc.shape[0] = 1, bc.sa[0] = bc.sb[0] = 0;  // one element
  switch (op) {
    case 0: launch_binary<0>(out, a, b, bc, n, s); break;
    case 1: launch_binary<1>(out, a, b, bc, n, s); break;
    case 2: launch_binary<2>(out, a, b, bc, n, s); break;
    default: launch_binary<3>(out, a, b, bc, n, s); break;
  }
}

void add_inplace(float* a, const float* b, int64_t n, cudaStream_t s) {
  if (n) add_inplace_kernel<<<grid_for(n), kThreads, 0, s>>>(a, b, n);
}

void scale(float* y, const float* x, float s_, int64_t n, cudaStream_t s) {
  if (n) scale_kernel<<<grid_for(n), kThreads, 0, s>>>(y, x, s_, n);
}

void channel_affine(float* y, const float* x, const float* scale, const float* shift, int64_t rows, int64_t cols,
                    Act a, cudaStream_t s) {
  if (rows * cols) channel_affine_kernel<<<grid_for(rows * cols), kThreads, 0, s>>>(y, x, scale, shift, rows, cols, a);
}

void sine_expand(float* out, const float* y_embed, const float* x_embed, const float* dim_t, int64_t N, int64_t F,
                 cudaStream_t s) {
  if (N * F) sine_expand_kernel<<<grid_for(N * 2 * F), kThreads, 0, s>>>(out, y_embed, x_embed, dim_t, N, F);
}

void inverse_sigmoid(float* y, const float* x, float eps, int64_t n, cudaStream_t s) {
  if (n) inverse_sigmoid_kernel<<<grid_for(n), kThreads, 0, s>>>(y, x, eps, n);
}

void refine_boxes(float* out, const float* delta, const float* reference, int64_t nc, float eps, int64_t rows,
                  cudaStream_t s) {
  if (rows) refine_boxes_kernel<<<grid_for(rows * 4), kThreads, 0, s>>>(out, delta, reference, nc, eps, rows);
}

void fill(float* x, float value, int64_t n, cudaStream_t s) {
  if (n) fill_kernel<<<grid_for(n), kThreads, 0, s>>>(x, value, n);
}

void convert(void* out, int to, const void* in, int from, int64_t n, cudaStream_t s) {
  if (n) convert_kernel<<<grid_for(n), kThreads, 0, s>>>(out, to, in, from, n);
}

}  // namespace vf::cuda
