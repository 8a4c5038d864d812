#include "core/attention.h"

#include "core/backend.h"

#include "core/errors.h"
#include "core/limits.h"
#include "core/onednn.h"
#include "core/simd.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include <dnnl.hpp>
#include <oneapi/dnnl/dnnl.h>

#include "core/bfloat16.h"

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
// With `rounded`, the probabilities go there instead, rounded to bfloat16 ([rows, n]; the bfloat16
// second product reads them), in the pass that scales them: the same values as rounding the float32
// rows afterwards, without that pass over them.
void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float factor, uint16_t* rounded = nullptr) {
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
    if (rounded) {
      uint16_t* out = rounded + i * n;
      int64_t j = 0;
      for (; j + simd::kLanes <= n; j += simd::kLanes) simd::store(out + j, simd::load(row + j) * mul);
      float tail[simd::kLanes];
      for (int64_t t = 0; t < n - j; ++t) tail[t] = row[j + t] * mul;
      bf16_from_float(tail, out + j, n - j);  // as the whole vectors round (subnormals included)
      continue;
    }
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
// Float32, or bfloat16 where all three operands are (Operand::bf16 says which).
struct Operand {
  const void* p;
  int64_t batch_stride;
  int64_t row_stride;
  bool bf16 = false;
  template <typename T>
  const T* at(int64_t b, int64_t row, int64_t col) const {
    return static_cast<const T*>(p) + b * batch_stride + row * row_stride + col;
  }
};

// Rows of a query block: enough (batch, head, block) tasks to keep every thread busy, blocks large
// enough for a product, and then as many tasks as the rounds of threads they take (CvT-13's first
// stage: 49 blocks of 64 rows on 16 threads were 4 rounds, the last of one block; 64 blocks of 49
// rows are 4 full ones). Float32 blocks start as large as their scores fit in kScoreBytes, fewer and
// larger products (each call costs microseconds beyond its arithmetic): at 2 threads DeiT-B's 198
// queries are one block a head, no longer four, and its attention takes ~9% less time on the
// development VM, CvT-13's ~8-20% (bench_ops' BM_OpAttention). bfloat16 blocks start at 64 rows.
int64_t query_block(int64_t B, int64_t Lq, int64_t Lk, int64_t H, bool bf16) {
  constexpr int64_t kScoreBytes = int64_t(512) << 10;  // with a head's keys and values, within a 1 MiB L2
  const int64_t threads = omp_get_max_threads();
  int64_t qb = 64;
  if (!bf16)
    while (qb < Lq && 2 * qb * Lk * int64_t(sizeof(float)) <= kScoreBytes) qb *= 2;
  while (qb > 16 && B * H * ((Lq + qb - 1) / qb) < 2 * threads) qb /= 2;
  const int64_t rounds = (B * H * ((Lq + qb - 1) / qb) + threads - 1) / threads;
  const int64_t blocks = (rounds * threads + B * H - 1) / (B * H);  // per (batch, head)
  return std::max<int64_t>(std::min<int64_t>(8, Lq), (Lq + blocks - 1) / blocks);
}

// ---- the two products of a query block -----------------------------------------------------------
// oneDNN's matmul primitive, made once per shape and kept, computes a block's scores and context in
// float32, or on bfloat16 operands with float32 accumulation. Its brgemm kernels take dense operands
// only (on strided ones oneDNN 2.6 falls back to its JIT gemm), so the kernel hands it each head's keys
// and values packed [Lk, d] and the query block and its context in dense scratch. Not dnnl_sgemm nor
// that JIT gemm: they point the stack pointer into their heap workspace, so a signal arriving during
// them (a profiler, Ctrl-C, a child's exit) writes its frame into the heap (oneDNN issue 4845).
struct Products {
  dnnl::matmul scores;   // Q [rows, dk] x K^T [dk, Lk] -> scale * S [rows, Lk], float32
  dnnl::matmul context;  // P [rows, Lk] x V [Lk, dv] -> O [rows, dv], float32
  dnnl::memory::desc q, k, s, p, v, o, scores_scratchpad, context_scratchpad;
  // The larger of the two scratchpads: a thread's room for both (its blocks run them in turn).
  size_t scratch_bytes() const { return std::max(scores_scratchpad.get_size(), context_scratchpad.get_size()); }
  // Each product's arguments, a set per thread running blocks at once (BlockArgs).
  mutable onednn::ArgSets scores_args, context_args;
};

// The first implementation oneDNN offers that is neither its reference code nor its JIT gemm (see
// Products); false where there is none.
bool skip_to_fast_kernel(dnnl::matmul::primitive_desc& pd) {
  for (;;) {
    const std::string impl = pd.impl_info_str();
    if (impl.rfind("ref", 0) != 0 && impl.find("gemm") == std::string::npos) return true;
    if (!pd.next_impl()) return false;
  }
}

// The products for `rows` query rows on dense float32 or bfloat16 operands (P, the probabilities, in
// the same type), or null where oneDNN has only its reference code or its JIT gemm for them: a CPU
// without AVX-512 (bfloat16 operands: without bfloat16 instructions). The caller then widens bfloat16
// operands; float32 ones take `portable_scores` and `portable_context`. Shared: a call keeps the
// products it runs alive while another, making those of a new shape, drops them from the cache.
std::shared_ptr<const Products> block_products(bool bf16, int64_t rows, int64_t Lk, int64_t dk, int64_t dv, float scale) {
  using dnnl::memory;
  using dt = memory::data_type;
  static std::mutex mutex;
  static std::map<std::array<int64_t, 6>, std::shared_ptr<const Products>> made;
  const std::array<int64_t, 6> key{bf16, rows, Lk, dk, dv, int64_t(std::bit_cast<uint32_t>(scale))};
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = made.find(key); it != made.end()) return it->second;
  if (made.size() >= 256) made.clear();  // shapes follow the image sizes: bounded, not a leak
  std::shared_ptr<const Products> pr;
  try {
    const dt in = bf16 ? dt::bf16 : dt::f32;
    auto md = [](int64_t r, int64_t c, dt t, int64_t row_stride, int64_t col_stride) {
      return memory::desc({r, c}, t, memory::dims{row_stride, col_stride});
    };
    auto made_pr = std::make_shared<Products>();
    Products& b = *made_pr;
    b.q = md(rows, dk, in, dk, 1);
    b.k = md(dk, Lk, in, 1, dk);  // K^T of the packed keys [Lk, dk]
    b.s = md(rows, Lk, dt::f32, Lk, 1);
    b.p = md(rows, Lk, in, Lk, 1);
    b.v = md(Lk, dv, in, dv, 1);
    b.o = md(rows, dv, dt::f32, dv, 1);
    dnnl::primitive_attr scaled, plain;
    scaled.set_output_scales(0, {scale});
    scaled.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    plain.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc spd(dnnl::matmul::desc(b.q, b.k, b.s), scaled, onednn::cpu_engine());
    dnnl::matmul::primitive_desc cpd(dnnl::matmul::desc(b.p, b.v, b.o), plain, onednn::cpu_engine());
    if (skip_to_fast_kernel(spd) && skip_to_fast_kernel(cpd)) {
      b.scores = dnnl::matmul(spd);
      b.context = dnnl::matmul(cpd);
      b.scores_scratchpad = spd.scratchpad_desc();
      b.context_scratchpad = cpd.scratchpad_desc();
      pr = std::move(made_pr);
    }
  } catch (const dnnl::error&) {
    pr.reset();  // not offered for these operands
  }
  made.emplace(key, pr);
  return pr;
}

