// The non-oneDNN ops: activations, normalisation, pooling, layout, elementwise, resampling.
// Loops are parallelised over the outermost independent dimension with OpenMP.
#include "core/ops.h"

#include "core/backend.h"
#include "core/bfloat16.h"
#include "core/errors.h"
#include "core/shapes.h"
#include "core/simd.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace vf {

namespace {
void require_f32(const Tensor& x, const char* op) {
  if (!x.defined()) throw Error(std::string(op) + ": undefined tensor");
  if (x.dtype() != DType::F32) throw Error(std::string(op) + ": expected float32, got " + dtype_name(x.dtype()));
}

inline float gelu_erf(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }
inline float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}
// F.softplus with its default threshold: the identity above 20.
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// run(px, py) with x's and y's elements as float32 or bfloat16 pointers, whichever each holds: the
// norms read a float32 or a bfloat16 map and write either for the layer after them.
template <class Run>
void with_rows(const Tensor& x, Tensor& y, const Run& run) {
  auto to = [&](const auto* px) {
    if (y.dtype() == DType::BF16)
      run(px, static_cast<uint16_t*>(y.raw()));
    else
      run(px, y.f32());
  };
  if (x.dtype() == DType::BF16)
    to(static_cast<const uint16_t*>(x.raw()));
  else
    to(x.f32());
}

}  // namespace

// ---- activations ---------------------------------------------------------------------------------

Act act_from_name(const std::string& name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu" || name == "gelu_python") return Act::Gelu;
  // FastGELU and AccurateGELU are the tanh approximation written out (equal up to rounding).
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_python_tanh" || name == "gelu_fast" ||
      name == "gelu_accurate")
    return Act::GeluTanh;
  if (name == "gelu_10") return Act::GeluClip10;
  if (name == "hardswish") return Act::HardSwish;
  if (name == "mish") return Act::Mish;
  if (name == "relu2") return Act::Relu2;
  if (name == "laplace") return Act::Laplace;
  if (name == "sqrtsoftplus") return Act::SqrtSoftplus;
  if (name == "prelu" || name == "xielu")
    throw ModelError("config activation (hidden_act / activation_function) '" + name +
                     "' has learned parameters, which are not supported");
  if (name == "silu" || name == "swish") return Act::Silu;
  if (name == "selu") return Act::Selu;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "tanh") return Act::Tanh;
  if (name == "quick_gelu") return Act::QuickGelu;
  if (name == "relu6") return Act::Relu6;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "linear" || name == "identity") return Act::None;
  throw ModelError("config activation (hidden_act / activation_function) '" + name.substr(0, 100) +
                   "' is not a known activation function");
}

void act_inplace(Tensor& x, Act a) {
  if (a == Act::None) return;
  if (!x.is_cpu()) return backend(x.device()).act_inplace(x, a);
  require_f32(x, "act");
  float* p = x.f32();
  int64_t n = x.numel();
  switch (a) {
    case Act::None: break;
#define VF_ACT_LOOP(expr) \
  _Pragma("omp parallel for simd") for (int64_t i = 0; i < n; ++i) { float v = p[i]; p[i] = (expr); }
    case Act::Relu: VF_ACT_LOOP(v > 0.f ? v : 0.f) break;
    case Act::Gelu: VF_ACT_LOOP(gelu_erf(v)) break;
    case Act::GeluTanh: VF_ACT_LOOP(gelu_tanh(v)) break;
    case Act::Silu: VF_ACT_LOOP(v * sigmoid(v)) break;
    case Act::Selu: VF_ACT_LOOP(1.0507009873554804934193349852946f *
                                (v > 0.f ? v : 1.6732632423543772848170429916717f * (std::exp(v) - 1.f))) break;
    case Act::Sigmoid: VF_ACT_LOOP(sigmoid(v)) break;
    case Act::Tanh: VF_ACT_LOOP(std::tanh(v)) break;
    case Act::QuickGelu: VF_ACT_LOOP(v * sigmoid(1.702f * v)) break;
    case Act::Relu6: VF_ACT_LOOP(std::min(std::max(v, 0.f), 6.f)) break;
    case Act::LeakyRelu: VF_ACT_LOOP(v > 0.f ? v : 0.01f * v) break;
    case Act::GeluClip10: VF_ACT_LOOP(std::min(std::max(gelu_erf(v), -10.f), 10.f)) break;
    case Act::HardSwish: VF_ACT_LOOP(v * std::min(std::max(v + 3.f, 0.f), 6.f) / 6.f) break;
    case Act::Mish: VF_ACT_LOOP(v * std::tanh(softplus(v))) break;
    case Act::Relu2: VF_ACT_LOOP(v > 0.f ? v * v : 0.f) break;
    // LaplaceActivation: mu = 0.707107, sigma = 0.282095.
    case Act::Laplace: VF_ACT_LOOP(0.5f * (1.f + std::erf((v - 0.707107f) / float(0.282095 * 1.4142135623730951)))) break;
    case Act::SqrtSoftplus: VF_ACT_LOOP(std::sqrt(softplus(v))) break;
#undef VF_ACT_LOOP
  }
}

Tensor act(const Tensor& x, Act a) {
  Tensor y = x.clone();
  act_inplace(y, a);
  return y;
}

// ---- normalisation -------------------------------------------------------------------------------

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, DType out_dtype) {
  if (!x.is_cpu()) return backend(x.device()).layer_norm(x, weight, bias, eps);
  if (x.dtype() != DType::BF16) require_f32(x, "layer_norm");
  if (out_dtype != DType::F32 && out_dtype != DType::BF16)
    throw Error(std::string("layer_norm: cannot write ") + dtype_name(out_dtype));
  int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
  if (weight.numel() != c || bias.numel() != c) throw Error("layer_norm: weight/bias do not match " + shape_str(x.shape()));
  Tensor y = Tensor::empty(x.shape(), out_dtype);
  const float* w = weight.f32();
  const float* b = bias.f32();
  // x in float32, or in bfloat16 (a residual stream a bfloat16 layer wrote), read as float32; y in
  // float32 or in bfloat16 for the layer that reads it. Each row's mean and variance are summed in
  // sixteen lanes over its whole vectors, the rest of the row after them.
  auto run = [&](const auto* px, auto* py) {
    using simd::F16, simd::kLanes;
    const int64_t whole = c - c % kLanes;
#pragma omp parallel for
    for (int64_t r = 0; r < rows; ++r) {
      const auto* in = px + r * c;
      auto* out = py + r * c;
      F16 s{};
      for (int64_t i = 0; i < whole; i += kLanes) s += simd::load(in + i);
      float mean = simd::sum(s);
      for (int64_t i = whole; i < c; ++i) mean += as_float(in[i]);
      mean /= c;
      const F16 m = simd::splat(mean);
      F16 q{};
      for (int64_t i = 0; i < whole; i += kLanes) {
        const F16 d = simd::load(in + i) - m;
        q += d * d;
      }
      float var = simd::sum(q);
      for (int64_t i = whole; i < c; ++i) { float d = as_float(in[i]) - mean; var += d * d; }
      var /= c;
      const float inv = 1.0f / std::sqrt(var + eps);
      const F16 vi = simd::splat(inv);
      for (int64_t i = 0; i < whole; i += kLanes)
        simd::store(out + i, (simd::load(in + i) - m) * vi * simd::load(w + i) + simd::load(b + i));
      for (int64_t i = whole; i < c; ++i) simd::put(out + i, (as_float(in[i]) - mean) * inv * w[i] + b[i]);
    }
  };
  with_rows(x, y, run);
  return y;
}

