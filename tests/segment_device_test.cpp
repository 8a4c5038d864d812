// Segmentation post-processing with the masks on a device (Model::infer_on_device, the plane ops),
// checked on the emulated device (core/device.h): the same results as the CPU path, bit for bit, on
// hand-made inputs and on the golden cases' segmentation outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check_post.h"
#include "core/device.h"
#include "core/ops.h"
#include "io/image.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "processors/detr_postprocess.h"
#include "test_util.h"
#include "visionformers.h"

namespace vf {
namespace {

const Device kEmu = Device::emulated();

template <class T>
std::vector<T> values(const Tensor& t) {
  const Tensor h = t.cpu();
  return std::vector<T>(h.data<T>(), h.data<T>() + h.numel());
}

// ---- the plane ops, by hand ----------------------------------------------------------------------

TEST(PlaneOps, ArgmaxFirstMaximumWithScales) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Three planes of four positions. Position 0: a tie between planes 0 and 2 (first wins); 1: plane 1;
  // 2: a NaN in plane 1 never wins; 3: plane 2 only after its scale.
  const Tensor x = Tensor::from<float>({3, 2, 2}, {1, 0, 2, 1, 0, 5, nan, 1, 1, 0, 1, 0.75f});
  for (Device d : {Device::cpu(), kEmu}) {
    SCOPED_TRACE(d.str());
    const Tensor plain = argmax_planes(x.to(d));
    EXPECT_EQ(plain.device(), d);
    EXPECT_EQ(plain.shape(), (Shape{2, 2}));
    EXPECT_EQ(values<int64_t>(plain), (std::vector<int64_t>{0, 1, 0, 0}));
    // Scales 1, 1, 2: plane 2 wins positions 0 (2 > 1) and 3 (1.5 > 1) and ties plane 0 at position 2.
    const Tensor scales = Tensor::from<float>({3}, {1, 1, 2});
    const Tensor weighed = argmax_planes(x.to(d), scales, DType::I32);
    EXPECT_EQ(weighed.dtype(), DType::I32);
    EXPECT_EQ(values<int32_t>(weighed), (std::vector<int32_t>{2, 1, 0, 2}));
    // x * scale >= 1: plane 0 {1, 2, 1}, plane 1 {5, 1}, plane 2 (doubled) {2, 2, 1.5}.
    EXPECT_EQ(values<int64_t>(count_at_least(x.to(d), scales, 1.0f)), (std::vector<int64_t>{3, 2, 3}));
    EXPECT_EQ(values<int64_t>(count_at_least(x.to(d), Tensor(), 1.0f)), (std::vector<int64_t>{3, 2, 2}));
  }
  EXPECT_THROW(argmax_planes(Tensor::zeros({0, 3})), Error);
  EXPECT_THROW(argmax_planes(x, Tensor::from<float>({2}, {1, 1})), Error);
  EXPECT_THROW(argmax_planes(x, Tensor(), DType::F32), Error);
}

TEST(PlaneOps, BincountIgnoresOutsideValues) {
  const Tensor i64 = Tensor::from<int64_t>({2, 4}, {0, 2, 2, 5, -1, 2, 0, 3});
  for (Device d : {Device::cpu(), kEmu}) {
    SCOPED_TRACE(d.str());
    const Tensor c = bincount(i64.to(d), 4);
    EXPECT_EQ(c.device(), d);
    EXPECT_EQ(values<int64_t>(c), (std::vector<int64_t>{2, 0, 3, 1}));
    EXPECT_EQ(values<int64_t>(bincount(i64.to(DType::I32).to(d), 2)), (std::vector<int64_t>{2, 0}));
    EXPECT_EQ(bincount(i64.to(d), 0).numel(), 0);
  }
  EXPECT_THROW(bincount(Tensor::zeros({3}), 2), Error);
}

// ---- post-processing: the device path against the CPU path ----------------------------------------

void expect_same(const SegmentationResult& dev, const SegmentationResult& cpu, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_TRUE(dev.segmentation.is_cpu());
  ASSERT_EQ(dev.segmentation.dtype(), cpu.segmentation.dtype());
  ASSERT_EQ(dev.segmentation.shape(), cpu.segmentation.shape());
  EXPECT_EQ(std::memcmp(dev.segmentation.raw(), cpu.segmentation.raw(), cpu.segmentation.nbytes()), 0);
  EXPECT_EQ(dev.has_rle, cpu.has_rle);
  EXPECT_EQ(dev.rle, cpu.rle);
  ASSERT_EQ(dev.segments_info.size(), cpu.segments_info.size());
  for (size_t i = 0; i < cpu.segments_info.size(); ++i) {
    EXPECT_EQ(dev.segments_info[i].id, cpu.segments_info[i].id) << i;
    EXPECT_EQ(dev.segments_info[i].label_id, cpu.segments_info[i].label_id) << i;
    EXPECT_EQ(dev.segments_info[i].was_fused, cpu.segments_info[i].was_fused) << i;
    EXPECT_EQ(dev.segments_info[i].score, cpu.segments_info[i].score) << i;
  }
}

// Every segmentation post-processing of (logits, pred_masks) with `opt`, on the CPU and with both
// inputs on the emulated device; returns the CPU's panoptic results.
std::vector<SegmentationResult> expect_device_matches_cpu(DetrPostKind kind, const Tensor& logits,
                                                          const Tensor& masks, SegmentationOptions opt,
                                                          const std::string& what) {
  const Tensor dl = logits.to(kEmu), dm = masks.to(kEmu);
  const auto pan = post_process_panoptic_segmentation(kind, logits, masks, opt);
  const auto pan_dev = post_process_panoptic_segmentation(kind, dl, dm, opt);
  opt.return_coco_annotation = true;
  const auto inst = post_process_instance_segmentation(kind, logits, masks, opt);
  const auto inst_dev = post_process_instance_segmentation(kind, dl, dm, opt);
  const auto sem = post_process_semantic_segmentation(kind, logits, masks, opt.target_sizes);
  const auto sem_dev = post_process_semantic_segmentation(kind, dl, dm, opt.target_sizes);
  EXPECT_EQ(pan_dev.size(), pan.size());
  EXPECT_EQ(inst_dev.size(), inst.size());
  EXPECT_EQ(sem_dev.size(), sem.size());
  for (size_t b = 0; b < pan.size() && b < pan_dev.size(); ++b)
    expect_same(pan_dev[b], pan[b], what + " panoptic " + std::to_string(b));
  for (size_t b = 0; b < inst.size() && b < inst_dev.size(); ++b)
    expect_same(inst_dev[b], inst[b], what + " instance " + std::to_string(b));
  for (size_t b = 0; b < sem.size() && b < sem_dev.size(); ++b) {
    SCOPED_TRACE(what + " semantic " + std::to_string(b));
    EXPECT_TRUE(sem_dev[b].is_cpu());
    EXPECT_EQ(sem_dev[b].shape(), sem[b].shape());
    EXPECT_EQ(values<int64_t>(sem_dev[b]), values<int64_t>(sem[b]));
  }
  return pan;
}

TEST(SegmentOnDevice, HandMadeTiesThresholdsAndFusion) {
  // Classes {0, 1, 2} + no-object (3); one image of 2 x 3 mask pixels. Queries 0 and 1: class 1 with
  // equal logits and equal masks (an exact tie everywhere: query 0 takes every pixel, and query 1,
  // with no pixel, has no segment); query 2: class 2 on the top right pixel; query 3: class 1, the
  // strongest at the bottom right pixel but below mask_threshold everywhere (no segment: the pixel
  // gets 0); query 4: no-object.
  const float hi = 4.f, lo = -4.f, below = -9.f;
  Tensor logits = Tensor::from<float>({1, 5, 4}, {0, 5, 0, 0, 0, 5, 0, 0, 0, 0, 6, 0, 0, 5, 0, 0, 0, 0, 0, 5});
  Tensor masks = Tensor::from<float>({1, 5, 2, 3}, {hi, hi, lo, hi, hi, lo,  //
                                                    hi, hi, lo, hi, hi, lo,  //
                                                    lo, lo, hi, lo, lo, lo,  //
                                                    below, below, below, below, below, -3.f,  //
                                                    hi, hi, hi, hi, hi, hi});
  SegmentationOptions opt;
  std::vector<SegmentationResult> pan = expect_device_matches_cpu(DetrPostKind::Detr, logits, masks, opt, "plain");
  // By hand: query 0 -> segment 1 on the two left columns, query 2 -> segment 2 on the top right pixel;
  // sigmoid(-3) = 0.047 beats sigmoid(-4) = 0.018 at the bottom right, which stays 0.
  ASSERT_EQ(pan.size(), 1u);
  EXPECT_EQ(values<int32_t>(pan[0].segmentation), (std::vector<int32_t>{1, 1, 2, 1, 1, 0}));
  ASSERT_EQ(pan[0].segments_info.size(), 2u);
  EXPECT_EQ(pan[0].segments_info[0].label_id, 1);
  EXPECT_EQ(pan[0].segments_info[1].label_id, 2);

  // Fusing class 1, a resize to 5 x 7, another mask threshold and no overlap rule.
  opt.label_ids_to_fuse = {1};
  opt.target_sizes = {{5, 7}};
  opt.mask_threshold = 0.3;
  opt.overlap_mask_area_threshold = 0.0;
  pan = expect_device_matches_cpu(DetrPostKind::Detr, logits, masks, opt, "fused, resized");
  EXPECT_EQ(pan[0].segmentation.shape(), (Shape{5, 7}));
  for (const SegmentInfo& s : pan[0].segments_info) EXPECT_EQ(s.was_fused, s.label_id == 1);

  // Conditional DETR's kind, and nothing above the threshold (the -1 map).
  expect_device_matches_cpu(DetrPostKind::ConditionalDetr, logits, masks, opt, "conditional");
  opt.threshold = 0.999;
  pan = expect_device_matches_cpu(DetrPostKind::Detr, logits, masks, opt, "none kept");
  EXPECT_EQ(pan[0].segmentation.dtype(), DType::F32);
}

std::map<std::string, Tensor> case_outputs(const std::string& name) {
  std::map<std::string, Tensor> out;
  for (auto& [k, t] : read_safetensors(test::golden_case(name) + "/expected.safetensors")) out[k] = t;
  return out;
}

TEST(SegmentOnDevice, GoldenSegmentationOutputs) {
  for (const char* name : {"postproc-detr", "postproc-conditional-detr", "detr-tiny-seg", "conditional-detr-tiny-seg"}) {
    SCOPED_TRACE(name);
    const std::string dir = test::golden_case(name);
    const json spec = read_json_file(dir + "/case.json");
    const DetrPostKind kind = detr_post_kind(spec.at("family").get<std::string>());
    std::map<std::string, Tensor> outputs = case_outputs(name);
    const Tensor& logits = outputs.at("logits");
    const Tensor& masks = outputs.at("pred_masks");
    const int64_t batch = logits.size(0);

    // The reference outputs on the device pass the case's own segmentation checks (object detection
    // reads its inputs on the host).
    check::Case c;
    c.dir = dir;
    c.spec = spec;
    c.spec["post"] = json::array();
    for (const json& post : spec.at("post"))
      if (post.at("fn").get<std::string>().find("segmentation") != std::string::npos) c.spec["post"].push_back(post);
    c.expected = outputs;
    std::map<std::string, Tensor> on_device;
    for (auto& [k, t] : outputs) on_device[k] = t.to(kEmu);
    check::CheckReport report;
    check::run_post(c, on_device, report);
    EXPECT_EQ(report.failures(), 0);
    EXPECT_GE(report.checked(), 3);

    // And equal the CPU path's results under several settings.
    SegmentationOptions opt;
    for (int64_t b = 0; b < batch; ++b) opt.target_sizes.push_back({300 + 37 * b, 451 - 50 * b});
    opt.threshold = 0.0;
    opt.overlap_mask_area_threshold = 0.05;
    opt.label_ids_to_fuse = {1, 2};
    expect_device_matches_cpu(kind, logits, masks, opt, "resized, fused");
    opt.target_sizes.clear();
    opt.label_ids_to_fuse.clear();
    opt.threshold = 0.1;
    opt.mask_threshold = 0.2;
    opt.overlap_mask_area_threshold = 0.0;
    expect_device_matches_cpu(kind, logits, masks, opt, "mask size");
  }
}

// ---- the model's outputs left on the device ------------------------------------------------------

TEST(SegmentOnDevice, InferOnDeviceKeepsOutputsThere) {
  const std::string dir = test::golden_case("detr-tiny-seg");
  const Pretrained dev = Pretrained::from_pretrained(dir, LoadOptions{"", kEmu, std::nullopt});
  ModelInputs in;
  in.pixel_values = test::randn({1, 3, 64, 96}, 7);
  const ModelOutput host = dev.model->infer(in);
  for (int run = 0; run < 3; ++run) {  // (on a GPU, runs 2 and 3 replay a recording and hand out copies)
    const ModelOutput kept = dev.model->infer_on_device(in);
    ASSERT_EQ(kept.items().size(), host.items().size());
    for (auto& [k, t] : kept.items()) {
      EXPECT_EQ(t.device(), kEmu) << k;
      EXPECT_EQ(max_abs_diff(t.cpu(), host.get(k)), 0) << k;
    }
  }
  for (auto& [k, t] : host.items()) EXPECT_TRUE(t.is_cpu()) << k;
}

// vf::segment on a device against the host post-processing of the same model's outputs. (Not against
// a CPU model: a device's convolutions run their NHWC kernels where the CPU's ResNet runs blocked
// ones, so the two forwards may differ in the last bits, e.g. a score 0.896089 against 0.89609 in the
// sanitizer build.)
TEST(SegmentOnDevice, SegmentOnTheDeviceEqualsCpu) {
  const std::string dir = test::golden_case("detr-tiny-seg");
  const Pretrained dev = Pretrained::from_pretrained(dir, LoadOptions{"", kEmu, std::nullopt});
  const std::vector<Image> images = {load_image(test::images_dir() + "/chelsea.png", true),
                                     load_image(test::images_dir() + "/rocket.jpg", true)};
  for (const char* task : {"panoptic", "instance", "semantic"}) {
    SCOPED_TRACE(task);
    SegmentParams params;
    params.task = task;
    params.threshold = 0.0;
    params.overlap_mask_area_threshold = 0.05;
    std::vector<SegmentedImage> want;
    for (const Image& image : images)  // one image a forward, as segment(..., 1) runs them
      want.push_back(std::move(segment_output(dev, dev.run({image}), {&image}, params)[0]));
    const int64_t before = device_to_host_copies();
    const std::vector<SegmentedImage> got = segment(dev, images, params, 1);
    // Per image, what comes back: the logits and the map (semantic), or the logits, the owner map
    // and the two area vectors; never the masks or the other outputs.
    EXPECT_LE(device_to_host_copies() - before, static_cast<int64_t>(4 * images.size()));
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(values<int32_t>(got[i].map), values<int32_t>(want[i].map)) << i;
      ASSERT_EQ(got[i].segments.size(), want[i].segments.size()) << i;
      for (size_t s = 0; s < want[i].segments.size(); ++s) {
        EXPECT_EQ(got[i].segments[s].id, want[i].segments[s].id);
        EXPECT_EQ(got[i].segments[s].label_id, want[i].segments[s].label_id);
        EXPECT_EQ(got[i].segments[s].score, want[i].segments[s].score);
      }
    }
  }
}

}  // namespace
}  // namespace vf
