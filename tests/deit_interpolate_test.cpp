// DeiT's interpolate_pos_encoding: bicubic position embeddings for other input sizes. The expected
// tensors (tests/data/deit-interp) come from transformers 5.17's DeiTForImageClassificationWithTeacher
// (image_size 32, patch 8: a 4 x 4 grid) run with interpolate_pos_encoding=True on random inputs of
// 40x56, 48x48, 32x32 (no interpolation) and 24x40 pixels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "test_util.h"

namespace vf {
namespace {

TEST(DeiTInterpolatePosEncoding, MatchesTheReferenceForOtherSizes) {
  const std::string dir = std::string(VF_SOURCE_DIR) + "/tests/data/deit-interp";
  std::map<std::string, Tensor> expected;
  for (auto& [name, t] : read_safetensors(dir + "/expected.safetensors")) expected[name] = t;
  auto store = load_checkpoint(dir);
  auto model = create_model(read_json_file(dir + "/config.json"), "", Weights(store));
  for (const char* input : {"a", "b", "c", "d"}) {
    SCOPED_TRACE(input);
    ModelInputs in;
    in.pixel_values = expected.at(std::string(input) + ".pixel_values");
    in.interpolate_pos_encoding = true;
    in.output_hidden_states = true;
    ModelOutput out = model->forward(in);
    EXPECT_LT(max_abs_diff(out.get("hidden_states.0"), expected.at(std::string(input) + ".hidden_states.0")), 1e-5f);
    EXPECT_LT(max_abs_diff(out.get("hidden_states.2"), expected.at(std::string(input) + ".last_hidden_state")), 1e-4f);
    EXPECT_LT(max_abs_diff(out.get("logits"), expected.at(std::string(input) + ".logits")), 1e-4f);
  }
  // Without the flag, only the configured size is accepted, as in the reference.
  ModelInputs in;
  in.pixel_values = expected.at("a.pixel_values");
  EXPECT_THROW(model->forward(in), Error);
}

// Bicubic interpolation on a ramp: Keys' cubic reproduces linear functions exactly away from the
// clamped border, and a same-size resize is the identity.
TEST(DeiTInterpolatePosEncoding, BicubicBasics) {
  Tensor x = Tensor::empty({1, 1, 4, 6});
  for (int64_t i = 0; i < 24; ++i) x.f32()[i] = float(i % 6) * 2.0f + float(i / 6) * 10.0f;
  Tensor same = interpolate_bicubic(x, 4, 6);
  for (int64_t i = 0; i < 24; ++i) EXPECT_NEAR(same.f32()[i], x.f32()[i], 1e-5f);
  // 6 -> 3 columns: sources at 0.5, 2.5, 4.5; the middle one needs no clamped neighbour.
  Tensor half = interpolate_bicubic(x, 4, 3);
  EXPECT_NEAR(half.f32()[1], 2.5f * 2.0f, 1e-5f);
  EXPECT_NEAR(half.f32()[3 * 2 + 1], 2.5f * 2.0f + 20.0f, 1e-5f);
}

}  // namespace
}  // namespace vf