// Float32 products where oneDNN has no kernel for them but its JIT gemm (see Products), on the
// operands in place: scale * Q K^T into s [rows, Lk], then P V into o (leading dimension o_ld).
// Vectorised along the contiguous head dimension; slower than a blocked gemm, but only CPUs without
// AVX-512 take it.
void portable_scores(int64_t rows, int64_t Lk, int64_t dk, float scale, const float* q, int64_t q_ld, const float* k,
                     int64_t k_ld, float* s) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < Lk; ++j) {
      const float* qi = q + i * q_ld;
      const float* kj = k + j * k_ld;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < dk; ++c) dot += qi[c] * kj[c];
      s[i * Lk + j] = scale * dot;
    }
}

void portable_context(int64_t rows, int64_t Lk, int64_t dv, const float* p, const float* v, int64_t v_ld, float* o,
                      int64_t o_ld) {
  for (int64_t i = 0; i < rows; ++i) {
    float* oi = o + i * o_ld;
    std::fill(oi, oi + dv, 0.0f);
    for (int64_t j = 0; j < Lk; ++j) {
      const float pij = p[i * Lk + j];
      const float* vj = v + j * v_ld;
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) oi[c] += pij * vj[c];
    }
  }
}

// A thread's argument sets of one Products (ArgSets: taken when the thread starts on its blocks,
// given back when it is done), pointed at each block's operands; both products share the thread's
// scratchpad.
struct BlockArgs {
  onednn::ArgSets::Lease scores, context;

