// The CUDA backend against the CPU ops, op by op, on random inputs (built only with -DVF_CUDA=ON and
// run on a machine with a GPU: scripts/device-test.sh). The CPU ops are the independent side: the
// golden cases check them against transformers. Tolerances are those of float32 arithmetic done in
// another order (cuDNN / cuBLAS block their sums; the kernels reduce across a warp).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../proposal_inputs.h"
#include "../test_util.h"
#include "core/attention.h"
#include "core/backend.h"
#include "core/boxes.h"
#include "core/cuda/kernels.h"
#include "core/deformable_attention.h"
#include "core/device.h"
#include "core/ops.h"
#include "core/position.h"
#include "core/tensor.h"
#include "processors/detr_postprocess.h"

namespace vf {
namespace {

const Device kGpu = Device::cuda(0);

using test::randn;

Tensor uniform(Shape shape, uint32_t seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  Tensor t = Tensor::empty(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(gen);
  return t;
}

// |gpu - cpu| <= atol + rtol * |cpu| everywhere, the GPU result poisoned nowhere (NaN fails), the
// shapes equal, and the result really came from the device.
void expect_close(const Tensor& gpu, const Tensor& cpu, double atol = 1e-5, double rtol = 1e-5,
                  const std::string& what = "") {
  ASSERT_EQ(gpu.device(), kGpu) << what;
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what << ": " << shape_str(gpu.shape()) << " vs " << shape_str(cpu.shape());
  Tensor g = gpu.cpu().to(DType::F64), c = cpu.to(DType::F64);
  ASSERT_GT(c.numel(), 0) << what;
  double worst = 0;
  int64_t worst_i = 0;
  for (int64_t i = 0; i < c.numel(); ++i) {
    double a = g.data<double>()[i], b = c.data<double>()[i];
    double excess = std::fabs(a - b) - (atol + rtol * std::fabs(b));
    if (!(excess <= 0) && (std::isnan(excess) || excess > worst)) {
      worst = std::isnan(excess) ? INFINITY : excess;
      worst_i = i;
    }
  }
  EXPECT_EQ(worst, 0) << what << ": element " << worst_i << " is " << g.data<double>()[worst_i] << " on the GPU, "
                      << c.data<double>()[worst_i] << " on the CPU";
}

TEST(CudaOps, CopiesRoundTrip) {
  Tensor x = randn({3, 5, 7}, 1);
  Tensor g = x.to(kGpu);
  EXPECT_EQ(g.device(), kGpu);
  EXPECT_THROW(g.f32(), Error);
  EXPECT_EQ(max_abs_diff(g.cpu(), x), 0);
  Tensor c = g.clone();
  c.fill(2.5f);
  EXPECT_EQ(c.cpu().f32()[17], 2.5f);
  EXPECT_EQ(g.cpu().f32()[17], x.f32()[17]);
  Tensor i = Tensor::from_vector<int64_t>({4}, {-3, 0, 7, 1 << 20}).to(kGpu);
  Tensor f = i.to(DType::F32).cpu();
  EXPECT_EQ(f.f32()[0], -3.0f);
  EXPECT_EQ(f.f32()[3], float(1 << 20));
  // A parameter is uploaded once and the same copy is reused.
  Tensor p1 = x.on(kGpu), p2 = x.on(kGpu);
  EXPECT_EQ(p1.raw(), p2.raw());
}

TEST(CudaOps, Activations) {
  Tensor x = randn({1000}, 2, 3.0f);
  for (Act a : {Act::Relu, Act::Gelu, Act::GeluTanh, Act::Silu, Act::Selu, Act::Sigmoid, Act::Tanh, Act::QuickGelu,
                Act::Relu6, Act::LeakyRelu, Act::GeluClip10, Act::HardSwish, Act::Mish, Act::Relu2, Act::Laplace,
                Act::SqrtSoftplus})
    expect_close(act(x.to(kGpu), a), act(x, a), 1e-6, 1e-5, "act " + std::to_string(int(a)));
}

TEST(CudaOps, Norms) {
  Tensor x = randn({2, 5, 6, 32}, 3, 2.0f), w = randn({32}, 4), b = randn({32}, 5);
  expect_close(layer_norm(x.to(kGpu), w, b, 1e-5f), layer_norm(x, w, b, 1e-5f), 1e-5, 1e-5, "layer_norm");
  Tensor wide = randn({7, 3000}, 6);
  Tensor ww = randn({3000}, 7), wb = randn({3000}, 8);
  expect_close(layer_norm(wide.to(kGpu), ww, wb, 1e-6f), layer_norm(wide, ww, wb, 1e-6f), 1e-5, 1e-5, "wide layer_norm");
  expect_close(group_norm_nhwc(x.to(kGpu), 8, w, b, 1e-5f, Act::Relu), group_norm_nhwc(x, 8, w, b, 1e-5f, Act::Relu),
               1e-5, 1e-5, "group_norm");
  expect_close(channel_affine(x.to(kGpu), w, b, Act::Relu), channel_affine(x, w, b, Act::Relu), 1e-6, 1e-6, "affine");
  expect_close(grn_nhwc(x.to(kGpu), w, b), grn_nhwc(x, w, b), 1e-5, 1e-5, "grn");
  Tensor s = randn({37, 301}, 9, 4.0f), sg = s.to(kGpu);
  softmax_lastdim_inplace(s);
  softmax_lastdim_inplace(sg);
  expect_close(sg, s, 1e-7, 1e-5, "softmax");
}

// x on the GPU at an address 4 bytes past a 16-byte boundary (a view one float into a buffer): the
// kernels' float4 paths must give way to their scalar ones.
Tensor misaligned_on_gpu(const Tensor& x) {
  Tensor flat = Tensor::empty({x.numel() + 1});
  flat.f32()[0] = 0.f;
  for (int64_t i = 0; i < x.numel(); ++i) flat.f32()[i + 1] = x.f32()[i];
  Tensor g = flat.to(kGpu).slice0(1, x.numel() + 1).reshape(x.shape());
  EXPECT_NE(reinterpret_cast<uintptr_t>(g.raw()) % 16, 0u);
  return g;
}

// The widths of the layer norm's paths: float4 in registers (cols % 4 == 0, up to 1024), scalar in
// registers (other widths up to 1024, or a misaligned row), and the three passes beyond 1024.
TEST(CudaOps, LayerNormWidths) {
  uint32_t seed = 500;
  for (int64_t cols : {4, 96, 97, 128, 130, 256, 384, 511, 768, 1000, 1024, 1025, 1028}) {
    Tensor x = randn({197, cols}, seed++, 3.0f), w = randn({cols}, seed++), b = randn({cols}, seed++);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += 5.0f;  // a mean far from 0: the two passes matter
    Tensor want = layer_norm(x, w, b, 1e-6f);
    std::string what = "layer_norm width " + std::to_string(cols);
    expect_close(layer_norm(x.to(kGpu), w, b, 1e-6f), want, 1e-5, 1e-4, what);
    expect_close(layer_norm(misaligned_on_gpu(x), w, b, 1e-6f), want, 1e-5, 1e-4, what + " misaligned");
  }
  // By hand: the row (1, 2, 3, 4) has mean 2.5 and variance 1.25.
  Tensor x = Tensor::from_vector<float>({1, 4}, {1, 2, 3, 4});
  Tensor w = Tensor::from_vector<float>({4}, {1, 1, 2, 1}), b = Tensor::from_vector<float>({4}, {0, 0, 0, 1});
  Tensor y = layer_norm(x.to(kGpu), w, b, 0.0f).cpu();
  const float s = 1.0f / std::sqrt(1.25f);
  EXPECT_NEAR(y.f32()[0], -1.5f * s, 1e-6);
  EXPECT_NEAR(y.f32()[1], -0.5f * s, 1e-6);
  EXPECT_NEAR(y.f32()[2], 1.0f * s, 1e-6);
  EXPECT_NEAR(y.f32()[3], 1.5f * s + 1.0f, 1e-6);
}

// Group norm's split statistics (one block per chunk of a group's pixels) and its apply, float4 and
// scalar: groups of 8 channels (BiT), of 4, of 2 (a float4 spans two groups), of 3 (c % 4 != 0).
TEST(CudaOps, GroupNormShapes) {
  struct Case {
    int64_t n, h, w, c;
    int groups;
    Act a;
  };
  uint32_t seed = 600;
  for (const Case& k : {Case{1, 56, 56, 256, 32, Act::Relu}, Case{2, 9, 11, 24, 6, Act::None},
                        Case{1, 37, 41, 64, 32, Act::Silu}, Case{3, 5, 7, 12, 6, Act::None},
                        Case{2, 13, 17, 30, 10, Act::Relu}, Case{1, 1, 1, 8, 2, Act::None}}) {
    Tensor x = randn({k.n, k.h, k.w, k.c}, seed++, 2.0f), w = randn({k.c}, seed++), b = randn({k.c}, seed++);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += 1.5f;
    Tensor want = group_norm_nhwc(x, k.groups, w, b, 1e-5f, k.a);
    std::string what = "group_norm " + shape_str(x.shape()) + " groups " + std::to_string(k.groups);
    expect_close(group_norm_nhwc(x.to(kGpu), k.groups, w, b, 1e-5f, k.a), want, 1e-5, 1e-4, what);
    expect_close(group_norm_nhwc(misaligned_on_gpu(x), k.groups, w, b, 1e-5f, k.a), want, 1e-5, 1e-4,
                 what + " misaligned");
  }
}

TEST(CudaOps, Pooling) {
  Tensor x = randn({2, 11, 13, 5}, 10);
  expect_close(max_pool2d_nhwc(x.to(kGpu), 3, 2, 1, 1, 1, 1), max_pool2d_nhwc(x, 3, 2, 1, 1, 1, 1), 0, 0, "max_pool");
  expect_close(max_pool2d_nhwc(x.to(kGpu), 3, 2, 0, 1, 1, 0, true), max_pool2d_nhwc(x, 3, 2, 0, 1, 1, 0, true), 0, 0,
               "max_pool ceil");
  expect_close(avg_pool2d_nhwc(x.to(kGpu), 3, 2, 1, false), avg_pool2d_nhwc(x, 3, 2, 1, false), 1e-6, 1e-6, "avg_pool");
  expect_close(avg_pool2d_nhwc(x.to(kGpu), 2, 2, 0, true), avg_pool2d_nhwc(x, 2, 2, 0, true), 1e-6, 1e-6, "avg_pool 2");
  expect_close(global_avg_pool_nhwc(x.to(kGpu)), global_avg_pool_nhwc(x), 1e-6, 1e-6, "global_avg_pool");
  // Channels in fours (the float4 kernel), and PyTorch's rule that a NaN in a window is its maximum:
  // the NaN at (row 4, column 6, channel 5) is in every window that covers it (output y covers input
  // rows 2y - 1 .. 2y + 1: outputs 2 and, for columns, 3), and only there.
  Tensor x8 = randn({1, 9, 10, 8}, 11);
  expect_close(max_pool2d_nhwc(x8.to(kGpu), 3, 2, 1, 1, 1, 1), max_pool2d_nhwc(x8, 3, 2, 1, 1, 1, 1), 0, 0,
               "max_pool, 8 channels");
  x8.f32()[(4 * 10 + 6) * 8 + 5] = NAN;
  Tensor pooled = max_pool2d_nhwc(x8.to(kGpu), 3, 2, 1, 1, 1, 1).cpu();
  ASSERT_EQ(pooled.shape(), (Shape{1, 5, 5, 8}));
  for (int64_t oy = 0; oy < 5; ++oy)
    for (int64_t ox = 0; ox < 5; ++ox)
      for (int64_t ch = 0; ch < 8; ++ch) {
        const bool covers = ch == 5 && oy * 2 - 1 <= 4 && 4 <= oy * 2 + 1 && ox * 2 - 1 <= 6 && 6 <= ox * 2 + 1;
        EXPECT_EQ(std::isnan(pooled.f32()[(oy * 5 + ox) * 8 + ch]), covers) << oy << "," << ox << "," << ch;
      }
}

TEST(CudaOps, Layout) {
  Tensor x = randn({2, 3, 4, 5}, 11);
  expect_close(permute(x.to(kGpu), {3, 1, 0, 2}), permute(x, {3, 1, 0, 2}), 0, 0, "permute");
  expect_close(nchw_to_nhwc(x.to(kGpu)), nchw_to_nhwc(x), 0, 0, "nchw_to_nhwc");
  expect_close(transpose_last2(x.to(kGpu)), transpose_last2(x), 0, 0, "transpose_last2");
  expect_close(pad_nhwc(x.to(kGpu), 1, 2, 0, 3, -1.5f), pad_nhwc(x, 1, 2, 0, 3, -1.5f), 0, 0, "pad");
  Tensor y = randn({2, 3, 5, 5}, 12);
  expect_close(cat({x.to(kGpu), y.to(kGpu)}, 2), cat({x, y}, 2), 0, 0, "cat");
  expect_close(cat({x.to(kGpu), y}, -2), cat({x, y}, -2), 0, 0, "cat with a host tensor");
  expect_close(narrow(y.to(kGpu), 2, 1, 3), narrow(y, 2, 1, 3), 0, 0, "narrow");
  Tensor m = randn({2, 12, 8, 6}, 13);
  expect_close(window_partition(m.to(kGpu), 4, 2), window_partition(m, 4, 2), 0, 0, "window_partition");
  Tensor w = window_partition(m, 4, 2);
  expect_close(window_reverse(w.to(kGpu), 4, 12, 8, 2, 11, 7), window_reverse(w, 4, 12, 8, 2, 11, 7), 0, 0,
               "window_reverse");
}

TEST(CudaOps, Elementwise) {
  Tensor a = randn({2, 3, 4}, 14), b = randn({3, 1}, 15), c = uniform({4}, 16, 0.5f, 2.0f);
  expect_close(add(a.to(kGpu), b.to(kGpu)), add(a, b), 0, 0, "add");
  expect_close(sub(a.to(kGpu), b), sub(a, b), 0, 0, "sub");
  expect_close(mul(b.to(kGpu), a.to(kGpu)), mul(b, a), 0, 0, "mul");
  expect_close(div(a.to(kGpu), c.to(kGpu)), div(a, c), 0, 1e-7, "div");
  Tensor g = a.to(kGpu);
  Tensor a2 = a.clone();
  add_inplace(g, a2.to(kGpu));
  add_inplace(a2, a);
  expect_close(g, a2, 0, 0, "add_inplace");
  expect_close(scale(a.to(kGpu), 0.125f), scale(a, 0.125f), 0, 0, "scale");
  expect_close(mul_lastdim(a.to(kGpu), c), mul_lastdim(a, c), 0, 0, "mul_lastdim");
  // The shapes of the index arithmetic's merged dims: equal shapes (one dim, four at a time, and an
  // odd count), a trailing broadcast, a middle one, both operands broadcast, a single element.
  Tensor p = randn({2, 5, 8}, 20), q = randn({2, 5, 8}, 21), r = uniform({2, 1, 8}, 22, 0.5f, 2.0f);
  Tensor odd = randn({3, 7}, 23), row = randn({1, 6}, 24), col = randn({5, 1}, 25), one = randn({1}, 26);
  expect_close(add(p.to(kGpu), q.to(kGpu)), add(p, q), 0, 0, "add, equal shapes");
  expect_close(mul(odd.to(kGpu), odd.to(kGpu)), mul(odd, odd), 0, 0, "mul, equal odd shapes");
  Tensor last = randn({8}, 27);
  expect_close(sub(p.to(kGpu), last.to(kGpu)), sub(p, last), 0, 0, "sub, trailing broadcast");
  expect_close(div(p.to(kGpu), r.to(kGpu)), div(p, r), 0, 1e-7, "div, middle broadcast");
  expect_close(add(col.to(kGpu), row.to(kGpu)), add(col, row), 0, 0, "add, both broadcast");
  expect_close(mul(one.to(kGpu), one.to(kGpu)), mul(one, one), 0, 0, "mul, one element");
  Tensor ye = uniform({300}, 17, 0.0f, 6.3f), xe = uniform({300}, 18, 0.0f, 6.3f), dim_t = uniform({64}, 19, 1.0f, 9000.0f);
  expect_close(sine_expand(ye.to(kGpu), xe.to(kGpu), dim_t.to(kGpu)), sine_expand(ye, xe, dim_t), 1e-6, 1e-5,
               "sine_expand");
}

TEST(CudaOps, Interpolate) {
  Tensor x = randn({2, 3, 7, 9}, 17);
  expect_close(interpolate_bilinear(x.to(kGpu), 13, 5), interpolate_bilinear(x, 13, 5), 1e-5, 1e-5, "bilinear");
  expect_close(interpolate_bilinear(x.to(kGpu), 4, 17, true), interpolate_bilinear(x, 4, 17, true), 1e-5, 1e-5,
               "bilinear align_corners");
  expect_close(interpolate_nearest(x.to(kGpu), 15, 4), interpolate_nearest(x, 15, 4), 0, 0, "nearest");
  expect_close(interpolate_bicubic(x.to(kGpu), 10, 12), interpolate_bicubic(x, 10, 12), 1e-5, 1e-5, "bicubic");
}

TEST(CudaOps, MatmulAndLayers) {
  Tensor a = randn({3, 17, 33}, 18), b = randn({3, 33, 9}, 19), bt = randn({3, 9, 33}, 20);
  expect_close(matmul(a.to(kGpu), b.to(kGpu)), matmul(a, b), 1e-4, 1e-5, "matmul");
  expect_close(matmul(a.to(kGpu), bt.to(kGpu), true, 0.5f), matmul(a, bt, true, 0.5f), 1e-4, 1e-5, "matmul trans_b");

  Tensor w = randn({24, 33}, 21, 0.2f), bias = randn({24}, 22);
  Tensor x = randn({2, 17, 33}, 23), res = randn({2, 17, 24}, 24);
  Linear cpu_lin(w, bias, Act::Gelu);
  Linear cpu_res(w, bias);
  LoadDeviceScope on(kGpu);
  Linear gpu_lin(w, bias, Act::Gelu);
  Linear gpu_res(w, bias);
  Linear gpu_silu(w, bias, Act::Mish);  // not fusable on the CPU: applied apart on the GPU
  expect_close(gpu_lin.forward(x.to(kGpu)), cpu_lin.forward(x), 1e-5, 1e-5, "linear gelu");
  Tensor rg = res.to(kGpu);
  expect_close(gpu_res.forward(x.to(kGpu), &rg), cpu_res.forward(x, &res), 1e-5, 1e-5, "linear residual");
  expect_close(gpu_silu.forward(x.to(kGpu)), act(cpu_res.forward(x), Act::Mish), 1e-5, 1e-5, "linear mish");
}

// Linear's epilogue act(y + b) + residual, four columns a thread (out % 4 == 0) or one (out odd, or a
// misaligned residual).
TEST(CudaOps, BiasActWidths) {
  uint32_t seed = 700;
  for (int64_t out : {24, 7, 96}) {
    Tensor w = randn({out, 33}, seed++, 0.2f), bias = randn({out}, seed++);
    Tensor x = randn({2, 17, 33}, seed++), res = randn({2, 17, out}, seed++);
    Linear cpu(w, bias, Act::Gelu);
    Tensor want = cpu.forward(x), want_res = cpu.forward(x, &res);
    LoadDeviceScope on(kGpu);
    Linear gpu(w, bias, Act::Gelu);
    std::string what = "linear gelu out " + std::to_string(out);
    expect_close(gpu.forward(x.to(kGpu)), want, 1e-5, 1e-5, what);
    Tensor rg = res.to(kGpu), rm = misaligned_on_gpu(res);
    expect_close(gpu.forward(x.to(kGpu), &rg), want_res, 1e-5, 1e-5, what + " + residual");
    expect_close(gpu.forward(x.to(kGpu), &rm), want_res, 1e-5, 1e-5, what + " + misaligned residual");
  }
}

struct ConvCase {
  int64_t n, h, w, in, out, k;
  Conv2dOptions opt;
};

TEST(CudaOps, Conv2d) {
  std::vector<ConvCase> cases;
  Conv2dOptions o;
  cases.push_back({2, 13, 11, 8, 16, 3, o});                    // plain, no padding
  Conv2dOptions pw;
  pw.act = Act::Relu;
  cases.push_back({2, 9, 7, 24, 40, 1, pw});                    // 1x1: a matrix product
  Conv2dOptions dws;
  dws.dynamic_same = true;
  dws.stride_h = dws.stride_w = 2;
  dws.groups = 12;
  cases.push_back({1, 15, 16, 12, 12, 3, dws});                 // depthwise, strided, TF SAME
  o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = 1;
  o.stride_h = o.stride_w = 2;
  o.act = Act::Relu;
  cases.push_back({1, 17, 15, 8, 12, 3, o});                    // stride 2, padding, relu
  Conv2dOptions dw;
  dw.pad_top = dw.pad_left = dw.pad_bottom = dw.pad_right = 3;
  dw.groups = 16;
  cases.push_back({1, 14, 14, 16, 16, 7, dw});                  // depthwise 7x7 (ConvNeXt)
  Conv2dOptions same;
  same.dynamic_same = true;
  same.stride_h = same.stride_w = 2;
  cases.push_back({1, 16, 15, 6, 10, 3, same});                 // TF SAME: asymmetric padding (BiT)
  Conv2dOptions asym;
  asym.pad_top = 0, asym.pad_left = 1, asym.pad_bottom = 2, asym.pad_right = 1;
  asym.dilation_h = asym.dilation_w = 2;
  asym.groups = 2;
  cases.push_back({2, 12, 13, 8, 6, 3, asym});                  // asymmetric, dilated, grouped
  Conv2dOptions patch;
  patch.stride_h = patch.stride_w = 4;
  cases.push_back({1, 32, 32, 3, 24, 4, patch});                // patch embedding
  uint32_t seed = 100;
  for (auto& c : cases) {
    Tensor w = randn({c.out, c.in / c.opt.groups, c.k, c.k}, seed++, 0.3f), b = randn({c.out}, seed++);
    Tensor x = randn({c.n, c.h, c.w, c.in}, seed++);
    Conv2d cpu(w, b, c.opt);
    Tensor want = cpu.forward(x);
    Tensor res = randn(want.shape(), seed++);
    Tensor want_res = cpu.forward(x, &res);
    LoadDeviceScope on(kGpu);
    Conv2d gpu(w, b, c.opt);
    std::string what = "conv " + std::to_string(c.k) + "x" + std::to_string(c.k) + " groups " + std::to_string(c.opt.groups);
    expect_close(gpu.forward(x.to(kGpu)), want, 1e-4, 1e-5, what);
    Tensor rg = res.to(kGpu);
    expect_close(gpu.forward(x.to(kGpu), &rg), want_res, 1e-4, 1e-5, what + " + residual");
    // A host input on a GPU layer is computed there and comes back to the host.
    Tensor back = gpu.forward(x);
    EXPECT_TRUE(back.is_cpu());
    EXPECT_LT(max_abs_diff(back, want), 1e-3);
  }
}

// The depthwise convolution's paths: stride 1, no dilation and kw 3, 5 or 7 run rows of 8, 4, 2 or 1
// outputs a thread for 4 channels (aligned, c % 4 == 0) or one, as many as keep enough threads; the
// rest run the generic kernel. With and without a residual, aligned and not, on widths that leave a
// partial last group of outputs.
TEST(CudaOps, DepthwiseConvShapes) {
  struct Case {
    int64_t n, h, w, c, kh, kw;
    int pad_h, pad_w, stride, dilation;
    Act a;
  };
  const std::vector<Case> cases = {
      {2, 17, 23, 96, 7, 7, 3, 3, 1, 1, Act::None},   // a small map: one output, one channel a thread
      {4, 56, 61, 384, 7, 7, 3, 3, 1, 1, Act::None},  // 8 outputs x 4 channels (misaligned: 4 x 1)
      {2, 56, 57, 384, 7, 7, 3, 3, 1, 1, Act::None},  // 4 outputs x 4 channels
      {1, 28, 29, 192, 7, 7, 3, 3, 1, 1, Act::None},  // ConvNeXt's stage 2 at 224: 2 outputs x 1 channel
      {1, 7, 7, 768, 7, 7, 3, 3, 1, 1, Act::Gelu},    // ConvNeXt's last stage: the image narrower than a row of taps
      {1, 9, 10, 12, 5, 5, 2, 2, 1, 1, Act::Relu},    // kw 5
      {2, 6, 5, 8, 3, 3, 1, 1, 1, 1, Act::None},      // kw 3
      {1, 11, 13, 16, 3, 7, 1, 3, 1, 1, Act::None},   // kh != kw
      {1, 11, 13, 16, 7, 7, 0, 1, 1, 1, Act::None},   // less padding than the kernel: a smaller output
      {1, 12, 14, 6, 7, 7, 3, 3, 1, 1, Act::None},    // c % 4 != 0: one channel a thread
      {1, 12, 14, 8, 4, 4, 1, 2, 1, 1, Act::None},    // kw 4: generic
      {1, 12, 14, 8, 3, 3, 1, 1, 2, 1, Act::None},    // stride 2: generic
      {1, 12, 14, 8, 3, 3, 2, 2, 1, 2, Act::None},    // dilation 2: generic
  };
  uint32_t seed = 800;
  for (const Case& k : cases) {
    Conv2dOptions o;
    o.pad_top = o.pad_bottom = k.pad_h;
    o.pad_left = o.pad_right = k.pad_w;
    o.stride_h = o.stride_w = k.stride;
    o.dilation_h = o.dilation_w = k.dilation;
    o.groups = int(k.c);
    o.act = k.a;
    Tensor w = randn({k.c, 1, k.kh, k.kw}, seed++, 0.3f), b = randn({k.c}, seed++);
    Tensor x = randn({k.n, k.h, k.w, k.c}, seed++);
    Conv2d cpu(w, b, o);
    Tensor want = cpu.forward(x);
    Tensor res = randn(want.shape(), seed++);
    Tensor want_res = cpu.forward(x, &res);
    LoadDeviceScope on(kGpu);
    Conv2d gpu(w, b, o);
    std::string what = "depthwise " + shape_str(x.shape()) + " " + std::to_string(k.kh) + "x" + std::to_string(k.kw) +
                       " stride " + std::to_string(k.stride) + " dilation " + std::to_string(k.dilation);
    expect_close(gpu.forward(x.to(kGpu)), want, 1e-4, 1e-5, what);
    Tensor rg = res.to(kGpu);
    expect_close(gpu.forward(x.to(kGpu), &rg), want_res, 1e-4, 1e-5, what + " + residual");
    expect_close(gpu.forward(misaligned_on_gpu(x)), want, 1e-4, 1e-5, what + " misaligned");
  }
  // By hand: a 3x3 kernel of ones over a 3x3 image of 1..9 (one channel, padding 1, bias 0.5): the
  // centre sums all nine (45), the corner (0, 0) sums 1, 2, 4, 5.
  Conv2dOptions o;
  o.pad_top = o.pad_bottom = o.pad_left = o.pad_right = 1;
  o.groups = 4;
  Tensor w = Tensor::full({4, 1, 3, 3}, 1.0f), b = Tensor::full({4}, 0.5f);
  Tensor x = Tensor::empty({1, 3, 3, 4});
  for (int64_t i = 0; i < 36; ++i) x.f32()[i] = float(i / 4 + 1);
  LoadDeviceScope on(kGpu);
  Conv2d gpu(w, b, o);
  Tensor y = gpu.forward(x.to(kGpu)).cpu();
  for (int64_t ch = 0; ch < 4; ++ch) {
    EXPECT_EQ(y.f32()[4 * 4 + ch], 45.5f);
    EXPECT_EQ(y.f32()[ch], 12.5f);
    EXPECT_EQ(y.f32()[8 * 4 + ch], 28.5f);  // (2, 2): 5 + 6 + 8 + 9
  }
}

// The convolution of an NHWC x [n, h, w, c] by w [k, c, 3, 3], stride 1, in double: the direct sum
// the three GPU ways (cuDNN, patches, Winograd) must all reproduce.
Tensor conv3x3_reference(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor* residual, int pt,
                         int pl, int64_t oh, int64_t ow, Act act) {
  const int64_t n = x.size(0), h = x.size(1), wd = x.size(2), c = x.size(3), k = w.size(0);
  Tensor y = Tensor::empty({n, oh, ow, k});
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oy = 0; oy < oh; ++oy)
      for (int64_t ox = 0; ox < ow; ++ox)
        for (int64_t ko = 0; ko < k; ++ko) {
          double acc = bias.f32()[ko];
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const int64_t iy = oy - pt + ky, ix = ox - pl + kx;
              if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
              for (int64_t ci = 0; ci < c; ++ci)
                acc += double(x.f32()[((b * h + iy) * wd + ix) * c + ci]) * w.f32()[((ko * c + ci) * 3 + ky) * 3 + kx];
            }
          const int64_t at = ((b * oh + oy) * ow + ox) * k + ko;
          if (residual) acc += residual->f32()[at];
          y.f32()[at] = act == Act::Relu ? float(std::max(acc, 0.0)) : float(acc);
        }
  return y;
}

// 3x3 stride-1 convolutions by each way, forced with VF_CUDA_CONV, against the direct sum in double:
// tiles cut by the image's edge (sizes not multiples of 4), no padding, asymmetric padding, batches,
// a residual and ReLU, channels that are not multiples of 4, and a ResNet layer1-sized map.
TEST(CudaOps, Conv3x3Ways) {
  struct Case {
    int64_t n, h, w, in, out;
    int pt, pl, pb, pr;
    Act act;
  };
  const std::vector<Case> cases = {
      {1, 13, 11, 16, 24, 1, 1, 1, 1, Act::Relu}, {2, 9, 10, 8, 8, 0, 0, 0, 0, Act::None},
      {1, 7, 6, 5, 3, 0, 1, 2, 1, Act::None},     {3, 4, 4, 12, 20, 1, 1, 1, 1, Act::Relu},
      {1, 50, 67, 64, 64, 1, 1, 1, 1, Act::Relu},
  };
  uint32_t seed = 900;
  for (const Case& c : cases) {
    Conv2dOptions o;
    o.pad_top = c.pt, o.pad_left = c.pl, o.pad_bottom = c.pb, o.pad_right = c.pr;
    o.act = c.act;
    // Weights of a trained layer's scale (a folded batch norm's): outputs of order one.
    Tensor w = randn({c.out, c.in, 3, 3}, seed++, 1.0f / std::sqrt(9.0f * float(c.in))), b = randn({c.out}, seed++);
    Tensor x = randn({c.n, c.h, c.w, c.in}, seed++);
    const int64_t oh = c.h + c.pt + c.pb - 2, ow = c.w + c.pl + c.pr - 2;
    Tensor res = randn({c.n, oh, ow, c.out}, seed++);
    Tensor want = conv3x3_reference(x, w, b, nullptr, c.pt, c.pl, oh, ow, c.act);
    Tensor want_res = conv3x3_reference(x, w, b, &res, c.pt, c.pl, oh, ow, c.act);
    for (const char* way : {"winograd", "patches", "cudnn"}) {
      setenv("VF_CUDA_CONV", way, 1);
      LoadDeviceScope on(kGpu);
      Conv2d gpu(w, b, o);
      const std::string what = std::string(way) + " " + std::to_string(c.h) + "x" + std::to_string(c.w) + " " +
                               std::to_string(c.in) + "->" + std::to_string(c.out);
      expect_close(gpu.forward(x.to(kGpu)), want, 1e-4, 1e-5, what);
      Tensor rg = res.to(kGpu);
      expect_close(gpu.forward(x.to(kGpu), &rg), want_res, 1e-4, 1e-5, what + " + residual");
      unsetenv("VF_CUDA_CONV");
    }
  }
  // Chosen by timing (no VF_CUDA_CONV): whichever way wins computes the same.
  Conv2dOptions o;
  o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = 1;
  Tensor w = randn({32, 32, 3, 3}, 950, 0.06f), b = randn({32}, 951), x = randn({1, 40, 36, 32}, 952);
  Tensor want = conv3x3_reference(x, w, b, nullptr, 1, 1, 40, 36, Act::None);
  LoadDeviceScope on(kGpu);
  Conv2d gpu(w, b, o);
  for (int round = 0; round < 2; ++round) expect_close(gpu.forward(x.to(kGpu)), want, 1e-4, 1e-5, "timed way");
}

TEST(CudaOps, GatherRows) {
  Tensor x = randn({2, 70, 33}, 960);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < 2 * 45; ++i) rows.push_back((i * 37) % 70);
  Tensor idx = Tensor::from_vector<int64_t>({2, 45}, rows);
  Tensor want = gather_rows(x, idx);
  expect_close(gather_rows(x.to(kGpu), idx), want, 0, 0, "gather_rows");
}

