// The Swin backbone's pieces against hand computations: window partition / reverse with a cyclic
// shift, the relative position index, the shifted-window attention mask, the attention op's
// additive bias and mask, and the backbone_config choices. The whole backbone is checked against
// the reference by the deta-swin-* golden cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>

#include "core/attention.h"
#include "core/errors.h"
#include "core/ops.h"
#include "models/detr_backbone.h"
#include "models/model.h"
#include "models/swin.h"

using namespace vf;

namespace {

// x[0, r, c, 0] = 10 r + c on a 4x4 map.
Tensor grid4() {
  Tensor x = Tensor::empty({1, 4, 4, 1});
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) x.f32()[r * 4 + c] = float(10 * r + c);
  return x;
}

std::vector<float> values(const Tensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

}  // namespace

TEST(Swin, WindowPartitionUnshifted) {
  Tensor w = window_partition(grid4(), 2, 0);
  ASSERT_EQ(w.shape(), (Shape{4, 4, 1}));
  // Windows row-major over the map, tokens row-major inside a window.
  EXPECT_EQ(values(w), (std::vector<float>{0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33}));
}

TEST(Swin, WindowPartitionShiftedIsRollThenPartition) {
  // torch.roll(x, (-1, -1)) puts x[(r + 1) % 4, (c + 1) % 4] at (r, c):
  //   11 12 13 10 / 21 22 23 20 / 31 32 33 30 / 1 2 3 0
  Tensor w = window_partition(grid4(), 2, 1);
  EXPECT_EQ(values(w), (std::vector<float>{11, 12, 21, 22, 13, 10, 23, 20, 31, 32, 1, 2, 33, 30, 3, 0}));
}

TEST(Swin, WindowReverseUndoesPartitionAndCrops) {
  Tensor x = grid4();
  for (int shift : {0, 1}) {
    Tensor back = window_reverse(window_partition(x, 2, shift), 2, 4, 4, shift, 4, 4);
    EXPECT_EQ(values(back), values(x)) << "shift " << shift;
    Tensor crop = window_reverse(window_partition(x, 2, shift), 2, 4, 4, shift, 3, 2);
    ASSERT_EQ(crop.shape(), (Shape{1, 3, 2, 1}));
    EXPECT_EQ(values(crop), (std::vector<float>{0, 1, 10, 11, 20, 21})) << "shift " << shift;
  }
  EXPECT_THROW(window_partition(Tensor::zeros({1, 3, 4, 1}), 2, 0), Error);  // not a grid of windows
}

TEST(Swin, RelativePositionIndexWindow2) {
  // Tokens (0,0) (0,1) (1,0) (1,1); index = (dh + 1) * 3 + (dw + 1).
  Tensor idx = swin_relative_position_index(2);
  ASSERT_EQ(idx.shape(), (Shape{4, 4}));
  std::vector<int64_t> got(idx.data<int64_t>(), idx.data<int64_t>() + 16);
  EXPECT_EQ(got, (std::vector<int64_t>{4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4}));
  // The table has (2w - 1)^2 rows: the largest index is its last row.
  Tensor idx7 = swin_relative_position_index(7);
  int64_t mx = 0;
  for (int64_t i = 0; i < idx7.numel(); ++i) mx = std::max(mx, idx7.data<int64_t>()[i]);
  EXPECT_EQ(mx, 13 * 13 - 1);
}

TEST(Swin, ShiftedWindowMask4x4) {
  // Window 2, shift 1 on a 4x4 map: rows 0-1 are region 0, row 2 region 1, row 3 region 2 (and the
  // same for columns); label = 3 * row region + column region.
  Tensor m = swin_shifted_window_mask(4, 4, 2, 1);
  ASSERT_EQ(m.shape(), (Shape{4, 4, 4}));
  const float X = -100.0f;
  // window (0,0): one region
  EXPECT_EQ(values(m[0]), (std::vector<float>(16, 0.0f)));
  // window (0,1): labels 1 2 / 1 2
  EXPECT_EQ(values(m[1]), (std::vector<float>{0, X, 0, X, X, 0, X, 0, 0, X, 0, X, X, 0, X, 0}));
  // window (1,0): labels 3 3 / 6 6
  EXPECT_EQ(values(m[2]), (std::vector<float>{0, 0, X, X, 0, 0, X, X, X, X, 0, 0, X, X, 0, 0}));
  // window (1,1): four regions
  EXPECT_EQ(values(m[3]), (std::vector<float>{0, X, X, X, X, 0, X, X, X, X, 0, X, X, X, X, 0}));
  EXPECT_FALSE(swin_shifted_window_mask(4, 4, 2, 0).defined());
}

