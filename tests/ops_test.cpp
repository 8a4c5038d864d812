#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>

#include "core/ops.h"

using namespace vf;

namespace {
Tensor randn(Shape s, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  Tensor t = Tensor::empty(std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(g);
  return t;
}

// Plain NCHW convolution written directly from the definition.
Tensor conv_reference(const Tensor& x_nchw, const Tensor& w, const Tensor& b, int stride, int pad, int dil, int groups) {
  int64_t n = x_nchw.size(0), c = x_nchw.size(1), h = x_nchw.size(2), wd = x_nchw.size(3);
  int64_t o = w.size(0), cg = w.size(1), kh = w.size(2), kw = w.size(3);
  int64_t oh = (h + 2 * pad - dil * (kh - 1) - 1) / stride + 1, ow = (wd + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
  Tensor y = Tensor::zeros({n, o, oh, ow});
  int64_t og = o / groups;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t oc = 0; oc < o; ++oc)
      for (int64_t yy = 0; yy < oh; ++yy)
        for (int64_t xx = 0; xx < ow; ++xx) {
          double acc = b.defined() ? b.f32()[oc] : 0.0;
          int64_t g = oc / og;
          for (int64_t ic = 0; ic < cg; ++ic)
            for (int64_t ky = 0; ky < kh; ++ky)
              for (int64_t kx = 0; kx < kw; ++kx) {
                int64_t iy = yy * stride - pad + ky * dil, ix = xx * stride - pad + kx * dil;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                acc += double(x_nchw.f32()[((i * c + g * cg + ic) * h + iy) * wd + ix]) *
                       w.f32()[((oc * cg + ic) * kh + ky) * kw + kx];
              }
          y.f32()[((i * o + oc) * oh + yy) * ow + xx] = float(acc);
        }
  return y;
}
}  // namespace

TEST(Ops, Conv2dMatchesDefinition) {
  struct Case { int c, o, k, stride, pad, dil, groups; };
  for (Case cs : {Case{3, 8, 3, 2, 1, 1, 1}, Case{8, 8, 7, 1, 3, 1, 8}, Case{4, 6, 3, 1, 2, 2, 2}, Case{5, 7, 1, 1, 0, 1, 1}}) {
    Tensor x = randn({2, cs.c, 11, 9}, 1);
    Tensor w = randn({cs.o, cs.c / cs.groups, cs.k, cs.k}, 2);
    Tensor b = randn({cs.o}, 3);
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = cs.stride;
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = cs.pad;
    opt.dilation_h = opt.dilation_w = cs.dil;
    opt.groups = cs.groups;
    Conv2d conv(w, b, opt);
    Tensor ours = nhwc_to_nchw(conv.forward(nchw_to_nhwc(x)));
    Tensor ref = conv_reference(x, w, b, cs.stride, cs.pad, cs.dil, cs.groups);
    ASSERT_EQ(ours.shape(), ref.shape());
    EXPECT_LT(max_abs_diff(ours, ref), 1e-4) << "k=" << cs.k << " groups=" << cs.groups;
  }
}

// 3x3 stride-1 convolutions with channels in multiples of 16 (on NHWC maps, in * out >= 2048) run as
// Winograd; one layer meets maps of several sizes (each may want its own Winograd weight layout, made
// from the direct one).
TEST(Ops, Conv2dWinogradMatchesDefinition) {
  const int64_t C = 48, O = 64;
  Tensor w = randn({O, C, 3, 3}, 21);
  Tensor b = randn({O}, 22);
  for (Act a : {Act::None, Act::Relu}) {
    Conv2dOptions opt;
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = 1;
    opt.act = a;
    Conv2d conv(w, b, opt);
    for (auto [h, wd] : {std::pair<int64_t, int64_t>{7, 9}, {40, 37}, {13, 64}, {7, 9}}) {
      Tensor x = randn({1, C, h, wd}, 23 + uint32_t(h));
      Tensor ours = nhwc_to_nchw(conv.forward(nchw_to_nhwc(x)));
      Tensor ref = conv_reference(x, w, b, 1, 1, 1, 1);
      if (a == Act::Relu) ref = act(ref, Act::Relu);
      ASSERT_EQ(ours.shape(), ref.shape());
      double scale = 0;
      for (int64_t i = 0; i < ref.numel(); ++i) scale = std::max(scale, double(std::fabs(ref.f32()[i])));
      ASSERT_GT(scale, 1.0);
      EXPECT_LT(max_abs_diff(ours, ref), 2e-6 * scale) << h << "x" << wd;
    }
  }
}

// One output channel runs vf's own kernel (a dot product per pixel): against the definition with
// channel counts around its 16-float vector (a remainder, exact multiples, more than one vector a
// tap), strides, padding on every side, a batch, and the residual then activation.
TEST(Ops, Conv2dOneOutputChannelMatchesDefinition) {
  struct Case { int c, k, stride, pad; };
  for (Case cs : {Case{16, 3, 1, 1}, Case{5, 3, 1, 1}, Case{20, 3, 2, 1}, Case{32, 1, 1, 0}, Case{3, 5, 2, 2}}) {
    SCOPED_TRACE("c=" + std::to_string(cs.c) + " k=" + std::to_string(cs.k) + " stride=" + std::to_string(cs.stride));
    Tensor x = randn({2, cs.c, 13, 10}, 31);
    Tensor w = randn({1, cs.c, cs.k, cs.k}, 32);
    Tensor b = randn({1}, 33);
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = cs.stride;
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = cs.pad;
    Conv2d conv(w, b, opt);
    Tensor ours = nhwc_to_nchw(conv.forward(nchw_to_nhwc(x)));
    Tensor ref = conv_reference(x, w, b, cs.stride, cs.pad, 1, 1);
    ASSERT_EQ(ours.shape(), ref.shape());
    EXPECT_LT(max_abs_diff(ours, ref), 1e-4);

    opt.act = Act::Relu;
    Tensor r = randn(Shape{2, ref.size(2), ref.size(3), 1}, 34);
    Tensor fused = Conv2d(w, b, opt).forward(nchw_to_nhwc(x), &r);
    Tensor expect = act(add(nchw_to_nhwc(ref), r), Act::Relu);
    EXPECT_LT(max_abs_diff(fused, expect), 1e-4);
    int64_t zeros = 0;
    for (int64_t i = 0; i < expect.numel(); ++i) zeros += expect.f32()[i] == 0.f;
    EXPECT_GT(zeros, 0);  // the ReLU cut something
  }
}

TEST(Ops, Conv2dFusesResidualThenActivation) {
  Tensor x = randn({1, 5, 5, 4}, 4), w = randn({4, 4, 1, 1}, 5), r = randn({1, 5, 5, 4}, 6);
  Conv2dOptions opt;
  opt.act = Act::Relu;
  Tensor plain = Conv2d(w, Tensor(), Conv2dOptions{}).forward(x);
  Tensor fused = Conv2d(w, Tensor(), opt).forward(x, &r);
  Tensor expect = act(add(plain, r), Act::Relu);
  EXPECT_LT(max_abs_diff(fused, expect), 1e-5);
}

// ConvNeXt V2's global response norm against its definition, on maps of one and of several of its
// 256-row chunks, and on few rows of many channels (split into channel slices, more of them at more
// threads): the same result, bit for bit, at 1 and 16 threads.
TEST(Ops, GrnMatchesDefinition) {
  for (auto [h, w, c] : {std::tuple<int64_t, int64_t, int64_t>{5, 7, 24}, {30, 41, 24}, {7, 7, 200}}) {
    const int64_t n = 2;
    Tensor x = randn({n, h, w, c}, 51), gamma = randn({c}, 52), beta = randn({c}, 53);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(16);
    Tensor y = grn_nhwc(x, gamma, beta, 1e-6f);
    omp_set_num_threads(1);
    Tensor y1 = grn_nhwc(x, gamma, beta, 1e-6f);
    omp_set_num_threads(threads);
    EXPECT_EQ(max_abs_diff(y, y1), 0.0) << h << "x" << w << "x" << c;
    ASSERT_EQ(y.shape(), x.shape());
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> gx(c, 0.0);
      double mean = 0;
      for (int64_t k = 0; k < c; ++k) {
        for (int64_t p = 0; p < h * w; ++p) gx[k] += std::pow(double(x.f32()[(i * h * w + p) * c + k]), 2);
        gx[k] = std::sqrt(gx[k]);
        mean += gx[k] / c;
      }
      for (int64_t p = 0; p < h * w; ++p)
        for (int64_t k = 0; k < c; ++k) {
          const int64_t at = (i * h * w + p) * c + k;
          const double v = x.f32()[at], nx = gx[k] / (mean + 1e-6);
          worst = std::max(worst, std::fabs(y.f32()[at] - (gamma.f32()[k] * v * nx + beta.f32()[k] + v)));
        }
    }
    EXPECT_LT(worst, 1e-5) << h << "x" << w << "x" << c;
  }
}

