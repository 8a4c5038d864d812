// Single ops at the shapes of ConvNeXt V2-T's four stages (224x224 input: maps of 56, 28, 14 and 7
// pixels a side, 96 to 768 channels), on VF_THREADS threads: the per-call costs that the whole-model
// benchmarks hide (a region's fork and join, an op's own set-up), beside the work at each size.
// Arguments: the stage (0-3) and the dtype (0 float32, 1 bfloat16: the op reads and writes bfloat16,
// as between the layers of a bfloat16 forward).
//
//   VF_THREADS=16 vf_bench --benchmark_filter='BM_Op'
//
//   BM_OpGrn        grn_nhwc on the pwconv1 output [1, s, s, 4 * dim]
//   BM_OpLayerNorm  layer_norm on the depthwise conv's output [1, s, s, dim]
//   BM_OpLinear     pwconv1, [s * s, dim] -> [s * s, 4 * dim] with GELU (a layer built in the dtype)
//
// And the machine's float32 peak, the yardstick for every layer and model ("% of peak"):
//
//   BM_PeakF32      GFLOP/s of fused multiply-adds from registers on VF_THREADS threads at once
#include <benchmark/benchmark.h>

#include <cstdint>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "core/attention.h"
#include "core/device.h"
#include "core/ops.h"

