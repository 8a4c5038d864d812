// DETR and Conditional DETR against the vendored golden cases detr-tiny-model and
// conditional-detr-tiny-det, plus the shared backbone layer's pieces.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "models/detr.h"
#include "models/model.h"
#include "test_util.h"

using namespace vf;

namespace {

std::map<std::string, Tensor> read_expected(const std::string& case_dir) {
  std::map<std::string, Tensor> m;
  for (auto& [name, t] : read_safetensors(case_dir + "/expected.safetensors")) m[name] = t;
  return m;
}

// max |ours - ref| <= 1e-4 * max(1, max |ref|), the goldens' tolerance for tiny cases.
void expect_close(const Tensor& ours, const Tensor& ref, const std::string& what) {
  ASSERT_EQ(shape_str(ours.shape()), shape_str(ref.shape())) << what;
  double tol = 1e-4 * std::max(1.0, max_abs(ref));
  EXPECT_LE(max_abs_diff(ours, ref), tol) << what;
}

}  // namespace

TEST(DetrBackbone, MaskDownsamplingIsNearest) {
  // 1 row of 5 real pixels out of 7 -> 3 columns: sources floor(j * 7/3) = 0, 2, 4.
  Tensor mask = Tensor::from<int64_t>({1, 1, 7}, {1, 1, 1, 1, 1, 0, 0});
  Tensor m = downsample_pixel_mask(mask, 1, 3);
  EXPECT_EQ(m.data<uint8_t>()[0], 1);
  EXPECT_EQ(m.data<uint8_t>()[1], 1);
  EXPECT_EQ(m.data<uint8_t>()[2], 1);
  Tensor m2 = downsample_pixel_mask(mask, 1, 2);  // floor(j * 3.5) = 0, 3
  EXPECT_EQ(m2.data<uint8_t>()[1], 1);
  Tensor m4 = downsample_pixel_mask(mask, 1, 4);  // floor(j * 1.75) = 0, 1, 3, 5
  EXPECT_EQ(m4.data<uint8_t>()[3], 0);
}

TEST(DetrBackbone, SineEmbeddingMatchesFormula) {
  Tensor mask = Tensor::zeros({1, 2, 3}, DType::U8);
  for (int i = 0; i < 6; ++i) mask.data<uint8_t>()[i] = (i % 3) < 2;  // last column is padding
  SinePositionEmbeddingOptions opt;
  opt.num_position_features = 4;
  opt.normalize = true;
  Tensor pos = sine_position_embedding(mask, opt);
  ASSERT_EQ(shape_str(pos.shape()), "[1, 2, 3, 8]");
  // Pixel (1, 0): y = 2/2 * 2pi, x = 1/2 * 2pi; channel 1 = cos(y / 10000^(0/4)), 5 = cos(x).
  const float* p = pos.f32() + (1 * 3 + 0) * 8;
  const float two_pi = 6.283185307179586f;
  EXPECT_NEAR(p[0], std::sin(two_pi / (1 + 1e-6f)), 1e-5);
  EXPECT_NEAR(p[5], std::cos(0.5f * two_pi / (1 + 1e-6f)), 1e-6);
  EXPECT_NEAR(p[6], std::sin(0.5f * two_pi / 100.0f), 1e-6);  // 10000^(2/4) = 100
  opt.deformable_offset = true;
  Tensor dpos = sine_position_embedding(mask, opt);
  EXPECT_NEAR(dpos.f32()[(1 * 3 + 0) * 8 + 4], std::sin(0.5f / 2 * two_pi), 1e-5);
}

// The timm-free (transformers ResNet) backbone of detr-tiny-model, through the input projection:
// the encoder's first hidden state is exactly that.
TEST(DetrBackbone, TransformersResNetThroughInputProjection) {
  std::string dir = test::golden_case("detr-tiny-model");
  json config = read_json_file(dir + "/config.json");
  auto store = load_checkpoint(dir);
  Weights w(store);
  auto exp = read_expected(dir);
  DetrBackboneConfig bc = read_detr_backbone_config(config, {1, 2, 3, 4}, {"stage4"});
  EXPECT_FALSE(bc.use_timm_backbone);
  ASSERT_EQ(bc.out_features.size(), 4u);
  DetrConvEncoder enc(bc, w.pp("backbone.conv_encoder.model"));
  EXPECT_EQ(enc.intermediate_channel_sizes(), (std::vector<int64_t>{8, 16, 24, 32}));
  auto maps = enc.forward(exp["pixel_values"], exp["pixel_mask"]);
  ASSERT_EQ(maps.size(), 4u);
  Conv2d proj(w.get("input_projection.weight", {16, 32, 1, 1}), w.get("input_projection.bias", {16}),
              Conv2dOptions{});
  Tensor x = proj.forward(maps.back().features);
  ASSERT_EQ(shape_str(x.shape()), "[2, 6, 9, 16]");
  // The full goldens hold the encoder's input, exactly these features (vendored copies leave it out).
  if (exp.count("encoder_hidden_states.0"))
    expect_close(x.reshape({x.size(0), -1, 16}), exp["encoder_hidden_states.0"], "projected features");
  // A caller that reads only the last level (a model without a segmentation head) gets that level
  // alone, the same values and mask.
  auto last = enc.forward(exp["pixel_values"], exp["pixel_mask"], /*last_level_only=*/true);
  ASSERT_EQ(last.size(), 1u);
  EXPECT_EQ(max_abs_diff(last[0].features, maps.back().features), 0.0);
  ASSERT_EQ(last[0].mask.shape(), maps.back().mask.shape());
  EXPECT_TRUE(std::equal(last[0].mask.data<uint8_t>(), last[0].mask.data<uint8_t>() + last[0].mask.numel(),
                         maps.back().mask.data<uint8_t>()));
}