// A layer keeps the oneDNN memory objects of its calls and lends a set to each call: calls running on
// one layer at once (a server's workers sharing a model) each get their own. Each thread's inputs
// differ, so a call that computed on another's buffers would not give its input's result. Float32
// inputs to a bfloat16 layer take the source conversion as well.
TEST(Ops, LayersCalledFromSeveralThreadsAtOnceGiveEachCallItsResult) {
  for (DType compute : {DType::F32, DType::BF16}) {
    LoadDeviceScope scope(Device::cpu(), compute);
    const Linear fc(scale(randn({32, 48}, 80), 0.1f), randn({32}, 81), Act::Gelu);
    Conv2dOptions o;
    o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = 1;
    const Conv2d conv(scale(randn({8, 6, 3, 3}, 82), 0.1f), randn({8}, 83), o);
    constexpr int kThreads = 4;
    std::vector<Tensor> xs, maps, residuals, want_fc, want_conv;
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    for (int t = 0; t < kThreads; ++t) {
      xs.push_back(randn({5, 48}, 90 + t));
      residuals.push_back(randn({5, 32}, 95 + t));
      maps.push_back(randn({1, 7, 9, 6}, 100 + t));
      want_fc.push_back(fc.forward(xs[t], &residuals[t]));
      want_conv.push_back(conv.forward(maps[t]));
    }
    omp_set_num_threads(threads);
    std::vector<int> wrong(kThreads, 0);
    std::vector<std::thread> workers;
    for (int t = 0; t < kThreads; ++t)
      workers.emplace_back([&, t] {
        omp_set_num_threads(1);
        for (int i = 0; i < 300; ++i) {
          if (max_abs_diff(fc.forward(xs[t], &residuals[t]), want_fc[t]) != 0.0) ++wrong[t];
          if (max_abs_diff(conv.forward(maps[t]), want_conv[t]) != 0.0) ++wrong[t];
        }
      });
    for (auto& w : workers) w.join();
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[t], 0) << dtype_name(compute) << " thread " << t;
    // The inputs differ enough that the results do (the comparison above can tell the calls apart).
    EXPECT_GT(max_abs_diff(want_fc[0], want_fc[1]), 0.1);
    EXPECT_GT(max_abs_diff(want_conv[0], want_conv[1]), 0.1);
  }
}