Tensor group_norm_nhwc(const Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps, Act a,
                       DType out_dtype) {
  if (!x.is_cpu()) return backend(x.device()).group_norm_nhwc(x, groups, weight, bias, eps, a);
  require_f32(x, "group_norm");
  if (out_dtype != DType::F32 && out_dtype != DType::BF16)
    throw Error(std::string("group_norm: cannot write ") + dtype_name(out_dtype));
  if (x.dim() != 4) throw Error("group_norm expects NHWC, got " + shape_str(x.shape()));
  int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  if (groups <= 0 || c % groups) throw Error("group_norm: " + std::to_string(c) + " channels in " + std::to_string(groups) + " groups");
  int64_t cg = c / groups;
  const float* px = x.f32();
  const float* w = weight.f32();
  const float* b = bias.f32();
  // One pass over the map for every group at once: per-channel sums along the contiguous channel rows,
  // in float over 16 rows and in double beyond. The map is cut into fixed chunks of rows whose sums are
  // added in order, so the result does not depend on the thread count. The float sums of 16 channels
  // stay in registers over their 16 rows (kLanes is one AVX-512 vector).
  // Tasks also split the channels into slices of whole vectors (a small map, one chunk, still spreads
  // over the threads); every channel's sums are the same whatever the slicing.
  constexpr int64_t kLanes = 16, kSlice = 4 * kLanes;
  const int64_t chunk_rows = 256, chunks = (hw + chunk_rows - 1) / chunk_rows;
  const int64_t slices = (c + kSlice - 1) / kSlice;
  std::vector<double> part(size_t(n * chunks) * 2 * c);
#pragma omp parallel for collapse(3)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < chunks; ++j)
      for (int64_t sl = 0; sl < slices; ++sl) {
        double* ds = part.data() + (i * chunks + j) * 2 * c;
        double* dq = ds + c;
        const int64_t kb = sl * kSlice, ke = std::min(c, kb + kSlice);
        int64_t p0 = j * chunk_rows, p1 = std::min(hw, p0 + chunk_rows);
        for (int64_t p = p0; p < p1; p += 16) {
          const float* first = px + (i * hw + p) * c;
          const int64_t rows = std::min(p1, p + 16) - p;
          int64_t k0 = kb;
          for (; k0 + kLanes <= ke; k0 += kLanes) {
            float s[kLanes] = {}, q[kLanes] = {};
            for (int64_t r = 0; r < rows; ++r) {
              const float* row = first + r * c + k0;
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) { s[l] += row[l]; q[l] += row[l] * row[l]; }
            }
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) { ds[k0 + l] += s[l]; dq[k0 + l] += q[l]; }
          }
          for (int64_t k = k0; k < ke; ++k) {
            float s = 0.f, q = 0.f;
            for (int64_t r = 0; r < rows; ++r) { s += first[r * c + k]; q += first[r * c + k] * first[r * c + k]; }
            ds[k] += s;
            dq[k] += q;
          }
        }
      }
  std::vector<float> scale(n * c), shift(n * c);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0, sq = 0;
      for (int64_t j = 0; j < chunks; ++j) {
        const double* ds = part.data() + (i * chunks + j) * 2 * c;
        for (int64_t k = g * cg; k < (g + 1) * cg; ++k) { sum += ds[k]; sq += ds[c + k]; }
      }
      double cnt = double(hw * cg);
      double mean = sum / cnt;
      double var = std::max(sq / cnt - mean * mean, 0.0);
      float inv = float(1.0 / std::sqrt(var + eps));
      for (int64_t k = 0; k < cg; ++k) {
        int64_t ch = g * cg + k;
        scale[i * c + ch] = inv * w[ch];
        shift[i * c + ch] = b[ch] - float(mean) * inv * w[ch];
      }
    }
  const bool relu = a == Act::Relu;
  // `count` (<= kLanes) values of a row in float32: ReLU (BiT, DETR's mask head) fused, other
  // activations applied afterwards.
  auto normalise = [relu](const float* in, const float* s, const float* t, float* out, int64_t count)
      __attribute__((always_inline)) {
    if (relu) {
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) out[k] = std::max(in[k] * s[k] + t[k], 0.f);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < count; ++k) out[k] = in[k] * s[k] + t[k];
    }
  };
  const bool to_bf16 = out_dtype == DType::BF16 && (relu || a == Act::None);
  Tensor y = Tensor::empty(x.shape(), to_bf16 ? DType::BF16 : DType::F32);
#pragma omp parallel for collapse(2)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < hw; ++p) {
      const int64_t at = (i * hw + p) * c;
      const float* s = scale.data() + i * c;
      const float* t = shift.data() + i * c;
      if (to_bf16) {  // each vector rounded while in registers
        uint16_t* out = static_cast<uint16_t*>(y.raw()) + at;
#if defined(__AVX512BF16__)
        const __m512 zero = _mm512_setzero_ps();
        for (int64_t k0 = 0; k0 < c; k0 += kLanes) {
          const __mmask16 m = c - k0 >= kLanes ? __mmask16(0xffff) : __mmask16((1u << (c - k0)) - 1u);
          // in * s + t in one rounding, as the float32 loop above compiles (FMA); max(0, v) keeps a NaN
          // as std::max(v, 0) does.
          __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, px + at + k0), _mm512_maskz_loadu_ps(m, s + k0),
                                     _mm512_maskz_loadu_ps(m, t + k0));
          if (relu) v = _mm512_max_ps(zero, v);
          _mm256_mask_storeu_epi16(out + k0, m, (__m256i)_mm512_cvtneps_pbh(v));
        }
#else
        for (int64_t k0 = 0; k0 < c; k0 += kLanes) {
          const int64_t count = std::min(kLanes, c - k0);
          float block[kLanes];
          normalise(px + at + k0, s + k0, t + k0, block, count);
          bf16_from_float(block, out + k0, count);
        }
#endif
      } else {
        normalise(px + at, s, t, y.f32() + at, c);
      }
    }
  if (to_bf16) return y;
  if (!relu) act_inplace(y, a);
  if (out_dtype == DType::BF16) {  // after an activation of its own pass
    Tensor yb = Tensor::empty(x.shape(), DType::BF16);
    bf16_from_float(y.f32(), static_cast<uint16_t*>(yb.raw()), y.numel());
    return yb;
  }
  return y;
}

Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift, Act a) {
  if (!x.is_cpu()) return backend(x.device()).channel_affine(x, scale, shift, a);
  require_f32(x, "channel_affine");
  int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
  Tensor y = Tensor::empty(x.shape());
  const float* px = x.f32();
  const float* s = scale.f32();
  const float* t = shift.f32();
  float* py = y.f32();
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < c; ++k) py[r * c + k] = px[r * c + k] * s[k] + t[k];
  act_inplace(y, a);
  return y;
}

