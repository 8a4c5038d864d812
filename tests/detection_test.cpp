// Detection machinery: boxes, NMS, linear sum assignment, DETR-family post-processing and losses.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/assignment.h"
#include "core/boxes.h"

using namespace vf;

namespace {

double assignment_cost(const std::vector<double>& c, int64_t cols, const std::vector<std::pair<int64_t, int64_t>>& a) {
  double s = 0;
  for (auto [r, k] : a) s += c[r * cols + k];
  return s;
}

// Minimal cost over every injective map of the smaller side into the larger, by enumeration.
double brute_force_min(const std::vector<double>& c, int64_t rows, int64_t cols,
                       std::vector<std::pair<int64_t, int64_t>>* best_pairs) {
  const bool tr = rows > cols;
  const int64_t small = tr ? cols : rows, large = tr ? rows : cols;
  std::vector<int64_t> perm(large);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  double best = INFINITY;
  do {
    double s = 0;
    for (int64_t i = 0; i < small; ++i) s += tr ? c[perm[i] * cols + i] : c[i * cols + perm[i]];
    if (s < best) {
      best = s;
      best_pairs->clear();
      for (int64_t i = 0; i < small; ++i) best_pairs->emplace_back(tr ? perm[i] : i, tr ? i : perm[i]);
      std::sort(best_pairs->begin(), best_pairs->end());
    }
  } while (std::next_permutation(perm.begin(), perm.end()));
  return best;
}

}  // namespace

TEST(DetBoxes, FormatRoundTrip) {
  Tensor c = Tensor::from<float>({2, 4}, {0.5f, 0.5f, 0.4f, 0.6f, 0.3f, 0.7f, 0.2f, 0.1f});
  Tensor k = center_to_corners(c);
  EXPECT_FLOAT_EQ(k.f32()[0], 0.3f);
  EXPECT_FLOAT_EQ(k.f32()[1], 0.2f);
  EXPECT_FLOAT_EQ(k.f32()[2], 0.7f);
  EXPECT_FLOAT_EQ(k.f32()[3], 0.8f);
  Tensor back = corners_to_center(k);
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(back.f32()[i], c.f32()[i], 1e-7);
  Tensor a = box_area(k);
  EXPECT_NEAR(a.f32()[0], 0.24f, 1e-7);
  EXPECT_NEAR(a.f32()[1], 0.02f, 1e-7);
  EXPECT_THROW(center_to_corners(Tensor::zeros({3, 3})), Error);
}

TEST(DetBoxes, IouAndGeneralizedIou) {
  Tensor a = Tensor::from<float>({2, 4}, {0, 0, 2, 2, 0, 0, 1, 1});
  Tensor b = Tensor::from<float>({3, 4}, {1, 1, 3, 3, 0, 0, 2, 2, 5, 5, 6, 6});
  BoxIou iu = box_iou(a, b);
  ASSERT_EQ(iu.iou.shape(), (Shape{2, 3}));
  EXPECT_NEAR(iu.iou.f32()[0], 1.0 / 7.0, 1e-7);
  EXPECT_NEAR(iu.union_area.f32()[0], 7.0, 1e-6);
  EXPECT_NEAR(iu.iou.f32()[1], 1.0, 1e-7);
  EXPECT_NEAR(iu.iou.f32()[2], 0.0, 1e-7);
  EXPECT_NEAR(iu.iou.f32()[3], 0.0, 1e-7);  // (0,0,1,1) vs (1,1,3,3) touch at a corner
  EXPECT_NEAR(iu.iou.f32()[4], 0.25, 1e-7);
  Tensor g = generalized_box_iou(a, b);
  EXPECT_NEAR(g.f32()[0], 1.0 / 7.0 - 2.0 / 9.0, 1e-6);
  EXPECT_NEAR(g.f32()[1], 1.0, 1e-6);
  EXPECT_NEAR(g.f32()[2], 0.0 - (36.0 - 5.0) / 36.0, 1e-6);
  EXPECT_NEAR(g.f32()[5], 0.0 - (36.0 - 2.0) / 36.0, 1e-6);
  Tensor bad = Tensor::from<float>({1, 4}, {2, 0, 1, 1});
  EXPECT_THROW(generalized_box_iou(a, bad), Error);
}