TEST(Ops, LinearAndMatmul) {
  Tensor x = randn({2, 3, 16}, 7), w = randn({10, 16}, 8), b = randn({10}, 9);
  Tensor y = Linear(w, b).forward(x);
  ASSERT_EQ(y.shape(), (Shape{2, 3, 10}));
  for (int r = 0; r < 6; ++r)
    for (int o = 0; o < 10; ++o) {
      double acc = b.f32()[o];
      for (int k = 0; k < 16; ++k) acc += double(x.f32()[r * 16 + k]) * w.f32()[o * 16 + k];
      EXPECT_NEAR(y.f32()[r * 10 + o], acc, 1e-4);
    }
  Tensor bt = randn({2, 10, 16}, 10);
  Tensor m = matmul(x, bt, /*trans_b=*/true, 0.5f);
  ASSERT_EQ(m.shape(), (Shape{2, 3, 10}));
  // Batch 1, row 1, column 4.
  double acc = 0;
  for (int k = 0; k < 16; ++k) acc += double(x.f32()[(3 + 1) * 16 + k]) * bt.f32()[(10 + 4) * 16 + k];
  EXPECT_NEAR(m.f32()[(3 + 1) * 10 + 4], 0.5 * acc, 1e-4);
}

// A residual handed over (moved) with no other owner takes the sum in its own storage; one that
// another tensor still shares is copied first and left as it was. Both against the definition.
TEST(Ops, LinearResidualAccumulatesInPlaceOnlyWhenHandedOver) {
  Tensor x = randn({5, 16}, 12), w = randn({8, 16}, 13), b = randn({8}, 14);
  Linear linear(w, b);
  Tensor r = randn({5, 8}, 15);
  const Tensor r_copy = r.clone();
  auto expected = [&](int row, int o) {
    double acc = b.f32()[o] + double(r_copy.f32()[row * 8 + o]);
    for (int k = 0; k < 16; ++k) acc += double(x.f32()[row * 16 + k]) * w.f32()[o * 16 + k];
    return acc;
  };
  Tensor y1;
  {
    Tensor shared = r;  // r still holds the storage: copied, r unchanged
    y1 = linear.forward(x, std::move(shared));
  }
  EXPECT_NE(y1.raw(), r.raw());
  EXPECT_EQ(max_abs_diff(r, r_copy), 0.0);
  const void* storage = r.raw();
  Tensor y2 = linear.forward(x, std::move(r));  // sole owner: in place
  EXPECT_EQ(y2.raw(), storage);
  for (int row = 0; row < 5; ++row)
    for (int o = 0; o < 8; ++o) {
      EXPECT_NEAR(y1.f32()[row * 8 + o], expected(row, o), 1e-4);
      EXPECT_NEAR(y2.f32()[row * 8 + o], expected(row, o), 1e-4);
    }
}