Tensor grn_nhwc(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, DType out_dtype) {
  if (!x.is_cpu()) return backend(x.device()).grn_nhwc(x, gamma, beta, eps);
  // ConvNeXt V2: Gx = ||x||_2 over (H, W) per channel; Nx = Gx / (mean_c Gx + eps);
  // y = gamma * (x * Nx) + beta + x.
  if (x.dtype() != DType::BF16) require_f32(x, "grn");
  if (out_dtype != DType::F32 && out_dtype != DType::BF16)
    throw Error(std::string("grn: cannot write ") + dtype_name(out_dtype));
  int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  Tensor y = Tensor::empty(x.shape(), out_dtype);
  if (y.numel() == 0) return y;
  const float* g = gamma.f32();
  const float* b = beta.f32();
  // The per-channel sums of squares: in float over blocks of 16 rows (sixteen channels' sums in one
  // vector), those added in double over fixed chunks of rows, then the chunks added in order: the same
  // sums at any thread count. A task is a chunk of rows and a slice of channels: whole rows where the
  // chunks alone keep every thread busy, narrower slices (multiples of 16 channels) where they do not,
  // as in the late stages' few rows of many channels (196 x 1536 in ConvNeXt V2-T's third: one chunk).
  constexpr int64_t kChunk = 256, kRows = 16;
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  const int threads = omp_get_max_threads();
  const int64_t wanted = (2 * threads + n * chunks - 1) / (n * chunks);
  const int64_t kSlice = std::max<int64_t>(16, (c / std::max<int64_t>(wanted, 1) + 15) / 16 * 16);
  const int64_t slices = (c + kSlice - 1) / kSlice;
  // Gx's square roots are taken over blocks of channels across the threads too (3072 of them in the
  // last stage, a few microseconds on one thread while fifteen wait).
  constexpr int64_t kRootBlock = 64;
  const int64_t root_blocks = (c + kRootBlock - 1) / kRootBlock;
  // The output pass cuts rows into runs of at most 512 channels: ConvNeXt V2-T's last stage has 49
  // rows of 3072 (whole rows on 16 threads would be four rounds, the last a quarter full).
  constexpr int64_t kRun = 512;
  const int64_t runs = (c + kRun - 1) / kRun;
  // Scratch from the buffer pool: the chunks' sums, Gx, and each thread's own copy of Nx.
  Tensor partial_room = Tensor::empty({n * chunks * c}, DType::F64);
  Tensor gx_room = Tensor::empty({n * c}), nx_room = Tensor::empty({int64_t(threads) * n * c});
  double* partial = static_cast<double*>(partial_room.raw());
  float* gx = gx_room.f32();
  float* nx_all = nx_room.f32();
  // x in float32, or in bfloat16 (a bfloat16 pwconv1's forward_to_layer), read as float32; y in
  // float32 or in bfloat16 for pwconv2. The steps share one parallel region; Nx needs the mean of all
  // of Gx, so after one barrier every thread computes it (the same sums in the same order) and Nx
  // for itself, rather than one thread while the others wait at two more.
  auto run = [&](const auto* px, auto* py) {
    using simd::F16, simd::kLanes;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for collapse(3) schedule(static)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ch = 0; ch < chunks; ++ch)
          for (int64_t sl = 0; sl < slices; ++sl) {
            const int64_t k0 = sl * kSlice, k1 = std::min(c, k0 + kSlice);
            double* acc = partial + (i * chunks + ch) * c;
            std::fill(acc + k0, acc + k1, 0.0);
            const int64_t p1 = std::min(hw, (ch + 1) * kChunk);
            for (int64_t p = ch * kChunk; p < p1; p += kRows) {
              const auto* first = px + (i * hw + p) * c;
              const int64_t rows = std::min(kRows, p1 - p);
              int64_t k = k0;
              for (; k + kLanes <= k1; k += kLanes) {
                F16 sq{};
                for (int64_t r = 0; r < rows; ++r) {
                  const F16 v = simd::load(first + r * c + k);
                  sq += v * v;
                }
                simd::add_to(acc + k, sq);
              }
              for (; k < k1; ++k) {  // the channels past the last whole vector, in the same order
                float sq = 0.0f;
                for (int64_t r = 0; r < rows; ++r) sq += as_float(first[r * c + k]) * as_float(first[r * c + k]);
                acc[k] += sq;
              }
            }
          }
#pragma omp for collapse(2) schedule(static)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t rb = 0; rb < root_blocks; ++rb)
          for (int64_t k = rb * kRootBlock; k < std::min(c, (rb + 1) * kRootBlock); ++k) {
            double sq = 0;
            for (int64_t ch = 0; ch < chunks; ++ch) sq += partial[(i * chunks + ch) * c + k];
            gx[i * c + k] = float(std::sqrt(sq));
          }
      float* nx = nx_all + int64_t(omp_get_thread_num()) * n * c;
      for (int64_t i = 0; i < n; ++i) {
        const float denominator = float(simd::sum_in_double(gx + i * c, c) / double(c)) + eps;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) nx[i * c + k] = gx[i * c + k] / denominator;
      }
#pragma omp for collapse(3) schedule(static) nowait
      for (int64_t i = 0; i < n; ++i)
        for (int64_t p = 0; p < hw; ++p)
          for (int64_t r = 0; r < runs; ++r) {
            const int64_t k0 = r * kRun, count = std::min(kRun, c - k0), whole = count - count % kLanes;
            const int64_t at = (i * hw + p) * c + k0;
            const auto* in = px + at;
            auto* out = py + at;
            const float *gk = g + k0, *bk = b + k0, *nk = nx + i * c + k0;
            for (int64_t k = 0; k < whole; k += kLanes) {
              const F16 v = simd::load(in + k);
              simd::store(out + k, simd::load(gk + k) * (v * simd::load(nk + k)) + simd::load(bk + k) + v);
            }
            for (int64_t k = whole; k < count; ++k) {
              const float v = as_float(in[k]);
              simd::put(out + k, gk[k] * (v * nk[k]) + bk[k] + v);
            }
          }
    }
  };
  with_rows(x, y, run);
  return y;
}

void softmax_lastdim_inplace(Tensor& x) {
  if (!x.is_cpu()) return backend(x.device()).softmax_lastdim_inplace(x);
  require_f32(x, "softmax");
  int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
  float* p = x.f32();
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * c;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < c; ++i) m = std::max(m, row[i]);
    float s = 0.f;
    for (int64_t i = 0; i < c; ++i) { row[i] = std::exp(row[i] - m); s += row[i]; }
    float inv = 1.0f / s;
    for (int64_t i = 0; i < c; ++i) row[i] *= inv;
  }
}