TEST(DetNms, SuppressesByScoreOrder) {
  // Box 1 has the best score; box 0 overlaps it with IoU 0.6, box 2 with IoU ~0.077, box 3 is apart.
  Tensor boxes = Tensor::from<float>({4, 4}, {0, 0, 10, 10, 0, 0, 10, 6, 0, 5, 10, 13, 20, 20, 30, 30});
  Tensor scores = Tensor::from<float>({4}, {0.8f, 0.9f, 0.7f, 0.1f});
  EXPECT_EQ(nms(boxes, scores, 0.5), (std::vector<int64_t>{1, 2, 3}));
  // IoU(1,0) = 0.6 < 0.61: kept; IoU(0,2) = 50/130 ~ 0.385.
  EXPECT_EQ(nms(boxes, scores, 0.61), (std::vector<int64_t>{1, 0, 2, 3}));
  // IoU(1,2) = 10/130 ~ 0.077.
  EXPECT_EQ(nms(boxes, scores, 0.05), (std::vector<int64_t>{1, 3}));
  // A suppressed box does not suppress others: 0 would suppress 2 (IoU 0.29) but 1 removes 0 first
  // (IoU 0.33), and 1 does not touch 2.
  Tensor b2 = Tensor::from<float>({3, 4}, {0, 0, 10, 10, 0, -5, 10, 5, 0, 5.5f, 10, 15.5f});
  Tensor s2 = Tensor::from<float>({3}, {0.8f, 0.9f, 0.7f});
  EXPECT_EQ(nms(b2, s2, 0.25), (std::vector<int64_t>{1, 2}));
  // Equal scores keep input order.
  Tensor s3 = Tensor::from<float>({4}, {0.5f, 0.5f, 0.5f, 0.5f});
  EXPECT_EQ(nms(boxes, s3, 0.5), (std::vector<int64_t>{0, 2, 3}));
  EXPECT_TRUE(nms(Tensor::zeros({0, 4}), Tensor::zeros({0}), 0.5).empty());
}

TEST(DetNms, BatchedKeepsGroupsApartOnBothPaths) {
  Tensor boxes = Tensor::from<float>({4, 4}, {0, 0, 10, 10, 0, 0, 10, 9, 0, 0, 10, 8, 50, 50, 60, 60});
  Tensor scores = Tensor::from<float>({4}, {0.9f, 0.8f, 0.95f, 0.1f});
  Tensor groups = Tensor::from<int64_t>({4}, {0, 0, 1, 0});
  EXPECT_EQ(batched_nms(boxes, scores, groups, 0.5), (std::vector<int64_t>{2, 0, 3}));

  // Many random boxes: the offset path (<= 4000 coordinates) and the per-group path (> 4000) must
  // both equal a plain per-group NMS.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.f, 100.f), ws(1.f, 30.f), sc(0.f, 1.f);
  for (int n : {300, 1500}) {
    std::vector<float> b(4 * n), s(n);
    std::vector<int64_t> g(n);
    for (int i = 0; i < n; ++i) {
      float x = u(rng), y = u(rng);
      b[4 * i] = x, b[4 * i + 1] = y, b[4 * i + 2] = x + ws(rng), b[4 * i + 3] = y + ws(rng);
      s[i] = sc(rng);
      g[i] = i % 5;
    }
    auto keep = batched_nms(Tensor::from_vector<float>({n, 4}, b), Tensor::from_vector<float>({n}, s),
                            Tensor::from_vector<int64_t>({n}, g), 0.5);
    std::vector<int64_t> expect;
    for (int grp = 0; grp < 5; ++grp) {
      std::vector<float> gb, gs;
      std::vector<int64_t> idx;
      for (int i = 0; i < n; ++i)
        if (g[i] == grp) {
          idx.push_back(i);
          gs.push_back(s[i]);
          gb.insert(gb.end(), b.begin() + 4 * i, b.begin() + 4 * i + 4);
        }
      for (int64_t k : nms(gb.data(), gs.data(), static_cast<int64_t>(idx.size()), 0.5)) expect.push_back(idx[k]);
    }
    std::sort(expect.begin(), expect.end(), [&](int64_t x, int64_t y) { return s[x] > s[y]; });
    EXPECT_EQ(keep, expect) << "n = " << n;
    EXPECT_LT(keep.size(), static_cast<size_t>(n));
  }
}