// cat, narrow and clone of tensors large enough to be copied across threads (in 64 KB pieces, the
// last one short): every element lands where the definition puts it.
TEST(Ops, LargeCatNarrowAndCloneCopyEveryElement) {
  const int64_t B = 3, L = 40007, C = 3;  // 1.4 MB
  Tensor x = randn({B, L, C}, 60), cls = randn({B, 1, C}, 61);
  Tensor joined = cat({cls, x}, 1);
  ASSERT_EQ(joined.shape(), (Shape{B, L + 1, C}));
  Tensor tail = narrow(joined, 1, 1, L), head = narrow(joined, 1, 0, 1), copy = joined.clone();
  int64_t wrong = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      wrong += joined.f32()[(b * (L + 1)) * C + c] != cls.f32()[b * C + c];
      wrong += head.f32()[b * C + c] != cls.f32()[b * C + c];
      for (int64_t t = 0; t < L; ++t) {
        const float want = x.f32()[(b * L + t) * C + c];
        wrong += joined.f32()[(b * (L + 1) + 1 + t) * C + c] != want;
        wrong += tail.f32()[(b * L + t) * C + c] != want;
        wrong += copy.f32()[(b * (L + 1) + 1 + t) * C + c] != want;
      }
    }
  EXPECT_EQ(wrong, 0);
  EXPECT_NE(copy.raw(), joined.raw());
}

// narrow of a batch of one is a view (its range is contiguous): the same values, no copy, and the
// source stays shared, so ops that write in place do not write into it. Of a batch of two, a copy.
TEST(Ops, NarrowOfOneImageIsAViewOfItsRange) {
  Tensor x = randn({1, 5, 4}, 70);
  Tensor tail = narrow(x, 1, 2, 3);
  ASSERT_EQ(tail.shape(), (Shape{1, 3, 4}));
  EXPECT_EQ(tail.raw(), static_cast<const void*>(x.f32() + 2 * 4));
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(tail.f32()[i], x.f32()[8 + i]);
  EXPECT_FALSE(tail.sole_owner());
  Tensor pair = randn({2, 5, 4}, 71);
  Tensor second = narrow(pair, 1, 2, 3);
  EXPECT_TRUE(second.sole_owner());
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(second.f32()[b * 12 + i], pair.f32()[b * 20 + 8 + i]);
}

// Every element against the definition in double, at widths with and without a part past the last
// whole 16-lane vector.
TEST(Ops, LayerNormMatchesDefinition) {
  for (int64_t c : {5, 16, 40, 200}) {
    const int64_t rows = 7;
    Tensor x = randn({rows, c}, 61), w = randn({c}, 62), b = randn({c}, 63);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = 3.0f + 2.0f * x.f32()[i];  // a mean far from 0
    Tensor y = layer_norm(x, w, b, 1e-5f);
    ASSERT_EQ(y.shape(), x.shape());
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* in = x.f32() + r * c;
      double mean = 0, var = 0;
      for (int64_t k = 0; k < c; ++k) mean += in[k];
      mean /= double(c);
      for (int64_t k = 0; k < c; ++k) var += (in[k] - mean) * (in[k] - mean);
      var /= double(c);
      for (int64_t k = 0; k < c; ++k) {
        const double want = (in[k] - mean) / std::sqrt(var + 1e-5) * w.f32()[k] + b.f32()[k];
        worst = std::max(worst, std::fabs(y.f32()[r * c + k] - want));
      }
    }
    EXPECT_LT(worst, 1e-5) << c;
  }
}