TEST(CudaOps, GatherRowsDeviceIndices) {
  Tensor x = randn({2, 70, 33}, 961);
  Tensor idx = Tensor::from_vector<int64_t>({2, 3}, {69, 0, 5, 5, 70, -1});
  Tensor got = gather_rows(x.to(kGpu), idx.to(kGpu)).cpu();
  Tensor want = gather_rows(x, Tensor::from_vector<int64_t>({2, 3}, {69, 0, 5, 5, 0, 0}));
  // Rows in range as the CPU gathers them; out of range (not checkable without waiting): NaN.
  for (int64_t i = 0; i < 4 * 33; ++i) ASSERT_EQ(got.f32()[i], want.f32()[i]) << i;
  for (int64_t i = 4 * 33; i < 6 * 33; ++i) ASSERT_TRUE(std::isnan(got.f32()[i])) << i;
}

// ---- selection: the host's indices exactly ----

std::vector<int64_t> row_of(const Tensor& t, int64_t b) {
  const Tensor c = t.cpu();
  return std::vector<int64_t>(c.data<int64_t>() + b * c.size(1), c.data<int64_t>() + (b + 1) * c.size(1));
}

TEST(CudaOps, TopkRows) {
  const int64_t S = 17884;
  auto [ties, unused] = test::tie_heavy(3, S, 970, 0.01);
  for (const Tensor& scores : {randn({3, S}, 971), ties}) {
    for (int64_t k : {int64_t{1}, int64_t{300}, int64_t{900}, S}) {
      const Tensor got = topk_rows(scores.to(kGpu), k);
      ASSERT_EQ(got.device(), kGpu);
      const Tensor want = topk_rows(scores, k);
      for (int64_t b = 0; b < 3; ++b) EXPECT_EQ(row_of(got, b), row_of(want, b)) << "k = " << k << ", row " << b;
    }
  }
}

