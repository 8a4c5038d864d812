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

// output_attentions on DETA (no golden case holds them): the shapes the 4.x DetaModel returns, the
// deformable weights summing to one per head over levels x points, and decoder layer 0 worked out
// by hand in double from the checkpoint alone (without two-stage the decoder's first self-attention
// and the cross-attention's weights depend only on the learned queries, not on the image):
//   target, query_pos = query_position_embeddings split in halves (query_pos first)
//   self-attention probs = softmax((q_proj(target + query_pos) . k_proj(target + query_pos)) / sqrt(d))
//   h = self_attn_layer_norm(target + out_proj(probs v_proj(target)))
//   cross weights = softmax over levels x points, per head, of attention_weights(h + query_pos).
TEST(DeformGolden, DetaOutputAttentions) {
  std::string dir = test::golden_case("deta-tiny-model");
  json config = read_json_file(dir + "/config.json");
  auto store = load_checkpoint(dir);
  auto model = create_model(config, "DetaModel", Weights(store));
  std::map<std::string, Tensor> expected;
  for (auto& [n, t] : read_safetensors(dir + "/expected.safetensors")) expected[n] = t;
  ModelInputs in;
  in.pixel_values = expected.at("pixel_values");
  in.pixel_mask = expected.at("pixel_mask");
  ModelOutput plain = model->forward(in);
  for (const char* name : {"encoder_attentions.0", "decoder_attentions.0", "cross_attentions.0"})
    EXPECT_FALSE(plain.has(name)) << name;
  in.output_attentions = true;
  ModelOutput out = model->forward(in);

  const int64_t B = in.pixel_values.size(0), C = config["d_model"].get<int64_t>();
  const int64_t H = config["decoder_attention_heads"].get<int64_t>();
  const int64_t EH = config["encoder_attention_heads"].get<int64_t>();
  const int64_t NL = config["num_feature_levels"].get<int64_t>(), Q = config["num_queries"].get<int64_t>();
  const int64_t ENP = config["encoder_n_points"].get<int64_t>(), DNP = config["decoder_n_points"].get<int64_t>();
  const int64_t S = expected.at("encoder_last_hidden_state").size(1);
  // Attentions change nothing else.
  EXPECT_EQ(max_abs_diff(out.get("last_hidden_state"), plain.get("last_hidden_state")), 0.0);
  EXPECT_LE(max_abs_diff(out.get("last_hidden_state"), expected.at("last_hidden_state")),
            1e-4 * std::max(1.0, max_abs(expected.at("last_hidden_state"))));

  // Each [.., levels, points] block of one head sums to one.
  auto expect_distributions = [](const Tensor& t, int64_t n, const std::string& what) {
    double worst = 0;
    for (int64_t r = 0; r < t.numel() / n; ++r) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += t.f32()[r * n + j];
      worst = std::max(worst, std::fabs(s - 1));
    }
    EXPECT_LT(worst, 1e-5) << what;
  };
  for (int64_t l = 0; l < config["encoder_layers"].get<int64_t>(); ++l) {
    const Tensor& e = out.get("encoder_attentions." + std::to_string(l));
    ASSERT_EQ(e.shape(), (Shape{B, S, EH, NL, ENP}));
    expect_distributions(e, NL * ENP, "encoder_attentions");
  }
  const int64_t layers = config["decoder_layers"].get<int64_t>();
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& d = out.get("decoder_attentions." + std::to_string(l));
    const Tensor& c = out.get("cross_attentions." + std::to_string(l));
    ASSERT_EQ(d.shape(), (Shape{B, H, Q, Q}));
    ASSERT_EQ(c.shape(), (Shape{B, Q, H, NL, DNP}));
    expect_distributions(d, Q, "decoder_attentions");
    expect_distributions(c, NL * DNP, "cross_attentions");
  }
  EXPECT_FALSE(out.has("decoder_attentions." + std::to_string(layers)));
  EXPECT_FALSE(out.has("encoder_attentions." + std::to_string(config["encoder_layers"].get<int64_t>())));

  // Decoder layer 0 by hand.
  auto w = [&](const std::string& n) { return *store->find("decoder.layers.0." + n); };
  auto linear = [](const Tensor& weight, const Tensor& bias, const std::vector<double>& x, int64_t rows) {
    const int64_t out_dim = weight.size(0), in_dim = weight.size(1);
    std::vector<double> y(rows * out_dim);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out_dim; ++o) {
        double acc = bias.f32()[o];
        for (int64_t i = 0; i < in_dim; ++i) acc += weight.f32()[o * in_dim + i] * x[r * in_dim + i];
        y[r * out_dim + o] = acc;
      }
    return y;
  };
  const Tensor& qpe = *store->find("query_position_embeddings.weight");  // [Q, 2C]
  std::vector<double> target(Q * C), query_pos(Q * C), with_pos(Q * C);
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t c = 0; c < C; ++c) {
      query_pos[q * C + c] = qpe.f32()[q * 2 * C + c];
      target[q * C + c] = qpe.f32()[q * 2 * C + C + c];
      with_pos[q * C + c] = target[q * C + c] + query_pos[q * C + c];
    }
  auto qs = linear(w("self_attn.q_proj.weight"), w("self_attn.q_proj.bias"), with_pos, Q);
  auto ks = linear(w("self_attn.k_proj.weight"), w("self_attn.k_proj.bias"), with_pos, Q);
  auto vs = linear(w("self_attn.v_proj.weight"), w("self_attn.v_proj.bias"), target, Q);
  const int64_t hd = C / H;
  std::vector<double> probs(H * Q * Q), context(Q * C, 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Q; ++i) {
      double mx = -INFINITY, sum = 0;
      double* p = &probs[(h * Q + i) * Q];
      for (int64_t j = 0; j < Q; ++j) {
        double dot = 0;
        for (int64_t e = 0; e < hd; ++e) dot += qs[i * C + h * hd + e] * ks[j * C + h * hd + e];
        p[j] = dot / std::sqrt(double(hd));
        mx = std::max(mx, p[j]);
      }
      for (int64_t j = 0; j < Q; ++j) sum += (p[j] = std::exp(p[j] - mx));
      for (int64_t j = 0; j < Q; ++j) {
        p[j] /= sum;
        for (int64_t e = 0; e < hd; ++e) context[i * C + h * hd + e] += p[j] * vs[j * C + h * hd + e];
      }
    }
  auto attn = linear(w("self_attn.out_proj.weight"), w("self_attn.out_proj.bias"), context, Q);
  const Tensor lnw = w("self_attn_layer_norm.weight"), lnb = w("self_attn_layer_norm.bias");
  std::vector<double> cross_query(Q * C);
  for (int64_t q = 0; q < Q; ++q) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += target[q * C + c] + attn[q * C + c];
    mean /= C;
    for (int64_t c = 0; c < C; ++c) var += std::pow(target[q * C + c] + attn[q * C + c] - mean, 2);
    var /= C;
    for (int64_t c = 0; c < C; ++c)
      cross_query[q * C + c] = (target[q * C + c] + attn[q * C + c] - mean) / std::sqrt(var + 1e-5) * lnw.f32()[c] +
                               lnb.f32()[c] + query_pos[q * C + c];
  }
  auto logits = linear(w("encoder_attn.attention_weights.weight"), w("encoder_attn.attention_weights.bias"),
                       cross_query, Q);  // [Q, H * NL * DNP]
  const int64_t n = NL * DNP;
  std::vector<double> cross(Q * H * n);
  for (int64_t r = 0; r < Q * H; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, logits[r * n + j]);
    for (int64_t j = 0; j < n; ++j) sum += (cross[r * n + j] = std::exp(logits[r * n + j] - mx));
    for (int64_t j = 0; j < n; ++j) cross[r * n + j] /= sum;
  }
  const Tensor& d0 = out.get("decoder_attentions.0");
  const Tensor& c0 = out.get("cross_attentions.0");
  double worst_self = 0, worst_cross = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < H * Q * Q; ++i)
      worst_self = std::max(worst_self, std::fabs(d0.f32()[b * H * Q * Q + i] - probs[i]));
    for (int64_t i = 0; i < Q * H * n; ++i)
      worst_cross = std::max(worst_cross, std::fabs(c0.f32()[b * Q * H * n + i] - cross[i]));
  }
  EXPECT_LT(worst_self, 1e-5);
  EXPECT_LT(worst_cross, 1e-5);
  // Not a uniform distribution that any softmax would give: the weights really differ by query.
  EXPECT_GT(std::fabs(probs[0] - probs[Q + 1]), 1e-3);
}

}  // namespace
}  // namespace vf