  BlockArgs(const Products& pr, void* scratchpad)
      : scores(pr.scores_args.take([&] { return args(pr.q, pr.k, pr.s, pr.scores_scratchpad); })),
        context(pr.context_args.take([&] { return args(pr.p, pr.v, pr.o, pr.context_scratchpad); })) {
    if (pr.scores_scratchpad.get_size() > 0) scores.bind(DNNL_ARG_SCRATCHPAD, scratchpad);
    if (pr.context_scratchpad.get_size() > 0) context.bind(DNNL_ARG_SCRATCHPAD, scratchpad);
  }
  static onednn::ArgSets::Args args(const dnnl::memory::desc& src, const dnnl::memory::desc& weights,
                                    const dnnl::memory::desc& dst, const dnnl::memory::desc& scratchpad) {
    onednn::ArgSets::Args a{{DNNL_ARG_SRC, onednn::unbound(src)},
                            {DNNL_ARG_WEIGHTS, onednn::unbound(weights)},
                            {DNNL_ARG_DST, onednn::unbound(dst)}};
    if (scratchpad.get_size() > 0) a.emplace(DNNL_ARG_SCRATCHPAD, onednn::unbound(scratchpad));
    return a;
  }
};

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
  if (opt.out_dtype != DType::F32 && opt.out_dtype != DType::BF16)
    throw Error(std::string("attention: cannot write the context in ") + dtype_name(opt.out_dtype));
  const bool bf16_out = opt.out_dtype == DType::BF16;
  Tensor out = Tensor::empty({B, Lq, H * dv}, opt.out_dtype);
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

  const int threads = omp_get_max_threads();
  const int64_t qb = query_block(B, Lq, Lk, H, q.bf16);
  const int64_t nqb = (Lq + qb - 1) / qb;
  const int64_t tasks = B * H * nqb;
  const int64_t last_rows = Lq - (nqb - 1) * qb;

  // The products for a full block and for the last one (null: no fast kernel for them).
  const std::shared_ptr<const Products> full = block_products(q.bf16, qb, Lk, dk, dv, opt.scale);
  const std::shared_ptr<const Products> last =
      last_rows == qb ? full : block_products(q.bf16, last_rows, Lk, dk, dv, opt.scale);
  if (q.bf16 && (!full || !last)) return Tensor();  // no bfloat16 kernels here: the caller widens
  const bool fast = full && last;                    // else float32 on the portable products
  const size_t es = q.bf16 ? 2 : 4;                  // bytes of an operand element
  auto operand = [es](const Operand& x, int64_t b, int64_t row, int64_t col) {
    return static_cast<const char*>(x.p) + (b * x.batch_stride + row * x.row_stride + col) * es;
  };
  // Each head's keys and values packed [Lk, d] for the products, unless they already are (one head).
  const bool pack_kv = fast && (H > 1 || k.row_stride != dk || v.row_stride != dv);
  const bool pack_q = fast && (H > 1 || q.row_stride != dk);
  const bool dense_o = !fast || (H == 1 && !bf16_out);  // the float32 context written in place
  Tensor packed_k, packed_v;
  if (pack_kv) {
    const DType t = q.bf16 ? DType::BF16 : DType::F32;
    packed_k = Tensor::empty({B * H, Lk, dk}, t);
    packed_v = Tensor::empty({B * H, Lk, dv}, t);
    char* pk = static_cast<char*>(packed_k.raw());
    char* pv = static_cast<char*>(packed_v.raw());
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        copy_blocks(pk + (b * H + h) * Lk * dk * es, dk * es, operand(k, b, 0, h * dk), k.row_stride * es, dk * es, Lk);
        copy_blocks(pv + (b * H + h) * Lk * dv * es, dv * es, operand(v, b, 0, h * dv), v.row_stride * es, dv * es, Lk);
      }
  }
  const size_t scratch_bytes = fast ? std::max(full->scratch_bytes(), last->scratch_bytes()) : 0;
  // Per thread, each part on a 64-byte boundary: the block's scores (unless they go to probs), its
  // bfloat16 probabilities, its packed queries and dense context, and the products' scratchpad.
  auto lines = [](int64_t bytes) { return (bytes + 63) / 64 * 16; };
  const int64_t score_floats = probs ? 0 : lines(qb * Lk * 4);
  const int64_t prob_floats = q.bf16 ? lines(qb * Lk * 2) : 0;
  const int64_t query_floats = pack_q ? lines(qb * dk * int64_t(es)) : 0;
  const int64_t context_floats = dense_o ? 0 : lines(qb * dv * 4);
  const int64_t per_thread =
      score_floats + prob_floats + query_floats + context_floats + lines(int64_t(scratch_bytes));
  Tensor scratch;
  if (per_thread > 0) scratch = Tensor::empty({static_cast<int64_t>(threads), per_thread});
  // The portable products write float32: a bfloat16 context is rounded from it at the end.
  Tensor out32 = bf16_out && !fast ? Tensor::empty({B, Lq, H * dv}) : Tensor();
  float* out_p = bf16_out ? (fast ? nullptr : out32.f32()) : out.f32();
  uint16_t* out_bf16 = bf16_out ? static_cast<uint16_t*>(out.raw()) : nullptr;
  // Bias, padding mask and softmax on a block's scaled scores (and the head mask's factor).
  auto finish_scores = [&](float* s, int64_t rows, int64_t b, int64_t h, int64_t i0, uint16_t* rounded = nullptr) {
    if (bias) add_rows(s, bias + (h * Lq + i0) * Lk, rows * Lk);
    if (batch_bias) add_rows(s, batch_bias + ((b % batch_bias_count) * Lq + i0) * Lk, rows * Lk);
    if (key_mask) mask_rows(s, rows, Lk, key_mask + b * Lk);
    softmax_rows(s, rows, Lk, Lk, head_mask ? head_mask[h] : 1.0f, rounded);
  };

