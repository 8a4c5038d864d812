// The device-side pieces a GPU relies on, checked on the emulated device (core/device.h), which runs
// the CPU kernels behind the same boundary as a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "core/boxes.h"
#include "core/device.h"
#include "models/model.h"
#include "test_util.h"
#include "visionformers.h"

namespace vf {
namespace {

const Device kEmu = Device::emulated();

TEST(BoxOps, InverseSigmoidByHand) {
  const Tensor x = Tensor::from<float>({5}, {0.5f, 0.75f, 0.0f, 1.5f, -1.0f});
  for (Device d : {Device::cpu(), kEmu}) {
    const Tensor y = inverse_sigmoid(x.to(d)).cpu();
    EXPECT_EQ(y.shape(), (Shape{5}));
    EXPECT_NEAR(y.f32()[0], 0.0f, 1e-7);
    EXPECT_NEAR(y.f32()[1], std::log(3.0f), 1e-6);
    // Clamped to [0, 1], then floored at eps = 1e-5: log(1e-5 / 1) and log(1 / 1e-5).
    EXPECT_NEAR(y.f32()[2], std::log(1e-5f), 1e-5);
    EXPECT_NEAR(y.f32()[3], -std::log(1e-5f), 1e-5);
    EXPECT_NEAR(y.f32()[4], std::log(1e-5f), 1e-5);
  }
}

TEST(BoxOps, RefineBoxesByHand) {
  // Two queries: 2-d reference points, offsets for (cx, cy, w, h).
  const Tensor delta = Tensor::from<float>({1, 2, 4}, {0, 0, 1, -1, 0.5f, -0.5f, 0, 2});
  const Tensor reference = Tensor::from<float>({1, 2, 2}, {0.25f, 0.5f, 0.5f, 0.8f});
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  const double want[8] = {0.25, 0.5, sig(1), sig(-1), sig(0.5), sig(-0.5 + std::log(4.0)), 0.5, sig(2)};
  for (Device d : {Device::cpu(), kEmu}) {
    const Tensor out = refine_boxes(delta.to(d), reference.to(d)).cpu();
    ASSERT_EQ(out.shape(), (Shape{1, 2, 4}));
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(out.f32()[i], want[i], 1e-6) << i;
  }
  EXPECT_THROW(refine_boxes(delta, Tensor::zeros({1, 2, 5})), Error);
  EXPECT_THROW(refine_boxes(delta, Tensor::zeros({1, 3, 2})), Error);
}

// A forward that is to be recorded as a CUDA graph must not wait for the device: no copy to the host
// inside it (the DETR family's reference points, box refinement and position embeddings are ops).
// Two-stage models (DETA) select their proposals on the host and are not recordable.
TEST(DeviceRoundTrips, DetrFamilyForwardsMakeNoHostCopies) {
  for (const char* name : {"detr-tiny-model", "conditional-detr-tiny-det", "deformable-detr-tiny-det"}) {
    SCOPED_TRACE(name);
    LoadOptions options;
    options.device = kEmu;
    const Pretrained p = Pretrained::from_pretrained(std::string(VF_SOURCE_DIR) + "/tests/goldens/" + name, options);
    ModelInputs in;
    in.pixel_values = Tensor::full({1, 3, 64, 96}, 0.25f).to(kEmu);
    const int64_t before = device_to_host_copies();
    const ModelOutput out = p.model->forward(in);
    EXPECT_EQ(device_to_host_copies(), before);
    ASSERT_FALSE(out.items().empty());
    for (auto& [key, t] : out.items()) EXPECT_EQ(t.device(), kEmu) << key;
    // The counter does count: the outputs' way back is one copy each.
    for (auto& [key, t] : out.items()) t.cpu();
    EXPECT_EQ(device_to_host_copies(), before + static_cast<int64_t>(out.items().size()));
  }
}

}  // namespace
}  // namespace vf