TEST(Swin, AttentionAddsBiasThenPerWindowMask) {
  // Two windows of two tokens, one head of width 1, q = k = 0: the scores are bias + mask alone.
  Tensor q = Tensor::zeros({2, 2, 1});
  Tensor v = Tensor::from<float>({2, 2, 1}, {1, 5, 2, 6});
  const float l3 = std::log(3.0f);
  AttentionOptions opt;
  opt.bias = Tensor::from<float>({1, 2, 2}, {0, l3, l3, 0});
  opt.batch_bias = Tensor::from<float>({2, 2, 2}, {0, 0, 0, 0, 0, -100, -100, 0});
  Tensor out = multi_head_attention(q, q, v, 1, opt);
  // Window 0: softmax(0, ln 3) = (1/4, 3/4) -> 1/4 + 15/4 = 4; softmax(ln 3, 0) -> 3/4 + 5/4 = 2.
  // Window 1 (mask[1]): row 0 keeps token 0 (2), row 1 keeps token 1 (6), up to e^-100.
  EXPECT_NEAR(out.f32()[0], 4.0f, 1e-5f);
  EXPECT_NEAR(out.f32()[1], 2.0f, 1e-5f);
  EXPECT_NEAR(out.f32()[2], 2.0f, 1e-5f);
  EXPECT_NEAR(out.f32()[3], 6.0f, 1e-5f);
  opt.bias = Tensor::zeros({2, 2, 2});  // two heads' worth for one head
  EXPECT_THROW(multi_head_attention(q, q, v, 1, opt), Error);
}

TEST(Swin, BackboneConfigSelection) {
  json config = {{"backbone_config",
                  {{"model_type", "swin"}, {"embed_dim", 8}, {"depths", {2, 2, 4, 2}}, {"num_heads", {1, 2, 4, 8}},
                   {"window_size", 4}, {"out_features", {"stage4", "stage2", "stage3"}}}}};
  DetrBackboneConfig c = read_detr_backbone_config(config, {2, 3, 4}, {"stage2", "stage3", "stage4"}, false);
  EXPECT_EQ(c.model_type, "swin");
  EXPECT_EQ(c.swin.out_indices, (std::vector<int>{2, 3, 4}));  // stage order
  EXPECT_EQ(c.swin.window_size, 4);
  EXPECT_EQ(c.swin.mlp_ratio, 4.0);
  EXPECT_EQ(c.swin.hidden_act, "gelu");

  json idx = config;
  idx["backbone_config"].erase("out_features");
  idx["backbone_config"]["out_indices"] = {1, -1};
  EXPECT_EQ(read_detr_backbone_config(idx, {}, {}, false).swin.out_indices, (std::vector<int>{1, 4}));

  json bad = config;
  bad["backbone_config"]["num_heads"] = {3, 2, 4, 8};  // 3 heads do not divide 8
  EXPECT_THROW(read_detr_backbone_config(bad, {}, {}, false), ModelError);
  bad = config;
  bad["backbone_config"]["use_absolute_embeddings"] = true;
  EXPECT_THROW(read_detr_backbone_config(bad, {}, {}, false), ModelError);
  bad = config;
  bad["backbone_config"]["model_type"] = "convnext";
  EXPECT_THROW(read_detr_backbone_config(bad, {}, {}, false), ModelError);
}

