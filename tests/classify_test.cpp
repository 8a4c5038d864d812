// The library front door and `vf classify` on the bundled tiny model and image.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "visionformers.h"

namespace {

std::string run(const std::string& cmd, int* status) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *status = pclose(p);
  return out;
}

const std::string kAssets = std::string(VF_SOURCE_DIR) + "/assets";

}  // namespace

TEST(Classify, LibraryTopKIsSortedSoftmax) {
  auto p = vf::Pretrained::from_pretrained(kAssets + "/tiny-convnext");
  auto img = vf::load_image(kAssets + "/cat.jpg");
  auto all = vf::classify(p, {img, img}, 5);
  ASSERT_EQ(all.size(), 2u);
  ASSERT_EQ(all[0].size(), 5u);  // the tiny model has 5 labels
  double sum = 0;
  for (size_t i = 0; i < all[0].size(); ++i) {
    sum += all[0][i].score;
    if (i) {
      EXPECT_GE(all[0][i - 1].score, all[0][i].score);
    }
    EXPECT_EQ(all[0][i].label, all[1][i].label);  // same image, same answer
    EXPECT_FLOAT_EQ(all[0][i].score, all[1][i].score);
  }
  EXPECT_NEAR(sum, 1.0, 1e-5);
  EXPECT_EQ(vf::classify(p, {img}, 2)[0].size(), 2u);
}

TEST(Classify, CliJsonHasPipelineShape) {
  int status = 0;
  std::string out = run(std::string(VF_VF_BINARY) + " classify --json --top-k 3", &status);
  ASSERT_EQ(status, 0) << out;
  auto j = nlohmann::json::parse(out);
  ASSERT_TRUE(j.is_array());
  ASSERT_EQ(j.size(), 3u);
  EXPECT_TRUE(j[0]["label"].get<std::string>().rfind("label_", 0) == 0);
  EXPECT_GT(j[0]["score"].get<double>(), j[2]["score"].get<double>());
}

TEST(Classify, CliBadInputIsOneErrorAndNonZero) {
  int status = 0;
  std::string out = run(std::string(VF_VF_BINARY) + " classify " + kAssets + "/tiny-convnext " + VF_SOURCE_DIR +
                            "/tests/goldens/images/truncated.jpg 2>&1",
                        &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("truncated.jpg"), std::string::npos) << out;
  out = run(std::string(VF_VF_BINARY) + " classify /nonexistent-model 2>&1", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("nonexistent-model"), std::string::npos) << out;
}