// ---- pooling -------------------------------------------------------------------------------------

namespace {

// kLanes floats as one value: a vector register's worth (GCC's vector types), or a plain float.
template <int64_t kLanes>
struct Lanes {
  using type [[gnu::vector_size(kLanes * sizeof(float))]] = float;
};
template <>
struct Lanes<1> {
  using type = float;
};

// max_pool2d_nhwc's loop: each pixel's channels go through the window kLanes at a time (16: an
// AVX-512 register, 8: an AVX2 one; kLanes divides the channel count), the running maximum held in
// a register. The blocked max pool's maps are [N * C/16][H][W][16]: one vector per pixel.
template <int64_t kLanes>
void max_pool_nhwc_loop(const float* px, float* py, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh,
                        int64_t ow, int k, int s, int pt, int pl) {
  using V = typename Lanes<kLanes>::type;
#pragma omp parallel for collapse(2)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t oy = 0; oy < oh; ++oy) {
      // The window's rows and columns inside the map (the padding is left out).
      const int64_t y0 = std::max<int64_t>(oy * s - pt, 0), y1 = std::min<int64_t>(oy * s - pt + k, h);
      for (int64_t ox = 0; ox < ow; ++ox) {
        const int64_t x0 = std::max<int64_t>(ox * s - pl, 0), x1 = std::min<int64_t>(ox * s - pl + k, w);
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          V acc = V{} - std::numeric_limits<float>::infinity();  // -inf in every lane
          for (int64_t iy = y0; iy < y1; ++iy)
            for (int64_t ix = x0; ix < x1; ++ix) {
              V v;
              std::memcpy(&v, px + ((i * h + iy) * w + ix) * c + c0, sizeof v);
              // As PyTorch: a NaN in the window is the maximum (std::max would drop it).
              acc = (v > acc) | (v != v) ? v : acc;
            }
          std::memcpy(py + ((i * oh + oy) * ow + ox) * c + c0, &acc, sizeof acc);
        }
      }
    }
}

}  // namespace

Tensor max_pool2d_nhwc(const Tensor& x, int k, int s, int pt, int pl, int pb, int pr, bool ceil_mode) {
  if (!x.is_cpu()) return backend(x.device()).max_pool2d_nhwc(x, k, s, pt, pl, pb, pr, ceil_mode);
  require_f32(x, "max_pool2d");
  int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  int64_t oh = max_pool_out_size(h, k, s, pt, pb, ceil_mode), ow = max_pool_out_size(w, k, s, pl, pr, ceil_mode);
  if (oh <= 0 || ow <= 0) throw Error("max_pool2d: input too small");
  Tensor y = Tensor::empty({n, oh, ow, c});
  auto loop = c % 16 == 0 ? max_pool_nhwc_loop<16> : c % 8 == 0 ? max_pool_nhwc_loop<8> : max_pool_nhwc_loop<1>;
  loop(x.f32(), y.f32(), n, h, w, c, oh, ow, k, s, pt, pl);
  return y;
}

Tensor avg_pool2d_nhwc(const Tensor& x, int k, int s, int pad, bool count_include_pad) {
  if (!x.is_cpu()) return backend(x.device()).avg_pool2d_nhwc(x, k, s, pad, count_include_pad);
  require_f32(x, "avg_pool2d");
  int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  int64_t oh = (h + 2 * pad - k) / s + 1, ow = (w + 2 * pad - k) / s + 1;
  if (oh <= 0 || ow <= 0) throw Error("avg_pool2d: input too small");
  Tensor y = Tensor::empty({n, oh, ow, c});
  const float* px = x.f32();
  float* py = y.f32();
#pragma omp parallel for collapse(2)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t oy = 0; oy < oh; ++oy)
      for (int64_t ox = 0; ox < ow; ++ox) {
        float* out = py + ((i * oh + oy) * ow + ox) * c;
        std::fill_n(out, c, 0.f);
        int64_t cnt = 0;
        for (int64_t ky = 0; ky < k; ++ky) {
          int64_t iy = oy * s - pad + ky;
          for (int64_t kx = 0; kx < k; ++kx) {
            int64_t ix = ox * s - pad + kx;
            bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
            if (inside) {
              const float* in = px + ((i * h + iy) * w + ix) * c;
              for (int64_t ch = 0; ch < c; ++ch) out[ch] += in[ch];
            }
            if (inside || count_include_pad) ++cnt;
          }
        }
        float inv = 1.0f / float(std::max<int64_t>(cnt, 1));
        for (int64_t ch = 0; ch < c; ++ch) out[ch] *= inv;
      }
  return y;
}

Tensor global_avg_pool_nhwc(const Tensor& x) {
  if (!x.is_cpu()) return backend(x.device()).global_avg_pool_nhwc(x);
  require_f32(x, "global_avg_pool");
  int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  Tensor y = Tensor::zeros({n, c});
  const float* px = x.f32();
  float* py = y.f32();
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> acc(c, 0.0);
    for (int64_t p = 0; p < hw; ++p)
      for (int64_t k = 0; k < c; ++k) acc[k] += px[(i * hw + p) * c + k];
    for (int64_t k = 0; k < c; ++k) py[i * c + k] = float(acc[k] / double(hw));
  }
  return y;
}

// ---- layout --------------------------------------------------------------------------------------

namespace {

// dst[b][j][i] = src[b][i][j] for `batch` matrices of rows x cols, in 16 x 16 tiles: the tile's source
// lines stay in cache while its columns are written out as rows.
// A few rows or columns (an image's channels) are (de)interleaved with their count known to the
// compiler, a range of the long side at a time.
template <int64_t kRows>
void interleave_rows(const float* in, float* out, int64_t cols, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = 0; r < kRows; ++r) out[c * kRows + r] = in[r * cols + c];
}
template <int64_t kCols>
void deinterleave_cols(const float* in, float* out, int64_t rows, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < kCols; ++c) out[c * rows + r] = in[r * kCols + c];
}

void transpose_batched(const float* src, float* dst, int64_t batch, int64_t rows, int64_t cols) {
  if (cols <= 4 && rows > 4) {
    constexpr int64_t kRange = 1024;
    const int64_t ranges = (rows + kRange - 1) / kRange;
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < ranges; ++t) {
        const float* in = src + b * rows * cols;
        float* out = dst + b * rows * cols;
        const int64_t r0 = t * kRange, r1 = std::min(rows, r0 + kRange);
        switch (cols) {
          case 2: deinterleave_cols<2>(in, out, rows, r0, r1); break;
          case 3: deinterleave_cols<3>(in, out, rows, r0, r1); break;
          default: deinterleave_cols<4>(in, out, rows, r0, r1); break;
        }
      }
    return;
  }
  constexpr int64_t kTile = 16;
  const int64_t tile = rows <= 4 ? 1024 : kTile;
  const int64_t col_tiles = (cols + tile - 1) / tile;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t ct = 0; ct < col_tiles; ++ct) {
      const int64_t c0 = ct * tile, c1 = std::min(cols, c0 + tile);
      const float* in = src + b * rows * cols;
      float* out = dst + b * rows * cols;
      switch (rows) {
        case 2: interleave_rows<2>(in, out, cols, c0, c1); continue;
        case 3: interleave_rows<3>(in, out, cols, c0, c1); continue;
        case 4: interleave_rows<4>(in, out, cols, c0, c1); continue;
        default: break;
      }
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int64_t r1 = std::min(rows, r0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
      }
    }
}