TEST(Ops, LayerNormAndSoftmax) {
  Tensor x = randn({4, 32}, 11);
  Tensor y = layer_norm(x, Tensor::full({32}, 2.0f), Tensor::full({32}, 1.0f), 1e-6f);
  double mean = 0, var = 0;
  for (int i = 0; i < 32; ++i) mean += y.f32()[32 + i];
  mean /= 32;
  for (int i = 0; i < 32; ++i) var += (y.f32()[32 + i] - mean) * (y.f32()[32 + i] - mean);
  EXPECT_NEAR(mean, 1.0, 1e-5);
  EXPECT_NEAR(var / 32, 4.0, 1e-3);
  softmax_lastdim_inplace(x);
  double s = 0;
  for (int i = 0; i < 32; ++i) s += x.f32()[i];
  EXPECT_NEAR(s, 1.0, 1e-5);
}

// A batch gives each image exactly what it gives alone (the server batches requests and answers what
// the CLI prints for one image): strided 1x1 convolutions (ResNet's shortcuts), whose kernel is chosen
// by kind, the same for every batch size, and a 3x3 one.
TEST(Ops, ConvolutionOfABatchEqualsEachImageAlone) {
  struct Case { int64_t in, out, h, w; int k, stride, pad; };
  for (const Case& c : {Case{256, 512, 50, 67, 1, 2, 0}, Case{64, 128, 40, 36, 1, 2, 0}, Case{32, 32, 21, 17, 3, 1, 1}}) {
    Conv2dOptions o;
    o.stride_h = o.stride_w = c.stride;
    o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = c.pad;
    Conv2d conv(scale(randn({c.out, c.in, c.k, c.k}, 40), 0.05f), randn({c.out}, 41), o);
    Tensor x = randn({3, c.h, c.w, c.in}, 42);
    Tensor all = conv.forward(x);
    for (int64_t i = 0; i < 3; ++i) {
      Tensor one = conv.forward(x.slice0(i, i + 1));
      EXPECT_EQ(max_abs_diff(one, all.slice0(i, i + 1)), 0.0) << "image " << i << ", " << c.k << "x" << c.k;
    }
  }
}

TEST(Ops, PermuteCatNarrowRoundTrip) {
  Tensor x = randn({2, 3, 4, 5}, 12);
  Tensor back = nhwc_to_nchw(nchw_to_nhwc(x));
  EXPECT_EQ(max_abs_diff(back, x), 0.0);
  EXPECT_FLOAT_EQ(nchw_to_nhwc(x).f32()[1], x.f32()[4 * 5]);  // (0,0,0,1) <- (0,1,0,0)
  Tensor c = cat({narrow(x, 1, 0, 1), narrow(x, 1, 1, 2)}, 1);
  EXPECT_EQ(max_abs_diff(c, x), 0.0);
}

// y[b, k] = x[b, idx[b, k]] by hand, on the host and on the emulated device (whose op runs the
// device path: the indices go with the call, the rows stay on the device); bad indices are refused.
TEST(Ops, GatherRowsPicksWholeRowsPerImage) {
  Tensor x = Tensor::empty({2, 4, 3});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = float(i);
  Tensor idx = Tensor::from_vector<int64_t>({2, 3}, {3, 0, 3, 1, 2, 1});
  for (const Device d : {Device::cpu(), Device::emulated()}) {
    Tensor y = gather_rows(x.to(d), idx);
    ASSERT_EQ(y.device(), d);
    ASSERT_EQ(y.shape(), (Shape{2, 3, 3}));
    const std::vector<float> want = {9, 10, 11, 0, 1, 2, 9, 10, 11, 15, 16, 17, 18, 19, 20, 15, 16, 17};
    Tensor h = y.cpu();
    for (int64_t i = 0; i < 18; ++i) EXPECT_EQ(h.f32()[i], want[i]) << i;
  }
  EXPECT_THROW(gather_rows(x, Tensor::from_vector<int64_t>({2, 1}, {4, 0})), Error);
  EXPECT_THROW(gather_rows(x, Tensor::from_vector<int64_t>({2, 1}, {0, -1})), Error);
  EXPECT_THROW(gather_rows(x, Tensor::from_vector<int64_t>({1, 1}, {0})), Error);
}

