// bfloat16 compute on the CPU (--dtype bfloat16): the weighted layers against a definition computed
// here from bfloat16-rounded inputs and weights, and `vf check --dtype` on vendored cases.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "core/attention.h"
#include "core/device.h"
#include "core/errors.h"
#include "core/ops.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "vf_binary.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

// Skips the test where this CPU has no bfloat16 (the CI machines have AVX512-BF16).
#define SKIP_WITHOUT_CPU_BF16()                                                 \
  do {                                                                          \
    try {                                                                       \
      check_compute_dtype(Device::cpu(), DType::BF16);                          \
    } catch (const Error& e) {                                                  \
      GTEST_SKIP() << "this CPU cannot compute in bfloat16: " << e.what();      \
    }                                                                           \
  } while (0)

// float32 -> bfloat16 -> float32, rounding to nearest even (finite values), written from the format.
float round_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&v, &u, 4);
  return v;
}

using test::randn;

Tensor rounded(const Tensor& t) {
  Tensor r = t.clone();
  for (int64_t i = 0; i < r.numel(); ++i) r.f32()[i] = round_bf16(r.f32()[i]);
  return r;
}

// |ours - ref| against the error float32 accumulation may add: a few ulps of the sum of |terms|.
void expect_within_accumulation(const Tensor& ours, const Tensor& ref, const Tensor& abs_sum, const char* what) {
  ASSERT_EQ(ours.shape(), ref.shape());
  int bad = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double tol = 1e-5 * abs_sum.f32()[i] + 1e-6;
    if (!(std::fabs(ours.f32()[i] - ref.f32()[i]) <= tol) && bad++ < 5)
      ADD_FAILURE() << what << " [" << i << "]: " << ours.f32()[i] << " vs " << ref.f32()[i] << " (tol " << tol << ")";
  }
  EXPECT_EQ(bad, 0) << what;
}

// NHWC convolution from the definition (double accumulation), and the sum of |terms| per output.
void conv_definition(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int pad, int groups, Tensor& y,
                     Tensor& abs_sum) {
  const int64_t n = x.size(0), h = x.size(1), wd = x.size(2), c = x.size(3);
  const int64_t o = w.size(0), cg = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t oh = (h + 2 * pad - kh) / stride + 1, ow = (wd + 2 * pad - kw) / stride + 1, og = o / groups;
  y = Tensor::zeros({n, oh, ow, o});
  abs_sum = Tensor::zeros({n, oh, ow, o});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t yy = 0; yy < oh; ++yy)
      for (int64_t xx = 0; xx < ow; ++xx)
        for (int64_t oc = 0; oc < o; ++oc) {
          double acc = b.f32()[oc], mag = std::fabs(b.f32()[oc]);
          const int64_t g = oc / og;
          for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t iy = yy * stride - pad + ky, ix = xx * stride - pad + kx;
              if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
              for (int64_t ic = 0; ic < cg; ++ic) {
                const double t = double(x.f32()[((i * h + iy) * wd + ix) * c + g * cg + ic]) *
                                 w.f32()[((oc * cg + ic) * kh + ky) * kw + kx];
                acc += t;
                mag += std::fabs(t);
              }
            }
          const int64_t at = ((i * oh + yy) * ow + xx) * o + oc;
          y.f32()[at] = float(acc);
          abs_sum.f32()[at] = float(mag);
        }
}

// conv(x, w) + b + residual, then ReLU, from the definition on bfloat16-rounded x and w (the residual
// as given), with the sum of |terms| per output.
void conv_residual_relu_definition(const Tensor& x, const Tensor& w, const Tensor& b, int pad, const Tensor& residual,
                                   Tensor& ref, Tensor& mag) {
  conv_definition(rounded(x), rounded(w), b, 1, pad, 1, ref, mag);
  for (int64_t i = 0; i < ref.numel(); ++i) {
    ref.f32()[i] = std::max(0.0f, ref.f32()[i] + residual.f32()[i]);
    mag.f32()[i] += std::fabs(residual.f32()[i]);
  }
}