// A permutation that is a batched matrix transpose once size-1 dims are dropped and the dims that
// stay together are merged (NCHW <-> NHWC, transpose_last2): the source as [batch, rows, cols].
bool as_batched_transpose(const Shape& shape, const std::vector<int>& perm, int64_t& batch, int64_t& rows,
                          int64_t& cols) {
  std::vector<int> kept(shape.size(), -1);  // a source dim's place among the dims larger than 1
  int m = 0;
  for (size_t k = 0; k < shape.size(); ++k)
    if (shape[k] != 1) kept[k] = m++;
  std::vector<std::pair<int, int64_t>> runs;  // in output order: (first kept source dim, merged size)
  int prev = -2;
  for (int k : perm) {
    if (kept[k] < 0) continue;
    if (kept[k] == prev + 1) runs.back().second *= shape[k];
    else runs.push_back({kept[k], shape[k]});
    prev = kept[k];
  }
  if (runs.size() == 2 && runs[1].first < runs[0].first) {
    batch = 1, rows = runs[1].second, cols = runs[0].second;
    return true;
  }
  if (runs.size() == 3 && runs[0].first < runs[2].first && runs[2].first < runs[1].first) {
    batch = runs[0].second, rows = runs[2].second, cols = runs[1].second;
    return true;
  }
  return false;
}

}  // namespace

Tensor permute(const Tensor& x, const std::vector<int>& perm) {
  if (!x.is_cpu()) return backend(x.device()).permute(x, perm);
  const int64_t d = x.dim();
  std::vector<int64_t> src_stride;
  const Shape out_shape = permute_shape(x, perm, &src_stride);
  Tensor y = Tensor::empty(out_shape, x.dtype());
  size_t es = dtype_size(x.dtype());
  int64_t total = y.numel();
  if (total == 0) return y;
  if (int64_t batch, rows, cols; es == 4 && as_batched_transpose(x.shape(), perm, batch, rows, cols)) {
    transpose_batched(static_cast<const float*>(x.raw()), static_cast<float*>(y.raw()), batch, rows, cols);
    return y;
  }
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(y.raw());
  int64_t inner = out_shape[d - 1], inner_stride = src_stride[d - 1];
  int64_t outer = total / inner;
#pragma omp parallel for
  for (int64_t o = 0; o < outer; ++o) {
    int64_t rem = o, off = 0;
    for (int64_t i = d - 2; i >= 0; --i) {
      off += (rem % out_shape[i]) * src_stride[i];
      rem /= out_shape[i];
    }
    char* out = dst + o * inner * es;
    if (es == 4) {
      const float* s = reinterpret_cast<const float*>(src) + off;
      float* t = reinterpret_cast<float*>(out);
      for (int64_t j = 0; j < inner; ++j) t[j] = s[j * inner_stride];
    } else {
      for (int64_t j = 0; j < inner; ++j) std::memcpy(out + j * es, src + (off + j * inner_stride) * es, es);
    }
  }
  return y;
}

Tensor nchw_to_nhwc(const Tensor& x) { return permute(x, {0, 2, 3, 1}); }
Tensor nhwc_to_nchw(const Tensor& x) { return permute(x, {0, 3, 1, 2}); }

Tensor transpose_last2(const Tensor& x) {
  std::vector<int> perm(x.dim());
  for (int i = 0; i < x.dim(); ++i) perm[i] = i;
  std::swap(perm[x.dim() - 1], perm[x.dim() - 2]);
  return permute(x, perm);
}

Tensor pad_nhwc(const Tensor& x, int top, int left, int bottom, int right, float value) {
  if (!x.is_cpu()) return backend(x.device()).pad_nhwc(x, top, left, bottom, right, value);
  require_f32(x, "pad");
  int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  int64_t oh = h + top + bottom, ow = w + left + right;
  Tensor y = Tensor::full({n, oh, ow, c}, value);
  const float* px = x.f32();
  float* py = y.f32();
#pragma omp parallel for collapse(2)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < h; ++r)
      std::memcpy(py + ((i * oh + r + top) * ow + left) * c, px + (i * h + r) * w * c, w * c * sizeof(float));
  return y;
}

namespace {

void check_window_grid(int64_t H, int64_t W, int64_t window, int64_t shift, const char* what) {
  if (window <= 0 || H % window != 0 || W % window != 0 || shift < 0 || shift >= window)
    throw Error(std::string(what) + ": a " + std::to_string(H) + "x" + std::to_string(W) +
                " map is not a grid of windows of " + std::to_string(window) + " shifted by " + std::to_string(shift));
}

}  // namespace

Tensor window_partition(const Tensor& x, int64_t window, int64_t shift) {
  require_f32(x, "window_partition");
  if (x.dim() != 4) throw Error("window_partition: x must be [B, H, W, C], got " + shape_str(x.shape()));
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  check_window_grid(H, W, window, shift, "window_partition");
  if (!x.is_cpu()) return backend(x.device()).window_partition(x, window, shift);
  const int64_t nh = H / window, nw = W / window;
  Tensor y = Tensor::empty({B * nh * nw, window * window, C});
  const float* px = x.f32();
  float* py = y.f32();
  // One task per (window, row of the window): a row of a window is at most two contiguous runs of
  // the source row (it wraps around once when shifted).
#pragma omp parallel for collapse(2)
  for (int64_t wi = 0; wi < B * nh * nw; ++wi)
    for (int64_t i = 0; i < window; ++i) {
      const int64_t b = wi / (nh * nw), a = (wi / nw) % nh, c = wi % nw;
      const int64_t r = (a * window + i + shift) % H;
      const float* row = px + (b * H + r) * W * C;
      float* dst = py + (wi * window + i) * window * C;
      for (int64_t j = 0; j < window; ++j)
        std::memcpy(dst + j * C, row + ((c * window + j + shift) % W) * C, C * sizeof(float));
    }
  return y;
}