// torch.topk's order: NaN above every number, equal values by index, k clamped to n; and the same
// as sorting everything on random values with many ties.
TEST(Ops, TopKIndicesOrdersLikeTorch) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> v = {1.f, nan, 3.f, 3.f, -INFINITY, nan, 2.f};
  EXPECT_EQ(topk_indices(v.data(), 7, 4), (std::vector<int64_t>{1, 5, 2, 3}));
  EXPECT_EQ(topk_indices(v.data(), 7, 9), (std::vector<int64_t>{1, 5, 2, 3, 6, 0, 4}));
  EXPECT_TRUE(topk_indices(v.data(), 7, 0).empty());
  std::vector<float> r(5000);
  for (size_t i = 0; i < r.size(); ++i) r[i] = float((i * 7919) % 613) * 0.25f;  // ~8 copies of each value
  std::vector<int64_t> all(r.size());
  std::iota(all.begin(), all.end(), int64_t{0});
  std::stable_sort(all.begin(), all.end(), [&](int64_t a, int64_t b) { return r[a] > r[b]; });
  all.resize(1000);
  EXPECT_EQ(topk_indices(r.data(), int64_t(r.size()), 1000), all);
}

// Every element against y[i0..] = x[i_perm...], for permutations that are batched transposes (few
// rows, few columns, tiles with partial edges, size-1 dims in between) and ones that are not.
TEST(Ops, PermuteMatchesItsDefinition) {
  struct Case { Shape shape; std::vector<int> perm; };
  for (const Case& cs : {Case{{2, 3, 7, 9}, {0, 2, 3, 1}}, Case{{1, 5, 6, 3}, {0, 3, 1, 2}}, Case{{2, 37, 19}, {0, 2, 1}},
                         Case{{1, 2, 50, 1, 3}, {0, 4, 3, 2, 1}}, Case{{40, 33}, {1, 0}}, Case{{3, 4, 5, 6}, {2, 0, 3, 1}},
                         Case{{4, 1, 18, 2}, {2, 1, 0, 3}}, Case{{2, 1, 5, 3}, {0, 3, 1, 2}},
                         Case{{3, 2, 70}, {0, 2, 1}}, Case{{2, 3, 4}, {0, 1, 2}}}) {
    Tensor x = randn(cs.shape, 31);
    Tensor y = permute(x, cs.perm);
    const int64_t d = x.dim();
    ASSERT_EQ(y.dim(), d);
    for (int64_t i = 0; i < d; ++i) ASSERT_EQ(y.size(i), x.size(cs.perm[i]));
    std::vector<int64_t> stride(d, 1);
    for (int64_t i = d - 2; i >= 0; --i) stride[i] = stride[i + 1] * x.size(i + 1);
    int bad = 0;
    for (int64_t o = 0; o < y.numel(); ++o) {
      int64_t rem = o, src = 0;
      for (int64_t i = d - 1; i >= 0; --i) {
        src += (rem % y.size(i)) * stride[cs.perm[i]];
        rem /= y.size(i);
      }
      if (y.f32()[o] != x.f32()[src]) ++bad;
    }
    EXPECT_EQ(bad, 0) << shape_str(cs.shape);
  }
}

TEST(Ops, BilinearMatchesTorchHalfPixelRule) {
  // 1x1x1x2 -> 1x1x1x4: sources -0.25 (clamped 0), 0.25, 0.75, 1.25 (i1 clamps): [a, .75a+.25b, .25a+.75b, b]
  Tensor x = Tensor::from<float>({1, 1, 1, 2}, {1.0f, 5.0f});
  Tensor y = interpolate_bilinear(x, 1, 4);
  EXPECT_FLOAT_EQ(y.f32()[0], 1.0f);
  EXPECT_FLOAT_EQ(y.f32()[1], 2.0f);
  EXPECT_FLOAT_EQ(y.f32()[2], 4.0f);
  EXPECT_FLOAT_EQ(y.f32()[3], 5.0f);
}

TEST(Ops, GroupNormNormalisesEachGroup) {
  Tensor x = randn({1, 3, 3, 4}, 13);
  Tensor y = group_norm_nhwc(x, 2, Tensor::full({4}, 1.f), Tensor::zeros({4}), 1e-5f);
  double s = 0;
  for (int p = 0; p < 9; ++p) s += y.f32()[p * 4] + y.f32()[p * 4 + 1];
  EXPECT_NEAR(s, 0.0, 1e-4);
}

