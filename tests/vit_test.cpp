// Vision transformers: the fused attention kernel, DeiT and CvT against their golden cases.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "core/attention.h"
#include "core/bfloat16.h"
#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "test_util.h"

using namespace vf;

namespace {

using test::plain_attention;

Tensor random_tensor(const Shape& shape, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = dist(gen);
  return t;
}


std::map<std::string, Tensor> read_expected(const std::string& case_dir) {
  std::map<std::string, Tensor> m;
  for (auto& [name, t] : read_safetensors(case_dir + "/expected.safetensors")) m[name] = t;
  return m;
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

struct LoadedCase {
  std::string dir;
  json config, spec;
  std::shared_ptr<WeightStore> store;
  std::unique_ptr<Model> model;
  std::map<std::string, Tensor> expected;
};

LoadedCase load_case(const std::string& name) {
  LoadedCase c;
  c.dir = test::golden_case(name);
  c.config = read_json(c.dir + "/config.json");
  c.spec = read_json(c.dir + "/case.json");
  c.store = load_checkpoint(c.dir);
  c.model = create_model(c.config, c.spec["model_class"].get<std::string>(), Weights(c.store));
  c.store->check_complete();
  EXPECT_TRUE(c.store->unused().empty()) << "unused weight " << c.store->unused().front();
  c.expected = read_expected(c.dir);
  return c;
}

// The goldens' tolerance for tiny cases: max|ours - ref| <= 1e-4 * max(1, max|ref|).
void expect_close(const std::string& name, const ModelOutput& out, const Tensor& ref) {
  ASSERT_TRUE(out.has(name)) << "no output " << name;
  const Tensor& ours = out.get(name);
  ASSERT_EQ(ours.numel(), ref.numel()) << name << ": " << shape_str(ours.shape()) << " vs " << shape_str(ref.shape());
  if (ref.dim() > 0) {
    EXPECT_EQ(ours.shape(), ref.shape()) << name;
  }
  const double tol = 1e-4 * std::max(1.0, max_abs(ref));
  EXPECT_LE(max_abs_diff(ours.reshape(ref.shape()), ref), tol) << name;
}

// Runs a golden case with hidden states: every output the case lists must be produced, and each
// one expected.safetensors holds (the vendored copies drop the per-layer hidden states) must match.
void check_golden(const std::string& name) {
  LoadedCase c = load_case(name);
  ModelInputs in;
  in.pixel_values = c.expected.at("pixel_values");
  in.output_hidden_states = true;
  ModelOutput out = c.model->forward(in);
  int compared = 0;
  for (auto& o : c.spec["outputs"]) {
    std::string n = o.get<std::string>();
    if (n == "pixel_values") continue;
    EXPECT_TRUE(out.has(n)) << "no output " << n;
    auto it = c.expected.find(n);
    if (it == c.expected.end()) continue;
    expect_close(n, out, it->second);
    ++compared;
  }
  EXPECT_GE(compared, 2);
}

}  // namespace

// Several heads read in place through strides (3 x 8 / 5), and one head of 32 (CvT's first stage):
// the products get the operands packed or as they are. On 1 and 3 threads, 300 queries over 90 keys
// are one block a head, or blocks of 100 rows (float32 blocks grow past 64 rows where their scores fit).
TEST(VitAttention, MatchesPlainComputation) {
  struct Shape_ {
    int64_t B, Lq, Lk, H, dk, dv, threads;
  };
  const int threads_before = num_threads();
  struct Restore {
    int n;
    ~Restore() { set_num_threads(n); }
  } restore{threads_before};
  for (const Shape_& sh : {Shape_{2, 37, 29, 3, 8, 5, threads_before}, Shape_{1, 100, 70, 1, 32, 32, threads_before},
                           Shape_{1, 300, 90, 2, 16, 16, 1}, Shape_{1, 300, 90, 2, 16, 16, 3}}) {
    const int64_t B = sh.B, Lq = sh.Lq, Lk = sh.Lk, H = sh.H, dk = sh.dk, dv = sh.dv;
    SCOPED_TRACE(testing::Message() << "Lq " << Lq << ", " << H << " heads, " << sh.threads << " threads");
    set_num_threads(int(sh.threads));
    Tensor q = random_tensor({B, Lq, H * dk}, 1), k = random_tensor({B, Lk, H * dk}, 2),
           v = random_tensor({B, Lk, H * dv}, 3);
    const float scale = 0.7f;
    Tensor ref_ctx, ref_probs;
    plain_attention(q, k, v, H, scale, nullptr, &ref_ctx, &ref_probs);

    AttentionOptions opt;
    opt.scale = scale;
    Tensor ctx = multi_head_attention(q, k, v, H, opt);
    EXPECT_EQ(ctx.shape(), (Shape{B, Lq, H * dv}));
    EXPECT_LT(max_abs_diff(ctx, ref_ctx), 1e-5);

    Tensor probs;
    opt.probs = &probs;
    Tensor ctx2 = multi_head_attention(q, k, v, H, opt);
    EXPECT_EQ(max_abs_diff(ctx, ctx2), 0.0);
    ASSERT_EQ(probs.shape(), (Shape{B, H, Lq, Lk}));
    EXPECT_LT(max_abs_diff(probs, ref_probs), 1e-6);
    for (int64_t r = 0; r < B * H * Lq; ++r) {
      double s = 0;
      for (int64_t j = 0; j < Lk; ++j) s += probs.f32()[r * Lk + j];
      EXPECT_NEAR(s, 1.0, 1e-5);
    }
  }
}

// Attention called from several threads at once (a server's workers), each call with its own small
// team: the products of one shape are shared, each thread running blocks takes its own argument set.
// Every call gives its own inputs' result (against the plain computation), none another's.
TEST(VitAttention, CallsFromSeveralThreadsAtOnceGiveEachCallItsResult) {
  constexpr int kWorkers = 4;
  const int64_t B = 1, L = 90, H = 3, d = 16;
  std::vector<Tensor> qs, ks, vs, want;
  for (int t = 0; t < kWorkers; ++t) {
    qs.push_back(random_tensor({B, L, H * d}, 40 + t));
    ks.push_back(random_tensor({B, L, H * d}, 50 + t));
    vs.push_back(random_tensor({B, L, H * d}, 60 + t));
    Tensor ctx, probs;
    plain_attention(qs[t], ks[t], vs[t], H, 0.25f, nullptr, &ctx, &probs);
    want.push_back(ctx);
  }
  std::vector<double> worst(kWorkers, 0.0);
  std::vector<std::thread> workers;
  for (int t = 0; t < kWorkers; ++t)
    workers.emplace_back([&, t] {
      set_num_threads(2);
      AttentionOptions opt;
      opt.scale = 0.25f;
      for (int i = 0; i < 100; ++i)
        worst[t] = std::max(worst[t], max_abs_diff(multi_head_attention(qs[t], ks[t], vs[t], H, opt), want[t]));
    });
  for (auto& w : workers) w.join();
  for (int t = 0; t < kWorkers; ++t) EXPECT_LT(worst[t], 1e-5) << "worker " << t;
  EXPECT_GT(max_abs_diff(want[0], want[1]), 0.1);  // the workers' results differ: a mix-up would show
}

// A bfloat16 context (for a bfloat16 output projection) is the float32 context rounded to nearest
// even, value for value: several heads and one head, separate and packed operands.
TEST(VitAttention, Bfloat16ContextIsTheFloat32OneRounded) {
  for (int64_t H : {3, 1}) {
    SCOPED_TRACE(H);
    const int64_t B = 2, L = 45, d = 32, C = H * d;
    Tensor qkv = random_tensor({B, L, 3 * C}, 30);
    Tensor q = narrow(qkv, 2, 0, C), k = narrow(qkv, 2, C, C), v = narrow(qkv, 2, 2 * C, C);
    AttentionOptions opt;
    opt.scale = 0.3f;
    const Tensor ref = multi_head_attention(q, k, v, H, opt);
    opt.out_dtype = DType::BF16;
    for (const Tensor& ctx : {multi_head_attention(q, k, v, H, opt), multi_head_attention_packed(qkv, H, opt)}) {
      ASSERT_EQ(ctx.dtype(), DType::BF16);
      ASSERT_EQ(ctx.shape(), ref.shape());
      const uint16_t* got = static_cast<const uint16_t*>(ctx.raw());
      int64_t differ = 0;
      for (int64_t i = 0; i < ref.numel(); ++i) differ += got[i] != bf16_from_float(ref.f32()[i]);
      EXPECT_EQ(differ, 0);
    }
  }
  AttentionOptions bad;
  bad.out_dtype = DType::I64;
  Tensor t = random_tensor({1, 4, 8}, 31);
  EXPECT_THROW(multi_head_attention(t, t, t, 1, bad), Error);
}

TEST(VitAttention, PackedEqualsSeparate) {
  const int64_t B = 2, L = 50, H = 4, d = 16, C = H * d;
  Tensor qkv = random_tensor({B, L, 3 * C}, 4, -2.0f, 2.0f);
  Tensor q = narrow(qkv, 2, 0, C), k = narrow(qkv, 2, C, C), v = narrow(qkv, 2, 2 * C, C);
  AttentionOptions opt;
  opt.scale = 0.25f;
  Tensor a = multi_head_attention_packed(qkv, H, opt);
  Tensor b = multi_head_attention(q, k, v, H, opt);
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
  Tensor ref_ctx, ref_probs;
  plain_attention(q, k, v, H, 0.25f, nullptr, &ref_ctx, &ref_probs);
  EXPECT_LT(max_abs_diff(a, ref_ctx), 1e-5);
}

TEST(VitAttention, HeadMaskScalesProbabilities) {
  const int64_t B = 1, L = 20, H = 3, d = 4;
  Tensor q = random_tensor({B, L, H * d}, 5), k = random_tensor({B, L, H * d}, 6), v = random_tensor({B, L, H * d}, 7);
  Tensor mask = Tensor::from<float>({H}, {1.0f, 0.0f, 0.5f});
  Tensor probs, ref_ctx, ref_probs;
  AttentionOptions opt;
  opt.scale = 0.5f;
  opt.head_mask = mask;
  opt.probs = &probs;
  Tensor ctx = multi_head_attention(q, k, v, H, opt);
  plain_attention(q, k, v, H, 0.5f, mask.f32(), &ref_ctx, &ref_probs);
  EXPECT_LT(max_abs_diff(ctx, ref_ctx), 1e-5);
  EXPECT_LT(max_abs_diff(probs, ref_probs), 1e-6);
  // Head 1 is switched off: zero probabilities and zero context; head 2's rows sum to one half.
  double s1 = 0, s2 = 0, c1 = 0;
  for (int64_t j = 0; j < L; ++j) {
    s1 += std::fabs(probs.f32()[(1 * L + 3) * L + j]);
    s2 += probs.f32()[(2 * L + 3) * L + j];
  }
  for (int64_t i = 0; i < L; ++i)
    for (int64_t c = 0; c < d; ++c) c1 += std::fabs(ctx.f32()[i * H * d + 1 * d + c]);
  EXPECT_EQ(s1, 0.0);
  EXPECT_EQ(c1, 0.0);
  EXPECT_NEAR(s2, 0.5, 1e-5);
  AttentionOptions wrong_mask;
  wrong_mask.scale = 0.5f;
  wrong_mask.head_mask = Tensor::zeros({2});
  EXPECT_THROW(multi_head_attention(q, k, v, H, wrong_mask), Error);
}

// The softmax subtracts each row's maximum before the exponentials: with scores up to 100 apart, any
// other subtrahend overflows (exp(100 - x) for x < 12 is inf) and the row turns to NaN. The largest
// score is put at every key position in turn (within the 16-wide blocks and the tail of 37 keys), so
// each one must get all the weight: the context is that key's value row. A NaN score makes the row
// NaN, as in PyTorch.
TEST(VitAttention, SoftmaxSubtractsTheRowMaximumWherever) {
  const int64_t Lk = 37;
  Tensor q = Tensor::from<float>({1, 1, 1}, {1.0f});
  Tensor v = Tensor::empty({1, Lk, 1});
  for (int64_t j = 0; j < Lk; ++j) v.f32()[j] = float(j + 1);
  for (int64_t top = 0; top < Lk; ++top) {
    Tensor k = Tensor::empty({1, Lk, 1});
    for (int64_t j = 0; j < Lk; ++j) k.f32()[j] = j == top ? 100.0f : float(j) - 60.0f;
    Tensor ctx = multi_head_attention(q, k, v, 1, {});
    EXPECT_EQ(ctx.f32()[0], float(top + 1)) << "largest score at key " << top;
  }
  Tensor k = Tensor::zeros({1, Lk, 1});
  k.f32()[20] = std::nanf("");
  EXPECT_TRUE(std::isnan(multi_head_attention(q, k, v, 1, {}).f32()[0]));
}

// DETR's key padding mask: a padded key gets no weight, so a batch element equals plain attention
// over its unpadded keys alone; a batch element with every key padded averages all values.
TEST(VitAttention, KeyMaskDropsPaddedKeys) {
  const int64_t B = 3, Lq = 9, Lk = 20, H = 2, d = 8, kept = 13;
  Tensor q = random_tensor({B, Lq, H * d}, 11), k = random_tensor({B, Lk, H * d}, 12, -3.0f, 3.0f),
         v = random_tensor({B, Lk, H * d}, 13);
  Tensor mask = Tensor::zeros({B, Lk}, DType::U8);
  for (int64_t j = 0; j < Lk; ++j) {
    mask.data<uint8_t>()[j] = j < kept;   // image 0: keys kept..Lk-1 padded
    mask.data<uint8_t>()[Lk + j] = 1;     // image 1: none padded
  }                                       // image 2: all padded
  Tensor probs;
  AttentionOptions opt;
  opt.scale = 0.3f;
  opt.key_mask = mask;
  opt.probs = &probs;
  Tensor ctx = multi_head_attention(q, k, v, H, opt);

  Tensor ref_ctx, ref_probs;
  plain_attention(q.slice0(0, 1), narrow(k.slice0(0, 1), 1, 0, kept), narrow(v.slice0(0, 1), 1, 0, kept), H, 0.3f,
                  nullptr, &ref_ctx, &ref_probs);
  EXPECT_LT(max_abs_diff(ctx.slice0(0, 1), ref_ctx), 1e-5);
  for (int64_t r = 0; r < H * Lq; ++r)
    for (int64_t j = 0; j < Lk; ++j) {
      const float p = probs.f32()[r * Lk + j];
      if (j < kept)
        EXPECT_NEAR(p, ref_probs.f32()[r * kept + j], 1e-6);
      else
        EXPECT_LT(p, 1e-30f);
    }
  plain_attention(q.slice0(1, 2), k.slice0(1, 2), v.slice0(1, 2), H, 0.3f, nullptr, &ref_ctx, &ref_probs);
  EXPECT_LT(max_abs_diff(ctx.slice0(1, 2), ref_ctx), 1e-5);
  for (int64_t c = 0; c < H * d; ++c) {
    double mean = 0;
    for (int64_t j = 0; j < Lk; ++j) mean += v.f32()[(2 * Lk + j) * H * d + c] / double(Lk);
    for (int64_t i = 0; i < Lq; ++i) EXPECT_NEAR(ctx.f32()[(2 * Lq + i) * H * d + c], mean, 1e-5);
  }
  opt.key_mask = Tensor::zeros({B, Lk});  // float, not uint8
  EXPECT_THROW(multi_head_attention(q, k, v, H, opt), Error);
}

// A signal may arrive while the kernel runs (a profiler's SIGPROF, Ctrl-C in Python, a child's
// SIGCHLD): the kernel then writes the signal frame just below the interrupted code's stack pointer.
// oneDNN 2.6's JIT sgemm points the stack pointer into its heap workspace, so every such signal
// corrupted the heap (oneDNN issue 4845; found by a sampling profiler that aborted in malloc). Here a
// timer interrupts this thread every 20 us of its attention calls, which must neither corrupt the heap
// nor change the result.
namespace {
std::atomic<int64_t> signals_seen{0};
void count_signal(int) { signals_seen.fetch_add(1, std::memory_order_relaxed); }
}  // namespace

TEST(VitAttention, SignalsDuringTheKernelAreHarmless) {
  const int64_t B = 1, L = 256, H = 4, d = 32;
  Tensor q = random_tensor({B, L, H * d}, 21), k = random_tensor({B, L, H * d}, 22), v = random_tensor({B, L, H * d}, 23);
  Tensor ref_ctx, ref_probs;
  plain_attention(q, k, v, H, 0.2f, nullptr, &ref_ctx, &ref_probs);

  struct sigaction sa {}, old {};
  sa.sa_handler = count_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  ASSERT_EQ(sigaction(SIGPROF, &sa, &old), 0);
  sigevent ev{};
  ev.sigev_notify = SIGEV_THREAD_ID;
  ev.sigev_signo = SIGPROF;
  ev._sigev_un._tid = static_cast<pid_t>(syscall(SYS_gettid));
  timer_t timer;
  ASSERT_EQ(timer_create(CLOCK_MONOTONIC, &ev, &timer), 0);
  itimerspec every{{0, 20000}, {0, 20000}};
  ASSERT_EQ(timer_settime(timer, 0, &every, nullptr), 0);

  AttentionOptions opt;
  opt.scale = 0.2f;
  double worst = 0;
  for (int i = 0; i < 400 && signals_seen.load() < 2000; ++i) {
    Tensor ctx = multi_head_attention(q, k, v, H, opt);
    worst = std::max(worst, max_abs_diff(ctx, ref_ctx));
    std::vector<std::vector<char>> churn(64);  // heap traffic for malloc's checks to run into
    for (size_t j = 0; j < churn.size(); ++j) churn[j].resize(64 + 32 * j);
  }
  itimerspec off{};
  timer_settime(timer, 0, &off, nullptr);
  timer_delete(timer);
  sigaction(SIGPROF, &old, nullptr);
  EXPECT_GT(signals_seen.load(), 100) << "the timer hardly interrupted the kernel: nothing was tested";
  EXPECT_LT(worst, 1e-5);
}

TEST(VitDeiT, GoldenTinyModel) { check_golden("deit-tiny-model"); }

TEST(VitCvt, GoldenTinyModel) { check_golden("cvt-tiny-model"); }

// output_attentions on the golden DeiT: shapes, rows summing to one, and layer 0's probabilities
// recomputed by hand from the embeddings (hidden_states.0) and the checkpoint's weights.
TEST(VitDeiT, OutputAttentions) {
  LoadedCase c = load_case("deit-tiny-model");
  ModelInputs in;
  in.pixel_values = c.expected.at("pixel_values");
  in.output_hidden_states = true;
  in.output_attentions = true;
  ModelOutput out = c.model->forward(in);
  const int64_t H = c.config["num_attention_heads"].get<int64_t>(), C = c.config["hidden_size"].get<int64_t>();
  const int64_t layers = c.config["num_hidden_layers"].get<int64_t>(), L = out.get("last_hidden_state").size(1);
  for (int64_t i = 0; i < layers; ++i) {
    const Tensor& a = out.get("attentions." + std::to_string(i));
    ASSERT_EQ(a.shape(), (Shape{1, H, L, L}));
    for (int64_t r = 0; r < H * L; r += 7) {
      double s = 0;
      for (int64_t j = 0; j < L; ++j) s += a.f32()[r * L + j];
      EXPECT_NEAR(s, 1.0, 1e-5);
    }
  }
  EXPECT_FALSE(out.has("attentions." + std::to_string(layers)));
  // Attentions do not change the other outputs.
  expect_close("last_hidden_state", out, c.expected.at("last_hidden_state"));

  // Layer 0 by hand from its input, the embeddings (hidden_states.0): LayerNorm (eps 1e-12),
  // query/key projections (this config has no qkv bias), softmax(q k^T / sqrt(head_dim)).
  const Tensor& x = out.get("hidden_states.0");
  auto w = [&](const std::string& n) { return *c.store->find("encoder.layer.0." + n); };
  Tensor lnw = w("layernorm_before.weight"), lnb = w("layernorm_before.bias");
  Tensor wq = w("attention.attention.query.weight"), wk = w("attention.attention.key.weight");
  std::vector<double> ln(L * C), q(L * C), k(L * C);
  for (int64_t t = 0; t < L; ++t) {
    double mean = 0, var = 0;
    for (int64_t j = 0; j < C; ++j) mean += x.f32()[t * C + j];
    mean /= C;
    for (int64_t j = 0; j < C; ++j) var += std::pow(x.f32()[t * C + j] - mean, 2);
    var /= C;
    for (int64_t j = 0; j < C; ++j)
      ln[t * C + j] = (x.f32()[t * C + j] - mean) / std::sqrt(var + 1e-12) * lnw.f32()[j] + lnb.f32()[j];
    for (int64_t o = 0; o < C; ++o) {
      double sq = 0, sk = 0;
      for (int64_t j = 0; j < C; ++j) {
        sq += ln[t * C + j] * wq.f32()[o * C + j];
        sk += ln[t * C + j] * wk.f32()[o * C + j];
      }
      q[t * C + o] = sq;
      k[t * C + o] = sk;
    }
  }
  const int64_t d = C / H;
  const Tensor& a0 = out.get("attentions.0");
  double worst = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < L; i += 5) {
      std::vector<double> s(L);
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < L; ++j) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += q[i * C + h * d + e] * k[j * C + h * d + e];
        s[j] = dot / std::sqrt(double(d));
        mx = std::max(mx, s[j]);
      }
      for (auto& z : s) sum += (z = std::exp(z - mx));
      for (int64_t j = 0; j < L; ++j) {
        const double e = std::fabs(s[j] / sum - a0.f32()[(h * L + i) * L + j]);
        if (!(e <= worst)) worst = e;  // a NaN sticks (std::max would drop it)
      }
    }
  EXPECT_LT(worst, 1e-5);
}