// A bfloat16 result, element by element one bfloat16 rounding of a value within float32
// accumulation error (1e-5 of the sum of magnitudes `mag`) of the definition `ref`.
void expect_one_rounding(const Tensor& ours, const Tensor& ref, const Tensor& mag) {
  ASSERT_EQ(ours.numel(), ref.numel());
  Tensor wide = ours.to(DType::F32);
  int bad = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const float v = wide.f32()[i], want = ref.f32()[i];
    const double tol = 1e-5 * mag.f32()[i] + 1e-6;
    const bool ok = v == round_bf16(want) || v == round_bf16(float(want + tol)) || v == round_bf16(float(want - tol));
    if (!ok && bad++ < 5) ADD_FAILURE() << "[" << i << "]: " << v << " vs " << want << " rounded " << round_bf16(want);
  }
  EXPECT_EQ(bad, 0);
}

// `bf` is `f32` rounded to bfloat16, element by element.
void expect_rounded_copy(const Tensor& bf, const Tensor& f32, const std::string& what) {
  ASSERT_EQ(bf.dtype(), DType::BF16) << what;
  ASSERT_EQ(bf.shape(), f32.shape()) << what;
  Tensor back = bf.to(DType::F32);
  int bad = 0;
  for (int64_t i = 0; i < f32.numel(); ++i)
    if (back.f32()[i] != round_bf16(f32.f32()[i]) && bad++ < 5)
      ADD_FAILURE() << what << " [" << i << "] " << back.f32()[i] << " vs " << round_bf16(f32.f32()[i]);
}

// A layer built as a bfloat16 model builds it (the load-time scope picks its compute dtype).
template <class Layer, class... Args>
std::unique_ptr<Layer> bf16_layer(Args&&... args) {
  LoadDeviceScope on(Device::cpu(), DType::BF16);
  return std::make_unique<Layer>(std::forward<Args>(args)...);
}

}  // namespace

TEST(Bf16, Conv2dComputesOnRoundedInputsAndWeights) {
  SKIP_WITHOUT_CPU_BF16();
  struct Case { int c, o, k, stride, pad, groups; };
  for (Case cs : {Case{32, 48, 3, 1, 1, 1}, Case{3, 16, 7, 2, 3, 1}, Case{64, 64, 7, 1, 3, 64}, Case{96, 40, 1, 1, 0, 1}}) {
    Tensor x = randn({2, 13, 11, cs.c}, 11);
    Tensor w = randn({cs.o, cs.c / cs.groups, cs.k, cs.k}, 12, 0.2f);
    Tensor b = randn({cs.o}, 13);
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = cs.stride;
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = cs.pad;
    opt.groups = cs.groups;
    auto conv = bf16_layer<Conv2d>(w, b, opt);
    Tensor ours = conv->forward(x);
    Tensor ref, mag;
    conv_definition(rounded(x), rounded(w), b, cs.stride, cs.pad, cs.groups, ref, mag);
    expect_within_accumulation(ours, ref, mag, ("conv k=" + std::to_string(cs.k)).c_str());
    // It did round: the float32 definition is further away than accumulation error allows.
    Tensor exact, unused;
    conv_definition(x, w, b, cs.stride, cs.pad, cs.groups, exact, unused);
    EXPECT_GT(max_abs_diff(ours, exact), 10 * max_abs_diff(ours, ref)) << "k=" << cs.k;
  }
}

TEST(Bf16, Conv2dResidualAndActivationStayFloat32) {
  SKIP_WITHOUT_CPU_BF16();
  Tensor x = randn({1, 9, 8, 24}, 21);
  Tensor w = randn({16, 24, 3, 3}, 22, 0.2f);
  Tensor b = randn({16}, 23);
  Tensor r = randn({1, 9, 8, 16}, 24);
  Conv2dOptions opt;
  opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = 1;
  opt.act = Act::Relu;
  auto conv = bf16_layer<Conv2d>(w, b, opt);
  Tensor ours = conv->forward(x, &r);
  // The residual (not rounded) joins the float32 sum, then ReLU.
  Tensor ref, mag;
  conv_residual_relu_definition(x, w, b, 1, r, ref, mag);
  expect_within_accumulation(ours, ref, mag, "conv + residual + relu");
}