// Against the definition in double precision, over a map of several hundred positions (the sums run
// in chunks of rows) with channels in groups of two, and of 25 over several slices of 64 channels
// with a remainder of 8 (the sums also split by channels), an affine and a fused ReLU.
TEST(Ops, GroupNormMatchesDefinition) {
  for (auto [C, G] : {std::pair<int64_t, int64_t>{64, 32}, {200, 8}}) {
    SCOPED_TRACE("C=" + std::to_string(C));
    const int64_t H = 23, W = 29, cg = C / G;
    Tensor x = randn({1, H, W, C}, 31), w = randn({C}, 32), b = randn({C}, 33);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = 3.0f + 2.0f * x.f32()[i];  // off-centre
    for (Act a : {Act::None, Act::Relu}) {
      Tensor y = group_norm_nhwc(x, int(G), w, b, 1e-5f, a);
      double worst = 0;
      for (int64_t g = 0; g < G; ++g) {
        double sum = 0, sq = 0;
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t k = g * cg; k < (g + 1) * cg; ++k) sum += x.f32()[p * C + k];
        const double mean = sum / double(H * W * cg);
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t k = g * cg; k < (g + 1) * cg; ++k) sq += (x.f32()[p * C + k] - mean) * (x.f32()[p * C + k] - mean);
        const double inv = 1.0 / std::sqrt(sq / double(H * W * cg) + 1e-5);
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t k = g * cg; k < (g + 1) * cg; ++k) {
            double e = (x.f32()[p * C + k] - mean) * inv * w.f32()[k] + b.f32()[k];
            if (a == Act::Relu) e = std::max(e, 0.0);
            worst = std::max(worst, std::fabs(e - y.f32()[p * C + k]));
          }
      }
      EXPECT_LT(worst, 1e-4);
    }
  }
}

// As PyTorch: the maximum of a window that holds a NaN is NaN; elsewhere the plain maximum.
TEST(Ops, MaxPoolPropagatesNaN) {
  Tensor x = Tensor::from<float>({1, 2, 2, 2}, {1.0f, -5.0f, 4.0f, -6.0f, NAN, -7.0f, 2.0f, -8.0f});
  Tensor y = max_pool2d_nhwc(x, 2, 2, 0, 0, 0, 0);
  ASSERT_EQ(y.shape(), (Shape{1, 1, 1, 2}));
  EXPECT_TRUE(std::isnan(y.f32()[0]));
  EXPECT_EQ(y.f32()[1], -5.0f);
}

// The comparison every test goes through: a NaN anywhere must fail any tolerance, shapes must match.
TEST(Ops, MaxAbsDiffFailsOnNaNAndShapeMismatch) {
  Tensor a = Tensor::from<float>({2, 2}, {1.0f, 2.0f, 3.0f, 4.0f});
  Tensor b = Tensor::from<float>({2, 2}, {1.0f, 2.5f, 3.0f, 4.0f});
  EXPECT_DOUBLE_EQ(max_abs_diff(a, b), 0.5);
  // A NaN after a larger difference (std::max(0.5, NaN) would keep 0.5), in either argument.
  Tensor n = Tensor::from<float>({2, 2}, {1.0f, 2.5f, 3.0f, NAN});
  EXPECT_TRUE(std::isnan(max_abs_diff(a, n)));
  EXPECT_TRUE(std::isnan(max_abs_diff(n, a)));
  EXPECT_FALSE(max_abs_diff(a, n) <= 1e9);
  EXPECT_FALSE(max_abs_diff(n, n) == 0.0);  // NaN does not even equal itself
  // Equal infinities agree; different ones do not.
  Tensor inf = Tensor::from<float>({1}, {-INFINITY});
  EXPECT_EQ(max_abs_diff(inf, inf), 0.0);
  EXPECT_EQ(max_abs_diff(inf, Tensor::from<float>({1}, {0.0f})), INFINITY);
  // Same element count, different shapes: [2, 2] vs [4] and vs [1, 4].
  EXPECT_THROW(max_abs_diff(a, Tensor::from<float>({4}, {1.0f, 2.0f, 3.0f, 4.0f})), Error);
  EXPECT_THROW(max_abs_diff(a, a.reshape({1, 4})), Error);
  EXPECT_THROW(max_abs_diff(a, a.reshape({4, 1})), Error);
}
