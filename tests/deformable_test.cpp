// Deformable DETR / DETA: the deformable attention sampling kernel and the golden cases.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/deformable_attention.h"
#include "test_util.h"

namespace vf {
namespace {

// grid_sample(input [C, H, W], one grid point (gx, gy) in [-1, 1]), bilinear, zero padding,
// align_corners=False, written out plainly in double.
void grid_sample_point(const std::vector<double>& input, int64_t C, int64_t H, int64_t W, double gx, double gy,
                       std::vector<double>& out) {
  double ix = ((gx + 1) * W - 1) / 2, iy = ((gy + 1) * H - 1) / 2;
  double x0 = std::floor(ix), y0 = std::floor(iy);
  out.assign(C, 0.0);
  for (int dy = 0; dy < 2; ++dy)
    for (int dx = 0; dx < 2; ++dx) {
      int64_t x = static_cast<int64_t>(x0) + dx, y = static_cast<int64_t>(y0) + dy;
      double wx = dx ? ix - x0 : 1 - (ix - x0), wy = dy ? iy - y0 : 1 - (iy - y0);
      if (x < 0 || x >= W || y < 0 || y >= H) continue;
      for (int64_t c = 0; c < C; ++c) out[c] += wx * wy * input[(c * H + y) * W + x];
    }
}

TEST(DeformAttention, MatchesGridSampleReference) {
  const int64_t B = 2, NH = 3, D = 5, Q = 7, NP = 3;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{6, 9}, {3, 5}, {1, 2}};
  auto levels = deform_levels(shapes);
  ASSERT_EQ(levels.size(), 3u);
  EXPECT_EQ(levels[1].start, 54);
  EXPECT_EQ(levels[2].start, 69);
  const int64_t NL = 3, S = 71;

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f), loc_dist(-0.3f, 1.3f), pos(0.f, 1.f);
  Tensor value = Tensor::empty({B, S, NH, D});
  for (int64_t i = 0; i < value.numel(); ++i) value.f32()[i] = u(rng);
  Tensor loc = Tensor::empty({B, Q, NH, NL, NP, 2});
  for (int64_t i = 0; i < loc.numel(); ++i) loc.f32()[i] = loc_dist(rng);
  // A few exact pixel centres and borders.
  loc.f32()[0] = 0.5f / 9;
  loc.f32()[1] = 0.5f / 6;
  loc.f32()[2] = 0.f;
  loc.f32()[3] = 1.f;
  Tensor aw = Tensor::empty({B, Q, NH, NL, NP});
  for (int64_t i = 0; i < aw.numel(); ++i) aw.f32()[i] = pos(rng);

  Tensor out = ms_deform_attn(value, levels, loc, aw);
  ASSERT_EQ(out.shape(), (Shape{B, Q, NH * D}));

  // The reference's algorithm: per level, value as [B*NH, D, H, W], grid 2*loc-1, grid_sample,
  // then the attention-weighted sum over levels and points.
  double max_err = 0, max_ref = 0;
  std::vector<double> sample;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      std::vector<double> acc(Q * D, 0.0);
      for (int64_t l = 0; l < NL; ++l) {
        auto [H, W] = shapes[l];
        std::vector<double> img(D * H * W);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t p = 0; p < H * W; ++p)
            img[d * H * W + p] = value.f32()[((b * S + levels[l].start + p) * NH + h) * D + d];
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t p = 0; p < NP; ++p) {
            int64_t k = (((b * Q + q) * NH + h) * NL + l) * NP + p;
            double gx = 2.0 * loc.f32()[2 * k] - 1, gy = 2.0 * loc.f32()[2 * k + 1] - 1;
            grid_sample_point(img, D, H, W, gx, gy, sample);
            for (int64_t d = 0; d < D; ++d) acc[q * D + d] += sample[d] * aw.f32()[k];
          }
      }
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t d = 0; d < D; ++d) {
          double ref = acc[q * D + d];
          double ours = out.f32()[(b * Q + q) * NH * D + h * D + d];
          const double err = std::abs(ours - ref);
          if (!(err <= max_err)) max_err = err;  // a NaN sticks (std::max would drop it)
          max_ref = std::max(max_ref, std::abs(ref));
        }
    }
  EXPECT_GT(max_ref, 0.5);
  EXPECT_LT(max_err, 1e-5);
}