// The GPU's selection against level_nms_select over the GPU's own sigmoids (device_sigmoid's expf
// may round differently from the host's std::exp); where the two sigmoids agree bit for bit, against
// the CPU op itself too.
void expect_host_selection(const Tensor& logits, const Tensor& coords, const std::vector<int64_t>& sizes, int64_t k,
                           const std::string& what) {
  const int64_t B = logits.size(0), S = logits.size(1);
  const Tensor lg = logits.to(kGpu), cg = coords.to(kGpu);
  const Tensor got = level_nms_proposals(lg, cg, sizes, k, 1000, 0.9);
  ASSERT_EQ(got.device(), kGpu) << what;
  ASSERT_EQ(got.shape(), (Shape{B, k})) << what;
  const Tensor scores = act(lg, Act::Sigmoid).cpu(), centers = act(cg, Act::Sigmoid).cpu();
  for (int64_t b = 0; b < B; ++b)
    EXPECT_EQ(row_of(got, b), level_nms_select(logits.f32() + b * S, scores.f32() + b * S,
                                               centers.f32() + b * S * 4, sizes, k, 1000, 0.9))
        << what << ", image " << b;
  const bool same_sigmoid = std::memcmp(scores.raw(), act(logits, Act::Sigmoid).raw(), scores.nbytes()) == 0 &&
                            std::memcmp(centers.raw(), act(coords, Act::Sigmoid).raw(), centers.nbytes()) == 0;
  if (!same_sigmoid) {
    std::printf("%s: the GPU's sigmoid rounds some values differently from the CPU's\n", what.c_str());
    return;
  }
  const Tensor cpu = level_nms_proposals(logits, coords, sizes, k, 1000, 0.9);
  for (int64_t b = 0; b < B; ++b) EXPECT_EQ(row_of(got, b), row_of(cpu, b)) << what << ", image " << b << " (CPU op)";
}