// forward_to_layer with a residual (the DETR family's ResNet blocks in bfloat16): the residual is
// read rounded to bfloat16, joins the float32 sum, ReLU, and the result is rounded once to bfloat16.
TEST(Bf16, Conv2dToLayerWithResidualRoundsTheSumOnce) {
  SKIP_WITHOUT_CPU_BF16();
  Tensor x = randn({1, 9, 8, 24}, 41), w = randn({16, 24, 1, 1}, 42, 0.2f), b = randn({16}, 43);
  Tensor r = randn({1, 9, 8, 16}, 44);
  Conv2dOptions opt;
  opt.act = Act::Relu;
  auto conv = bf16_layer<Conv2d>(w, b, opt);
  ASSERT_EQ(conv->input_dtype(), DType::BF16);
  Tensor ref, mag;
  conv_residual_relu_definition(x, w, b, 0, rounded(r), ref, mag);
  // A float32 residual (rounded on the way in) and a bfloat16 one (the previous block's output)
  // give the same.
  for (bool residual_bf16 : {false, true}) {
    SCOPED_TRACE(residual_bf16 ? "bf16 residual" : "f32 residual");
    Tensor ours = conv->forward_to_layer(x, residual_bf16 ? r.to(DType::BF16) : r.clone());
    ASSERT_EQ(ours.dtype(), DType::BF16);
    expect_one_rounding(ours, ref, mag);
  }
}

// Tensor::to between float32 and bfloat16: nearest even (ties to the even neighbour, carries into
// the exponent), exact back.
TEST(Bf16, TensorConversionRoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even is 1. 1 + 3 * 2^-8: halfway, even is 1 + 2^-6.
  // Just below 2 rounds up into the exponent. -3.3 has an inexact tail.
  const std::vector<float> v = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 2.0f - 0x1p-20f, -3.3f, 0.0f};
  const std::vector<float> want = {1.0f, 1.0f + 0x1p-6f, 2.0f, -3.296875f, 0.0f};
  Tensor t = Tensor::from<float>({5}, {v[0], v[1], v[2], v[3], v[4]});
  Tensor back = t.to(DType::BF16).to(DType::F32);
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(back.f32()[i], want[i]) << v[i];
  // Large enough for the parallel blocks: every element as the scalar rounding gives it.
  Tensor big = randn({300001}, 45);
  Tensor big_back = big.to(DType::BF16).to(DType::F32);
  int64_t bad = 0;
  for (int64_t i = 0; i < big.numel(); ++i) bad += big_back.f32()[i] != round_bf16(big.f32()[i]);
  EXPECT_EQ(bad, 0);
}

TEST(Bf16, LinearComputesOnRoundedInputsAndWeights) {
  SKIP_WITHOUT_CPU_BF16();
  for (int64_t rows : {1, 7, 130}) {
    Tensor x = randn({rows, 200}, 31);
    Tensor w = randn({72, 200}, 32, 0.1f);
    Tensor b = randn({72}, 33);
    Tensor res = randn({rows, 72}, 34);
    auto lin = bf16_layer<Linear>(w, b);
    Tensor plain = lin->forward(x), summed = lin->forward(x, &res);
    const Tensor xr = rounded(x), wr = rounded(w);
    Tensor ref = Tensor::empty({rows, 72}), mag = Tensor::empty({rows, 72});
    Tensor ref_sum = Tensor::empty({rows, 72}), mag_sum = Tensor::empty({rows, 72});
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t o = 0; o < 72; ++o) {
        double acc = b.f32()[o], m = std::fabs(b.f32()[o]);
        for (int64_t k = 0; k < 200; ++k) {
          const double t = double(xr.f32()[i * 200 + k]) * wr.f32()[o * 200 + k];
          acc += t;
          m += std::fabs(t);
        }
        ref.f32()[i * 72 + o] = float(acc);
        mag.f32()[i * 72 + o] = float(m);
        ref_sum.f32()[i * 72 + o] = float(acc + res.f32()[i * 72 + o]);
        mag_sum.f32()[i * 72 + o] = float(m + std::fabs(res.f32()[i * 72 + o]));
      }
    expect_within_accumulation(plain, ref, mag, "linear");
    expect_within_accumulation(summed, ref_sum, mag_sum, "linear + residual");
    // Rounded: the float32 product is further away.
    Tensor exact = Tensor::empty({rows, 72});
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t o = 0; o < 72; ++o) {
        double acc = b.f32()[o];
        for (int64_t k = 0; k < 200; ++k) acc += double(x.f32()[i * 200 + k]) * w.f32()[o * 200 + k];
        exact.f32()[i * 72 + o] = float(acc);
      }
    EXPECT_GT(max_abs_diff(plain, exact), 10 * max_abs_diff(plain, ref)) << rows << " rows";
  }
}

