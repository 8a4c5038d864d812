// The two-stage proposal selection as ops (ops.h topk_rows, boxes.h level_nms_proposals) on the CPU
// and the emulated device, against cases worked out by hand and against a transliteration of the
// reference (modeling_deta.py's DetaModel.forward with assign_first_stage, torchvision's nms and
// batched_nms, torch.topk with ties in index order and NaN first) written here on its own. The
// forwards of the two-stage models then make no host copy on a device (DeviceRoundTrips).
//
// This file is compiled without FMA contraction (tests/CMakeLists.txt), as torchvision's CPU kernels
// and boxes.cpp are, so that the reference's IoU rounds as theirs does.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/boxes.h"
#include "core/device.h"
#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "models/model.h"
#include "models/registry.h"
#include "proposal_inputs.h"
#include "test_util.h"

namespace vf {
namespace {

const Device kEmu = Device::emulated();
const float kNaN = std::nanf("");

std::vector<int64_t> row(const Tensor& t, int64_t b) {
  const Tensor c = t.cpu();
  return std::vector<int64_t>(c.data<int64_t>() + b * c.size(1), c.data<int64_t>() + (b + 1) * c.size(1));
}

// ---- the reference, transliterated ----

// torch.topk(v, k)[1]: a stable descending sort, NaN above every number.
std::vector<int64_t> torch_topk(const std::vector<float>& v, int64_t k) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    if (std::isnan(v[a]) || std::isnan(v[b])) return std::isnan(v[a]) && !std::isnan(v[b]);
    return v[a] > v[b];
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

using Box = std::array<float, 4>;

// torchvision/csrc/ops/cpu/nms_kernel.cpp.
std::vector<int64_t> torchvision_nms(const std::vector<Box>& boxes, const std::vector<float>& scores, double thr) {
  const std::vector<int64_t> order = torch_topk(scores, static_cast<int64_t>(scores.size()));
  std::vector<float> areas;
  for (const Box& b : boxes) areas.push_back((b[2] - b[0]) * (b[3] - b[1]));
  std::vector<char> suppressed(boxes.size(), 0);
  std::vector<int64_t> keep;
  for (size_t oi = 0; oi < order.size(); ++oi) {
    const int64_t i = order[oi];
    if (suppressed[i]) continue;
    keep.push_back(i);
    for (size_t oj = oi + 1; oj < order.size(); ++oj) {
      const int64_t j = order[oj];
      if (suppressed[j]) continue;
      const float xx1 = std::max(boxes[i][0], boxes[j][0]), yy1 = std::max(boxes[i][1], boxes[j][1]);
      const float xx2 = std::min(boxes[i][2], boxes[j][2]), yy2 = std::min(boxes[i][3], boxes[j][3]);
      const float w = std::max(0.0f, xx2 - xx1), h = std::max(0.0f, yy2 - yy1);
      const float inter = w * h;
      const float ovr = inter / (areas[i] + areas[j] - inter);
      if (ovr > thr) suppressed[j] = 1;
    }
  }
  return keep;
}

// torchvision.ops.boxes.batched_nms (its two paths on the CPU).
std::vector<int64_t> torchvision_batched_nms(const std::vector<Box>& boxes, const std::vector<float>& scores,
                                             const std::vector<int64_t>& ids, double thr) {
  const size_t n = boxes.size();
  if (4 * n <= 4000) {
    float max_coordinate = -INFINITY;  // boxes.max(): NaN when any coordinate is
    for (const Box& b : boxes)
      for (float c : b) max_coordinate = std::isnan(c) || std::isnan(max_coordinate) ? kNaN : std::max(max_coordinate, c);
    std::vector<Box> shifted = boxes;
    for (size_t i = 0; i < n; ++i)
      for (float& c : shifted[i]) c = c + static_cast<float>(ids[i]) * (max_coordinate + 1.0f);
    return torchvision_nms(shifted, scores, thr);
  }
  std::vector<char> keep_mask(n, 0);
  std::vector<int64_t> classes(ids);
  std::sort(classes.begin(), classes.end());
  classes.erase(std::unique(classes.begin(), classes.end()), classes.end());
  for (int64_t c : classes) {
    std::vector<int64_t> curr;
    std::vector<Box> cb;
    std::vector<float> cs;
    for (size_t i = 0; i < n; ++i)
      if (ids[i] == c) curr.push_back(static_cast<int64_t>(i)), cb.push_back(boxes[i]), cs.push_back(scores[i]);
    for (int64_t k : torchvision_nms(cb, cs, thr)) keep_mask[curr[k]] = 1;
  }
  std::vector<int64_t> keep_indices;
  std::vector<float> kept_scores;
  for (size_t i = 0; i < n; ++i)
    if (keep_mask[i]) keep_indices.push_back(static_cast<int64_t>(i)), kept_scores.push_back(scores[i]);
  std::vector<int64_t> r;
  for (int64_t o : torch_topk(kept_scores, static_cast<int64_t>(kept_scores.size()))) r.push_back(keep_indices[o]);
  return r;
}

float ref_sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// DetaModel.forward, assign_first_stage, for one image.
std::vector<int64_t> deta_reference(const float* logits, const float* coords, const std::vector<int64_t>& sizes,
                                    int64_t k, int64_t pre_nms_topk) {
  std::vector<int64_t> level_ids;
  for (size_t l = 0; l < sizes.size(); ++l) level_ids.insert(level_ids.end(), static_cast<size_t>(sizes[l]), l);
  const size_t S = level_ids.size();
  std::vector<Box> boxes(S);
  auto clamp01 = [](float x) { return x < 0 ? 0.0f : x > 1 ? 1.0f : x; };  // torch.clamp: NaN stays
  for (size_t s = 0; s < S; ++s) {
    const float cx = ref_sigmoid(coords[4 * s]), cy = ref_sigmoid(coords[4 * s + 1]);
    const float w = ref_sigmoid(coords[4 * s + 2]), h = ref_sigmoid(coords[4 * s + 3]);
    boxes[s] = {clamp01(cx - 0.5f * w), clamp01(cy - 0.5f * h), clamp01(cx + 0.5f * w), clamp01(cy + 0.5f * h)};
  }
  std::vector<int64_t> pre_nms_inds;
  for (size_t l = 0; l < sizes.size(); ++l) {
    std::vector<float> v(S);
    for (size_t s = 0; s < S; ++s) v[s] = ref_sigmoid(logits[s]) * static_cast<float>(level_ids[s] == int64_t(l));
    for (int64_t i : torch_topk(v, pre_nms_topk)) pre_nms_inds.push_back(i);
  }
  std::vector<Box> pb;
  std::vector<float> ps;
  std::vector<int64_t> pl;
  for (int64_t i : pre_nms_inds) pb.push_back(boxes[i]), ps.push_back(logits[i]), pl.push_back(level_ids[i]);
  std::vector<int64_t> keep_inds;
  for (int64_t i : torchvision_batched_nms(pb, ps, pl, 0.9)) keep_inds.push_back(pre_nms_inds[i]);
  if (static_cast<int64_t>(keep_inds.size()) < k) keep_inds = torch_topk(std::vector<float>(logits, logits + S), k);
  const int64_t q_per_l = k / static_cast<int64_t>(sizes.size());
  std::vector<char> mask(keep_inds.size(), 0);
  for (size_t l = 0; l < sizes.size(); ++l) {
    int64_t cumsum = 0;
    for (size_t i = 0; i < keep_inds.size(); ++i) {
      const bool ordered = level_ids[keep_inds[i]] == int64_t(l);
      cumsum += ordered;
      if (ordered && cumsum <= q_per_l) mask[i] = 1;
    }
  }
  int64_t sum = std::count(mask.begin(), mask.end(), 1);
  for (size_t i = 0; i < mask.size() && sum < k; ++i)
    if (!mask[i]) mask[i] = 1, ++sum;
  std::vector<int64_t> r;
  for (size_t i = 0; i < keep_inds.size(); ++i)
    if (mask[i]) r.push_back(keep_inds[i]);
  return r;
}

// ---- inputs ----

std::pair<Tensor, Tensor> random_inputs(int64_t B, int64_t S, uint32_t seed) {
  return {test::randn({B, S}, seed, 2.0f), test::randn({B, S, 4}, seed + 1, 1.5f)};
}

void expect_reference(const Tensor& logits, const Tensor& coords, const std::vector<int64_t>& sizes, int64_t k,
                      int64_t pre_nms_topk, const std::string& what) {
  const int64_t B = logits.size(0), S = logits.size(1);
  const Tensor cpu = level_nms_proposals(logits, coords, sizes, k, pre_nms_topk, 0.9);
  const Tensor emu = level_nms_proposals(logits.to(kEmu), coords.to(kEmu), sizes, k, pre_nms_topk, 0.9);
  ASSERT_EQ(cpu.shape(), (Shape{B, k})) << what;
  ASSERT_EQ(emu.device(), kEmu) << what;
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int64_t> want =
        deta_reference(logits.f32() + b * S, coords.f32() + b * S * 4, sizes, k, pre_nms_topk);
    EXPECT_EQ(row(cpu, b), want) << what << ", image " << b;
    EXPECT_EQ(row(emu, b), want) << what << ", image " << b << " (emulated device)";
  }
}

// ---- top-k ----

TEST(Selection, TopkRowsByHand) {
  // NaN first (in index order), then larger first, equal values (3, 3; -0, +0) in index order.
  const Tensor s = Tensor::from<float>({2, 8}, {1, kNaN, 3, 3, -0.0f, 0.0f, kNaN, 2,  //
                                                -1, -2, -1, -INFINITY, INFINITY, -0.0f, 0.0f, -1});
  for (Device d : {Device::cpu(), kEmu}) {
    const Tensor r = topk_rows(s.to(d), 6);
    ASSERT_EQ(r.shape(), (Shape{2, 6}));
    EXPECT_EQ(r.device(), d);
    EXPECT_EQ(row(r, 0), (std::vector<int64_t>{1, 6, 2, 3, 7, 0}));
    EXPECT_EQ(row(r, 1), (std::vector<int64_t>{4, 5, 6, 0, 2, 7}));
  }
  EXPECT_EQ(topk_rows(s, 0).shape(), (Shape{2, 0}));
  EXPECT_THROW(topk_rows(s, 9), Error);
  EXPECT_THROW(topk_rows(Tensor::zeros({8}), 2), Error);
}

TEST(Selection, TopkRowsMatchesTorchTopk) {
  auto [logits, unused] = test::tie_heavy(3, 2000, 7, 0.01);
  for (Device d : {Device::cpu(), kEmu}) {
    const Tensor r = topk_rows(logits.to(d), 300);
    for (int64_t b = 0; b < 3; ++b)
      EXPECT_EQ(row(r, b), torch_topk(std::vector<float>(logits.f32() + b * 2000, logits.f32() + (b + 1) * 2000), 300));
  }
}

// nms visits NaN scores first, as torchvision's descending sort does.
TEST(Selection, NmsVisitsNaNScoresFirst) {
  const Tensor boxes = Tensor::from<float>({3, 4}, {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5});
  EXPECT_EQ(nms(boxes, Tensor::from<float>({3}, {0.5f, kNaN, 0.7f}), 0.5), (std::vector<int64_t>{1, 2, 0}));
  // Two NaN-scored boxes that overlap: the first in index order is visited first and suppresses the other.
  const Tensor same = Tensor::from<float>({3, 4}, {0, 0, 1, 1, 0, 0, 1, 1, 4, 4, 5, 5});
  EXPECT_EQ(nms(same, Tensor::from<float>({3}, {kNaN, kNaN, 0.7f}), 0.5), (std::vector<int64_t>{0, 2}));
}

// One NMS over offset boxes (<= 4000 coordinates): a NaN coordinate anywhere makes torch's
// boxes.max() NaN, every offset box NaN, and nothing is suppressed.
TEST(Selection, BatchedNmsOffsetsWithNaNCoordinate) {
  const Tensor boxes = Tensor::from<float>({3, 4}, {0, 0, 1, 1, 0, 0, 1, 1, 2, 2, kNaN, 3});
  const Tensor scores = Tensor::from<float>({3}, {0.9f, 0.8f, 0.7f});
  const Tensor groups = Tensor::from_vector<int64_t>({3}, {0, 0, 1});
  EXPECT_EQ(batched_nms(boxes, scores, groups, 0.5), (std::vector<int64_t>{0, 1, 2}));
  const Tensor finite = Tensor::from<float>({3, 4}, {0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3});
  EXPECT_EQ(batched_nms(finite, scores, groups, 0.5), (std::vector<int64_t>{0, 2}));
}

// ---- DETA's first stage ----

// Two levels of 4 and 2 positions, 2 pre-NMS per level, k = 3 (k / L = 1), boxes apart unless made
// equal. Logits by position: 3 1 2 0 | 5 4, so the pre-NMS lists are {0, 2} and {4, 5}, and the
// kept boxes in score order 4 5 0 2.
TEST(Selection, FirstStageByHand) {
  const std::vector<int64_t> sizes = {4, 2};
  const Tensor logits = Tensor::from<float>({1, 6}, {3, 1, 2, 0, 5, 4});
  auto coords_with = [](std::vector<int> same_as) {  // box s is box same_as[s]
    const float centre[6] = {-2, -1, 0, 1, 2, 3};
    std::vector<float> c;
    for (int s = 0; s < 6; ++s) c.insert(c.end(), {centre[same_as[s]], centre[same_as[s]], -4, -4});
    return Tensor::from_vector<float>({1, 6, 4}, c);
  };
  struct Case {
    std::vector<int> same_as;
    std::vector<int64_t> want;
    const char* why;
  };
  const Case cases[] = {
      // 4 (level 1), 0 (level 0) in the first pass; topped up with 5, the first of the rest.
      {{0, 1, 2, 3, 4, 5}, {4, 5, 0}, "all kept"},
      // 5 is 4's box: suppressed. Kept 4 0 2: 4 and 0 first, topped up with 2.
      {{0, 1, 2, 3, 4, 4}, {4, 0, 2}, "one suppressed"},
      // 2 is 0's box too: only 4 and 0 kept, fewer than k: the plain top-k of the logits 4 5 0.
      {{0, 1, 0, 3, 4, 4}, {4, 5, 0}, "fallback"},
  };
  for (const Case& c : cases) {
    const Tensor coords = coords_with(c.same_as);
    for (Device d : {Device::cpu(), kEmu}) {
      const Tensor r = level_nms_proposals(logits.to(d), coords.to(d), sizes, 3, 2, 0.9);
      EXPECT_EQ(row(r, 0), c.want) << c.why;
    }
    EXPECT_EQ(deta_reference(logits.f32(), coords.f32(), sizes, 3, 2), c.want) << c.why << " (reference)";
  }
}

TEST(Selection, FirstStageMatchesReferenceOnTies) {
  // Levels below 1000 positions (the rest of their top 1000 comes from other levels), NaN logits,
  // equal and degenerate boxes; per-level NMS (5000 pre-NMS boxes).
  {
    auto [logits, coords] = test::tie_heavy(2, 2300, 11, 0.01);
    expect_reference(logits, coords, {1500, 600, 150, 40, 10}, 300, 1000, "five levels");
  }
  // One level: one NMS over offset boxes (<= 4000 coordinates).
  {
    auto [logits, coords] = test::tie_heavy(2, 1200, 12, 0.02);
    expect_reference(logits, coords, {1200}, 100, 1000, "one level");
  }
  // A NaN box coordinate: torch's boxes.max() is NaN, nothing suppressed.
  {
    auto [logits, coords] = test::tie_heavy(1, 1200, 13, 0.0);
    coords.f32()[4 * 600] = kNaN;
    expect_reference(logits, coords, {1200}, 100, 1000, "one level, a NaN coordinate");
  }
  // Every box the same: NMS keeps one per level, fewer than k: the fallback.
  {
    auto [logits, coords] = test::tie_heavy(1, 2000, 14, 0.01);
    for (int64_t i = 0; i < 2000 * 4; ++i) coords.f32()[i] = 0.25f;
    expect_reference(logits, coords, {1000, 700, 300}, 60, 1000, "fallback");
  }
}

TEST(Selection, FirstStageMatchesReferenceAtDetaSize) {
  // DETA-R50 at 800x1066: levels 100x134, 50x67, 25x34, 13x17, 7x9, k = 900.
  const std::vector<int64_t> sizes = {100 * 134, 50 * 67, 25 * 34, 13 * 17, 7 * 9};
  const int64_t S = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  auto [logits, coords] = random_inputs(1, S, 21);
  expect_reference(logits, coords, sizes, 900, 1000, "random");
  auto [tl, tc] = test::tie_heavy(1, S, 22, 0.001);
  expect_reference(tl, tc, sizes, 900, 1000, "ties");
}

TEST(Selection, FirstStageRejectsBadArguments) {
  auto [logits, coords] = random_inputs(1, 100, 31);
  EXPECT_THROW(level_nms_proposals(logits, coords, {60, 30}, 10, 50, 0.9), Error);     // sizes sum to 90
  EXPECT_THROW(level_nms_proposals(logits, coords, {60, 40}, 10, 101, 0.9), Error);    // pre-NMS > S
  EXPECT_THROW(level_nms_proposals(logits, coords, {60, 40}, 101, 50, 0.9), Error);    // k > S
  EXPECT_THROW(level_nms_proposals(logits, coords.reshape({1, 400}), {60, 40}, 10, 50, 0.9), Error);
  EXPECT_THROW(level_nms_proposals(logits.to(kEmu), coords, {60, 40}, 10, 50, 0.9), Error);  // two devices
}

// gather_rows takes indices on x's device; the emulated device checks them as the host does.
TEST(Selection, GatherRowsWithDeviceIndices) {
  const Tensor x = test::randn({2, 5, 3}, 41);
  const Tensor idx = Tensor::from_vector<int64_t>({2, 2}, {4, 0, 1, 1});
  const Tensor want = gather_rows(x, idx);
  const Tensor got = gather_rows(x.to(kEmu), idx.to(kEmu));
  EXPECT_EQ(got.device(), kEmu);
  EXPECT_EQ(max_abs_diff(got.cpu(), want), 0.0);
  EXPECT_EQ(want.f32()[3], x.f32()[0]);  // row 0 of image 0
  EXPECT_THROW(gather_rows(x.to(kEmu), Tensor::from_vector<int64_t>({2, 1}, {5, 0}).to(kEmu)), Error);
}

// ---- the two-stage forwards on a device ----

// A two-stage model from a vendored tiny case's config and weights, the two-stage parts (and heads)
// filled with small deterministic values.
std::unique_ptr<Model> two_stage_model(const std::string& case_name, json overrides, const std::string& arch) {
  const std::string dir = std::string(VF_SOURCE_DIR) + "/tests/goldens/" + case_name;
  json config = read_json_file(dir + "/config.json");
  config.update(overrides);
  config["architectures"] = {arch};
  auto store = load_checkpoint(dir);
  store->set_missing_filler([](const std::string& name, const Shape& shape) {
    Tensor t = Tensor::empty(shape);
    const bool norm_weight = name.find("norm") != std::string::npos && name.size() > 7 &&
                             name.compare(name.size() - 7, 7, ".weight") == 0;
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = (norm_weight ? 1.0f : 0.0f) + 0.02f * float((i * 7) % 13 - 6);
    return t;
  });
  return create_model(config, arch, Weights(store));
}

TEST(DeviceRoundTrips, TwoStageForwardsMakeNoHostCopies) {
  struct Case {
    const char* name;
    json overrides;
    const char* arch;
    std::vector<int64_t> level_sizes;  // DETA's selection needs them: the feature maps at 256x320
  };
  const Case cases[] = {
      {"deformable-detr-tiny-det",
       {{"two_stage", true}, {"with_box_refine", true}, {"two_stage_num_proposals", 12}},
       "DeformableDetrForObjectDetection",
       {}},
      // 3 levels at 256x320: 32x40 + 16x20 + 8x10 = 1680 positions, DETA's 1000 per level need 1000.
      {"deta-tiny-model", {{"two_stage", true}}, "DetaForObjectDetection", {32 * 40, 16 * 20, 8 * 10}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::unique_ptr<Model> on_cpu = two_stage_model(c.name, c.overrides, c.arch);
    std::unique_ptr<Model> on_emu;
    {
      LoadDeviceScope scope(kEmu);
      on_emu = two_stage_model(c.name, c.overrides, c.arch);
    }
    ModelInputs in;
    in.pixel_values = test::randn({1, 3, 256, 320}, 51);
    const ModelOutput want = on_cpu->forward(in);
    in.pixel_values = in.pixel_values.to(kEmu);
    const int64_t before = device_to_host_copies();
    const ModelOutput out = on_emu->forward(in);
    EXPECT_EQ(device_to_host_copies(), before);
    for (auto& [key, t] : out.items()) EXPECT_EQ(t.device(), kEmu) << key;
    // The decoder's first reference points are the selected proposals' boxes: the selection run on
    // the host over the forward's own encoder outputs picks the same ones.
    const Tensor cls = out.get("enc_outputs_class").cpu(), coords = out.get("enc_outputs_coord_logits").cpu();
    const int64_t S = cls.size(1), K = out.get("init_reference_points").size(1);
    const Tensor logit0 = narrow(cls, 2, 0, 1).reshape({1, S});
    const Tensor chosen = c.level_sizes.empty() ? topk_rows(logit0, K)
                                                : level_nms_proposals(logit0, coords, c.level_sizes, K, 1000, 0.9);
    EXPECT_EQ(max_abs_diff(out.get("init_reference_points").cpu(), act(gather_rows(coords, chosen), Act::Sigmoid)),
              0.0);
    // And the CPU's forward computes the same model (its kernels' paths differ only in rounding).
    for (const char* key : {"logits", "pred_boxes"}) EXPECT_LE(max_abs_diff(out.get(key).cpu(), want.get(key)), 1e-4);
  }
}

}  // namespace
}  // namespace vf