TEST(CudaOps, LevelNmsProposals) {
  // DETA-R50 at 800x1066: levels 100x134, 50x67, 25x34, 13x17, 7x9 (the last three below 1000), k = 900.
  const std::vector<int64_t> deta = {100 * 134, 50 * 67, 25 * 34, 13 * 17, 7 * 9};
  const int64_t S = std::accumulate(deta.begin(), deta.end(), int64_t{0});
  expect_host_selection(randn({2, S}, 980, 2.0f), randn({2, S, 4}, 981, 1.5f), deta, 900, "DETA size, random");
  auto [tl, tc] = test::tie_heavy(2, S, 982, 0.001);
  expect_host_selection(tl, tc, deta, 900, "DETA size, ties");
  // Five levels, most below 1000 positions, ties and NaN logits.
  auto [fl, fc] = test::tie_heavy(3, 2300, 983, 0.01);
  expect_host_selection(fl, fc, {1500, 600, 150, 40, 10}, 300, "five small levels");
  // One level: one NMS over offset boxes (<= 4000 coordinates); then a NaN coordinate in it.
  auto [ol, oc] = test::tie_heavy(2, 1200, 984, 0.02);
  expect_host_selection(ol, oc, {1200}, 100, "one level");
  oc.f32()[4 * 700 + 1] = std::nanf("");
  expect_host_selection(ol, oc, {1200}, 100, "one level, a NaN coordinate");
  // Every box the same: one kept per level, fewer than k: the plain top-k.
  auto [al, ac] = test::tie_heavy(2, 2000, 985, 0.01);
  for (int64_t i = 0; i < ac.numel(); ++i) ac.f32()[i] = 0.25f;
  expect_host_selection(al, ac, {1000, 700, 300}, 60, "fallback");
}

