// run_batches on a device prepares the next forward (preprocessing, and on a GPU its upload) on a
// thread of its own while the current one runs. The results must be those of running each image
// alone on the CPU, in the images' order, whatever the batch size.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/device.h"
#include "io/image.h"
#include "test_util.h"
#include "visionformers.h"

namespace vf {
namespace {

TEST(Pipeline, DeviceBatchesPreparedAheadComeBackInOrder) {
  const std::string model = test::golden_case("conditional-detr-tiny-det");
  std::vector<Image> images;
  for (const char* f : {"camera.png", "chelsea.png", "rocket.jpg", "palette_color.png", "chelsea.png"})
    images.push_back(load_image(test::images_dir() + "/" + f, /*apply_exif_orientation=*/true));
  Pretrained cpu = Pretrained::from_pretrained(model, LoadOptions{"", Device::cpu(), std::nullopt});
  Pretrained dev = Pretrained::from_pretrained(model, LoadOptions{"", Device::emulated(), std::nullopt});
  const auto want = detect(cpu, images, /*threshold=*/0.0f, /*batch_size=*/1);
  ASSERT_EQ(want.size(), images.size());
  for (int batch : {1, 2, 0}) {
    const auto got = detect(dev, images, 0.0f, batch);
    ASSERT_EQ(got.size(), want.size()) << "batch " << batch;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_FALSE(want[i].empty());
      ASSERT_EQ(got[i].size(), want[i].size()) << "batch " << batch << ", image " << i;
      for (size_t j = 0; j < want[i].size(); ++j) {
        EXPECT_EQ(got[i][j].label_id, want[i][j].label_id) << "batch " << batch << ", image " << i << ", #" << j;
        EXPECT_NEAR(got[i][j].score, want[i][j].score, 1e-5) << "batch " << batch << ", image " << i << ", #" << j;
        EXPECT_NEAR(got[i][j].x0, want[i][j].x0, 1e-3) << "batch " << batch << ", image " << i << ", #" << j;
        EXPECT_NEAR(got[i][j].y1, want[i][j].y1, 1e-3) << "batch " << batch << ", image " << i << ", #" << j;
      }
    }
  }
}

}  // namespace
}  // namespace vf