TEST(VitDeiT, HeadMask) {
  LoadedCase c = load_case("deit-tiny-model");
  const int64_t H = c.config["num_attention_heads"].get<int64_t>();
  const int64_t layers = c.config["num_hidden_layers"].get<int64_t>();
  ModelInputs in;
  in.pixel_values = c.expected.at("pixel_values");
  in.output_attentions = true;

  // All ones: the same as no mask.
  in.head_mask = Tensor::full({layers, H}, 1.0f);
  ModelOutput ones = c.model->forward(in);
  expect_close("last_hidden_state", ones, c.expected.at("last_hidden_state"));
  ModelInputs plain;
  plain.pixel_values = in.pixel_values;
  EXPECT_EQ(max_abs_diff(ones.get("last_hidden_state"), c.model->forward(plain).get("last_hidden_state")), 0.0);

  // Head 2 of layer 0 off: its probabilities are zero, the others untouched, the output changes.
  Tensor mask = Tensor::full({layers, H}, 1.0f);
  mask.f32()[2] = 0.0f;
  in.head_mask = mask;
  ModelOutput masked = c.model->forward(in);
  const Tensor& a = masked.get("attentions.0");
  const Tensor& a_ref = ones.get("attentions.0");
  const int64_t L = a.size(2);
  EXPECT_EQ(max_abs(narrow(a, 1, 2, 1)), 0.0);
  EXPECT_EQ(max_abs_diff(narrow(a, 1, 0, 2), narrow(a_ref, 1, 0, 2)), 0.0);
  EXPECT_GT(max_abs_diff(masked.get("last_hidden_state"), ones.get("last_hidden_state")), 1e-3);
  (void)L;

  // A [num_heads] mask applies to every layer.
  Tensor per_head = Tensor::full({H}, 1.0f);
  per_head.f32()[0] = 0.0f;
  in.head_mask = per_head;
  ModelOutput all = c.model->forward(in);
  for (int64_t i = 0; i < layers; ++i) EXPECT_EQ(max_abs(narrow(all.get("attentions." + std::to_string(i)), 1, 0, 1)), 0.0);

  in.head_mask = Tensor::full({H + 1}, 1.0f);
  EXPECT_THROW(c.model->forward(in), Error);
}