// The selection and the gathers after it record into a CUDA graph (nothing waits for the GPU) and
// replay to the same rows.
TEST(CudaOps, ProposalSelectionRecordsAsGraph) {
  const std::vector<int64_t> deta = {100 * 134, 50 * 67, 25 * 34, 13 * 17, 7 * 9};
  const int64_t S = std::accumulate(deta.begin(), deta.end(), int64_t{0});
  const Tensor logits = randn({1, S}, 990, 2.0f).to(kGpu), coords = randn({1, S, 4}, 991, 1.5f).to(kGpu);
  const Tensor eager = gather_rows(coords, level_nms_proposals(logits, coords, deta, 900, 1000, 0.9)).cpu();
  const Tensor eager_top = gather_rows(coords, topk_rows(logits, 900)).cpu();
  Tensor recorded, recorded_top;
  auto graph = backend(kGpu).capture([&] {
    recorded = gather_rows(coords, level_nms_proposals(logits, coords, deta, 900, 1000, 0.9));
    recorded_top = gather_rows(coords, topk_rows(logits, 900));
  });
  ASSERT_NE(graph, nullptr);
  for (int round = 0; round < 2; ++round) {
    graph->replay();
    EXPECT_EQ(max_abs_diff(recorded.cpu(), eager), 0.0);
    EXPECT_EQ(max_abs_diff(recorded_top.cpu(), eager_top), 0.0);
  }
}

// Values on a coarse grid, so that planes tie often (the first maximum must win on both sides).
Tensor coarse(Shape shape, uint32_t seed) {
  Tensor t = uniform(std::move(shape), seed, -2, 2);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = std::round(t.f32()[i] * 2) / 2;
  return t;
}

TEST(CudaOps, PlaneReductions) {
  const Tensor x = coarse({7, 33, 65}, 970);
  const Tensor scales = Tensor::from<float>({7}, {1, 0.5f, 2, 1, 0.25f, 1, 0.75f});
  for (const Tensor& s : {Tensor(), scales}) {
    for (DType out : {DType::I32, DType::I64}) {
      const Tensor want = argmax_planes(x, s, out), got = argmax_planes(x.to(kGpu), s, out);
      ASSERT_EQ(got.device(), kGpu);
      ASSERT_EQ(got.dtype(), out);
      expect_close(got.to(DType::F32), want.to(DType::F32), 0, 0, "argmax_planes");
    }
    for (float threshold : {-0.5f, 0.0f, 0.75f})
      expect_close(count_at_least(x.to(kGpu), s, threshold).to(DType::F32), count_at_least(x, s, threshold).to(DType::F32),
                   0, 0, "count_at_least");
  }
  // bincount: a shared-memory histogram (few bins) and the global one (more bins than a block holds),
  // values outside [0, bins) left out.
  std::vector<int64_t> v;
  for (int64_t i = 0; i < 50000; ++i) v.push_back((i * 7919) % 20011 - 5);
  const Tensor idx = Tensor::from_vector<int64_t>({50000}, v);
  for (int64_t bins : {int64_t{1}, int64_t{37}, int64_t{20000}})
    for (DType t : {DType::I64, DType::I32})
      expect_close(bincount(idx.to(t).to(kGpu), bins).to(DType::F32), bincount(idx.to(t), bins).to(DType::F32), 0, 0,
                   "bincount " + std::to_string(bins));
}

