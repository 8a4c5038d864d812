// Config options found by the config-coverage audit: every ACT2FN name the families may name, and
// processor switches the reference ignores.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/ops.h"
#include "core/weights.h"
#include "models/detr_backbone.h"
#include "io/image.h"
#include "processors/image_processor.h"

namespace vf {
namespace {

double softplus_ref(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double gelu_ref(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

// Each name against its formula in transformers' activations.py, evaluated in double.
TEST(ConfigAudit, EveryAct2FnNameMatchesItsFormula) {
  const std::vector<float> xs = {-30.f, -12.f, -4.f, -3.f, -1.5f, -0.25f, 0.f, 0.3f, 0.707107f, 1.f, 2.5f, 3.f, 7.f, 12.f, 25.f};
  struct Case {
    std::string name;
    std::function<double(double)> f;
  };
  const std::vector<Case> cases = {
      {"gelu", gelu_ref},
      {"gelu_python", gelu_ref},
      {"gelu_new", gelu_tanh_ref},
      {"gelu_pytorch_tanh", gelu_tanh_ref},
      {"gelu_python_tanh", gelu_tanh_ref},
      {"gelu_fast", gelu_tanh_ref},
      {"gelu_accurate", gelu_tanh_ref},
      {"gelu_10", [](double x) { return std::min(std::max(gelu_ref(x), -10.0), 10.0); }},
      {"hardswish", [](double x) { return x * std::min(std::max(x + 3, 0.0), 6.0) / 6; }},
      {"mish", [](double x) { return x * std::tanh(softplus_ref(x)); }},
      {"relu2", [](double x) { return x > 0 ? x * x : 0.0; }},
      {"laplace", [](double x) { return 0.5 * (1 + std::erf((x - 0.707107) / (0.282095 * std::sqrt(2.0)))); }},
      {"sqrtsoftplus", [](double x) { return std::sqrt(softplus_ref(x)); }},
      {"quick_gelu", [](double x) { return x / (1 + std::exp(-1.702 * x)); }},
      {"relu6", [](double x) { return std::min(std::max(x, 0.0), 6.0); }},
      {"leaky_relu", [](double x) { return x > 0 ? x : 0.01 * x; }},
      {"silu", [](double x) { return x / (1 + std::exp(-x)); }},
      {"swish", [](double x) { return x / (1 + std::exp(-x)); }},
      {"relu", [](double x) { return std::max(x, 0.0); }},
      {"linear", [](double x) { return x; }},
  };
  Tensor in = Tensor::from_vector<float>({static_cast<int64_t>(xs.size())}, xs);
  for (const Case& c : cases) {
    Tensor out = act(in, act_from_name(c.name));
    for (size_t i = 0; i < xs.size(); ++i) {
      const double want = c.f(xs[i]);
      EXPECT_NEAR(out.f32()[i], want, 2e-6 * std::max(1.0, std::fabs(want))) << c.name << "(" << xs[i] << ")";
    }
  }
  // The clip of gelu_10 is real: gelu(12) = 12 is clipped to 10.
  EXPECT_EQ(act(Tensor::from<float>({1}, {12.f}), act_from_name("gelu_10")).f32()[0], 10.f);
}

TEST(ConfigAudit, ActivationsWithLearnedParametersAreRefused) {
  EXPECT_THROW(act_from_name("prelu"), Error);
  EXPECT_THROW(act_from_name("xielu"), Error);
  EXPECT_THROW(act_from_name("no_such_act"), Error);
}

Image gradient_image(int64_t h, int64_t w) {
  Image im;
  im.height = h, im.width = w;
  im.rgb.resize(static_cast<size_t>(h * w * 3));
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) im.rgb[static_cast<size_t>((y * w + x) * 3 + c)] = static_cast<uint8_t>((7 * x + 13 * y + 50 * c) % 256);
  return im;
}

// ConvNextImageProcessor's _preprocess has no padding step: do_pad / pad_size change nothing.
TEST(ConfigAudit, ConvNextProcessorIgnoresDoPad) {
  json base = {{"image_processor_type", "ConvNextImageProcessor"}, {"size", {{"shortest_edge", 32}}}};
  json padded = base;
  padded["do_pad"] = true;
  padded["pad_size"] = {{"height", 48}, {"width", 48}};
  const std::vector<Image> images = {gradient_image(40, 56)};
  BatchFeature a = create_image_processor(base)->preprocess(images);
  BatchFeature b = create_image_processor(padded)->preprocess(images);
  ASSERT_EQ(b.pixel_values.shape(), (Shape{1, 3, 32, 32}));
  ASSERT_EQ(a.pixel_values.shape(), b.pixel_values.shape());
  for (int64_t i = 0; i < a.pixel_values.numel(); ++i) ASSERT_EQ(a.pixel_values.f32()[i], b.pixel_values.f32()[i]);
  EXPECT_FALSE(b.pixel_mask.defined());
}

// The PilBackend processors (here DeiT) do pad: to pad_size, zeros to the bottom and right.
TEST(ConfigAudit, DeiTProcessorPadsToPadSize) {
  json base = {{"image_processor_type", "DeiTImageProcessor"},
               {"size", {{"height", 30}, {"width", 30}}},
               {"crop_size", {{"height", 24}, {"width", 24}}}};
  json padded = base;
  padded["do_pad"] = true;
  padded["pad_size"] = {{"height", 28}, {"width", 32}};
  const std::vector<Image> images = {gradient_image(40, 56)};
  BatchFeature a = create_image_processor(base)->preprocess(images);
  BatchFeature b = create_image_processor(padded)->preprocess(images);
  ASSERT_EQ(a.pixel_values.shape(), (Shape{1, 3, 24, 24}));
  ASSERT_EQ(b.pixel_values.shape(), (Shape{1, 3, 28, 32}));
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < 28; ++y)
      for (int64_t x = 0; x < 32; ++x) {
        const float got = b.pixel_values.f32()[(c * 28 + y) * 32 + x];
        const float want = (y < 24 && x < 24) ? a.pixel_values.f32()[(c * 24 + y) * 24 + x] : 0.f;
        ASSERT_EQ(got, want) << c << " " << y << " " << x;
      }
}

// A transformers-ResNet backbone (DETR family, backbone_config) with hidden_act "gelu": the reference's
// ResNetConvLayers inside a block keep their default "relu"; hidden_act runs in the stem and after
// the residual sum only. Weights are chosen so every convolution is a per-pixel scalar product (delta
// kernels, batch norm = identity scale plus a bias), so the result can be computed by hand.
class ResNetActivationTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ResNetActivationTest, InnerConvLayersUseRelu) {
  const std::string layer_type = GetParam();
  const bool bottleneck = layer_type == "bottleneck";
  const int64_t out = 4, reduced = bottleneck ? 1 : out;
  auto store = std::make_shared<WeightStore>();
  auto delta = [&](const std::string& name, int64_t o, int64_t i, int64_t k, std::function<float(int64_t, int64_t)> gain) {
    Tensor t = Tensor::zeros({o, i, k, k});
    for (int64_t a = 0; a < o; ++a)
      for (int64_t b = 0; b < i; ++b) t.f32()[((a * i + b) * k + k / 2) * k + k / 2] = gain(a, b);
    store->add(name + ".convolution.weight", t);
  };
  auto bn = [&](const std::string& name, int64_t c, std::function<float(int64_t)> bias) {
    Tensor w = Tensor::empty({c}), b = Tensor::empty({c}), m = Tensor::zeros({c}), v = Tensor::empty({c});
    for (int64_t k = 0; k < c; ++k) w.f32()[k] = 1.f, b.f32()[k] = bias(k), v.f32()[k] = 1.f - 1e-5f;
    store->add(name + ".normalization.weight", w);
    store->add(name + ".normalization.bias", b);
    store->add(name + ".normalization.running_mean", m);
    store->add(name + ".normalization.running_var", v);
  };
  // stem: s = gelu(2 v + 0.5)
  delta("embedder.embedder", 1, 1, 7, [](int64_t, int64_t) { return 2.f; });
  bn("embedder.embedder", 1, [](int64_t) { return 0.5f; });
  const std::string L = "encoder.stages.0.layers.0.";
  // inner layers: pre-activations pushed negative so relu (0) and gelu (!= 0) differ
  if (bottleneck) {
    delta(L + "layer.0", reduced, 1, 1, [](int64_t, int64_t) { return 1.f; });
    bn(L + "layer.0", reduced, [](int64_t) { return -4.f; });
    delta(L + "layer.1", reduced, reduced, 3, [](int64_t, int64_t) { return 1.f; });
    bn(L + "layer.1", reduced, [](int64_t) { return 0.25f; });
    delta(L + "layer.2", out, reduced, 1, [](int64_t a, int64_t) { return 1.f + a; });
    bn(L + "layer.2", out, [](int64_t a) { return -0.1f * a; });
  } else {
    delta(L + "layer.0", out, 1, 3, [](int64_t a, int64_t) { return 1.f + 0.5f * a; });
    bn(L + "layer.0", out, [](int64_t a) { return -4.f + 3.f * a; });
    delta(L + "layer.1", out, out, 3, [](int64_t a, int64_t b) { return a == b ? 1.f : 0.f; });
    bn(L + "layer.1", out, [](int64_t a) { return 0.2f * a; });
  }
  delta(L + "shortcut", out, 1, 1, [](int64_t a, int64_t) { return 0.5f - 0.3f * a; });
  bn(L + "shortcut", out, [](int64_t) { return -1.f; });
  for (const std::string& name : store->names())
    if (name.find("normalization.weight") != std::string::npos)
      store->add(name.substr(0, name.size() - 6) + "num_batches_tracked", Tensor::zeros({1}, DType::I64));

