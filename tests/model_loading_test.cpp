// Building models from configs and weights: unknown types, missing and mis-shaped tensors.
#include <gtest/gtest.h>

#include <string>

#include "io/checkpoint.h"
#include "models/model.h"
#include "test_util.h"

using namespace vf;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
const json kTinyConvNext = {{"model_type", "convnext"}, {"hidden_sizes", {8, 16, 32, 64}}, {"depths", {1, 1, 2, 1}},
                            {"num_labels", 5}};
}  // namespace

TEST(ModelLoading, UnknownModelTypeNamesIt) {
  std::string e = error_of([] { create_model({{"model_type", "resnext9000"}}, "", Weights(std::make_shared<WeightStore>())); });
  EXPECT_NE(e.find("unknown model_type 'resnext9000'"), std::string::npos) << e;
  e = error_of([] { create_model({{"model_type", "convnext"}}, "ConvNextForSegmentation", Weights(std::make_shared<WeightStore>())); });
  EXPECT_NE(e.find("ConvNextForSegmentation"), std::string::npos) << e;
}

TEST(ModelLoading, MissingTensorsAreListedTogether) {
  auto store = std::make_shared<WeightStore>();
  create_model(kTinyConvNext, "ConvNextForImageClassification", Weights(store));
  std::string e = error_of([&] { store->check_complete(); });
  EXPECT_NE(e.find("convnext.embeddings.patch_embeddings.weight [8, 3, 4, 4]"), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
}

TEST(ModelLoading, WrongShapeNamesTheTensorAndBothShapes) {
  auto store = load_checkpoint(test::golden_case("convnext-tiny-backbone"));
  // The backbone checkpoint holds hidden_sizes [8, 16, 32, 64]; a config asking for 12 channels
  // in the first stage must be refused with the tensor's name and both shapes.
  json cfg = {{"model_type", "convnext"}, {"hidden_sizes", {12, 16, 32, 64}}, {"depths", {1, 1, 2, 1}},
              {"out_features", {"stage1"}}};
  std::string e = error_of([&] { create_model(cfg, "ConvNextBackbone", Weights(store)); });
  // Whichever of the patch embedding's tensors is read first is the one named.
  EXPECT_NE(e.find("tensor embeddings.patch_embeddings."), std::string::npos) << e;
  EXPECT_TRUE(e.find("has shape [8, 3, 4, 4], the config implies [12, 3, 4, 4]") != std::string::npos ||
              e.find("has shape [8], the config implies [12]") != std::string::npos) << e;
}

TEST(ModelLoading, TfClassNamesLoadThePyTorchModel) {
  auto store = load_checkpoint(test::golden_case("convnext-tiny-backbone"));
  json cfg = {{"model_type", "convnext"}, {"hidden_sizes", {8, 16, 32, 64}}, {"depths", {1, 1, 2, 1}},
              {"out_features", {"stage1", "stage2", "stage3", "stage4"}}};
  auto m = create_model(cfg, "TFConvNextBackbone", Weights(store));
  EXPECT_EQ(m->architecture, "ConvNextBackbone");
  store->check_complete();
}
