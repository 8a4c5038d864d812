// The activations of ops.cpp's act_inplace, on the device (same formulas, float32).
#pragma once

#include "core/ops.h"

namespace vf::cuda {

__device__ __forceinline__ float device_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float device_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float device_gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float apply_act(float v, Act a) {
  switch (a) {
    case Act::None: return v;
    case Act::Relu: return v > 0.f ? v : 0.f;
    case Act::Gelu: return device_gelu_erf(v);
    case Act::GeluTanh: {
      const float k = 0.7978845608028654f;
      return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
    case Act::Silu: return v * device_sigmoid(v);
    case Act::Selu:
      return 1.0507009873554804934193349852946f * (v > 0.f ? v : 1.6732632423543772848170429916717f * (expf(v) - 1.f));
    case Act::Sigmoid: return device_sigmoid(v);
    case Act::Tanh: return tanhf(v);
    case Act::QuickGelu: return v * device_sigmoid(1.702f * v);
    case Act::Relu6: return fminf(fmaxf(v, 0.f), 6.f);
    case Act::LeakyRelu: return v > 0.f ? v : 0.01f * v;
    case Act::GeluClip10: return fminf(fmaxf(device_gelu_erf(v), -10.f), 10.f);
    case Act::HardSwish: return v * fminf(fmaxf(v + 3.f, 0.f), 6.f) / 6.f;
    case Act::Mish: return v * tanhf(device_softplus(v));
    case Act::Relu2: return v > 0.f ? v * v : 0.f;
    case Act::Laplace: return 0.5f * (1.f + erff((v - 0.707107f) / float(0.282095 * 1.4142135623730951)));
    case Act::SqrtSoftplus: return sqrtf(device_softplus(v));
  }
  return v;
}

}  // namespace vf::cuda