TEST(DetAssignment, MatchesBruteForceOnRandomMatrices) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> u(-3.0, 5.0);
  int checked = 0;
  for (int rows = 1; rows <= 6; ++rows)
    for (int cols = 1; cols <= 6; ++cols)
      for (int rep = 0; rep < 6; ++rep) {
        std::vector<double> c(rows * cols);
        for (double& x : c) x = u(rng);
        auto got = linear_sum_assignment(c.data(), rows, cols);
        std::vector<std::pair<int64_t, int64_t>> want;
        double best = brute_force_min(c, rows, cols, &want);
        ASSERT_EQ(got.size(), static_cast<size_t>(std::min(rows, cols)));
        EXPECT_NEAR(assignment_cost(c, cols, got), best, 1e-9) << rows << "x" << cols;
        EXPECT_EQ(got, want) << rows << "x" << cols;  // continuous costs: the optimum is unique
        ++checked;
      }
  EXPECT_EQ(checked, 216);
}

TEST(DetAssignment, TiesAndIntegerCosts) {
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> u(0, 3);
  for (int rep = 0; rep < 200; ++rep) {
    int rows = 1 + rep % 5, cols = 1 + (rep / 5) % 5;
    std::vector<double> c(rows * cols);
    for (double& x : c) x = u(rng);
    auto got = linear_sum_assignment(c.data(), rows, cols);
    std::vector<std::pair<int64_t, int64_t>> want;
    double best = brute_force_min(c, rows, cols, &want);
    EXPECT_DOUBLE_EQ(assignment_cost(c, cols, got), best);
    std::vector<int64_t> rs, cs;
    for (auto [r, k] : got) rs.push_back(r), cs.push_back(k);
    EXPECT_TRUE(std::is_sorted(rs.begin(), rs.end()));
    std::sort(cs.begin(), cs.end());
    EXPECT_EQ(std::unique(cs.begin(), cs.end()), cs.end());
  }
  // scipy's documented example.
  Tensor cost = Tensor::from<float>({3, 3}, {4, 1, 3, 2, 0, 5, 3, 2, 2});
  auto a = linear_sum_assignment(cost);
  EXPECT_EQ(a, (std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 0}, {2, 2}}));
  std::vector<double> nan_cost = {1.0, NAN};
  EXPECT_THROW(linear_sum_assignment(nan_cost.data(), 1, 2), Error);
  std::vector<double> inf_cost = {INFINITY, INFINITY, INFINITY, INFINITY};
  EXPECT_THROW(linear_sum_assignment(inf_cost.data(), 2, 2), Error);
}

// ---- post-processing ------------------------------------------------------------------------------
#include "check_post.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "processors/detr_postprocess.h"
#include "test_util.h"

namespace {

check::Case load_case(const std::string& name) {
  check::Case c;
  c.dir = vf::test::golden_case(name);
  c.spec = read_json_file(c.dir + "/case.json");
  for (auto& [k, t] : read_safetensors(c.dir + "/expected.safetensors")) c.expected[k] = t;
  return c;
}

// Runs the case's `post` entries on `outputs`; returns (failures, checked).
std::pair<int, int> run_post_on(const check::Case& c, const std::map<std::string, Tensor>& outputs) {
  check::CheckReport report;
  check::run_post(c, outputs, report);
  return {report.failures(), report.checked()};
}

}  // namespace

TEST(DetPost, KindFromFamilyOrProcessor) {
  EXPECT_EQ(detr_post_kind("detr"), DetrPostKind::Detr);
  EXPECT_EQ(detr_post_kind("DetrImageProcessor"), DetrPostKind::Detr);
  EXPECT_EQ(detr_post_kind("conditional_detr"), DetrPostKind::ConditionalDetr);
  EXPECT_EQ(detr_post_kind("DeformableDetrImageProcessorFast"), DetrPostKind::DeformableDetr);
  EXPECT_EQ(detr_post_kind("deta"), DetrPostKind::Deta);
  EXPECT_EQ(detr_post_kind("DetaImageProcessor"), DetrPostKind::Deta);
  EXPECT_THROW(detr_post_kind("vit"), Error);
}