Tensor window_reverse(const Tensor& windows, int64_t window, int64_t H, int64_t W, int64_t shift, int64_t out_h,
                      int64_t out_w) {
  require_f32(windows, "window_reverse");
  check_window_grid(H, W, window, shift, "window_reverse");
  const int64_t nh = H / window, nw = W / window;
  if (windows.dim() != 3 || windows.size(1) != window * window || windows.size(0) % (nh * nw) != 0)
    throw Error("window_reverse: windows " + shape_str(windows.shape()) + " do not tile a " + std::to_string(H) +
                "x" + std::to_string(W) + " map by " + std::to_string(window));
  if (out_h < 0 || out_h > H || out_w < 0 || out_w > W) throw Error("window_reverse: crop larger than the map");
  if (!windows.is_cpu()) return backend(windows.device()).window_reverse(windows, window, H, W, shift, out_h, out_w);
  const int64_t B = windows.size(0) / (nh * nw), C = windows.size(2);
  Tensor y = Tensor::empty({B, out_h, out_w, C});
  const float* pw = windows.f32();
  float* py = y.f32();
  // Each output pixel (y, x) reads token ((y - shift) mod window ...) of the window holding the
  // unshifted position: the gather form of the reference's scatter, so rows are written once.
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t yy = 0; yy < out_h; ++yy) {
      const int64_t u = (yy - shift + H) % H, a = u / window, i = u % window;
      float* dst = py + (b * out_h + yy) * out_w * C;
      for (int64_t xx = 0; xx < out_w; ++xx) {
        const int64_t v = (xx - shift + W) % W, c = v / window, j = v % window;
        std::memcpy(dst + xx * C, pw + (((b * nh + a) * nw + c) * window * window + i * window + j) * C,
                    C * sizeof(float));
      }
    }
  return y;
}

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  if (xs.empty()) throw Error("cat of nothing");
  for (auto& t : xs)
    if (!t.is_cpu()) return backend(t.device()).cat(xs, dim);
  const Shape out_shape = cat_shape(xs, dim);
  const int64_t d = xs[0].dim();
  Tensor y = Tensor::empty(out_shape, xs[0].dtype());
  size_t es = dtype_size(y.dtype());
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= out_shape[i];
  for (int64_t i = dim + 1; i < d; ++i) inner *= out_shape[i];
  char* dst = static_cast<char*>(y.raw());
  int64_t row = out_shape[dim] * inner * es;
  int64_t offset = 0;
  for (auto& t : xs) {
    int64_t chunk = t.size(dim) * inner * es;
    copy_blocks(dst + offset, row, t.raw(), chunk, chunk, outer);
    offset += chunk;
  }
  return y;
}

Tensor narrow(const Tensor& x, int64_t dim, int64_t begin, int64_t length) {
  if (!x.is_cpu()) return backend(x.device()).narrow(x, dim, begin, length);
  int64_t d = x.dim();
  if (dim < 0) dim += d;
  if (begin < 0 || length < 0 || begin + length > x.size(dim)) throw Error("narrow: out of range");
  Shape out_shape = x.shape();
  out_shape[dim] = length;
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < dim; ++i) outer *= x.size(i);
  for (int64_t i = dim + 1; i < d; ++i) inner *= x.size(i);
  if (outer == 1) return x.reshape({x.numel()}).slice0(begin * inner, (begin + length) * inner).reshape(out_shape);
  Tensor y = Tensor::empty(out_shape, x.dtype());
  size_t es = dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw());
  copy_blocks(y.raw(), length * inner * es, src + begin * inner * es, x.size(dim) * inner * es, length * inner * es,
              outer);
  return y;
}

Tensor gather_rows(const Tensor& x, const Tensor& idx) {
  if (x.dim() != 3 || x.dtype() != DType::F32)
    throw Error("gather_rows: x must be float32 [B, S, C], got " + shape_str(x.shape()));
  if ((!idx.is_cpu() && idx.device() != x.device()) || idx.dtype() != DType::I64 || idx.dim() != 2 ||
      idx.size(0) != x.size(0))
    throw Error("gather_rows: idx must be int64 [" + std::to_string(x.size(0)) + ", K] on the host or on x's device, got " +
                shape_str(idx.shape()) + " on " + idx.device().str());
  const int64_t S = x.size(1);
  if (idx.is_cpu()) {
    const int64_t* rows = idx.data<int64_t>();
    if (std::any_of(rows, rows + idx.numel(), [S](int64_t r) { return r < 0 || r >= S; }))
      throw Error("gather_rows: index out of range");
  }
  if (!x.is_cpu()) return backend(x.device()).gather_rows(x, idx);
  const int64_t B = x.size(0), C = x.size(2), K = idx.size(1);
  const int64_t* rows = idx.data<int64_t>();
  Tensor y = Tensor::empty({B, K, C});
  const float* px = x.f32();
  float* py = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) std::copy_n(px + (b * S + rows[b * K + k]) * C, C, py + (b * K + k) * C);
  return y;
}

// ---- elementwise ---------------------------------------------------------------------------------

namespace {
template <class F>
Tensor broadcast_binary(const Tensor& a, const Tensor& b, F f, const char* name) {
  require_f32(a, name);
  require_f32(b, name);
  if (a.shape() == b.shape()) {
    Tensor y = Tensor::empty(a.shape());
    const float* pa = a.f32();
    const float* pb = b.f32();
    float* py = y.f32();
    int64_t n = a.numel();
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; ++i) py[i] = f(pa[i], pb[i]);
    return y;
  }
  const BroadcastShape bs = broadcast_shape(a, b, name);
  const Shape& out = bs.out;
  const std::vector<int64_t>& sa = bs.a_strides;
  const std::vector<int64_t>& sb = bs.b_strides;
  const int64_t d = static_cast<int64_t>(out.size());
  Tensor y = Tensor::empty(out);
  const float* pa = a.f32();
  const float* pb = b.f32();
  float* py = y.f32();
  int64_t n = y.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    int64_t rem = i, oa = 0, ob = 0;
    for (int64_t k = d - 1; k >= 0; --k) {
      int64_t idx = rem % out[k];
      rem /= out[k];
      oa += idx * sa[k];
      ob += idx * sb[k];
    }
    py[i] = f(pa[oa], pb[ob]);
  }
  return y;
}
}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  if (Device d = op_device({&a, &b}); !d.is_cpu()) return backend(d).binary(BinaryOp::Add, a, b);
  return broadcast_binary(a, b, [](float x, float y) { return x + y; }, "add");
}
Tensor sub(const Tensor& a, const Tensor& b) {
  if (Device d = op_device({&a, &b}); !d.is_cpu()) return backend(d).binary(BinaryOp::Sub, a, b);
  return broadcast_binary(a, b, [](float x, float y) { return x - y; }, "sub");
}
Tensor mul(const Tensor& a, const Tensor& b) {
  if (Device d = op_device({&a, &b}); !d.is_cpu()) return backend(d).binary(BinaryOp::Mul, a, b);
  return broadcast_binary(a, b, [](float x, float y) { return x * y; }, "mul");
}
Tensor div(const Tensor& a, const Tensor& b) {
  if (Device d = op_device({&a, &b}); !d.is_cpu()) return backend(d).binary(BinaryOp::Div, a, b);
  return broadcast_binary(a, b, [](float x, float y) { return x / y; }, "div");
}