namespace {

constexpr int64_t kSide[4] = {56, 28, 14, 7};
constexpr int64_t kDim[4] = {96, 192, 384, 768};

int threads_from_env() {
  const char* v = std::getenv("VF_THREADS");
  return v && std::atoi(v) > 0 ? std::atoi(v) : int(std::thread::hardware_concurrency());
}

// Values in [-1, 1), deterministic, in the benchmark's dtype.
vf::Tensor values(const vf::Shape& shape, bool bf16) {
  vf::Tensor t = vf::Tensor::empty(shape);
  float* p = t.f32();
  uint64_t h = 88172645463325252ull;
  for (int64_t i = 0; i < t.numel(); ++i) {
    h ^= h << 13, h ^= h >> 7, h ^= h << 17;
    p[i] = float(h >> 40) / float(1 << 24) * 2.0f - 1.0f;
  }
  return bf16 ? t.to(vf::DType::BF16) : t;
}

void label(benchmark::State& state, int64_t elements) {
  state.counters["threads"] = vf::num_threads();
  state.counters["elements"] = double(elements);
  state.SetLabel(state.range(1) ? "bfloat16" : "float32");
}

void BM_OpGrn(benchmark::State& state) {
  vf::set_num_threads(threads_from_env());
  const int64_t s = kSide[state.range(0)], c = 4 * kDim[state.range(0)];
  const bool bf16 = state.range(1) != 0;
  const vf::Tensor x = values({1, s, s, c}, bf16), gamma = values({c}, false), beta = values({c}, false);
  for (auto _ : state)
    benchmark::DoNotOptimize(vf::grn_nhwc(x, gamma, beta, 1e-6f, bf16 ? vf::DType::BF16 : vf::DType::F32));
  label(state, x.numel());
}

void BM_OpLayerNorm(benchmark::State& state) {
  vf::set_num_threads(threads_from_env());
  const int64_t s = kSide[state.range(0)], c = kDim[state.range(0)];
  const bool bf16 = state.range(1) != 0;
  const vf::Tensor x = values({1, s, s, c}, bf16), w = values({c}, false), b = values({c}, false);
  for (auto _ : state)
    benchmark::DoNotOptimize(vf::layer_norm(x, w, b, 1e-6f, bf16 ? vf::DType::BF16 : vf::DType::F32));
  label(state, x.numel());
}

void BM_OpLinear(benchmark::State& state) {
  vf::set_num_threads(threads_from_env());
  const int64_t s = kSide[state.range(0)], c = kDim[state.range(0)];
  const bool bf16 = state.range(1) != 0;
  vf::LoadDeviceScope scope(vf::Device::cpu(), bf16 ? vf::DType::BF16 : vf::DType::F32);
  const vf::Linear fc(values({4 * c, c}, false), values({4 * c}, false), vf::Act::Gelu);
  const vf::Tensor x = values({s * s, c}, bf16);
  fc.forward_to_layer(x);  // the primitive made and the weights reordered once, as a model's warm-up
  for (auto _ : state) benchmark::DoNotOptimize(fc.forward_to_layer(x));
  label(state, x.numel());
}

// The widest FMA the build targets, for BM_PeakF32.
#if defined(__AVX512F__)
using PeakVector = __m512;
inline PeakVector peak_fma(PeakVector x, PeakVector m, PeakVector a) { return _mm512_fmadd_ps(x, m, a); }
#elif defined(__FMA__)
using PeakVector = __m256;
inline PeakVector peak_fma(PeakVector x, PeakVector m, PeakVector a) { return _mm256_fmadd_ps(x, m, a); }
#else
using PeakVector = float;
inline PeakVector peak_fma(PeakVector x, PeakVector m, PeakVector a) { return x * m + a; }
#endif
constexpr int kPeakChains = 16;
constexpr int64_t kPeakRounds = int64_t(1) << 24;
constexpr double kPeakFlopsPerThread = 2.0 * kPeakChains * (sizeof(PeakVector) / sizeof(float)) * kPeakRounds;

// One thread's share of BM_PeakF32: kPeakChains independent chains acc = acc * m + a in registers
// (enough to cover the FMA units' latency times their count), no loads or stores, kPeakRounds rounds.
// Returns the chains' sum so that nothing is optimised away.
float fma_chains(float start) {
  const auto splat = [](float v) {
    PeakVector x;
    float f[sizeof(PeakVector) / sizeof(float)];
    for (float& e : f) e = v;
    std::memcpy(&x, f, sizeof x);
    return x;
  };
  PeakVector acc[kPeakChains];
  for (int j = 0; j < kPeakChains; ++j) acc[j] = splat(start * float(j));
  const PeakVector m = splat(1.0f - start), a = splat(start);
  for (int64_t r = 0; r < kPeakRounds; ++r)
    for (int j = 0; j < kPeakChains; ++j) acc[j] = peak_fma(acc[j], m, a);
  float s = 0, f[sizeof(PeakVector) / sizeof(float)];
  for (int j = 0; j < kPeakChains; ++j) {
    std::memcpy(f, &acc[j], sizeof f);
    for (float v : f) s += v;
  }
  return s;
}

// float32 GFLOP/s (a multiply-add is two) of VF_THREADS threads running fma_chains at once, each on its
// own std::thread, on whatever cores the process may use (as the models' threads).
void BM_PeakF32(benchmark::State& state) {
  const int threads = threads_from_env();
  static volatile float seed = 1e-6f;  // a start the compiler cannot know, so it cannot fold the chains
  for (auto _ : state) {
    std::vector<float> sums(threads);
    std::vector<std::thread> team;
    const auto start = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) team.emplace_back([&sums, t, s = float(seed)] { sums[t] = fma_chains(s); });
    for (auto& t : team) t.join();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["threads"] = threads;
  state.counters["GFLOPs"] = benchmark::Counter(kPeakFlopsPerThread * threads * double(state.iterations()) / 1e9,
                                                benchmark::Counter::kIsRate);
}

// Attention at the shapes of DeiT-B (198 tokens, 12 heads of 64), of CvT-13's three stages (3136
// queries over 784 keys, 1 head; 784 over 196, 3 heads; 197 over 50, 6 heads) and of DETR-R50's
// encoder at 800x1066 (850 tokens, 8 heads of 32). Arguments: the shape (0-4) and the dtype.
void BM_OpAttention(benchmark::State& state) {
  vf::set_num_threads(threads_from_env());
  struct Shape { int64_t lq, lk, heads, d; };
  constexpr Shape kShapes[5] = {{198, 198, 12, 64}, {3136, 784, 1, 64}, {784, 196, 3, 64}, {197, 50, 6, 64},
                                {850, 850, 8, 32}};
  const Shape sh = kShapes[state.range(0)];
  const bool bf16 = state.range(1) != 0;
  const int64_t width = sh.d * sh.heads;
  const vf::Tensor q = values({1, sh.lq, width}, bf16), k = values({1, sh.lk, width}, bf16),
                   v = values({1, sh.lk, width}, bf16);
  vf::AttentionOptions opt;
  opt.scale = 1.0f / std::sqrt(float(sh.d));
  for (auto _ : state) benchmark::DoNotOptimize(vf::multi_head_attention(q, k, v, sh.heads, opt));
  label(state, q.numel());
}

void stages(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{0, 1, 2, 3}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_OpGrn)->Apply(stages);
BENCHMARK(BM_OpLayerNorm)->Apply(stages);
BENCHMARK(BM_OpLinear)->Apply(stages);
BENCHMARK(BM_OpAttention)->ArgsProduct({{0, 1, 2, 3, 4}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_PeakF32)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