// Segmentation post-processing with the outputs on the GPU against the CPU path: the same segments,
// and the same map but for pixels whose winning margin is within the GPU sigmoid's last bit (its expf
// is not glibc's) or, for semantic maps, cuBLAS's order of summation.
TEST(CudaOps, SegmentationPostProcessing) {
  const int64_t queries = 20, classes = 6;
  Tensor logits = uniform({1, queries, classes}, 980, -1, 1);
  for (int64_t q = 0; q < queries; ++q) logits.f32()[q * classes + q % classes] += 4;  // some pass 0.5
  const Tensor masks = coarse({1, queries, 24, 36}, 981);
  auto same_fraction = [](const Tensor& a, const Tensor& b) {
    const Tensor x = a.to(DType::I64), y = b.to(DType::I64);
    int64_t same = 0;
    for (int64_t i = 0; i < x.numel(); ++i) same += x.data<int64_t>()[i] == y.data<int64_t>()[i];
    return double(same) / double(x.numel());
  };
  for (const std::vector<TargetSize>& targets : {std::vector<TargetSize>{}, std::vector<TargetSize>{{97, 143}}}) {
    SegmentationOptions opt;
    opt.target_sizes = targets;
    opt.label_ids_to_fuse = {1};
    for (bool panoptic : {true, false}) {
      auto post = panoptic ? post_process_panoptic_segmentation : post_process_instance_segmentation;
      const auto want = post(DetrPostKind::Detr, logits, masks, opt);
      const auto got = post(DetrPostKind::Detr, logits.to(kGpu), masks.to(kGpu), opt);
      ASSERT_EQ(got.size(), 1u);
      ASSERT_EQ(got[0].segmentation.shape(), want[0].segmentation.shape());
      EXPECT_GE(same_fraction(got[0].segmentation, want[0].segmentation), 0.999);
      ASSERT_EQ(got[0].segments_info.size(), want[0].segments_info.size());
      for (size_t i = 0; i < want[0].segments_info.size(); ++i) {
        EXPECT_EQ(got[0].segments_info[i].id, want[0].segments_info[i].id);
        EXPECT_EQ(got[0].segments_info[i].label_id, want[0].segments_info[i].label_id);
        EXPECT_EQ(got[0].segments_info[i].score, want[0].segments_info[i].score);
      }
    }
    const auto want = post_process_semantic_segmentation(DetrPostKind::Detr, logits, masks, targets);
    const auto got = post_process_semantic_segmentation(DetrPostKind::Detr, logits.to(kGpu), masks.to(kGpu), targets);
    ASSERT_EQ(got[0].shape(), want[0].shape());
    EXPECT_TRUE(got[0].is_cpu());
    EXPECT_GE(same_fraction(got[0], want[0]), 0.999);
  }
}

TEST(CudaOps, Attention) {
  const int64_t B = 2, Lq = 37, Lk = 45, H = 3, d = 16;
  Tensor q = randn({B, Lq, H * d}, 30), k = randn({B, Lk, H * d}, 31), v = randn({B, Lk, H * d}, 32);
  AttentionOptions opt;
  opt.scale = 0.25f;
  opt.bias = randn({H, Lq, Lk}, 33);
  opt.batch_bias = randn({2, Lq, Lk}, 34);
  opt.head_mask = uniform({H}, 35, 0.0f, 1.0f);
  Tensor probs_cpu, probs_gpu;
  opt.probs = &probs_cpu;
  Tensor want = multi_head_attention(q, k, v, H, opt);
  opt.probs = &probs_gpu;
  Tensor got = multi_head_attention(q.to(kGpu), k.to(kGpu), v.to(kGpu), H, opt);
  expect_close(got, want, 1e-5, 1e-4, "attention");
  expect_close(probs_gpu, probs_cpu, 1e-6, 1e-4, "attention probabilities");
  Tensor qkv = randn({B, Lq, 3 * H * d}, 36);
  AttentionOptions plain;
  plain.scale = 0.125f;
  expect_close(multi_head_attention_packed(qkv.to(kGpu), H, plain), multi_head_attention_packed(qkv, H, plain), 1e-5,
               1e-4, "packed attention");
}

TEST(CudaOps, DeformableSampling) {
  const int64_t B = 2, NH = 4, D = 8, Q = 19, P = 3;
  auto levels = deform_levels({{9, 11}, {5, 6}, {3, 3}});
  const int64_t L = int64_t(levels.size()), S = 9 * 11 + 5 * 6 + 3 * 3;
  Tensor value = randn({B, S, NH, D}, 40);
  Tensor loc = uniform({B, Q, NH, L, P, 2}, 41, -0.1f, 1.1f);  // some samples fall outside: zero padding
  Tensor w = uniform({B, Q, NH, L, P}, 42, 0.0f, 1.0f);
  expect_close(ms_deform_attn(value.to(kGpu), levels, loc.to(kGpu), w.to(kGpu)), ms_deform_attn(value, levels, loc, w),
               1e-5, 1e-5, "ms_deform_attn");
  // A head size that is not a multiple of 4: one channel a thread.
  Tensor value6 = randn({B, S, NH, 6}, 43);
  expect_close(ms_deform_attn(value6.to(kGpu), levels, loc.to(kGpu), w.to(kGpu)),
               ms_deform_attn(value6, levels, loc, w), 1e-5, 1e-5, "ms_deform_attn, head size 6");
}

// ---- 16-bit products (--dtype bfloat16 / float16) ----

// v rounded to the nearest bfloat16 or float16 value, ties to even, in host arithmetic (independent
// of the GPU's conversion kernel). Finite inputs of moderate size only.
float round_16bit(float v, DType t) {
  if (t == DType::F16) return float(static_cast<_Float16>(v));
  uint32_t u = std::bit_cast<uint32_t>(v);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::bit_cast<float>(u & 0xffff0000u);
}

Tensor rounded(const Tensor& x, DType t) {
  Tensor y = x.clone();
  for (int64_t i = 0; i < y.numel(); ++i) y.f32()[i] = round_16bit(y.f32()[i], t);
  return y;
}

Tensor abs_of(const Tensor& x) {
  Tensor y = x.clone();
  for (int64_t i = 0; i < y.numel(); ++i) y.f32()[i] = std::fabs(y.f32()[i]);
  return y;
}

double max_magnitude(const Tensor& x) {
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, double(std::fabs(x.f32()[i])));
  return m;
}

// Unit roundoff: the largest relative error of rounding to t (8 significant bits for bfloat16, 11
// for float16).
double unit_roundoff(DType t) { return std::ldexp(1.0, t == DType::BF16 ? -8 : -11); }

// Tolerances of the 16-bit layers against the CPU's float32 ones (the activations below are at most
// 1.2-Lipschitz, GELU's slope peaks at 1.13):
// - pre-rounded inputs and weights: the GPU's rounding changes nothing, and each product of two 16-bit
//   values is exact in float32 (16 or 22 significant bits of 24), so what is left is float32
//   accumulation in another order (tensor cores block the sums: 5e-4 covers a few float32 ulps of
//   sums of ~100 terms of size ~1), plus, for cuDNN's k x k convolutions, the rounding of the sum
//   to the 16-bit type before bias and residual are added: u * |sum|.
// - unrounded float32: each rounded product is off by at most 2u + u^2 of |x||w|, so the sum by
//   2.01 u sum|x||w|, plus the same output rounding.
// A float32 product on the GPU would pass both, so a third check asks that the unrounded result moved
// by more than float32 noise (it moves by ~u, far above float32's 6e-8).
struct HalfBounds {
  double sum_max;  // max |sum x w| over the output (pre-rounded operands)
  double abs_max;  // max sum |x| |w| (unrounded)
};

void expect_16bit_agreement(const Tensor& got_rounded, const Tensor& want_rounded, const Tensor& got, const Tensor& want,
                            const HalfBounds& b, DType t, bool rounds_output, bool computes_16bit,
                            const std::string& what) {
  const double u = unit_roundoff(t), lip = 1.2;
  const double out_round = rounds_output ? lip * u * b.sum_max : 0.0;
  expect_close(got_rounded, want_rounded, 5e-4 + out_round, 0, what + " (pre-rounded)");
  if (computes_16bit) {
    expect_close(got, want, 5e-4 + out_round + lip * 2.01 * u * b.abs_max, 0, what + " (float32 inputs)");
    EXPECT_GT(max_abs_diff(got.cpu(), want), u / 16) << what << ": no 16-bit rounding to be seen";
  } else {
    expect_close(got, want, 1e-4, 1e-5, what + " (stays float32)");
  }
}