#pragma omp parallel
  {
    float* mine = per_thread > 0 ? scratch.f32() + static_cast<int64_t>(omp_get_thread_num()) * per_thread : nullptr;
    float* my_probs = mine + score_floats;
    float* my_queries = my_probs + prob_floats;
    float* my_context = my_queries + query_floats;
    float* my_scratchpad = my_context + context_floats;
    // This thread's arguments of the products, pointed at each task's block.
    std::optional<BlockArgs> full_args, last_args;
    if (fast) full_args.emplace(*full, my_scratchpad);
    if (fast && last != full) last_args.emplace(*last, my_scratchpad);
    static thread_local dnnl::stream stream(onednn::cpu_engine());

#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / (H * nqb);
      const int64_t h = (t / nqb) % H;
      const int64_t i0 = (t % nqb) * qb;
      const int64_t rows = std::min(qb, Lq - i0);
      float* s = probs ? probs + ((b * H + h) * Lq + i0) * Lk : mine;
      const int64_t o_at = (b * Lq + i0) * H * dv + h * dv;  // the block's first context element
      float* o = out_p ? out_p + o_at : nullptr;

      if (!fast) {
        portable_scores(rows, Lk, dk, opt.scale, q.at<float>(b, i0, h * dk), q.row_stride, k.at<float>(b, 0, h * dk),
                        k.row_stride, s);
        finish_scores(s, rows, b, h, i0);
        portable_context(rows, Lk, dv, s, v.at<float>(b, 0, h * dv), v.row_stride, o, H * dv);
        continue;
      }
      const Products& pr = rows == qb ? *full : *last;
      BlockArgs& w = rows == qb ? *full_args : *last_args;  // a short block has its own products
      const char* queries = operand(q, b, i0, h * dk);
      if (pack_q) {
        copy_blocks(my_queries, dk * es, queries, q.row_stride * es, dk * es, rows);
        queries = reinterpret_cast<const char*>(my_queries);
      }
      const int64_t head = b * H + h;
      w.scores.bind(DNNL_ARG_SRC, queries);
      w.scores.bind(DNNL_ARG_WEIGHTS, pack_kv ? static_cast<const char*>(packed_k.raw()) + head * Lk * dk * es
                                              : operand(k, b, 0, 0));
      w.scores.bind(DNNL_ARG_DST, s);
      // bfloat16: the probabilities are rounded after the float32 softmax, as on the GPU.
      w.context.bind(DNNL_ARG_SRC, q.bf16 ? static_cast<const void*>(my_probs) : s);
      w.context.bind(DNNL_ARG_WEIGHTS, pack_kv ? static_cast<const char*>(packed_v.raw()) + head * Lk * dv * es
                                               : operand(v, b, 0, 0));
      w.context.bind(DNNL_ARG_DST, dense_o ? o : my_context);
      pr.scores.execute(stream, w.scores.args());
      // bfloat16: the float32 softmax's probabilities rounded for the second product (and kept in
      // float32 too where the caller asked for them).
      uint16_t* probs16 = q.bf16 ? reinterpret_cast<uint16_t*>(my_probs) : nullptr;
      finish_scores(s, rows, b, h, i0, probs ? nullptr : probs16);
      if (probs16 && probs) bf16_from_float(s, probs16, rows * Lk);
      pr.context.execute(stream, w.context.args());
      stream.wait();
      if (bf16_out)
        for (int64_t r = 0; r < rows; ++r) bf16_from_float(my_context + r * dv, out_bf16 + o_at + r * H * dv, dv);
      else if (!dense_o)
        copy_blocks(o, H * dv * 4, my_context, dv * 4, dv * 4, rows);
    }
  }
  if (out32.defined()) bf16_from_float(out32.f32(), out_bf16, out32.numel());
  return out;
}