void add_inplace(Tensor& a, const Tensor& b) {
  if (!a.is_cpu()) return backend(a.device()).add_inplace(a, b);
  require_f32(a, "add_inplace");
  require_f32(b, "add_inplace");
  if (a.numel() != b.numel()) throw Error("add_inplace: " + shape_str(a.shape()) + " += " + shape_str(b.shape()));
  float* pa = a.f32();
  const float* pb = b.f32();
  int64_t n = a.numel();
#pragma omp parallel for simd
  for (int64_t i = 0; i < n; ++i) pa[i] += pb[i];
}

Tensor scale(const Tensor& x, float s) {
  if (!x.is_cpu()) return backend(x.device()).scale(x, s);
  require_f32(x, "scale");
  Tensor y = Tensor::empty(x.shape());
  const float* px = x.f32();
  float* py = y.f32();
  int64_t n = x.numel();
#pragma omp parallel for simd
  for (int64_t i = 0; i < n; ++i) py[i] = px[i] * s;
  return y;
}

Tensor mul_lastdim(const Tensor& x, const Tensor& gamma) {
  if (!x.is_cpu()) return backend(x.device()).mul_lastdim(x, gamma);
  require_f32(x, "mul_lastdim");
  int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
  if (gamma.numel() != c) throw Error("mul_lastdim: " + shape_str(gamma.shape()) + " for " + shape_str(x.shape()));
  Tensor y = Tensor::empty(x.shape());
  const float* px = x.f32();
  const float* g = gamma.f32();
  float* py = y.f32();
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < c; ++k) py[r * c + k] = px[r * c + k] * g[k];
  return y;
}

// ---- resampling ----------------------------------------------------------------------------------

Tensor interpolate_bilinear(const Tensor& x, int64_t oh, int64_t ow, bool align_corners) {
  if (!x.is_cpu())
    return backend(x.device()).interpolate(x, oh, ow, align_corners ? Interp::BilinearAlignCorners : Interp::Bilinear);
  // torch's upsample_bilinear2d: source index = (dst + 0.5) * scale - 0.5 clamped at 0
  // (align_corners=False), or dst * (in-1)/(out-1) (align_corners=True).
  require_f32(x, "interpolate_bilinear");
  if (x.dim() != 4) throw Error("interpolate_bilinear expects NCHW");
  int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({n, c, oh, ow});
  struct Tap { int64_t i0, i1; float l0, l1; };
  auto taps = [&](int64_t in, int64_t out) {
    std::vector<Tap> t(out);
    float sc = align_corners ? (out > 1 ? float(in - 1) / float(out - 1) : 0.f) : float(in) / float(out);
    for (int64_t o = 0; o < out; ++o) {
      float src = align_corners ? o * sc : std::max((o + 0.5f) * sc - 0.5f, 0.f);
      int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
      int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
      float l1 = src - i0;
      t[o] = {i0, i1, 1.f - l1, l1};
    }
    return t;
  };
  auto ty = taps(h, oh), tx = taps(w, ow);
  const float* px = x.f32();
  float* py = y.f32();
#pragma omp parallel for
  for (int64_t p = 0; p < n * c; ++p) {
    const float* in = px + p * h * w;
    float* out = py + p * oh * ow;
    for (int64_t oy = 0; oy < oh; ++oy) {
      const Tap& a = ty[oy];
      for (int64_t ox = 0; ox < ow; ++ox) {
        const Tap& b = tx[ox];
        out[oy * ow + ox] = a.l0 * (b.l0 * in[a.i0 * w + b.i0] + b.l1 * in[a.i0 * w + b.i1]) +
                            a.l1 * (b.l0 * in[a.i1 * w + b.i0] + b.l1 * in[a.i1 * w + b.i1]);
      }
    }
  }
  return y;
}

Tensor interpolate_bicubic(const Tensor& x, int64_t oh, int64_t ow) {
  if (!x.is_cpu()) return backend(x.device()).interpolate(x, oh, ow, Interp::Bicubic);
  require_f32(x, "interpolate_bicubic");
  if (x.dim() != 4) throw Error("interpolate_bicubic expects NCHW");
  if (oh <= 0 || ow <= 0) throw Error("interpolate_bicubic: output size must be positive");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({n, c, oh, ow});
  struct Taps { int64_t i[4]; float wt[4]; };
  auto taps = [](int64_t in, int64_t out) {
    constexpr float A = -0.75f;
    auto near = [&](float d) { return ((A + 2) * d - (A + 3)) * d * d + 1; };       // |d| <= 1
    auto far = [&](float d) { return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A; };  // 1 < |d| < 2
    std::vector<Taps> t(out);
    const float scale = float(in) / float(out);
    for (int64_t o = 0; o < out; ++o) {
      const float src = scale * (o + 0.5f) - 0.5f;  // not clamped at 0 for cubic, as torch
      const float f = std::floor(src);
      const float d = src - f;
      const float wt[4] = {far(d + 1), near(d), near(1 - d), far(2 - d)};
      for (int k = 0; k < 4; ++k) {
        t[o].i[k] = std::clamp<int64_t>(static_cast<int64_t>(f) - 1 + k, 0, in - 1);
        t[o].wt[k] = wt[k];
      }
    }
    return t;
  };
  const auto ty = taps(h, oh), tx = taps(w, ow);
  const float* px = x.f32();
  float* py = y.f32();
#pragma omp parallel for
  for (int64_t p = 0; p < n * c; ++p) {
    const float* in = px + p * h * w;
    float* out = py + p * oh * ow;
    for (int64_t oy = 0; oy < oh; ++oy)
      for (int64_t ox = 0; ox < ow; ++ox) {
        const Taps &a = ty[oy], &b = tx[ox];
        float acc = 0;
        for (int j = 0; j < 4; ++j) {
          const float* row = in + a.i[j] * w;
          float r = 0;
          for (int k = 0; k < 4; ++k) r += row[b.i[k]] * b.wt[k];
          acc += r * a.wt[j];
        }
        out[oy * ow + ox] = acc;
      }
  }
  return y;
}

Tensor interpolate_nearest(const Tensor& x, int64_t oh, int64_t ow) {
  if (!x.is_cpu()) return backend(x.device()).interpolate(x, oh, ow, Interp::Nearest);
  // torch 'nearest': src = floor(dst * in / out) computed in float.
  require_f32(x, "interpolate_nearest");
  int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({n, c, oh, ow});
  std::vector<int64_t> iy(oh), ix(ow);
  float sy = float(h) / float(oh), sx = float(w) / float(ow);
  for (int64_t o = 0; o < oh; ++o) iy[o] = std::min<int64_t>(static_cast<int64_t>(std::floor(o * sy)), h - 1);
  for (int64_t o = 0; o < ow; ++o) ix[o] = std::min<int64_t>(static_cast<int64_t>(std::floor(o * sx)), w - 1);
  const float* px = x.f32();
  float* py = y.f32();
#pragma omp parallel for
  for (int64_t p = 0; p < n * c; ++p)
    for (int64_t oy = 0; oy < oh; ++oy)
      for (int64_t ox = 0; ox < ow; ++ox) py[(p * oh + oy) * ow + ox] = px[(p * h + iy[oy]) * w + ix[ox]];
  return y;
}