TEST(DetPost, DetrSoftmaxDetections) {
  // Two queries, classes {0, 1} + no-object. Query 0: class 1 wins (p ~ 0.84); query 1: no-object
  // dominates, its best real class has p ~ 0.11.
  Tensor logits = Tensor::from<float>({1, 2, 3}, {0.f, 2.f, 0.f, 0.f, 0.f, 2.f});
  Tensor boxes = Tensor::from<float>({1, 2, 4}, {0.5f, 0.5f, 0.2f, 0.4f, 0.25f, 0.25f, 0.5f, 0.5f});
  ObjectDetectionOptions opt;
  opt.threshold = 0.5;
  opt.target_sizes = {{100, 200}};
  auto d = post_process_object_detection(DetrPostKind::Detr, logits, boxes, opt);
  ASSERT_EQ(d.size(), 1u);
  ASSERT_EQ(d[0].scores.numel(), 1);
  const double e2 = std::exp(2.0);
  EXPECT_NEAR(d[0].scores.f32()[0], e2 / (e2 + 2), 1e-6);
  EXPECT_EQ(d[0].labels.data<int64_t>()[0], 1);
  const float want[4] = {0.4f * 200, 0.3f * 100, 0.6f * 200, 0.7f * 100};
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(d[0].boxes.f32()[k], want[k], 1e-4);
  opt.threshold = 0.1;
  opt.target_sizes.clear();
  d = post_process_object_detection(DetrPostKind::Detr, logits, boxes, opt);
  ASSERT_EQ(d[0].scores.numel(), 2);  // query order, relative boxes
  EXPECT_NEAR(d[0].scores.f32()[1], 1 / (e2 + 2), 1e-6);
  EXPECT_EQ(d[0].labels.data<int64_t>()[1], 0);
  EXPECT_NEAR(d[0].boxes.f32()[4], 0.0f, 1e-7);
  EXPECT_NEAR(d[0].boxes.f32()[7], 0.5f, 1e-7);
  opt.target_sizes = {{1, 1}, {2, 2}};
  EXPECT_THROW(post_process_object_detection(DetrPostKind::Detr, logits, boxes, opt), Error);
}

TEST(DetPost, SigmoidTopKAndDetaNms) {
  // Query 0 and 1 are the same box; query 2 elsewhere. Two classes.
  Tensor logits = Tensor::from<float>({1, 3, 2}, {3.f, -1.f, 2.f, 1.f, -2.f, 0.5f});
  Tensor boxes = Tensor::from<float>({1, 3, 4}, {0.5f, 0.5f, 0.2f, 0.2f, 0.5f, 0.5f, 0.2f, 0.2f, 0.2f, 0.2f, 0.1f, 0.1f});
  ObjectDetectionOptions opt;
  opt.threshold = 0.0;
  opt.top_k = 3;
  auto d = post_process_object_detection(DetrPostKind::DeformableDetr, logits, boxes, opt);
  // Sorted pairs: (q0,c0) 3, (q1,c0) 2, (q1,c1) 1 ...
  ASSERT_EQ(d[0].scores.numel(), 3);
  EXPECT_NEAR(d[0].scores.f32()[0], 1 / (1 + std::exp(-3.0)), 1e-6);
  EXPECT_EQ(std::vector<int64_t>(d[0].labels.data<int64_t>(), d[0].labels.data<int64_t>() + 3),
            (std::vector<int64_t>{0, 0, 1}));
  EXPECT_NEAR(d[0].boxes.f32()[8], 0.4f, 1e-7);  // third pick is query 1
  // DETA: per class, the same box of queries 0 and 1 survives once: (q1,c0) falls to (q0,c0) and
  // (q0,c1) to (q1,c1); query 2's box stays in both classes.
  opt.nms_threshold = 0.7;
  d = post_process_object_detection(DetrPostKind::Deta, logits, boxes, opt);
  ASSERT_EQ(d[0].scores.numel(), 4);
  EXPECT_EQ(std::vector<int64_t>(d[0].labels.data<int64_t>(), d[0].labels.data<int64_t>() + 4),
            (std::vector<int64_t>{0, 1, 1, 0}));
  EXPECT_NEAR(d[0].scores.f32()[1], 1 / (1 + std::exp(-1.0)), 1e-6);
}