// A bfloat16 Linear's residual sum for a bfloat16 residual stream (ConvNeXt's pwconv2): x W^T + b +
// residual accumulated in float32 and rounded to bfloat16 once, from the definition on rounded x, W
// and residual. A float32 residual gives the same (rounded on the way in); a bfloat16 one that
// nothing else holds takes the sum in its own storage.
TEST(Bf16, LinearToLayerWithResidualRoundsTheSumOnce) {
  SKIP_WITHOUT_CPU_BF16();
  const int64_t rows = 37, in = 96, out = 40;
  Tensor x = randn({rows, in}, 51), w = randn({out, in}, 52, 0.1f), b = randn({out}, 53), r = randn({rows, out}, 54);
  auto lin = bf16_layer<Linear>(w, b);
  ASSERT_EQ(lin->input_dtype(), DType::BF16);
  const Tensor xr = rounded(x), wr = rounded(w), rr = rounded(r);
  Tensor ref = Tensor::empty({rows, out}), mag = Tensor::empty({rows, out});
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t o = 0; o < out; ++o) {
      double acc = double(b.f32()[o]) + rr.f32()[i * out + o], m = std::fabs(acc);
      for (int64_t k = 0; k < in; ++k) {
        const double t = double(xr.f32()[i * in + k]) * wr.f32()[o * in + k];
        acc += t;
        m += std::fabs(t);
      }
      ref.f32()[i * out + o] = float(acc);
      mag.f32()[i * out + o] = float(m);
    }
  for (bool residual_bf16 : {false, true}) {
    SCOPED_TRACE(residual_bf16 ? "bf16 residual" : "f32 residual");
    Tensor residual = residual_bf16 ? r.to(DType::BF16) : r.clone();
    const void* storage = residual.raw();
    Tensor ours = lin->forward_to_layer(x, std::move(residual));
    ASSERT_EQ(ours.dtype(), DType::BF16);
    if (residual_bf16) {
      EXPECT_EQ(ours.raw(), storage);
    }
    expect_one_rounding(ours, ref, mag);
  }
}

// layer_norm reads a bfloat16 residual stream as the float32 values it holds: the definition in
// double on those values, to float32 accuracy.
TEST(Bf16, LayerNormReadsBf16AsItsValues) {
  const int64_t rows = 13, c = 96;
  Tensor x = rounded(randn({rows, c}, 55)), g = randn({c}, 56), b = randn({c}, 57);
  Tensor ours = layer_norm(x.to(DType::BF16), g, b, 1e-6f);
  ASSERT_EQ(ours.dtype(), DType::F32);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < c; ++i) mean += x.f32()[r * c + i] / double(c);
    for (int64_t i = 0; i < c; ++i) var += (x.f32()[r * c + i] - mean) * (x.f32()[r * c + i] - mean) / double(c);
    for (int64_t i = 0; i < c; ++i) {
      const double want = (x.f32()[r * c + i] - mean) / std::sqrt(var + 1e-6) * g.f32()[i] + b.f32()[i];
      worst = std::max(worst, std::fabs(ours.f32()[r * c + i] - want));
    }
  }
  EXPECT_LT(worst, 2e-5);
}

TEST(Bf16, CpuRefusesFloat16AndUnknownDtypes) {
  EXPECT_THROW(check_compute_dtype(Device::cpu(), DType::F16), Error);
  EXPECT_THROW(check_compute_dtype(Device::emulated(), DType::F16), Error);
  EXPECT_THROW(check_compute_dtype(Device::cpu(), DType::I8), Error);
  EXPECT_NO_THROW(check_compute_dtype(Device::cpu(), DType::F32));
  EXPECT_THROW(LoadDeviceScope(Device::cpu(), DType::F16), Error);
}

