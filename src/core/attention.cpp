#include "core/attention.h"

#include "core/backend.h"

#include "core/errors.h"
#include "core/limits.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>

#include <oneapi/dnnl/dnnl.h>

namespace vf {

namespace {

// exp(x) for x <= 0 in a form the compiler vectorises (Cephes' expf: range reduction by ln 2 in two
// parts, a degree-6 polynomial, 2^n through the exponent bits); about 1 ulp, like std::exp. Inputs
// below -87 return 0 (std::exp gives at most 1.6e-38 there, nothing next to the row sum, which is
// >= 1): a padded key, whose score is the lowest float, gets exactly zero weight as in the reference.
inline float exp_nonpositive(float in) {
  const float x = std::max(in, -87.0f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick rather than std::floor(... + 0.5f): the same
  // reduction (|r| <= ln2 / 2), and unlike floor it vectorises without -fno-trapping-math.
  constexpr float kRound = 12582912.0f;
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return in < -87.0f ? 0.0f : p * std::bit_cast<float>(bits);
}

// The largest of n floats (a NaN is skipped; the exponentials turn it into NaN anyway). Sixteen
// running maxima: GCC does not vectorise a float max reduction without -ffinite-math-only (it ran
// as a chain of scalar vmaxss, ~4 cycles a score), but it does vectorise this lane-wise form.
float row_max(const float* row, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lane[kLanes];
  for (float& m : lane) m = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], row[j + l]);
  float mx = -INFINITY;
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  for (float m : lane) mx = std::max(mx, m);
  return mx;
}

// Softmax over each of `rows` rows of length n (leading dimension ld), then the head-mask factor.
void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float factor) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const float mx = row_max(row, n);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      float e = exp_nonpositive(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    const float mul = factor / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= mul;
  }
}

void add_rows(float* s, const float* add, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] += add[i];
}

void mask_rows(float* s, int64_t rows, int64_t n, const uint8_t* keep) {
  const float lowest = std::numeric_limits<float>::lowest();
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = keep[j] ? row[j] : lowest;
  }
}

// One operand: element (b, t, h*d + c) lives at p[b*batch_stride + t*row_stride + h*d + c].
struct Operand {
  const float* p;
  int64_t batch_stride;
  int64_t row_stride;
};

void sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc) {
  dnnl_status_t st = dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, 0.0f, c, ldc);
  if (st != dnnl_success) throw Error("attention: oneDNN sgemm failed (status " + std::to_string(st) + ")");
}

Tensor attention_kernel(Operand q, Operand k, Operand v, int64_t B, int64_t Lq, int64_t Lk, int64_t H,
                        int64_t dk, int64_t dv, const AttentionOptions& opt) {
  const float* head_mask = nullptr;
  if (opt.head_mask.defined()) {
    if (opt.head_mask.dtype() != DType::F32 || opt.head_mask.numel() != H)
      throw Error("attention: head_mask must hold one float per head (" + std::to_string(H) + "), got " +
                  shape_str(opt.head_mask.shape()));
    head_mask = opt.head_mask.f32();
  }
  const float* bias = nullptr;
  if (opt.bias.defined()) {
    if (opt.bias.dtype() != DType::F32 || opt.bias.shape() != Shape{H, Lq, Lk})
      throw Error("attention: bias must be float32 " + shape_str({H, Lq, Lk}) + ", got " +
                  shape_str(opt.bias.shape()));
    bias = opt.bias.f32();
  }
  const float* batch_bias = nullptr;
  int64_t batch_bias_count = 0;
  if (opt.batch_bias.defined()) {
    const Tensor& bb = opt.batch_bias;
    if (bb.dtype() != DType::F32 || bb.dim() != 3 || bb.size(0) == 0 || bb.size(1) != Lq || bb.size(2) != Lk)
      throw Error("attention: batch_bias must be float32 [M, " + std::to_string(Lq) + ", " + std::to_string(Lk) +
                  "], got " + shape_str(bb.shape()));
    batch_bias = bb.f32();
    batch_bias_count = bb.size(0);
  }
  const uint8_t* key_mask = nullptr;
  if (opt.key_mask.defined()) {
    if (opt.key_mask.dtype() != DType::U8 || opt.key_mask.shape() != Shape{B, Lk})
      throw Error("attention: key_mask must be uint8 " + shape_str({B, Lk}) + ", got " +
                  shape_str(opt.key_mask.shape()));
    key_mask = opt.key_mask.data<uint8_t>();
  }
  // The reference materialises the B x H x Lq x Lk scores (computed here in blocks); an input that
  // large is refused rather than left to run for hours.
  const double score_bytes = double(B) * double(H) * double(Lq) * double(Lk) * sizeof(float);
  if (score_bytes > double(max_forward_bytes()))
    throw InputError("attention over " + std::to_string(Lq) + " x " + std::to_string(Lk) + " tokens (" +
                     std::to_string(H) + " heads, batch " + std::to_string(B) + ") needs " +
                     std::to_string(uint64_t(score_bytes)) + " bytes of scores, more than the limit of " +
                     std::to_string(max_forward_bytes()) + " (VF_MAX_FORWARD_BYTES): the image size is too large");
  Tensor out = Tensor::empty({B, Lq, H * dv});
  if (B == 0 || Lq == 0) {
    if (opt.probs) *opt.probs = Tensor::zeros({B, H, Lq, Lk});
    return out;
  }
  if (Lk == 0) throw Error("attention: no keys to attend to");

  float* probs = nullptr;
  if (opt.probs) {
    *opt.probs = Tensor::empty({B, H, Lq, Lk});
    probs = opt.probs->f32();
  }

  // Blocks of query rows: enough tasks to keep every thread busy, blocks large enough for sgemm.
  const int threads = omp_get_max_threads();
  int64_t qb = 64;
  while (qb > 16 && B * H * ((Lq + qb - 1) / qb) < 2 * threads) qb /= 2;
  const int64_t nqb = (Lq + qb - 1) / qb;
  const int64_t tasks = B * H * nqb;

  Tensor scratch;
  if (!probs) scratch = Tensor::empty({static_cast<int64_t>(threads), qb * Lk});
  float* out_p = out.f32();

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / (H * nqb);
    const int64_t h = (t / nqb) % H;
    const int64_t i0 = (t % nqb) * qb;
    const int64_t rows = std::min(qb, Lq - i0);

    const float* qp = q.p + b * q.batch_stride + i0 * q.row_stride + h * dk;
    const float* kp = k.p + b * k.batch_stride + h * dk;
    const float* vp = v.p + b * v.batch_stride + h * dv;
    float* s;
    if (probs)
      s = probs + ((b * H + h) * Lq + i0) * Lk;
    else
      s = scratch.f32() + static_cast<int64_t>(omp_get_thread_num()) * qb * Lk;

    sgemm('N', 'T', rows, Lk, dk, opt.scale, qp, q.row_stride, kp, k.row_stride, s, Lk);
    if (bias) add_rows(s, bias + (h * Lq + i0) * Lk, rows * Lk);
    if (batch_bias) add_rows(s, batch_bias + ((b % batch_bias_count) * Lq + i0) * Lk, rows * Lk);
    if (key_mask) mask_rows(s, rows, Lk, key_mask + b * Lk);
    softmax_rows(s, rows, Lk, Lk, head_mask ? head_mask[h] : 1.0f);
    sgemm('N', 'N', rows, dv, Lk, 1.0f, s, Lk, vp, v.row_stride, out_p + (b * Lq + i0) * H * dv + h * dv, H * dv);
  }
  return out;
}