TEST(DetPost, PanopticAndInstanceSegments) {
  // Classes {0, 1, 2} + no-object (3). Queries: 0 -> class 1 (left column), 1 -> class 2 (right
  // column, top), 2 -> class 1 (right column, bottom), 3 -> no-object.
  const float hi = 4.f, lo = -4.f;
  Tensor logits = Tensor::from<float>({1, 4, 4}, {0, 5, 0, 0, 0, 0, 5, 0, 0, 5, 0, 0, 0, 0, 0, 5});
  Tensor masks = Tensor::from<float>({1, 4, 2, 2}, {hi, lo, hi, lo, lo, hi, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi});
  SegmentationOptions opt;
  auto inst = post_process_instance_segmentation(DetrPostKind::Detr, logits, masks, opt);
  ASSERT_EQ(inst.size(), 1u);
  ASSERT_EQ(inst[0].segmentation.dtype(), DType::I32);
  const int32_t* s = inst[0].segmentation.data<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(s, s + 4), (std::vector<int32_t>{1, 2, 1, 3}));
  ASSERT_EQ(inst[0].segments_info.size(), 3u);
  EXPECT_EQ(inst[0].segments_info[2].label_id, 1);
  EXPECT_FALSE(inst[0].segments_info[2].was_fused);
  const double e5 = std::exp(5.0);
  EXPECT_NEAR(inst[0].segments_info[0].score, e5 / (e5 + 3), 1e-6);

  // Fusing class 1: queries 0 and 2 share segment 1; the reference then continues counting from
  // the reused id, so query 2's successor would get id 2 again.
  opt.label_ids_to_fuse = {1};
  auto pan = post_process_panoptic_segmentation(DetrPostKind::Detr, logits, masks, opt);
  s = pan[0].segmentation.data<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(s, s + 4), (std::vector<int32_t>{1, 2, 1, 1}));
  ASSERT_EQ(pan[0].segments_info.size(), 3u);
  EXPECT_EQ(pan[0].segments_info[2].id, 1);
  EXPECT_TRUE(pan[0].segments_info[2].was_fused);
  EXPECT_FALSE(pan[0].segments_info[1].was_fused);

  // A target size resizes the masks first; the overlap rule drops query 2 when its own mask is
  // mostly taken by others.
  opt.label_ids_to_fuse.clear();
  opt.target_sizes = {{4, 4}};
  pan = post_process_panoptic_segmentation(DetrPostKind::Detr, logits, masks, opt);
  EXPECT_EQ(pan[0].segmentation.shape(), (Shape{4, 4}));
  EXPECT_EQ(pan[0].segmentation.data<int32_t>()[0], 1);
  EXPECT_EQ(pan[0].segmentation.data<int32_t>()[15], 3);

  // Nothing above the threshold: a float map of -1.
  opt.threshold = 0.99;
  pan = post_process_panoptic_segmentation(DetrPostKind::Detr, logits, masks, opt);
  EXPECT_EQ(pan[0].segmentation.dtype(), DType::F32);
  EXPECT_EQ(pan[0].segmentation.shape(), (Shape{4, 4}));
  EXPECT_EQ(pan[0].segmentation.f32()[5], -1.0f);
  EXPECT_TRUE(pan[0].segments_info.empty());

  // COCO run-length encoding of the instance map.
  opt.threshold = 0.5;
  opt.target_sizes.clear();
  opt.return_coco_annotation = true;
  inst = post_process_instance_segmentation(DetrPostKind::Detr, logits, masks, opt);
  ASSERT_TRUE(inst[0].has_rle);
  ASSERT_EQ(inst[0].rle.size(), 3u);  // values 1, 2, 3 on the map [1, 2, 1, 3]
  EXPECT_EQ(inst[0].rle[0], (std::vector<int64_t>{1, 1, 3, 1}));
  EXPECT_EQ(inst[0].rle[2], (std::vector<int64_t>{4, 1}));
  EXPECT_THROW(post_process_panoptic_segmentation(DetrPostKind::DeformableDetr, logits, masks, opt), Error);
}

TEST(DetPost, SemanticSegmentation) {
  // DETR drops the no-object column; Conditional DETR keeps every class.
  Tensor logits = Tensor::from<float>({1, 2, 3}, {4, 0, 0, 0, 4, 6});
  Tensor masks = Tensor::from<float>({1, 2, 1, 2}, {5, -5, -5, 5});
  auto m = post_process_semantic_segmentation(DetrPostKind::Detr, logits, masks);
  ASSERT_EQ(m[0].shape(), (Shape{1, 2}));
  EXPECT_EQ(m[0].data<int64_t>()[0], 0);
  EXPECT_EQ(m[0].data<int64_t>()[1], 1);
  m = post_process_semantic_segmentation(DetrPostKind::ConditionalDetr, logits, masks, {{3, 5}});
  ASSERT_EQ(m[0].shape(), (Shape{3, 5}));
  EXPECT_EQ(m[0].data<int64_t>()[0], 0);
  EXPECT_EQ(m[0].data<int64_t>()[4], 2);
}

TEST(DetPost, GoldenPostprocCases) {
  for (const char* name : {"postproc-deformable-detr", "postproc-deta"}) {
    check::Case c = load_case(name);
    auto [failures, checked] = run_post_on(c, c.expected);
    EXPECT_EQ(failures, 0) << name;
    EXPECT_GE(checked, 4) << name;
  }
}