// The CLI says up front (usage error 64) when the machine cannot compute in the dtype asked for.
TEST(Bf16, CliRefusesADtypeTheCpuLacks) {
  const std::string scratch = test::temp_dir("bf16_cli_refuse");
  const std::string c = test::golden_case("bit-tiny-bottleneck-same");
  test::CommandResult r = test::run_vf({"check", c, "--images", test::images_dir(), "--dtype", "float16"}, scratch);
  EXPECT_EQ(r.rc, 64) << r.out << r.err;
  EXPECT_HAS(r.err, "float16 is not offered on the CPU");
  r = test::run_vf({"check", c, "--images", test::images_dir(), "--dtype", "int8"}, scratch);
  EXPECT_EQ(r.rc, 64) << r.out << r.err;
  // A CPU without AVX512-BF16, as oneDNN sees it when limited to AVX2 (the child inherits the variable).
  ::setenv("DNNL_MAX_CPU_ISA", "AVX2", 1);
  r = test::run_vf({"check", c, "--images", test::images_dir(), "--dtype", "bfloat16"}, scratch);
  ::unsetenv("DNNL_MAX_CPU_ISA");
  EXPECT_EQ(r.rc, 64) << r.out << r.err;
  EXPECT_HAS(r.err, "needs AVX512-BF16 or AMX");
}

// `vf check --dtype bfloat16` judges by the reduced-precision criteria: vendored classification and
// detection cases pass; a reference whose top-1 class is moved makes it fail.
TEST(Bf16, CheckPassesVendoredCasesByTheReducedPrecisionCriteria) {
  SKIP_WITHOUT_CPU_BF16();
  const std::string scratch = test::temp_dir("bf16_check");
  for (const char* name : {"bit-tiny-bottleneck-same", "conditional-detr-tiny-det", "deformable-detr-tiny-det"}) {
    test::CommandResult r =
        test::run_vf({"check", test::golden_case(name), "--images", test::images_dir(), "--dtype", "bfloat16"}, scratch);
    EXPECT_EQ(r.rc, 0) << name << "\n" << r.out << r.err;
    EXPECT_HAS(r.out, "reduced-precision criteria");
    if (std::string(name) == "bit-tiny-bottleneck-same") EXPECT_HAS(r.out, "top-1 1/1 equal");
    else EXPECT_HAS(r.out, "pred_boxes");
  }

  // The same classification case with the reference's best class of image 0 made its worst.
  const std::string src = test::golden_case("bit-tiny-bottleneck-same"), dst = scratch + "/moved-top1";
  fs::remove_all(dst);
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(src)) fs::copy(e.path(), dst / e.path().filename());
  auto tensors = read_safetensors(src + "/expected.safetensors");
  bool moved = false;
  for (auto& [name, t] : tensors) {
    if (name != "logits") continue;
    t = t.clone();
    float* row = t.f32();
    const int64_t classes = t.size(1);
    int64_t best = 0, worst = 0;
    for (int64_t k = 1; k < classes; ++k) {
      if (row[k] > row[best]) best = k;
      if (row[k] < row[worst]) worst = k;
    }
    std::swap(row[best], row[worst]);
    moved = true;
  }
  ASSERT_TRUE(moved);
  write_safetensors(dst + "/expected.safetensors", tensors);
  test::CommandResult r = test::run_vf({"check", dst, "--images", test::images_dir(), "--dtype", "bfloat16"}, scratch);
  EXPECT_EQ(r.rc, 1) << r.out << r.err;
  EXPECT_HAS(r.out, "top-1 0/1 equal");
}