TEST(DeformAttention, PixelCentreReturnsTheValueAndOutsideIsZero) {
  // One level 2x3, one head of 2 channels: sampling at a pixel centre returns that pixel exactly;
  // a location a full pixel outside the map returns zero (zero padding).
  const int64_t S = 6;
  Tensor value = Tensor::empty({1, S, 1, 2});
  for (int64_t i = 0; i < 2 * S; ++i) value.f32()[i] = static_cast<float>(i + 1);
  auto levels = deform_levels({{2, 3}});
  Tensor loc = Tensor::from_vector<float>({1, 2, 1, 1, 1, 2}, {2.5f / 3, 1.5f / 2, -0.5f, 0.5f});
  Tensor aw = Tensor::from_vector<float>({1, 2, 1, 1, 1}, {0.5f, 1.f});
  Tensor out = ms_deform_attn(value, levels, loc, aw);
  // Pixel (x=2, y=1) is position 5: values 11, 12; times the weight 0.5.
  EXPECT_NEAR(out.f32()[0], 5.5f, 1e-6);
  EXPECT_NEAR(out.f32()[1], 6.0f, 1e-6);
  EXPECT_EQ(out.f32()[2], 0.f);
  EXPECT_EQ(out.f32()[3], 0.f);
}

TEST(DeformAttention, RejectsMismatchedShapes) {
  Tensor value = Tensor::zeros({1, 6, 1, 2});
  Tensor loc = Tensor::zeros({1, 2, 1, 1, 1, 2});
  Tensor aw = Tensor::zeros({1, 2, 1, 1, 1});
  EXPECT_THROW(ms_deform_attn(value, deform_levels({{2, 2}}), loc, aw), Error);
  EXPECT_THROW(ms_deform_attn(value, deform_levels({{2, 3}}), loc, Tensor::zeros({1, 2, 1, 1, 2})), Error);
}

}  // namespace
}  // namespace vf

// ---- golden cases -----------------------------------------------------------------------------------

#include "deform_golden.h"

namespace vf {
namespace {

TEST(DeformGolden, DeformableDetrTinyDet) { EXPECT_GE(test::run_golden_case("deformable-detr-tiny-det"), 12); }

// A pytorch_model.bin stores every alias of the shared heads (class_embed.0 .. class_embed.N and,
// for box refinement, model.decoder.bbox_embed.N); the loader takes any of them and marks the rest used.
TEST(DeformGolden, HeadsLoadFromAnyAlias) {
  std::string dir = test::golden_case("deformable-detr-tiny-det");
  json config = read_json_file(dir + "/config.json");
  auto store = load_checkpoint(dir);
  auto aliased = std::make_shared<WeightStore>();
  for (auto& n : store->names()) {
    const Tensor& t = *store->find(n);
    if (n.rfind("class_embed.0.", 0) == 0 || n.rfind("bbox_embed.0.", 0) == 0) {
      std::string head = n.substr(0, n.find('.')), rest = n.substr(n.find('.') + 3);
      // Layer 1 only under the decoder's alias name, layer 0 under both.
      aliased->add("model.decoder." + head + ".1." + rest, t.clone());
      aliased->add("model.decoder." + n, t.clone());
    }
    aliased->add(n, t);
  }
  std::map<std::string, Tensor> expected;
  for (auto& [n, t] : read_safetensors(dir + "/expected.safetensors")) expected[n] = t;
  ModelInputs in;
  in.pixel_values = expected.at("pixel_values");
  in.pixel_mask = expected.at("pixel_mask");
  auto model = create_model(config, "DeformableDetrForObjectDetection", Weights(aliased));
  aliased->check_complete();
  EXPECT_TRUE(aliased->unused().empty()) << aliased->unused().front();
  ModelOutput out = model->forward(in);
  EXPECT_LE(max_abs_diff(out.get("logits"), expected.at("logits")), 1e-4);
  EXPECT_LE(max_abs_diff(out.get("pred_boxes"), expected.at("pred_boxes")), 1e-4);
  EXPECT_FALSE(out.has("decoder_hidden_states.0"));  // only with output_hidden_states
}

TEST(DeformGolden, DetaTinyModel) { EXPECT_GE(test::run_golden_case("deta-tiny-model"), 5); }

}  // namespace
}  // namespace vf