TEST(DetPost, GoldenModelCasesOnReferenceOutputs) {
  for (const char* name : {"conditional-detr-tiny-det", "deformable-detr-tiny-det"}) {
    check::Case c = load_case(name);
    auto [failures, checked] = run_post_on(c, c.expected);
    EXPECT_EQ(failures, 0) << name;
    EXPECT_EQ(checked, 2) << name;
  }
}

TEST(DetPost, GoldenComparisonCatchesWrongOutputs) {
  check::Case c = load_case("postproc-deta");
  std::map<std::string, Tensor> outs = c.expected;
  // Lower the best logit of image 0: its top detection drops in score and must be reported.
  Tensor logits = outs["logits"].clone();
  float* l = logits.f32();
  int64_t best = std::max_element(l, l + logits.size(1) * logits.size(2)) - l;
  l[best] -= 3.0f;
  outs["logits"] = logits;
  EXPECT_GT(run_post_on(c, outs).first, 0);
  // Shift the boxes by more than the tolerance.
  outs = c.expected;
  Tensor boxes = outs["pred_boxes"].clone();
  for (int64_t i = 0; i < boxes.numel(); i += 4) boxes.f32()[i] += 0.01f;
  outs["pred_boxes"] = boxes;
  EXPECT_GT(run_post_on(c, outs).first, 0);
}

// A NaN must fail, never match: comparisons with NaN are false, so "score differs by more than the
// tolerance" and "box error above the tolerance" both let a NaN through unless it is checked.
TEST(DetPost, GoldenComparisonFailsOnNaN) {
  for (const char* name : {"postproc-deta", "postproc-detr"}) {
    check::Case c = load_case(name);
    ASSERT_EQ(run_post_on(c, c.expected).first, 0) << name;
    // The best query's box becomes NaN (its score and label stay right).
    std::map<std::string, Tensor> outs = c.expected;
    const Tensor& l0 = outs["logits"];
    const int64_t Q = l0.size(1), C = l0.size(2);
    const float* l = l0.f32();
    const int64_t best_query = (std::max_element(l, l + Q * C) - l) / C;
    Tensor boxes = outs["pred_boxes"].clone();
    for (int k = 0; k < 4; ++k) boxes.f32()[4 * best_query + k] = NAN;
    outs["pred_boxes"] = boxes;
    EXPECT_GT(run_post_on(c, outs).first, 0) << name << ": NaN box";
    // One NaN coordinate only.
    boxes = c.expected.at("pred_boxes").clone();
    boxes.f32()[4 * best_query + 2] = NAN;
    outs["pred_boxes"] = boxes;
    EXPECT_GT(run_post_on(c, outs).first, 0) << name << ": NaN width";
    // The best query's logits become NaN: its score is NaN.
    outs = c.expected;
    Tensor logits = outs["logits"].clone();
    for (int64_t k = 0; k < C; ++k) logits.f32()[best_query * C + k] = NAN;
    outs["logits"] = logits;
    EXPECT_GT(run_post_on(c, outs).first, 0) << name << ": NaN score";
  }
}

// vf check's tensor comparison: a NaN on our side fails at any tolerance, and so does a shape that
// differs with the same element count.
TEST(DetPost, CheckReportFailsOnNaNAndShapeMismatch) {
  const Tensor a = Tensor::from<float>({2, 2}, {1, 2, 3, 4});
  const Tensor nan = Tensor::from<float>({2, 2}, {1, 2, NAN, 4});
  check::CheckReport r;
  r.compare("same", a, a, 0.0);
  EXPECT_EQ(r.failures(), 0);
  r.compare("nan", nan, a, 1e9);
  EXPECT_EQ(r.failures(), 1);
  r.compare_scaled("nan scaled", nan, a, 1e9);
  EXPECT_EQ(r.failures(), 2);
  r.compare("shape", a, a.reshape({4}), 1e9);
  EXPECT_EQ(r.failures(), 3);
  r.compare("shape", a, a.reshape({1, 4}), 1e9);
  EXPECT_EQ(r.failures(), 4);
  EXPECT_EQ(r.checked(), 5);
}

// ---- losses -------------------------------------------------------------------------------------------
#include "core/ops.h"
#include "models/detr_loss.h"