// A layer whose output only another weighted layer reads hands it over in bfloat16: the float32
// result rounded once, which the next layer reads exactly as it would have rounded it itself.
TEST(Bf16, ForwardToLayerHandsOverRoundedBf16) {
  SKIP_WITHOUT_CPU_BF16();
  Tensor x = randn({37, 64}, 41);
  std::unique_ptr<Linear> fc1, fc2, fp32;
  std::unique_ptr<Conv2d> c1, c2;
  Conv2dOptions opt;
  opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = 1;
  opt.act = Act::Relu;
  {
    LoadDeviceScope on(Device::cpu(), DType::BF16);
    fc1 = std::make_unique<Linear>(randn({96, 64}, 42, 0.1f), randn({96}, 43), Act::Gelu);
    fc2 = std::make_unique<Linear>(randn({64, 96}, 44, 0.1f), randn({64}, 45));
    c1 = std::make_unique<Conv2d>(randn({24, 16, 3, 3}, 46, 0.1f), randn({24}, 47), opt);
    c2 = std::make_unique<Conv2d>(randn({8, 24, 3, 3}, 48, 0.1f), randn({8}, 49), opt);
  }
  fp32 = std::make_unique<Linear>(randn({96, 64}, 42, 0.1f), randn({96}, 43), Act::Gelu);
  EXPECT_EQ(fp32->forward_to_layer(x).dtype(), DType::F32);

  auto check_pair = [](const Tensor& handed, const Tensor& f32, const char* what) {
    ASSERT_EQ(handed.dtype(), DType::BF16) << what;
    Tensor h = handed.to(DType::F32);
    ASSERT_EQ(h.shape(), f32.shape());
    int bad = 0;
    for (int64_t i = 0; i < h.numel(); ++i)  // within one bfloat16 step of the float32 result
      if (!(std::fabs(h.f32()[i] - f32.f32()[i]) <= std::ldexp(std::fabs(f32.f32()[i]), -8) + 1e-30) && bad++ < 5)
        ADD_FAILURE() << what << " [" << i << "] " << h.f32()[i] << " vs " << f32.f32()[i];
  };
  Tensor h = fc1->forward_to_layer(x);
  check_pair(h, fc1->forward(x), "linear");
  // The next layer reads the bf16 tensor as it reads the same values in float32.
  EXPECT_EQ(max_abs_diff(fc2->forward(h), fc2->forward(h.to(DType::F32))), 0.0);

  Tensor img = randn({1, 10, 9, 16}, 50);
  Tensor hc = c1->forward_to_layer(img);
  check_pair(hc, c1->forward(img), "conv");
  EXPECT_EQ(max_abs_diff(c2->forward(hc), c2->forward(hc.to(DType::F32))), 0.0);
}

// A group norm whose output only a bfloat16 convolution reads writes it rounded (nearest even, the
// rounding written out above) from its float32 result, activation included; the convolution gives
// what it gives on that float32 result, which it rounds itself.
TEST(Bf16, GroupNormWritesRoundedBf16ForABf16Conv) {
  SKIP_WITHOUT_CPU_BF16();
  Conv2dOptions opt;
  opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = 1;
  auto conv = bf16_layer<Conv2d>(randn({16, 64, 3, 3}, 61, 0.1f), randn({16}, 62), opt);
  EXPECT_EQ(conv->input_dtype(), DType::BF16);
  EXPECT_EQ(Conv2d(randn({16, 64, 3, 3}, 61, 0.1f), randn({16}, 62), opt).input_dtype(), DType::F32);
  // 2 x 300 rows: more than one chunk of the statistics; 64 channels: 4 full vectors; 40: a tail.
  for (int64_t c : {64, 40})
    for (Act a : {Act::Relu, Act::None, Act::Gelu}) {
      Tensor x = randn({2, 20, 15, c}, 63, 3.0f), w = randn({c}, 64), b = randn({c}, 65);
      Tensor f32 = group_norm_nhwc(x, 8, w, b, 1e-5f, a);
      Tensor bf = group_norm_nhwc(x, 8, w, b, 1e-5f, a, DType::BF16);
      expect_rounded_copy(bf, f32, "c=" + std::to_string(c) + " act " + std::to_string(int(a)));
      if (c == 64) {
        EXPECT_EQ(max_abs_diff(conv->forward(bf), conv->forward(f32)), 0.0) << "act " << int(a);
      }
    }
  EXPECT_THROW(group_norm_nhwc(randn({1, 2, 2, 8}, 66), 2, randn({8}, 67), randn({8}, 68), 1e-5f, Act::None, DType::F16),
               Error);
}