void check_16bit_convs(DType t) {
  struct Case {
    std::string name;
    int64_t in, out, k;
    Conv2dOptions opt;
    bool cudnn;  // through cuDNN (16-bit output) rather than a matrix product or the float32 stencil
  };
  Conv2dOptions k3;
  k3.pad_top = k3.pad_left = k3.pad_bottom = k3.pad_right = 1;
  k3.act = Act::Gelu;
  Conv2dOptions k3s = k3;
  k3s.stride_h = k3s.stride_w = 2;
  k3s.act = Act::Relu;
  Conv2dOptions p1;
  p1.act = Act::Relu;
  Conv2dOptions dw;
  dw.pad_top = dw.pad_left = dw.pad_bottom = dw.pad_right = 3;
  dw.groups = 16;
  std::vector<Case> cases = {{"3x3 gelu", 16, 32, 3, k3, true},
                             {"3x3 stride 2 relu, odd channels", 12, 20, 3, k3s, true},
                             {"1x1 relu", 48, 24, 1, p1, false},
                             {"depthwise 7x7", 16, 16, 7, dw, false}};
  uint32_t seed = 500 + uint32_t(t);
  for (const Case& c : cases) {
    const std::string what = std::string(dtype_name(t)) + " conv " + c.name;
    Tensor w = randn({c.out, c.in / c.opt.groups, c.k, c.k}, seed++, 0.2f), b = randn({c.out}, seed++);
    Tensor x = randn({2, 9, 11, c.in}, seed++);
    Tensor wr = rounded(w, t), xr = rounded(x, t);
    Conv2dOptions plain = c.opt;
    plain.act = Act::None;
    // The CPU layers first: the scope below would make them 16-bit too where the CPU can.
    Tensor res = randn(Conv2d(w, b, c.opt).forward(x).shape(), seed++);
    Tensor want_r = Conv2d(wr, b, c.opt).forward(xr, &res);
    Tensor want = Conv2d(w, b, c.opt).forward(x, &res);
    HalfBounds bounds{max_magnitude(Conv2d(wr, Tensor(), plain).forward(xr)),
                      max_magnitude(Conv2d(abs_of(w), Tensor(), plain).forward(abs_of(x)))};
    LoadDeviceScope on(kGpu, t);
    Conv2d gpu_r(wr, b, c.opt), gpu(w, b, c.opt);
    Tensor rg = res.to(kGpu);
    expect_16bit_agreement(gpu_r.forward(xr.to(kGpu), &rg), want_r, gpu.forward(x.to(kGpu), &rg), want, bounds, t,
                           c.cudnn, c.opt.groups == 1, what);
  }
}

void check_16bit_linear(DType t) {
  const std::string what = std::string(dtype_name(t)) + " linear";
  Tensor w = randn({24, 40}, 600, 0.2f), bias = randn({24}, 601);
  Tensor x = randn({2, 17, 40}, 602), res = randn({2, 17, 24}, 603);
  Tensor wr = rounded(w, t), xr = rounded(x, t);
  Tensor want_r = Linear(wr, bias, Act::Gelu).forward(xr, &res);
  Tensor want = Linear(w, bias, Act::Gelu).forward(x, &res);
  HalfBounds bounds{max_magnitude(Linear(wr, Tensor()).forward(xr)), max_magnitude(Linear(abs_of(w), Tensor()).forward(abs_of(x)))};
  LoadDeviceScope on(kGpu, t);
  Linear gpu_r(wr, bias, Act::Gelu), gpu(w, bias, Act::Gelu);
  Tensor rg = res.to(kGpu);
  expect_16bit_agreement(gpu_r.forward(xr.to(kGpu), &rg), want_r, gpu.forward(x.to(kGpu), &rg), want, bounds, t, false,
                         true, what);
}

// forward_to_layer: the output in t, rounded after the bias and after the activation (GELU's slope
// is at most 1.13), and a next layer of the same type reads it as it is.
void check_16bit_linear_to_layer(DType t) {
  const std::string what = std::string(dtype_name(t)) + " linear to layer";
  Tensor w1 = rounded(randn({32, 40}, 610, 0.2f), t), b1 = randn({32}, 611);
  Tensor w2 = rounded(randn({8, 32}, 612, 0.2f), t), b2 = randn({8}, 613);
  Tensor x = rounded(randn({3, 5, 40}, 614), t);
  Tensor hidden = Linear(w1, b1, Act::Gelu).forward(x);
  const double u = unit_roundoff(t), pre_max = max_magnitude(Linear(w1, b1).forward(x));
  LoadDeviceScope on(kGpu, t);
  Linear fc1(w1, b1, Act::Gelu), fc2(w2, b2);
  Tensor h = fc1.forward_to_layer(x.to(kGpu));
  EXPECT_EQ(h.dtype(), t) << what;
  expect_close(h.to(DType::F32), hidden, 5e-4 + 2.2 * u * pre_max, 0, what + " (hidden)");
  // fc2 reads the 16-bit hidden layer as it is: against the CPU's product of that same rounded input.
  Tensor hr = h.to(DType::F32).cpu();
  LoadDeviceScope cpu_scope(Device::cpu());
  Tensor want = Linear(w2, b2).forward(hr);
  expect_close(fc2.forward(h), want, 5e-4, 0, what + " (next layer)");
  EXPECT_GT(max_abs_diff(hr, hidden), u / 64) << what << ": no 16-bit rounding to be seen";
}

// Attention on a 16-bit packed Q|K|V: the scores are exact products of 16-bit values summed in
// float32; the probabilities are rounded to t for the second product, which moves the output by at
// most u * max|v| (the probabilities of a row sum to 1).
void check_16bit_attention(DType t) {
  const std::string what = std::string(dtype_name(t)) + " packed attention";
  const int64_t B = 2, L = 37, H = 3, d = 16;
  Tensor qkv = rounded(randn({B, L, 3 * H * d}, 620), t);
  AttentionOptions opt;
  opt.scale = 0.25f;
  Tensor want = multi_head_attention_packed(qkv, H, opt);
  Tensor got = multi_head_attention_packed(qkv.to(kGpu).to(t), H, opt);
  EXPECT_EQ(got.dtype(), DType::F32) << what;
  const double u = unit_roundoff(t);
  expect_close(got, want, 1e-4 + 1.01 * u * max_magnitude(qkv), 0, what);
  EXPECT_GT(max_abs_diff(got.cpu(), want), 1e-7) << what << ": no 16-bit rounding to be seen";
}

// The fused kernel itself (the op picks it or the materialised scores by timing), against the CPU's
// attention: keys over several tiles of 64 with a partial last one, query rows over several blocks,
// and with `options` every option the models use. Batch 0 pads every third key, batch 1 the whole
// first tile and more (its running maximum starts at the lowest float and must be replaced), batch 2
// every key (equal weights, as the reference's additive mask gives).
void check_fused_attention(DType t, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t dk, int64_t dv,
                           bool options) {
  const std::string what = std::string(dtype_name(t)) + " fused attention " + std::to_string(Lq) + "x" +
                           std::to_string(Lk) + " d " + std::to_string(dk) + "/" + std::to_string(dv);
  Tensor q = randn({B, Lq, H * dk}, 700), k = randn({B, Lk, H * dk}, 701), v = randn({B, Lk, H * dv}, 702);
  if (t != DType::F32) q = rounded(q, t), k = rounded(k, t), v = rounded(v, t);
  AttentionOptions opt;
  opt.scale = 1.0f / std::sqrt(float(dk));
  if (options) {
    opt.bias = randn({H, Lq, Lk}, 703);
    opt.batch_bias = randn({2, Lq, Lk}, 704);
    opt.head_mask = uniform({H}, 705, 0.5f, 1.5f);
    opt.key_mask = Tensor::empty({B, Lk}, DType::U8);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < Lk; ++j)
        opt.key_mask.data<uint8_t>()[b * Lk + j] = b == 0 ? j % 3 != 1 : b == 1 ? j >= 70 : 0;
  }
  Tensor want = multi_head_attention(q, k, v, H, opt);

  auto device = [&](const Tensor& x) { return x.to(kGpu).to(t); };
  auto on_gpu = [](const Tensor& x) { return x.defined() ? x.to(kGpu) : Tensor(); };
  Tensor qg = device(q), kg = device(k), vg = device(v);
  Tensor bias = on_gpu(opt.bias), batch_bias = on_gpu(opt.batch_bias), head_mask = on_gpu(opt.head_mask),
         key_mask = on_gpu(opt.key_mask);
  Tensor out = Tensor::full({B, Lq, H * dv}, NAN).to(kGpu);  // every element must be written
  auto f = [](const Tensor& x) { return x.defined() ? static_cast<const float*>(x.raw()) : nullptr; };
  const cuda::FusedAttention a{qg.raw(), kg.raw(), vg.raw(), H * dk, H * dk, H * dv, static_cast<float*>(out.raw()),
                               B, Lq, Lk, H, dk, dv, opt.scale, f(bias), f(batch_bias), 2,
                               key_mask.defined() ? static_cast<const uint8_t*>(key_mask.raw()) : nullptr,
                               f(head_mask)};
  ASSERT_TRUE(cuda::fused_attention_supported(a, t)) << what;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;  // the uploads ran on the backend's stream
  cuda::fused_attention(a, t, nullptr);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess) << what;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
  // 16 bits: the probabilities are rounded for the second product (see check_16bit_attention).
  const double tol = t == DType::F32 ? 2e-5 : 1e-4 + 1.01 * unit_roundoff(t) * max_magnitude(v);
  expect_close(out, want, tol, t == DType::F32 ? 1e-4 : 0, what);
}