namespace {

// Runs a golden case's model on its pixel_values / pixel_mask and compares every float output the
// case lists (except the processor's), returning how many were compared.
int run_and_compare(const std::string& case_name) {
  std::string dir = test::golden_case(case_name);
  json config = read_json_file(dir + "/config.json");
  json cs = read_json_file(dir + "/case.json");
  auto store = load_checkpoint(dir);
  auto model = create_model(config, cs["model_class"].get<std::string>(), Weights(store));
  EXPECT_NO_THROW(store->check_complete());
  EXPECT_TRUE(store->unused().empty()) << "unused: " << store->unused().front();
  auto exp = read_expected(dir);
  ModelInputs in;
  in.pixel_values = exp["pixel_values"];
  in.pixel_mask = exp["pixel_mask"];
  in.output_hidden_states = true;
  if (cs.contains("labels")) {
    for (auto& l : cs["labels"]) {
      DetectionTarget t;
      auto cls = l["class_labels"].get<std::vector<int64_t>>();
      auto boxes = l["boxes"].get<std::vector<std::vector<float>>>();
      t.class_labels = Tensor::from_vector<int64_t>({static_cast<int64_t>(cls.size())}, cls);
      std::vector<float> flat;
      for (auto& b : boxes) flat.insert(flat.end(), b.begin(), b.end());
      t.boxes = Tensor::from_vector<float>({static_cast<int64_t>(boxes.size()), 4}, flat);
      in.targets.push_back(t);
    }
  }
  ModelOutput out = model->forward(in);
  // Every output the case's expected.safetensors holds (vendored copies keep only some of them).
  int compared = 0;
  for (auto& [name, ref] : exp) {
    if (name.rfind("pixel_", 0) == 0 || name.rfind("post", 0) == 0) continue;
    EXPECT_TRUE(out.has(name)) << case_name << " lacks " << name;
    if (!out.has(name)) continue;
    if (name.rfind("loss", 0) == 0) {  // losses: relative error <= 1e-4
      double r = ref.at(0), o = out.get(name).at(0);
      EXPECT_LE(std::abs(o - r), 1e-4 * std::abs(r)) << case_name << " " << name << ": " << o << " vs " << r;
    } else {
      expect_close(out.get(name), ref, case_name + " " + name);
    }
    ++compared;
  }
  return compared;
}

}  // namespace

TEST(DetrModel, MatchesGoldenTinyModel) { EXPECT_GE(run_and_compare("detr-tiny-model"), 2); }
TEST(DetrConditionalForObjectDetection, MatchesGoldenTinyDet) {
  EXPECT_GE(run_and_compare("conditional-detr-tiny-det"), 9);
}
TEST(DetrMaskHead, UpsampleNearestAddRepeatsPerImage) {
  // x: 2 maps (repeat 2 of one image) of 1x2, one channel; y: 1 map of 2x3.
  Tensor x = Tensor::from<float>({2, 1, 2, 1}, {1, 2, 10, 20});
  Tensor y = Tensor::from<float>({1, 2, 3, 1}, {0, 0, 0, 100, 100, 100});
  Tensor out = upsample_nearest_add(x, y, 2);
  ASSERT_EQ(shape_str(out.shape()), "[2, 2, 3, 1]");
  // Columns read floor(j * 2/3) = 0, 0, 1; both rows read row 0.
  const float want[12] = {1, 1, 2, 101, 101, 102, 10, 10, 20, 110, 110, 120};
  for (int i = 0; i < 12; ++i) EXPECT_EQ(out.f32()[i], want[i]) << i;
}