// layer_norm's bfloat16 output (ConvNeXt's and DeiT's norms before a linear layer): the float32
// result rounded, and the linear layer gives the same from it as from the float32 result.
TEST(Bf16, LayerNormWritesRoundedBf16ForABf16Linear) {
  SKIP_WITHOUT_CPU_BF16();
  auto lin = bf16_layer<Linear>(randn({24, 200}, 71, 0.1f), randn({24}, 72));
  EXPECT_EQ(lin->input_dtype(), DType::BF16);
  EXPECT_EQ(Linear(randn({24, 200}, 71, 0.1f), randn({24}, 72)).input_dtype(), DType::F32);
  // 200 channels: three blocks of 64 and a tail.
  Tensor x = randn({3, 7, 200}, 73, 3.0f), w = randn({200}, 74), b = randn({200}, 75);
  Tensor f32 = layer_norm(x, w, b, 1e-6f);
  Tensor bf = layer_norm(x, w, b, 1e-6f, DType::BF16);
  expect_rounded_copy(bf, f32, "layer norm");
  EXPECT_EQ(max_abs_diff(lin->forward(bf), lin->forward(f32)), 0.0);
  EXPECT_THROW(layer_norm(x, w, b, 1e-6f, DType::F16), Error);
}

// grn_nhwc's bfloat16 output (ConvNeXt V2's response norm before pwconv2): the float32 result rounded.
// Its bfloat16 input (pwconv1's forward_to_layer) is read as the float32 values it holds: the result
// is that of the same values in float32, bit for bit.
TEST(Bf16, GrnWritesRoundedBf16) {
  // 24 x 30 positions, 200 channels: three blocks of 64 and a tail.
  Tensor x = randn({2, 24, 30, 200}, 81), gamma = randn({200}, 82), beta = randn({200}, 83);
  Tensor f32 = grn_nhwc(x, gamma, beta, 1e-6f);
  expect_rounded_copy(grn_nhwc(x, gamma, beta, 1e-6f, DType::BF16), f32, "grn");
  EXPECT_THROW(grn_nhwc(x, gamma, beta, 1e-6f, DType::F16), Error);
  Tensor xr = rounded(x);
  Tensor from_bf16 = grn_nhwc(xr.to(DType::BF16), gamma, beta, 1e-6f);
  EXPECT_EQ(max_abs_diff(from_bf16, grn_nhwc(xr, gamma, beta, 1e-6f)), 0.0);
  EXPECT_GT(max_abs_diff(from_bf16, f32), 0.0);  // the input was rounded: not the float32 input's result
}