// Float32, or a 16-bit layer's output (forward_to_attention), which the GPU reads as it is, and the
// CPU too where it is bfloat16 (other 16-bit operands are widened).
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
  const int64_t dk = q.size(2) / num_heads, dv = v.size(2) / num_heads;
  // bfloat16 products where all three are bfloat16 (a bfloat16 layer's forward_to_attention) and the
  // CPU has kernels for them; otherwise widened.
  const bool bf16 = q.dtype() == DType::BF16 && k.dtype() == DType::BF16 && v.dtype() == DType::BF16;
  if (bf16) {
    Tensor out = attention_kernel({q.raw(), Lq * q.size(2), q.size(2), true}, {k.raw(), Lk * k.size(2), k.size(2), true},
                                  {v.raw(), Lk * v.size(2), v.size(2), true}, B, Lq, Lk, num_heads, dk, dv, opt);
    if (out.defined()) return out;
  }
  if (q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32)
    return multi_head_attention(q.to(DType::F32), k.to(DType::F32), v.to(DType::F32), num_heads, opt);
  return attention_kernel({q.raw(), Lq * q.size(2), q.size(2)}, {k.raw(), Lk * k.size(2), k.size(2)},
                          {v.raw(), Lk * v.size(2), v.size(2)}, B, Lq, Lk, num_heads, dk, dv, opt);
}

Tensor multi_head_attention_packed(const Tensor& qkv, int64_t num_heads, const AttentionOptions& opt) {
  check_3d(qkv, "packed qkv");
  const int64_t B = qkv.size(0), L = qkv.size(1), W = qkv.size(2);
  if (num_heads <= 0 || W % (3 * num_heads) != 0)
    throw Error("attention: packed qkv width " + std::to_string(W) + " is not 3 * " + std::to_string(num_heads) +
                " heads * head_dim");
  const int64_t C = W / 3, d = C / num_heads;
  if (!qkv.is_cpu()) return backend(qkv.device()).multi_head_attention_packed(qkv, num_heads, opt);
  if (qkv.dtype() == DType::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(qkv.raw());
    Tensor out = attention_kernel({p, L * W, W, true}, {p + C, L * W, W, true}, {p + 2 * C, L * W, W, true}, B, L, L,
                                  num_heads, d, d, opt);
    if (out.defined()) return out;
  }
  if (qkv.dtype() != DType::F32) return multi_head_attention_packed(qkv.to(DType::F32), num_heads, opt);
  const float* p = qkv.f32();
  return attention_kernel({p, L * W, W}, {p + C, L * W, W}, {p + 2 * C, L * W, W}, B, L, L, num_heads, d, d, opt);
}

}  // namespace vf