namespace {

DetectionTarget make_target(std::vector<int64_t> labels, std::vector<float> boxes) {
  DetectionTarget t;
  const int64_t n = static_cast<int64_t>(labels.size());
  t.class_labels = Tensor::from_vector<int64_t>({n}, labels);
  t.boxes = Tensor::from_vector<float>({n, 4}, boxes);
  return t;
}

double dict_value(const DetrLossOutput& out, const std::string& key) {
  for (auto& [k, v] : out.loss_dict)
    if (k == key) return v.f32()[0];
  ADD_FAILURE() << "loss_dict has no " << key;
  return NAN;
}

}  // namespace

TEST(DetLoss, DetrCrossEntropyBoxesCardinality) {
  // Query 0 predicts class 0 on a box twice as tall as the target; query 1 predicts no-object.
  DetrLossInputs in;
  in.outputs.logits = Tensor::from<float>({1, 2, 2}, {2, 0, 0, 2});
  in.outputs.pred_boxes = Tensor::from<float>({1, 2, 4}, {0.5f, 0.5f, 0.2f, 0.4f, 0.1f, 0.1f, 0.1f, 0.1f});
  in.targets.push_back(make_target({0}, {0.5f, 0.5f, 0.2f, 0.2f}));
  DetrLossConfig cfg = detr_loss_config(json{{"model_type", "detr"}}, "DetrForObjectDetection");
  auto match = detr_hungarian_match(in.outputs, in.targets, cfg);
  ASSERT_EQ(match.size(), 1u);
  EXPECT_EQ(match[0], (std::vector<std::pair<int64_t, int64_t>>{{0, 0}}));
  DetrLossOutput out = detr_loss(in, cfg);
  const double nll = std::log1p(std::exp(-2.0));  // -log softmax of the larger logit
  EXPECT_NEAR(dict_value(out, "loss_ce"), (nll + 0.1 * nll) / 1.1, 1e-6);
  EXPECT_NEAR(dict_value(out, "loss_bbox"), 0.2, 1e-6);
  EXPECT_NEAR(dict_value(out, "loss_giou"), 0.5, 1e-6);  // IoU 0.5, the enclosing box is the union
  EXPECT_NEAR(dict_value(out, "cardinality_error"), 0.0, 1e-9);
  EXPECT_NEAR(out.loss.f32()[0], nll + 5 * 0.2 + 2 * 0.5, 1e-5);
  EXPECT_EQ(out.loss_dict.size(), 4u);
  EXPECT_EQ(out.loss_dict[0].first, "loss_ce");
  EXPECT_EQ(out.loss_dict[3].first, "cardinality_error");

  // Auxiliary layers repeat every term with a suffix, and weigh into the total.
  cfg.auxiliary_loss = true;
  cfg.decoder_layers = 2;
  in.auxiliary.push_back(in.outputs);
  out = detr_loss(in, cfg);
  EXPECT_EQ(out.loss_dict.size(), 8u);
  EXPECT_NEAR(dict_value(out, "loss_giou_0"), 0.5, 1e-6);
  EXPECT_NEAR(out.loss.f32()[0], 2 * (nll + 5 * 0.2 + 2 * 0.5), 1e-5);

  // Segmentation adds focal and dice terms on the matched masks (resized to the target's size).
  in.auxiliary.clear();
  cfg = detr_loss_config(json{{"model_type", "detr"}}, "DetrForSegmentation");
  in.outputs.pred_masks = Tensor::zeros({1, 2, 1, 1});  // p = 0.5 everywhere once upsampled
  in.targets[0].masks = Tensor::from<float>({1, 2, 2}, {1, 0, 0, 0});
  out = detr_loss(in, cfg);
  const double ce = std::log(2.0);
  EXPECT_NEAR(dict_value(out, "loss_mask"), (ce * 0.25 * 0.25 + 3 * ce * 0.25 * 0.75) / 4, 1e-6);
  EXPECT_NEAR(dict_value(out, "loss_dice"), 1 - (2 * 0.5 + 1) / (2.0 + 1 + 1), 1e-6);
  EXPECT_NEAR(out.loss.f32()[0], nll + 5 * 0.2 + 2 * 0.5 + dict_value(out, "loss_mask") + dict_value(out, "loss_dice"),
              1e-5);
}