TEST(CudaOps, FusedAttention) {
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    check_fused_attention(t, 3, 37, 150, 3, 64, 32, true);   // Conditional DETR's cross-attention sizes
    check_fused_attention(t, 3, 70, 129, 2, 32, 64, true);
    check_fused_attention(t, 2, 600, 200, 8, 32, 32, false);  // the float32 kernel's eight rows a warp
    check_fused_attention(t, 1, 197, 197, 4, 64, 64, false);  // DeiT's
  }
  // Shapes the kernel does not take: the op falls back to the materialised scores.
  cuda::FusedAttention odd{};
  odd.B = 1, odd.H = 1, odd.Lq = 4, odd.Lk = 4, odd.dk = 16, odd.dv = 16;
  EXPECT_FALSE(cuda::fused_attention_supported(odd, DType::F32));
}

// Through the op, where the first call of a shape times both ways and keeps the faster: the same
// results either way, the probabilities (materialised) when asked for.
TEST(CudaOps, AttentionChoosesAWay) {
  const int64_t B = 2, L = 300, H = 8, d = 32;
  Tensor q = randn({B, L, H * d}, 710), k = randn({B, L, H * d}, 711), v = randn({B, L, H * d}, 712);
  AttentionOptions opt;
  opt.scale = 1.0f / std::sqrt(float(d));
  opt.key_mask = Tensor::empty({B, L}, DType::U8);
  for (int64_t i = 0; i < B * L; ++i) opt.key_mask.data<uint8_t>()[i] = i % L < 250 || i < L;
  Tensor want = multi_head_attention(q, k, v, H, opt);
  for (int round = 0; round < 2; ++round)
    expect_close(multi_head_attention(q.to(kGpu), k.to(kGpu), v.to(kGpu), H, opt), want, 2e-5, 1e-4,
                 "attention, call " + std::to_string(round + 1));
  Tensor probs;
  opt.probs = &probs;
  expect_close(multi_head_attention(q.to(kGpu), k.to(kGpu), v.to(kGpu), H, opt), want, 2e-5, 1e-4,
               "attention with probabilities");
  ASSERT_EQ(probs.shape(), (Shape{B, H, L, L}));
}

// The 16-bit epilogue passes of a Linear that writes its compute type, against the same arithmetic
// on the CPU: rounding float32 to 16 bits (to_16bit) is exact to compare, and
// act(y + bias) rounded once may differ by one 16-bit step where the float32 activation lands on
// either side of a rounding boundary. Widths take both the eight-wide kernels and the scalar ones.
void check_16bit_passes(DType t) {
  const bool bf16 = t == DType::BF16;
  for (int64_t n : {int64_t(8), int64_t(4096), int64_t(1001)}) {
    Tensor x = randn({n}, 720 + uint32_t(n));
    Tensor y = Tensor::empty({n}, t, kGpu), xg = x.to(kGpu);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cuda::to_16bit(y.raw(), static_cast<const float*>(xg.raw()), n, bf16, nullptr);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Tensor got = y.to(DType::F32).cpu();
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(got.f32()[i], round_16bit(x.f32()[i], t)) << dtype_name(t) << " to_16bit, n " << n << ", element " << i;
  }
  const double u = unit_roundoff(t);
  for (int64_t cols : {int64_t(8), int64_t(768), int64_t(3072), int64_t(13)})
    for (Act act : {Act::None, Act::Gelu, Act::Relu}) {
      const int64_t rows = 5;
      Tensor x = rounded(randn({rows, cols}, 730 + uint32_t(cols)), t), bias = randn({cols}, 731);
      Tensor y = x.to(kGpu).to(t), bg = bias.to(kGpu);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      cuda::bias_act_16bit_inplace(y.raw(), bf16, static_cast<const float*>(bg.raw()), rows, cols, act, nullptr);
      ASSERT_EQ(cudaGetLastError(), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      Tensor got = y.to(DType::F32).cpu();
      for (int64_t i = 0; i < rows * cols; ++i) {
        const float v = x.f32()[i] + bias.f32()[i % cols];
        const float a = act == Act::None ? v
                        : act == Act::Relu ? std::max(v, 0.0f)
                                           : 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
        const double want = round_16bit(a, t);
        // One 16-bit step, plus GELU's tail: 1 + erf(v / sqrt 2) cancels for v << 0, so the few float32
        // ulps (of 1) in which two erf implementations differ become 0.5 |v| * 4 * 2^-23.
        ASSERT_LE(std::fabs(got.f32()[i] - want), 1.01 * u * 2 * std::fabs(want) + std::fabs(v) * 2.4e-7)
            << dtype_name(t) << " bias_act_16bit_inplace, " << cols << " columns, act " << int(act) << ", element "
            << i << ": " << got.f32()[i] << " against " << want;
      }
    }
}

TEST(CudaOps, Bfloat16Layers) {
  check_16bit_convs(DType::BF16);
  check_16bit_linear(DType::BF16);
  check_16bit_linear_to_layer(DType::BF16);
  check_16bit_attention(DType::BF16);
  check_16bit_passes(DType::BF16);
}

TEST(CudaOps, Float16Layers) {
  check_16bit_convs(DType::F16);
  check_16bit_linear(DType::F16);
  check_16bit_linear_to_layer(DType::F16);
  check_16bit_attention(DType::F16);
  check_16bit_passes(DType::F16);
}

// Uploads beside the compute stream (the next input during a forward): what arrives is the host's
// data, the compute stream reads it after await_upload, and a buffer given back is reused for the
// next upload without the two mixing.
TEST(CudaOps, UploadBeside) {
  DeviceBackend& be = backend(kGpu);
  for (uint32_t round = 0; round < 3; ++round) {
    Tensor host = randn({4, 512, 1024}, 800 + round);
    Tensor busy = matmul(randn({512, 512}, 810).to(kGpu), randn({512, 512}, 811).to(kGpu));  // work in flight
    Tensor up = be.upload_beside(host);
    ASSERT_TRUE(up.defined());
    ASSERT_EQ(up.device(), kGpu);
    ASSERT_EQ(up.shape(), host.shape());
    be.await_upload(up);
    expect_close(scale(up, 2.0f), scale(host, 2.0f), 0, 0, "scaled upload, round " + std::to_string(round));
  }
}

TEST(CudaOps, MemoryStats) {
  const DeviceMemoryStats before = device_memory_stats(kGpu, /*reset_peak=*/true);
  EXPECT_EQ(before.peak, before.in_use);
  {
    Tensor t = Tensor::empty({1 << 20}, DType::F32, kGpu);  // 4 MiB
    const DeviceMemoryStats during = device_memory_stats(kGpu);
    EXPECT_GE(during.in_use, before.in_use + (size_t(4) << 20));
    EXPECT_GE(during.peak, during.in_use);
  }
  const DeviceMemoryStats after = device_memory_stats(kGpu);
  EXPECT_EQ(after.in_use, before.in_use);
  EXPECT_GE(after.peak, before.in_use + (size_t(4) << 20));
}

}  // namespace
}  // namespace vf
