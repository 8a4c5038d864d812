// `vf detect` / `vf segment` and the library functions behind them (vf::detect, vf::segment), on the
// vendored tiny detection cases and a synthetic DETR panoptic model (tests/data/detr-tiny-seg).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "io/draw.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/synthetic.h"
#include "test_util.h"
#include "tiny_models.h"
#include "vf_binary.h"
#include "visionformers.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

using test::CommandResult;
using test::run_vf;

// The case's image that is largest in both dimensions: the reference's batch leaves it unpadded,
// so its results equal a run of the image alone (what vf::detect does).
size_t unpadded_image(const json& case_json) {
  const auto& sizes = case_json.at("image_sizes_hw");
  size_t best = 0;
  for (size_t i = 1; i < sizes.size(); ++i)
    if (sizes[i][0].get<int64_t>() * sizes[i][1].get<int64_t>() > sizes[best][0].get<int64_t>() * sizes[best][1].get<int64_t>())
      best = i;
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_LE(sizes[i][0].get<int64_t>(), sizes[best][0].get<int64_t>());
    EXPECT_LE(sizes[i][1].get<int64_t>(), sizes[best][1].get<int64_t>());
  }
  return best;
}

// Compares vf::detect (threshold 0, top-100) with the case's post_process_object_detection entry
// (threshold 0, a smaller top_k, target_sizes = the image sizes), with the goldens' tolerances.
void expect_detections_match_golden(const std::string& case_name) {
  const std::string dir = test::golden_case(case_name);
  json c = read_json_file(dir + "/case.json");
  const size_t img_index = unpadded_image(c);
  const std::string image_path = test::images_dir() + "/" + c["images"][img_index].get<std::string>();
  const json* entry = nullptr;
  for (auto& e : c["post"])
    if (e["fn"] == "post_process_object_detection" && e["kwargs"].contains("target_sizes") &&
        e["kwargs"].value("threshold", 0.5) == 0.0)
      entry = &e;
  ASSERT_NE(entry, nullptr) << case_name << " has no post_process_object_detection entry with threshold 0";
  const json& ref = (*entry)["result"][img_index];
  std::map<std::string, Tensor> expected;
  for (auto& [name, t] : read_safetensors(dir + "/expected.safetensors")) expected[name] = t;
  const Tensor& ref_boxes = expected.at(ref["boxes"]["tensor"].get<std::string>());
  const std::vector<double> ref_scores = ref["scores"].get<std::vector<double>>();
  const std::vector<int64_t> ref_labels = ref["labels"].get<std::vector<int64_t>>();
  const size_t k = ref_scores.size();
  ASSERT_GT(k, 2u);

  Pretrained p = Pretrained::from_pretrained(dir);
  Image image = load_image(image_path);
  auto results = detect(p, {image}, 0.0f);
  ASSERT_EQ(results.size(), 1u);
  const auto& ours = results[0];
  ASSERT_GE(ours.size(), k);
  for (size_t i = 1; i < ours.size(); ++i) EXPECT_GE(ours[i - 1].score, ours[i].score) << "not sorted at " << i;
  // Sorted scores agree position by position even where near-ties swap detections.
  for (size_t i = 0; i < k; ++i) EXPECT_NEAR(ours[i].score, ref_scores[i], 1e-4) << "score " << i;

  const double cutoff = ref_scores.back();
  const double box_tol = 1e-3 * std::max<double>(1, std::max(image.height, image.width));
  int checked = 0;
  for (size_t j = 0; j < k; ++j) {
    if (ref_scores[j] <= cutoff + 1e-4) continue;
    const float* rb = ref_boxes.f32() + 4 * j;
    bool found = false;
    for (const DetectedObject& o : ours) {
      if (o.label_id != ref_labels[j] || std::abs(o.score - ref_scores[j]) > 1e-4) continue;
      if (std::abs(o.x0 - rb[0]) > box_tol || std::abs(o.y0 - rb[1]) > box_tol || std::abs(o.x1 - rb[2]) > box_tol ||
          std::abs(o.y1 - rb[3]) > box_tol)
        continue;
      found = true;
      EXPECT_EQ(o.label, "obj_" + std::to_string(o.label_id));
      // The pipeline's ints: truncation toward zero.
      EXPECT_EQ(o.box.xmin, static_cast<int>(std::trunc(o.x0)));
      EXPECT_EQ(o.box.ymax, static_cast<int>(std::trunc(o.y1)));
      break;
    }
    EXPECT_TRUE(found) << case_name << ": reference detection " << j << " (label " << ref_labels[j] << ", score "
                       << ref_scores[j] << ") not found";
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

std::string panoptic_model_dir() { return test::panoptic_model_dir("cli_detr_panoptic"); }

std::string panoptic_image() { return test::images_dir() + "/chelsea.png"; }

Rgb pixel(const Image& img, int64_t x, int64_t y) {
  const uint8_t* p = img.rgb.data() + (y * img.width + x) * img.channels;
  return img.channels == 1 ? Rgb{p[0], p[0], p[0]} : Rgb{p[0], p[1], p[2]};
}

std::string rgb_str(Rgb c) {
  return "(" + std::to_string(c.r) + "," + std::to_string(c.g) + "," + std::to_string(c.b) + ")";
}

}  // namespace

// ---- drawing ------------------------------------------------------------------------------------

TEST(CliDraw, PaletteIsDistinctAndBackgroundBlack) {
  EXPECT_EQ(palette_color(0), (Rgb{0, 0, 0}));
  EXPECT_EQ(palette_color(1), (Rgb{128, 0, 0}));
  EXPECT_EQ(palette_color(2), (Rgb{0, 128, 0}));
  EXPECT_EQ(palette_color(3), (Rgb{128, 128, 0}));
  EXPECT_EQ(palette_color(8), (Rgb{64, 0, 0}));
  std::set<uint32_t> seen;
  for (int64_t i = 0; i < 5000; ++i) {
    Rgb c = palette_color(i);
    EXPECT_TRUE(seen.insert((uint32_t(c.r) << 16) | (uint32_t(c.g) << 8) | c.b).second) << "index " << i;
  }
}

TEST(CliDraw, BoxIsClampedIntoTheImage) {
  Image img;
  img.height = 10;
  img.width = 20;
  img.rgb.assign(img.pixels() * 3, 7);
  const Rgb red{255, 0, 0};
  draw_box(img, 5, -4, 30, 6, red, 1);  // reaches past the top and the right
  for (int64_t x = 5; x < 20; ++x) {
    EXPECT_EQ(pixel(img, x, 0), red) << x;  // top edge moved onto row 0
    EXPECT_EQ(pixel(img, x, 6), red) << x;
  }
  for (int64_t y = 0; y <= 6; ++y) {
    EXPECT_EQ(pixel(img, 5, y), red) << y;
    EXPECT_EQ(pixel(img, 19, y), red) << y;  // right edge moved onto the last column
  }
  EXPECT_EQ(pixel(img, 10, 3), (Rgb{7, 7, 7}));  // inside untouched
  EXPECT_EQ(pixel(img, 4, 3), (Rgb{7, 7, 7}));
  EXPECT_EQ(pixel(img, 10, 7), (Rgb{7, 7, 7}));
  draw_box(img, -100, -100, -50, -50, red, 3);  // wholly outside: a clamped corner, no crash
  EXPECT_EQ(pixel(img, 0, 0), red);
}

TEST(CliDraw, TextAndTags) {
  Image img;
  img.height = 40;
  img.width = 80;
  img.rgb.assign(img.pixels() * 3, 0);
  const Rgb white{255, 255, 255};
  EXPECT_EQ(text_width("AB", 1), 11);
  EXPECT_EQ(text_height(2), 14);
  draw_text(img, 1, 1, "1", white, 1);
  // '1': row 0 is "..#..", row 6 ".###."
  EXPECT_EQ(pixel(img, 3, 1), white);
  EXPECT_EQ(pixel(img, 1, 1), (Rgb{0, 0, 0}));
  EXPECT_EQ(pixel(img, 2, 7), white);
  EXPECT_EQ(pixel(img, 4, 7), white);
  EXPECT_EQ(pixel(img, 5, 7), (Rgb{0, 0, 0}));
  // A tag goes above its box when there is room, leaving the outline alone.
  const Rgb blue{0, 0, 200};
  draw_boxes(img, {{20, 20, 60, 35, blue, "x"}});
  for (int64_t x = 20; x <= 60; ++x) EXPECT_EQ(pixel(img, x, 20), blue);
  EXPECT_EQ(pixel(img, 20, 19), blue);  // tag background, just above the top edge
  EXPECT_EQ(pixel(img, 40, 28), (Rgb{0, 0, 0}));
}

TEST(CliDraw, SegmentColorsAndMasks) {
  Tensor map = Tensor::from<int32_t>({2, 3}, {0, 1, 1, 2, 2, 5});
  Image col = render_segments(map, {{1, palette_color(1)}, {2, palette_color(2)}});
  EXPECT_EQ(col.width, 3);
  EXPECT_EQ(col.height, 2);
  EXPECT_EQ(pixel(col, 0, 0), (Rgb{0, 0, 0}));
  EXPECT_EQ(pixel(col, 1, 0), palette_color(1));
  EXPECT_EQ(pixel(col, 0, 1), palette_color(2));
  EXPECT_EQ(pixel(col, 2, 1), (Rgb{0, 0, 0}));  // id 5 is not listed
  Image m = render_mask(map, 2);
  EXPECT_EQ(m.channels, 1);
  EXPECT_EQ(m.rgb, (std::vector<uint8_t>{0, 0, 0, 255, 255, 0}));
  EXPECT_THROW(render_mask(Tensor::zeros({2, 3}), 1), Error);
}

// ---- library: detect / segment --------------------------------------------------------------------

TEST(CliDetect, ConditionalDetrMatchesReferencePostProcessing) {
  expect_detections_match_golden("conditional-detr-tiny-det");
}

TEST(CliDetect, DeformableDetrMatchesReferencePostProcessing) {
  expect_detections_match_golden("deformable-detr-tiny-det");
}

TEST(CliDetect, ThresholdFilters) {
  Pretrained p = Pretrained::from_pretrained(test::golden_case("deformable-detr-tiny-det"));
  Image image = load_image(test::images_dir() + "/rocket.jpg");
  auto all = detect(p, {image, image}, 0.0f);
  ASSERT_EQ(all.size(), 2u);
  ASSERT_FALSE(all[0].empty());
  ASSERT_EQ(all[0].size(), all[1].size());
  // A threshold between two scores keeps exactly the detections above it.
  const float mid = all[0][all[0].size() / 2].score;
  auto some = detect(p, {image}, mid)[0];
  size_t above = 0;
  for (auto& o : all[0]) above += o.score > mid;
  EXPECT_EQ(some.size(), above);
  EXPECT_TRUE(detect(p, {image}, 1.0f)[0].empty());
}

// Pretrained::run passes output_attentions to the model. Two images of different shapes make the
// batch padded (camera 192x192 beside chelsea's 192x289): the padded keys of the second image get
// exactly zero probability (the reference adds finfo.min before the softmax), every row sums to one.
TEST(FrontDoor, RunReturnsDetrAttentions) {
  Pretrained p = Pretrained::from_pretrained(test::golden_case("detr-tiny-model"));
  std::vector<Image> images = {load_image(test::images_dir() + "/chelsea.png"),
                               load_image(test::images_dir() + "/camera.png")};
  ModelOutput plain = p.run(images);
  EXPECT_FALSE(plain.has("encoder_attentions.0"));
  ModelOutput out = p.run(images, /*output_hidden_states=*/false, /*output_attentions=*/true);
  EXPECT_EQ(max_abs_diff(out.get("last_hidden_state"), plain.get("last_hidden_state")), 0.0);
  const int64_t heads = p.config["encoder_attention_heads"].get<int64_t>();
  const int64_t queries = p.config.value("num_queries", int64_t{100});
  const Tensor& enc = out.get("encoder_attentions.0");
  ASSERT_EQ(enc.dim(), 4);
  const int64_t L = enc.size(3);
  EXPECT_EQ(enc.shape(), (Shape{2, heads, L, L}));
  EXPECT_FALSE(out.has("encoder_attentions." + std::to_string(p.config["encoder_layers"].get<int64_t>())));
  for (int64_t layer = 0; layer < p.config["decoder_layers"].get<int64_t>(); ++layer) {
    EXPECT_EQ(out.get("decoder_attentions." + std::to_string(layer)).shape(), (Shape{2, heads, queries, queries}));
    EXPECT_EQ(out.get("cross_attentions." + std::to_string(layer)).shape(), (Shape{2, heads, queries, L}));
  }
  // Keys no row of an image attends to, per image.
  auto dead_keys = [&](const Tensor& a, int64_t b) {
    const int64_t rows = a.size(1) * a.size(2);
    std::vector<int> dead;
    for (int64_t j = 0; j < L; ++j) {
      bool zero = true;
      for (int64_t r = 0; r < rows && zero; ++r) zero = a.f32()[(b * rows + r) * L + j] == 0.0f;
      if (zero) dead.push_back(static_cast<int>(j));
    }
    return dead;
  };
  const Tensor& cross = out.get("cross_attentions.0");
  EXPECT_TRUE(dead_keys(enc, 0).empty());
  EXPECT_FALSE(dead_keys(enc, 1).empty());
  EXPECT_EQ(dead_keys(enc, 1), dead_keys(cross, 1));
  for (const Tensor* a : {&enc, &cross}) {
    double worst = 0;
    for (int64_t r = 0; r < a->numel() / L; ++r) {
      double s = 0;
      for (int64_t j = 0; j < L; ++j) s += a->f32()[r * L + j];
      worst = std::max(worst, std::fabs(s - 1));
    }
    EXPECT_LT(worst, 1e-5);
  }
}

TEST(CliSegment, PanopticAndInstanceMatchReference) {
  Pretrained p = Pretrained::from_pretrained(panoptic_model_dir());
  Image image = load_image(panoptic_image());
  // The reference (detr-tiny-seg case, first image): threshold 0, overlap_mask_area_threshold 0.05
  // leave one segment, id 1, label 4, score 0.89609, for both panoptic and instance.
  for (const char* task : {"panoptic", "instance"}) {
    SegmentParams sp;
    sp.task = task;
    sp.threshold = 0.0;
    sp.overlap_mask_area_threshold = 0.05;
    SegmentedImage seg = segment(p, image, sp);
    ASSERT_EQ(seg.segments.size(), 1u) << task;
    EXPECT_EQ(seg.segments[0].id, 1);
    EXPECT_EQ(seg.segments[0].label_id, 4);
    EXPECT_EQ(seg.segments[0].label, "obj_4");
    ASSERT_TRUE(seg.segments[0].score.has_value());
    EXPECT_NEAR(*seg.segments[0].score, 0.89609, 1e-4);
    ASSERT_EQ(seg.map.shape(), (Shape{image.height, image.width}));
    EXPECT_EQ(seg.map.dtype(), DType::I32);
    int64_t ones = 0;
    for (int64_t i = 0; i < seg.map.numel(); ++i) ones += seg.map.data<int32_t>()[i] == 1;
    EXPECT_GT(ones, 0);
  }
  // Nothing passes a threshold of 1: the reference's map of -1 and no segments.
  SegmentedImage none = segment(p, image, "panoptic", 1.0);
  EXPECT_TRUE(none.segments.empty());
  EXPECT_EQ(none.map.data<int32_t>()[0], -1);
  EXPECT_THROW(segment(p, image, "depth"), Error);
}

TEST(CliSegment, SemanticSegmentsAreTheClassesPresent) {
  Pretrained p = Pretrained::from_pretrained(panoptic_model_dir());
  Image image = load_image(panoptic_image());
  SegmentedImage seg = segment(p, image, "semantic");
  ASSERT_EQ(seg.map.shape(), (Shape{image.height, image.width}));
  std::set<int32_t> present(seg.map.data<int32_t>(), seg.map.data<int32_t>() + seg.map.numel());
  ASSERT_EQ(seg.segments.size(), present.size());
  size_t i = 0;
  for (int32_t c : present) {
    EXPECT_EQ(seg.segments[i].id, c);
    EXPECT_EQ(seg.segments[i].label_id, c);
    EXPECT_FALSE(seg.segments[i].score.has_value());
    EXPECT_GE(c, 0);
    EXPECT_LT(c, 6);  // num_labels: the "no object" class is never chosen
    ++i;
  }
}

TEST(CliSegment, DetectionModelIsRefused) {
  Pretrained p = Pretrained::from_pretrained(test::golden_case("deformable-detr-tiny-det"));
  Image image = load_image(test::images_dir() + "/rocket.jpg");
  EXPECT_THROW(segment(p, image, "panoptic"), Error);
}

// ---- the vf binary ------------------------------------------------------------------------------

TEST(CliVf, DetectJsonAndDrawing) {
  const std::string scratch = test::temp_dir("cli_detect");
  const std::string model = test::golden_case("deformable-detr-tiny-det");
  const std::string image_path = test::images_dir() + "/rocket.jpg";
  const std::string drawn = scratch + "/boxes.png";
  fs::remove(drawn);
  CommandResult r = run_vf({"detect", model, image_path, "--threshold", "0", "--json", "--draw", drawn}, scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  json got = parse_json_text(r.out, "vf detect output");

  Pretrained p = Pretrained::from_pretrained(model);
  Image image = load_image(image_path, true);
  auto ref = detect(p, {image}, 0.0f)[0];
  ASSERT_TRUE(got.is_array());
  ASSERT_EQ(got.size(), ref.size());
  ASSERT_FALSE(ref.empty());
  for (size_t i = 0; i < ref.size(); ++i) {
    const json& g = got[i];
    EXPECT_NEAR(g["score"].get<double>(), ref[i].score, 1e-6);
    EXPECT_EQ(g["label"], ref[i].label);
    ASSERT_TRUE(g["box"]["xmin"].is_number_integer());
    EXPECT_NEAR(g["box"]["xmin"].get<int>(), ref[i].box.xmin, 1);
    EXPECT_NEAR(g["box"]["ymin"].get<int>(), ref[i].box.ymin, 1);
    EXPECT_NEAR(g["box"]["xmax"].get<int>(), ref[i].box.xmax, 1);
    EXPECT_NEAR(g["box"]["ymax"].get<int>(), ref[i].box.ymax, 1);
  }

  // The drawing: the input's size, and the best box (drawn last, on top) outlined in its label's
  // colour along all four edges, clamped into the image.
  Image out = load_image(drawn);
  ASSERT_EQ(out.width, image.width);
  ASSERT_EQ(out.height, image.height);
  const Rgb color = palette_color(ref[0].label_id + 1);
  const int64_t x0 = std::clamp<int64_t>(got[0]["box"]["xmin"].get<int>(), 0, image.width - 1);
  const int64_t x1 = std::clamp<int64_t>(got[0]["box"]["xmax"].get<int>(), 0, image.width - 1);
  const int64_t y0 = std::clamp<int64_t>(got[0]["box"]["ymin"].get<int>(), 0, image.height - 1);
  const int64_t y1 = std::clamp<int64_t>(got[0]["box"]["ymax"].get<int>(), 0, image.height - 1);
  ASSERT_LE(x0, x1);
  ASSERT_LE(y0, y1);
  for (int64_t x = x0; x <= x1; ++x) {
    ASSERT_EQ(pixel(out, x, y0), color) << "top edge at x=" << x << ": " << rgb_str(pixel(out, x, y0));
    ASSERT_EQ(pixel(out, x, y1), color) << "bottom edge at x=" << x;
  }
  for (int64_t y = y0; y <= y1; ++y) {
    ASSERT_EQ(pixel(out, x0, y), color) << "left edge at y=" << y;
    ASSERT_EQ(pixel(out, x1, y), color) << "right edge at y=" << y;
  }
  // Elsewhere the photo survives: some pixel well inside the box differs from every label colour
  // or keeps the input's value.
  int64_t unchanged = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(image.rgb.size()); ++i) unchanged += image.rgb[i] == out.rgb[i];
  EXPECT_GT(unchanged, static_cast<int64_t>(image.rgb.size()) / 10);
  EXPECT_FALSE(fs::exists(drawn + ".tmp"));
}

TEST(CliVf, DetectSeveralImagesGivesOneListEach) {
  const std::string scratch = test::temp_dir("cli_detect_many");
  const std::string model = test::golden_case("deformable-detr-tiny-det");
  const std::string a = test::images_dir() + "/rocket.jpg", b = test::images_dir() + "/chelsea.png";
  CommandResult r = run_vf({"detect", model, a, b, "--threshold", "0.3", "--json", "--draw", scratch + "/d.png"}, scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  json got = parse_json_text(r.out, "vf detect output");
  ASSERT_EQ(got.size(), 2u);
  Pretrained p = Pretrained::from_pretrained(model);
  auto ref = detect(p, {load_image(a, true), load_image(b, true)}, 0.3f);
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(got[i].is_array());
    ASSERT_EQ(got[i].size(), ref[i].size());
    for (auto& g : got[i]) EXPECT_GT(g["score"].get<double>(), 0.3);
  }
  EXPECT_EQ(load_image(scratch + "/d-0.png").width, 640);
  EXPECT_EQ(load_image(scratch + "/d-1.png").width, 451);
}

TEST(CliVf, PanopticColourMap) {
  const std::string scratch = test::temp_dir("cli_segment");
  const std::string model = panoptic_model_dir();
  const std::string out = scratch + "/pan.png";
  Pretrained p = Pretrained::from_pretrained(model);
  Image image = load_image(panoptic_image(), true);
  for (const char* overlap : {"0.05", "0"}) {
    CommandResult r = run_vf({"segment", model, panoptic_image(), "--task", "panoptic", "--threshold", "0",
                              "--overlap-mask-area-threshold", overlap, "--json", "--out", out},
                             scratch);
    ASSERT_EQ(r.rc, 0) << r.err;
    json got = parse_json_text(r.out, "vf segment output");
    SegmentParams sp;
    sp.threshold = 0;
    sp.overlap_mask_area_threshold = std::atof(overlap);
    SegmentedImage seg = segment(p, image, sp);
    ASSERT_EQ(got.size(), seg.segments.size()) << "overlap " << overlap;
    ASSERT_FALSE(seg.segments.empty());
    for (size_t i = 0; i < seg.segments.size(); ++i) {
      EXPECT_EQ(got[i]["label"], seg.segments[i].label);
      EXPECT_NEAR(got[i]["score"].get<double>(), *seg.segments[i].score, 1e-6);
    }
    if (std::string(overlap) == "0.05") {
      EXPECT_EQ(got[0]["label"], "obj_4");
      EXPECT_NEAR(got[0]["score"].get<double>(), 0.89609, 1e-4);
    }

    Image col = load_image(out);
    ASSERT_EQ(col.width, image.width);
    ASSERT_EQ(col.height, image.height);
    // One colour per segment id, black elsewhere: as many colours as segments (+ background).
    std::set<uint32_t> colours;
    bool background = false;
    const int32_t* ids = seg.map.data<int32_t>();
    for (int64_t y = 0; y < col.height; ++y)
      for (int64_t x = 0; x < col.width; ++x) {
        const int32_t id = ids[y * col.width + x];
        const Rgb c = pixel(col, x, y);
        colours.insert((uint32_t(c.r) << 16) | (uint32_t(c.g) << 8) | c.b);
        if (id <= 0) {
          background = true;
          ASSERT_EQ(c, (Rgb{0, 0, 0})) << x << "," << y;
        } else {
          ASSERT_EQ(c, palette_color(id)) << x << "," << y << " id " << id;
        }
      }
    EXPECT_EQ(colours.size(), seg.segments.size() + (background ? 1 : 0));
    // Each segment's mask next to the colour map, 255 exactly on its pixels.
    for (size_t i = 0; i < seg.segments.size(); ++i) {
      const std::string mask_path = scratch + "/pan-" + std::to_string(i) + ".png";
      EXPECT_EQ(got[i]["mask"], mask_path);
      Image m = load_image(mask_path);
      ASSERT_EQ(m.width, image.width);
      for (int64_t k = 0; k < static_cast<int64_t>(m.pixels()); ++k)
        ASSERT_EQ(m.rgb[3 * k], ids[k] == seg.segments[i].id ? 255 : 0) << "mask " << i << " pixel " << k;
    }
  }
}

TEST(CliVf, SemanticJsonHasNullScores) {
  const std::string scratch = test::temp_dir("cli_semantic");
  CommandResult r = run_vf({"segment", panoptic_model_dir(), panoptic_image(), "--task", "semantic", "--json",
                            "--out", scratch + "/sem.png"},
                           scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  json got = parse_json_text(r.out, "vf segment output");
  ASSERT_FALSE(got.empty());
  std::set<uint32_t> colours;
  Image col = load_image(scratch + "/sem.png");
  for (size_t k = 0; k < col.pixels(); ++k)
    colours.insert((uint32_t(col.rgb[3 * k]) << 16) | (uint32_t(col.rgb[3 * k + 1]) << 8) | col.rgb[3 * k + 2]);
  EXPECT_EQ(colours.size(), got.size());  // every pixel has a class: no background
  for (auto& g : got) {
    EXPECT_TRUE(g["score"].is_null());
    EXPECT_EQ(g["label"].get<std::string>().rfind("obj_", 0), 0u);
  }
}

TEST(CliVf, ErrorsAreReported) {
  const std::string scratch = test::temp_dir("cli_errors");
  CommandResult r = run_vf({"detect", scratch + "/no-such-model", test::images_dir() + "/rocket.jpg"}, scratch);
  EXPECT_EQ(r.rc, 65);  // bad input (tools/exit_codes.h)
  EXPECT_NE(r.err.find("vf: error:"), std::string::npos) << r.err;
  // A DETR base model (no heads): neither detection nor segmentation.
  r = run_vf({"segment", test::golden_case("detr-tiny-model"), test::images_dir() + "/rocket.jpg", "--task",
              "panoptic"},
             scratch);
  EXPECT_EQ(r.rc, 66);  // model problem
  EXPECT_NE(r.err.find("not a segmentation model"), std::string::npos) << r.err;
  r = run_vf({"detect", test::golden_case("detr-tiny-model"), test::images_dir() + "/rocket.jpg"}, scratch);
  EXPECT_EQ(r.rc, 66);  // model problem
  EXPECT_NE(r.err.find("not an object detection model"), std::string::npos) << r.err;
  r = run_vf({"segment", panoptic_model_dir(), panoptic_image(), "--task", "depth"}, scratch);
  EXPECT_NE(r.rc, 0);
}

// EXIF orientation 6 (rotate 90° clockwise): vf classify sees the upright image, as the pipeline's
// load_image does, so the rotated JPEG and an upright PNG of the same pixels classify alike.
TEST(CliVf, ClassifyAppliesExifOrientation) {
  const std::string scratch = test::temp_dir("cli_classify_exif");
  const std::string rotated = std::string(VF_SOURCE_DIR) + "/tests/fuzz/corpus/image/exif6.jpg";
  const Image raw = load_image(rotated), upright = load_image(rotated, /*apply_exif_orientation=*/true);
  ASSERT_EQ(upright.width, raw.height);
  ASSERT_EQ(upright.height, raw.width);
  ASSERT_NE(raw.width, raw.height);
  // Clockwise quarter turn: upright(y, x) = raw(H - 1 - x, y).
  for (int64_t y = 0; y < upright.height; y += 3)
    for (int64_t x = 0; x < upright.width; x += 3)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(upright.rgb[(y * upright.width + x) * 3 + c], raw.rgb[((raw.height - 1 - x) * raw.width + y) * 3 + c]);
  save_png(scratch + "/upright.png", upright);
  save_png(scratch + "/sideways.png", raw);

  const std::string model = std::string(VF_SOURCE_DIR) + "/assets/tiny-convnext";
  CommandResult a = run_vf({"classify", model, rotated, "--json", "--top-k", "5"}, scratch);
  ASSERT_EQ(a.rc, 0) << a.err;
  CommandResult b = run_vf({"classify", model, scratch + "/upright.png", "--json", "--top-k", "5"}, scratch);
  ASSERT_EQ(b.rc, 0) << b.err;
  CommandResult c = run_vf({"classify", model, scratch + "/sideways.png", "--json", "--top-k", "5"}, scratch);
  ASSERT_EQ(c.rc, 0) << c.err;
  const json ja = json::parse(a.out), jb = json::parse(b.out), jc = json::parse(c.out);
  ASSERT_EQ(ja.size(), 5u);
  ASSERT_EQ(jb.size(), 5u);
  float max_diff_upright = 0, max_diff_sideways = 0;
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(ja[i]["label"], jb[i]["label"]);
    // A NaN must stick (std::max(m, NaN) returns m) so that the expectations below fail on it.
    const float up = std::fabs(ja[i]["score"].get<float>() - jb[i]["score"].get<float>());
    const float side = std::fabs(ja[i]["score"].get<float>() - jc[i]["score"].get<float>());
    if (!(up <= max_diff_upright)) max_diff_upright = up;
    if (!(side <= max_diff_sideways)) max_diff_sideways = side;
  }
  EXPECT_LT(max_diff_upright, 1e-6f);
  EXPECT_GT(max_diff_sideways, max_diff_upright);  // the orientation matters to the scores at all
}

// Several images (a folder): one JSONL line each, each equal to a one-image run, in batches that
// put the two images of one size in one forward; the colour maps OUT-<n>.png, masks OUT-<n>-<i>.png.
TEST(CliVf, SegmentFolderInBatches) {
  const std::string scratch = test::temp_dir("cli_segment_folder");
  fs::remove_all(scratch + "/in");
  fs::create_directories(scratch + "/in");
  const Image chelsea = load_image(panoptic_image(), true);
  Image flipped = chelsea;  // upside down: same size, other pixels
  const size_t row = static_cast<size_t>(chelsea.width) * 3;
  for (int64_t y = 0; y < chelsea.height; ++y)
    std::copy_n(chelsea.rgb.begin() + (chelsea.height - 1 - y) * row, row, flipped.rgb.begin() + y * row);
  save_png(scratch + "/in/a.png", chelsea);
  save_png(scratch + "/in/b.png", flipped);
  fs::copy_file(test::images_dir() + "/rocket.jpg", scratch + "/in/c.jpg", fs::copy_options::overwrite_existing);
  const std::string model = panoptic_model_dir();
  CommandResult r = run_vf({"segment", model, scratch + "/in", "--task", "panoptic", "--threshold", "0",
                            "--overlap-mask-area-threshold", "0.05", "--batch-size", "3", "--jsonl", "--out",
                            scratch + "/seg.png"},
                           scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  std::vector<json> lines;
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);) lines.push_back(parse_json_text(line, "vf segment --jsonl"));
  ASSERT_EQ(lines.size(), 3u) << r.out;

  Pretrained p = Pretrained::from_pretrained(model);
  SegmentParams sp;
  sp.threshold = 0;
  sp.overlap_mask_area_threshold = 0.05;
  const std::vector<std::string> names = {"a.png", "b.png", "c.jpg"};
  for (size_t n = 0; n < 3; ++n) {
    EXPECT_EQ(lines[n]["path"], scratch + "/in/" + names[n]);
    const Image image = load_image(scratch + "/in/" + names[n], true);
    const SegmentedImage alone = segment(p, image, sp);
    const json& got = lines[n]["result"];
    ASSERT_EQ(got.size(), alone.segments.size()) << names[n];
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i]["label"], alone.segments[i].label);
      EXPECT_NEAR(got[i]["score"].get<double>(), *alone.segments[i].score, 1e-4);
      const std::string mask = scratch + "/seg-" + std::to_string(n) + "-" + std::to_string(i) + ".png";
      EXPECT_EQ(got[i]["mask"], mask);
      EXPECT_EQ(load_image(mask).width, image.width);
    }
    EXPECT_EQ(load_image(scratch + "/seg-" + std::to_string(n) + ".png").height, image.height);
  }
}