// Attention on bfloat16 Q, K and V (a bfloat16 layer's forward_to_attention): both products in
// bfloat16 with float32 accumulation. Against the definition in double on the same (exact) bfloat16
// values, with the probabilities rounded to bfloat16 before the second product: the scores and the
// probabilities handed back agree to float32 accuracy; the context to one bfloat16 rounding of each
// probability either way (a probability at a rounding boundary may round to the other neighbour).
// 71 query rows make blocks of two sizes (at 1, 2 and 16 threads); 4096 keys of 64 components make
// large products, and a small case (DeiT's size class) small ones: bfloat16 either way. Separate and
// packed operands agree.
TEST(Bf16, AttentionComputesBothProductsOnRoundedOperands) {
  SKIP_WITHOUT_CPU_BF16();
  const int64_t B = 2, Lq = 71, Lk = 4096, H = 3, d = 64, C = H * d;
  const float scale = 0.25f;
  Tensor qf = rounded(randn({B, Lq, C}, 31)), kf = rounded(randn({B, Lk, C}, 32)), vf = rounded(randn({B, Lk, C}, 33));
  // The context of bfloat16 q, k, v against the probabilities of float32 attention on the same
  // (rounded) values, each rounded once to bfloat16 for the second product.
  auto check_context = [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ctx) {
    const int64_t lq = q.size(1), lk = k.size(1);
    Tensor ref_ctx, ref_probs;
    test::plain_attention(q, k, v, H, scale, nullptr, &ref_ctx, &ref_probs);
    int bad = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < lq; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const float* p = ref_probs.f32() + ((b * H + h) * lq + i) * lk;
          for (int64_t c = 0; c < d; ++c) {
            double ref = 0, tol = 1e-6;
            for (int64_t j = 0; j < lk; ++j) {
              const double vj = v.f32()[(b * lk + j) * C + h * d + c];
              ref += double(round_bf16(p[j])) * vj;
              tol += std::ldexp(std::fabs(p[j] * vj), -8);  // one bfloat16 rounding of p[j]
            }
            const float got = ctx.f32()[(b * lq + i) * C + h * d + c];
            if (!(std::fabs(got - ref) <= tol) && bad++ < 5)
              ADD_FAILURE() << "context " << b << "," << i << "," << h * d + c << ": " << got << " vs " << ref << " (tol " << tol << ")";
          }
        }
    EXPECT_EQ(bad, 0);
    return ref_probs;
  };
  Tensor probs;
  AttentionOptions opt;
  opt.scale = scale;
  opt.probs = &probs;
  Tensor ctx = multi_head_attention(qf.to(DType::BF16), kf.to(DType::BF16), vf.to(DType::BF16), H, opt);
  ASSERT_EQ(ctx.dtype(), DType::F32);
  ASSERT_EQ(ctx.shape(), (Shape{B, Lq, C}));
  ASSERT_EQ(probs.shape(), (Shape{B, H, Lq, Lk}));
  EXPECT_LT(max_abs_diff(probs, check_context(qf, kf, vf, ctx)), 1e-6);
  // Without the probabilities handed back the softmax rounds them as it scales them (no float32 pass
  // of its own): the same context, also for rows whose length is not a whole number of vectors.
  AttentionOptions no_probs;
  no_probs.scale = scale;
  EXPECT_EQ(max_abs_diff(multi_head_attention(qf.to(DType::BF16), kf.to(DType::BF16), vf.to(DType::BF16), H, no_probs),
                         ctx),
            0.0);
  {
    const Tensor q16 = qf.to(DType::BF16), k16 = narrow(kf, 1, 0, Lk - 3).to(DType::BF16),
                 v16 = narrow(vf, 1, 0, Lk - 3).to(DType::BF16);
    Tensor tail_probs;
    AttentionOptions with_probs = no_probs;
    with_probs.probs = &tail_probs;
    EXPECT_EQ(max_abs_diff(multi_head_attention(q16, k16, v16, H, no_probs), multi_head_attention(q16, k16, v16, H, with_probs)),
              0.0);
  }
  // Not the float32 computation: the probabilities were rounded.
  AttentionOptions plain;
  plain.scale = scale;
  EXPECT_GT(max_abs_diff(ctx, multi_head_attention(qf, kf, vf, H, plain)), 0.0);

  // Small products (DeiT's size class: 20 queries, 30 keys) in bfloat16 too, not float32's result.
  Tensor qs = narrow(qf, 1, 0, 20), ks = narrow(kf, 1, 0, 30), vs = narrow(vf, 1, 0, 30);
  const Tensor small = multi_head_attention(qs.to(DType::BF16), ks.to(DType::BF16), vs.to(DType::BF16), H, plain);
  check_context(qs, ks, vs, small);
  EXPECT_GT(max_abs_diff(small, multi_head_attention(qs, ks, vs, H, plain)), 0.0);

  // Packed Q | K | V (DeiT's layout) reads the same products in place.
  const int64_t L = 2048;
  Tensor qkv = rounded(randn({B, L, 3 * C}, 34));
  Tensor a = multi_head_attention_packed(qkv.to(DType::BF16), H, plain);
  Tensor sep = multi_head_attention(narrow(qkv, 2, 0, C).to(DType::BF16), narrow(qkv, 2, C, C).to(DType::BF16),
                                    narrow(qkv, 2, 2 * C, C).to(DType::BF16), H, plain);
  EXPECT_EQ(max_abs_diff(a, sep), 0.0);
  EXPECT_GT(max_abs_diff(a, multi_head_attention_packed(qkv, H, plain)), 0.0);  // in bfloat16
}