// ---- reductions ----------------------------------------------------------------------------------

namespace {
void check_planes(const Tensor& x, const Tensor& plane_scale, const char* op) {
  require_f32(x, op);
  if (x.dim() < 1 || x.size(0) < 1)
    throw Error(std::string(op) + ": expected planes [K >= 1, ...], got " + shape_str(x.shape()));
  if (plane_scale.defined() && (plane_scale.dtype() != DType::F32 || plane_scale.numel() != x.size(0)))
    throw Error(std::string(op) + ": plane_scale must be float32 with one value per plane, got " +
                dtype_name(plane_scale.dtype()) + " " + shape_str(plane_scale.shape()) + " for " +
                shape_str(x.shape()));
}

// A plane's weight on the host (1 when there is none: x * 1.0f is x, NaN included).
std::vector<float> host_plane_scale(const Tensor& plane_scale, int64_t count) {
  if (!plane_scale.defined()) return std::vector<float>(static_cast<size_t>(count), 1.0f);
  const Tensor s = plane_scale.cpu();
  return std::vector<float>(s.f32(), s.f32() + count);
}
}  // namespace

Tensor argmax_planes(const Tensor& x, const Tensor& plane_scale, DType out) {
  check_planes(x, plane_scale, "argmax_planes");
  if (out != DType::I32 && out != DType::I64)
    throw Error(std::string("argmax_planes: indices are int32 or int64, not ") + dtype_name(out));
  if (!x.is_cpu()) return backend(x.device()).argmax_planes(x, plane_scale, out);
  const int64_t count = x.size(0), n = x.numel() / count;
  const std::vector<float> s = host_plane_scale(plane_scale, count);
  Tensor y = Tensor::empty(Shape(x.shape().begin() + 1, x.shape().end()), out);
  const float* planes = x.f32();
  // Blocks of positions, planes visited in order within a block: contiguous reads.
  constexpr int64_t kBlock = 2048;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t p0 = blk * kBlock, len = std::min(kBlock, n - p0);
    float best[kBlock];
    int64_t arg[kBlock];
    for (int64_t i = 0; i < len; ++i) best[i] = planes[p0 + i] * s[0];
    std::fill(arg, arg + len, int64_t{0});
    for (int64_t k = 1; k < count; ++k) {
      const float* plane = planes + k * n + p0;
      for (int64_t i = 0; i < len; ++i)
        if (const float v = plane[i] * s[k]; v > best[i]) {
          best[i] = v;
          arg[i] = k;
        }
    }
    if (out == DType::I64)
      std::copy(arg, arg + len, y.data<int64_t>() + p0);
    else
      std::transform(arg, arg + len, y.data<int32_t>() + p0, [](int64_t a) { return static_cast<int32_t>(a); });
  }
  return y;
}

Tensor count_at_least(const Tensor& x, const Tensor& plane_scale, float threshold) {
  check_planes(x, plane_scale, "count_at_least");
  if (!x.is_cpu()) return backend(x.device()).count_at_least(x, plane_scale, threshold);
  const int64_t count = x.size(0), n = x.numel() / count;
  const std::vector<float> s = host_plane_scale(plane_scale, count);
  Tensor y = Tensor::empty({count}, DType::I64);
  const float* px = x.f32();
#pragma omp parallel for
  for (int64_t k = 0; k < count; ++k) {
    int64_t c = 0;
    for (int64_t p = 0; p < n; ++p) c += px[k * n + p] * s[k] >= threshold;
    y.data<int64_t>()[k] = c;
  }
  return y;
}

Tensor bincount(const Tensor& idx, int64_t bins) {
  if (idx.dtype() != DType::I32 && idx.dtype() != DType::I64)
    throw Error(std::string("bincount: indices must be int32 or int64, got ") + dtype_name(idx.dtype()));
  if (bins < 0) throw Error("bincount: bins must be >= 0");
  if (!idx.is_cpu()) return backend(idx.device()).bincount(idx, bins);
  Tensor y = Tensor::zeros({bins}, DType::I64);
  int64_t* c = y.data<int64_t>();
  auto count = [&](const auto* v) {
    for (int64_t i = 0, n = idx.numel(); i < n; ++i)
      if (v[i] >= 0 && v[i] < bins) ++c[v[i]];
  };
  if (idx.dtype() == DType::I64)
    count(idx.data<int64_t>());
  else
    count(idx.data<int32_t>());
  return y;
}

double max_abs(const Tensor& x) {
  Tensor d = x.cpu().to(DType::F64);
  double m = 0;
  for (int64_t i = 0; i < d.numel(); ++i) m = std::max(m, std::fabs(d.data<double>()[i]));
  return m;
}

// Over equal shapes only (a [2, 3] is not a [6]); equal infinities agree; a NaN on either side makes
// the result NaN, so that `max_abs_diff(a, b) <= tol` and every other comparison with it is false.
double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape())
    throw Error("max_abs_diff: shapes differ: " + shape_str(a.shape()) + " vs " + shape_str(b.shape()));
  Tensor x = a.cpu().to(DType::F64), y = b.cpu().to(DType::F64);
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double xi = x.data<double>()[i], yi = y.data<double>()[i];
    const double d = xi == yi ? 0.0 : std::fabs(xi - yi);  // equal infinities agree
    // std::max(m, NaN) keeps m: a NaN must make the result NaN, so that every tolerance test fails.
    if (std::isnan(d)) return std::numeric_limits<double>::quiet_NaN();
    m = std::max(m, d);
  }
  return m;
}

// ---- selection ----------------------------------------------------------------------------------

std::vector<int64_t> topk_indices(const float* v, int64_t n, int64_t k) {
  k = std::clamp<int64_t>(k, 0, n);
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), int64_t{0});
  // A strict total order (score_above, then by index), so that selecting the first k (linear) and
  // sorting only those gives what sorting everything would.
  auto before = [v](int64_t a, int64_t b) {
    if (score_above(v[a], v[b])) return true;
    if (score_above(v[b], v[a])) return false;
    return a < b;
  };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), before);
  std::sort(idx.begin(), idx.begin() + k, before);
  idx.resize(static_cast<size_t>(k));
  return idx;
}

Tensor topk_rows(const Tensor& scores, int64_t k) {
  if (scores.dim() != 2 || scores.dtype() != DType::F32)
    throw Error("topk_rows: scores must be float32 [B, S], got " + shape_str(scores.shape()));
  if (k < 0 || k > scores.size(1))
    throw Error("top-k: k = " + std::to_string(k) + " of " + std::to_string(scores.size(1)) + " candidates");
  if (!scores.is_cpu()) return backend(scores.device()).topk_rows(scores, k);
  const int64_t B = scores.size(0), S = scores.size(1);
  Tensor r = Tensor::empty({B, k}, DType::I64);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int64_t> top = topk_indices(scores.f32() + b * S, S, k);
    std::copy(top.begin(), top.end(), r.data<int64_t>() + b * k);
  }
  return r;
}

}  // namespace vf