namespace {

// Synthetic weights: small deterministic values, layer-norm weights near 1.
// Records every name asked for in `asked`.
std::shared_ptr<WeightStore> synthetic_store(std::shared_ptr<std::vector<std::string>> asked = nullptr) {
  auto store = std::make_shared<WeightStore>();
  store->set_missing_filler([asked](const std::string& name, const Shape& shape) {
    if (asked) asked->push_back(name);
    Tensor t = Tensor::empty(shape);
    const bool norm_weight = name.find("norm") != std::string::npos && name.size() > 7 &&
                             name.compare(name.size() - 7, 7, ".weight") == 0;
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = (norm_weight ? 1.0f : 0.0f) + 0.01f * float((i * 7) % 13 - 6);
    return t;
  });
  return store;
}

json swin_backbone_config() {
  return {{"model_type", "swin"}, {"embed_dim", 8},      {"depths", {1, 2, 1}},
          {"num_heads", {1, 2, 2}}, {"window_size", 4}, {"out_features", {"stem", "stage2", "stage3"}}};
}

}  // namespace

// A 40x57 image: patches of 4 give 10x15 (the width padded to 60), then patch merging pads odd
// sides: 10x15 -> 5x8 -> 3x4; every stage's map is padded to windows of 4 inside the layers.
TEST(Swin, FeatureMapSizesAndChannels) {
  json config = {{"backbone_config", swin_backbone_config()}};
  DetrBackboneConfig bc = read_detr_backbone_config(config, {}, {}, false);
  DetrConvEncoder enc(bc, Weights(synthetic_store()));
  EXPECT_EQ(enc.intermediate_channel_sizes(), (std::vector<int64_t>{8, 16, 32}));
  Tensor pixels = Tensor::full({1, 3, 40, 57}, 0.5f);
  auto maps = enc.forward(pixels, Tensor());
  ASSERT_EQ(maps.size(), 3u);
  EXPECT_EQ(maps[0].features.shape(), (Shape{1, 10, 15, 8}));
  EXPECT_EQ(maps[1].features.shape(), (Shape{1, 5, 8, 16}));
  EXPECT_EQ(maps[2].features.shape(), (Shape{1, 3, 4, 32}));
  EXPECT_EQ(maps[2].mask.shape(), (Shape{1, 3, 4}));
  for (auto& m : maps)
    for (int64_t i = 0; i < m.features.numel(); ++i) ASSERT_TRUE(std::isfinite(m.features.f32()[i]));
}

// Every family that takes backbone_config builds on the Swin backbone, with the Hub's names under
// each family's backbone prefix.
TEST(Swin, EveryDetrFamilyTakesIt) {
  const std::vector<std::array<std::string, 3>> families = {
      {"detr", "DetrForObjectDetection", "model.backbone.conv_encoder.model."},
      {"conditional_detr", "ConditionalDetrForObjectDetection", "model.backbone.conv_encoder.model."},
      {"deformable_detr", "DeformableDetrForObjectDetection", "model.backbone.conv_encoder.model."},
      {"deta", "DetaForObjectDetection", "model.backbone.model."}};
  for (const auto& [type, arch, prefix] : families) {
    json config = {{"model_type", type}, {"architectures", {arch}}, {"backbone_config", swin_backbone_config()},
                   {"use_timm_backbone", false}, {"num_queries", 5}, {"two_stage_num_proposals", 5},
                   {"d_model", 32}, {"encoder_layers", 1}, {"decoder_layers", 1}, {"encoder_attention_heads", 2},
                   {"decoder_attention_heads", 2}, {"encoder_ffn_dim", 16}, {"decoder_ffn_dim", 16},
                   {"num_labels", 3}, {"assign_first_stage", false}, {"num_feature_levels", 4}};
    auto asked = std::make_shared<std::vector<std::string>>();
    auto model = create_model(config, arch, Weights(synthetic_store(asked)));
    ModelInputs in;
    in.pixel_values = Tensor::full({1, 3, 64, 96}, 0.25f);
    ModelOutput out = model->forward(in);
    EXPECT_EQ(out.get("logits").size(1), 5) << type;
    // An empty checkpoint reads as the base model's (no "model." in front).
    const std::string stem = prefix + "embeddings.patch_embeddings.projection.weight";
    const bool found = std::any_of(asked->begin(), asked->end(), [&](const std::string& n) {
      return n == stem || "model." + n == stem;
    });
    EXPECT_TRUE(found) << type << ": " << stem;
  }
}