namespace {

// A copy of a golden case folder without some of its files, in a scratch folder.
std::string case_copy(const std::string& name, const std::set<std::string>& drop, const std::string& scratch) {
  const std::string src = test::golden_case(name), dst = scratch + "/" + name;
  fs::remove_all(dst);
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(src))
    if (!drop.count(e.path().filename().string())) fs::copy(e.path(), dst / e.path().filename());
  return dst;
}

}  // namespace

// A case that compares nothing must fail, not pass with "0 compared".
TEST(CliVf, CheckFailsWhenACaseComparesNothing) {
  const std::string scratch = test::temp_dir("cli_check_empty");
  // As given, each passes.
  for (const char* name : {"proc-detr-nopad-norescale", "detr-tiny-model", "postproc-deta"})
    EXPECT_EQ(run_vf({"check", test::golden_case(name), "--images", test::images_dir()}, scratch).rc, 0) << name;
  // Without expected.safetensors: a processor case has no pixels, a model case no outputs, a
  // post-processing case no inputs (its post entries fail).
  for (const char* name : {"proc-detr-nopad-norescale", "detr-tiny-model", "postproc-deta"}) {
    const std::string dir = case_copy(name, {"expected.safetensors"}, scratch);
    CommandResult r = run_vf({"check", dir, "--images", test::images_dir()}, scratch);
    EXPECT_EQ(r.rc, 1) << name << "\n" << r.out << r.err;
    EXPECT_NE(r.out.find("FAIL"), std::string::npos) << name << "\n" << r.out;
  }
  // A post-processing case without post entries compares nothing either.
  const std::string dir = case_copy("postproc-deta", {}, scratch);
  json spec = read_json_file(dir + "/case.json");
  spec.erase("post");
  test::write_bytes(dir + "/case.json", spec.dump());
  CommandResult r = run_vf({"check", dir, "--images", test::images_dir()}, scratch);
  EXPECT_EQ(r.rc, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("compares no post-processing result"), std::string::npos) << r.out;
}