TEST(DetLoss, DetaSecondStageAssignsByIoU) {
  // Queries 0 and 1 overlap the target (IoU 1 and 0.8); the rest are far. With num_queries 20 up to
  // 5 positives are sampled, so the target is given its 2 best-overlapping queries.
  DetrLossInputs in;
  std::vector<float> ref = {0.5f, 0.5f, 0.2f, 0.2f, 0.5f, 0.52f, 0.2f, 0.2f};
  for (int q = 2; q < 6; ++q) ref.insert(ref.end(), {0.1f * q - 0.1f, 0.9f, 0.05f, 0.05f});
  in.outputs.init_reference = Tensor::from_vector<float>({1, 6, 4}, ref);
  in.outputs.pred_boxes = in.outputs.init_reference.clone();
  in.outputs.logits = Tensor::zeros({1, 6, 3});
  in.targets.push_back(make_target({1}, {0.5f, 0.5f, 0.2f, 0.2f}));
  DetrLossConfig cfg = detr_loss_config(json{{"model_type", "deta"}, {"num_queries", 20}}, "DetaForObjectDetection");
  EXPECT_TRUE(cfg.assign_second_stage);
  DetrLossOutput out = detr_loss(in, cfg);
  EXPECT_NEAR(dict_value(out, "loss_bbox"), 0.02, 1e-6);  // query 1's center is 0.02 off
  // With num_queries 4 only one positive is sampled: the target keeps its best query alone.
  cfg.num_queries = 4;
  out = detr_loss(in, cfg);
  EXPECT_NEAR(dict_value(out, "loss_bbox"), 0.0, 1e-7);
  // The focal class loss: every logit is 0 (p = 0.5), one positive (query 0, class 1).
  const double ce = std::log(2.0);
  EXPECT_NEAR(dict_value(out, "loss_ce"), ce * 0.25 * 0.25 + 17 * ce * 0.25 * 0.75, 1e-5);
  // Argmax cardinality: argmax of equal logits is class 0, not the last class: 6 predicted, 1 true.
  EXPECT_NEAR(dict_value(out, "cardinality_error"), 5.0, 1e-9);
}

TEST(DetLoss, GoldenFocalLosses) {
  for (const char* name : {"conditional-detr-tiny-det", "deformable-detr-tiny-det"}) {
    check::Case c = load_case(name);
    const json config = read_json_file(c.dir + "/config.json");
    DetrLossInputs in;
    in.outputs.logits = c.expected.at("logits");
    in.outputs.pred_boxes = c.expected.at("pred_boxes");
    in.targets = check::detection_targets_from_json(c.spec.at("labels"));
    ASSERT_EQ(in.targets.size(), 2u);
    EXPECT_EQ(in.targets[0].boxes.shape(), (Shape{2, 4}));
    EXPECT_EQ(in.targets[0].class_labels.data<int64_t>()[1], 4);
    EXPECT_FLOAT_EQ(in.targets[1].boxes.f32()[0], 0.6f);
    EXPECT_THROW(check::detection_targets_from_json(json::parse(R"([{"class_labels": [1], "boxes": [[0, 0, 1]]}])")),
                 Error);
    const DetrLossConfig cfg = detr_loss_config(config, c.spec.at("model_class").get<std::string>());
    EXPECT_EQ(cfg.match_cost, DetrMatchCost::Focal);
    const DetrLossOutput out = detr_loss(in, cfg);
    const float ref = c.expected.at("loss").f32()[0];
    EXPECT_NEAR(out.loss.f32()[0], ref, 1e-4 * std::fabs(ref)) << name;
    EXPECT_EQ(out.loss.shape(), c.expected.at("loss").shape());
    int compared = 0;
    for (auto& [k, v] : out.loss_dict) {
      const Tensor& r = c.expected.at("loss_dict." + k);
      EXPECT_NEAR(v.f32()[0], r.f32()[0], 1e-4 * std::max(1.0f, std::fabs(r.f32()[0]))) << name << " " << k;
      ++compared;
    }
    EXPECT_EQ(compared, 4) << name;
  }
}

TEST(DetPost, RunPostTakesModelOutput) {
  check::Case c = load_case("postproc-deformable-detr");
  ModelOutput outs;
  outs.set("logits", c.expected.at("logits"));
  outs.set("pred_boxes", c.expected.at("pred_boxes"));
  check::CheckReport report;
  check::run_post(c, outs, report);
  EXPECT_EQ(report.failures(), 0);
  EXPECT_EQ(report.checked(), 4);
  // Without pred_boxes the detections cannot be computed: reported, not thrown.
  ModelOutput partial;
  partial.set("logits", c.expected.at("logits"));
  check::CheckReport r2;
  check::run_post(c, partial, r2);
  EXPECT_EQ(r2.failures(), 2);
}