  json config = {{"backbone_config",
                  {{"model_type", "resnet"}, {"num_channels", 1}, {"embedding_size", 1}, {"hidden_sizes", {out}},
                   {"depths", {1}}, {"layer_type", layer_type}, {"hidden_act", "gelu"}, {"out_features", {"stage1"}}}}};
  DetrBackboneConfig bc = read_detr_backbone_config(config, {1, 2, 3, 4}, {"stage4"});
  DetrConvEncoder enc(bc, Weights(store));
  const float v = 0.8f;
  Tensor pixels = Tensor::from<float>({1, 1, 2, 2}, {v, 0.f, 0.f, 0.f});  // the 2x2 image maps to one position
  auto maps = enc.forward(pixels, Tensor());
  ASSERT_EQ(maps.size(), 1u);
  ASSERT_EQ(maps[0].features.shape(), (Shape{1, 1, 1, out}));

  auto relu = [](double x) { return std::max(x, 0.0); };
  const double s = gelu_ref(2.0 * v + 0.5);  // stem, then a max pool over one value
  for (int64_t k = 0; k < out; ++k) {
    double h;
    if (bottleneck) {
      const double h1 = relu(s - 4.0);     // relu, not gelu: 0 here, gelu would give about -0.02
      const double h2 = relu(h1 + 0.25);
      h = (1.0 + k) * h2 - 0.1 * k;
    } else {
      const double h1 = relu((1.0 + 0.5 * k) * s - 4.0 + 3.0 * k);
      h = h1 + 0.2 * k;
    }
    const double shortcut = (0.5 - 0.3 * k) * s - 1.0;
    const double want = gelu_ref(h + shortcut);
    EXPECT_NEAR(maps[0].features.f32()[k], want, 1e-5) << layer_type << " channel " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(ConfigAudit, ResNetActivationTest, ::testing::Values("bottleneck", "basic"));

}  // namespace
}  // namespace vf

// The timm backbone's keyword arguments: input channels under transformers 4.x's name (in_chans) or
// 5.x's (num_channels); output_stride 16 dilates the last stage and overrides `dilation`, 32 undoes
// it, and other strides are refused rather than built wrong.
TEST(ConfigAudit, TimmBackboneKwargs) {
  const std::vector<int> indices = {1, 2, 3, 4};
  auto read = [&](const vf::json& kwargs, bool dilation) {
    return vf::read_detr_backbone_config(
        vf::json{{"use_timm_backbone", true}, {"backbone", "resnet50"}, {"dilation", dilation}, {"backbone_kwargs", kwargs}},
        indices, {"stage4"}, true);
  };
  EXPECT_EQ(read(vf::json::object(), false).num_channels, 3);
  EXPECT_EQ(read(vf::json{{"in_chans", 1}}, false).num_channels, 1);
  EXPECT_EQ(read(vf::json{{"num_channels", 4}}, false).num_channels, 4);
  EXPECT_FALSE(read(vf::json::object(), false).dilation);
  EXPECT_TRUE(read(vf::json::object(), true).dilation);
  EXPECT_TRUE(read(vf::json{{"output_stride", 16}}, false).dilation);
  EXPECT_FALSE(read(vf::json{{"output_stride", 32}}, true).dilation);
  EXPECT_EQ(read(vf::json{{"out_indices", {4, 2}}}, false).out_indices, (std::vector<int>{2, 4}));
  try {
    read(vf::json{{"output_stride", 8}}, false);
    ADD_FAILURE() << "output_stride 8 was accepted";
  } catch (const vf::ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("output_stride 8"), std::string::npos) << e.what();
  }
}