// Float32, or a 16-bit layer's output (forward_to_layer), which the GPU reads as it is and the CPU
// widens.
void check_3d(const Tensor& t, const char* what) {
  const bool dtype_ok = t.dtype() == DType::F32 || t.dtype() == DType::BF16 || t.dtype() == DType::F16;
  if (t.dim() != 3 || !dtype_ok)
    throw Error(std::string("attention: ") + what + " must be float32 (or 16-bit) [batch, tokens, heads*head_dim], got " +
                std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()));
}

}  // namespace

Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads,
                            const AttentionOptions& opt) {
  check_3d(q, "query");
  check_3d(k, "key");
  check_3d(v, "value");
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  if (num_heads <= 0 || q.size(2) % num_heads != 0 || v.size(2) % num_heads != 0)
    throw Error("attention: " + std::to_string(num_heads) + " heads do not divide the query width " +
                std::to_string(q.size(2)) + " / value width " + std::to_string(v.size(2)));
  if (k.size(0) != B || v.size(0) != B || k.size(2) != q.size(2) || v.size(1) != Lk)
    throw Error("attention: query " + shape_str(q.shape()) + ", key " + shape_str(k.shape()) + " and value " +
                shape_str(v.shape()) + " do not match");
  if (Device d = op_device({&q, &k, &v}); !d.is_cpu()) return backend(d).multi_head_attention(q, k, v, num_heads, opt);
  if (q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32)  // a 16-bit layer's output
    return multi_head_attention(q.to(DType::F32), k.to(DType::F32), v.to(DType::F32), num_heads, opt);
  const int64_t dk = q.size(2) / num_heads, dv = v.size(2) / num_heads;
  return attention_kernel({q.f32(), Lq * q.size(2), q.size(2)}, {k.f32(), Lk * k.size(2), k.size(2)},
                          {v.f32(), Lk * v.size(2), v.size(2)}, B, Lq, Lk, num_heads, dk, dv, opt);
}

Tensor multi_head_attention_packed(const Tensor& qkv, int64_t num_heads, const AttentionOptions& opt) {
  check_3d(qkv, "packed qkv");
  const int64_t B = qkv.size(0), L = qkv.size(1), W = qkv.size(2);
  if (num_heads <= 0 || W % (3 * num_heads) != 0)
    throw Error("attention: packed qkv width " + std::to_string(W) + " is not 3 * " + std::to_string(num_heads) +
                " heads * head_dim");
  const int64_t C = W / 3, d = C / num_heads;
  if (!qkv.is_cpu()) return backend(qkv.device()).multi_head_attention_packed(qkv, num_heads, opt);
  if (qkv.dtype() != DType::F32) return multi_head_attention_packed(qkv.to(DType::F32), num_heads, opt);
  const float* p = qkv.f32();
  return attention_kernel({p, L * W, W}, {p + C, L * W, W}, {p + 2 * C, L * W, W}, B, L, L, num_heads, d, d, opt);
}

}  // namespace vf
