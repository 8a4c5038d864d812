// Image decoding, Pillow-exact resampling and the image processors, against the vendored goldens.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "core/ops.h"
#include "io/image.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "processors/coco_mask.h"
#include "processors/image_processor.h"
#include "processors/resample.h"
#include "test_util.h"

namespace vf {
namespace {

std::map<std::string, Tensor> expected_of(const std::string& case_dir) {
  auto list = read_safetensors(case_dir + "/expected.safetensors");
  return {list.begin(), list.end()};
}

// Runs a golden case's processor on its images.
BatchFeature run_case(const std::string& case_dir, const json** spec_out = nullptr) {
  static std::map<std::string, json> specs;
  json& spec = specs[case_dir] = read_json_file(case_dir + "/case.json");
  if (spec_out) *spec_out = &spec;
  auto processor = create_image_processor(read_json_file(case_dir + "/preprocessor_config.json"));
  std::vector<Image> images;
  for (const auto& name : spec["images"]) images.push_back(load_image(test::images_dir() + "/" + name.get<std::string>()));
  PreprocessInputs inputs;
  if (spec.contains("annotations")) inputs.annotations = &spec["annotations"];
  return processor->preprocess(images, inputs);
}

void expect_pixels_match(const std::string& case_name) {
  std::string dir = test::golden_case(case_name);
  BatchFeature out = run_case(dir);
  auto expected = expected_of(dir);
  ASSERT_TRUE(expected.count("pixel_values"));
  EXPECT_LE(max_abs_diff(out.pixel_values, expected["pixel_values"]), 1e-5) << case_name;
  if (expected.count("pixel_mask")) {
    ASSERT_TRUE(out.pixel_mask.defined()) << case_name;
    EXPECT_EQ(max_abs_diff(out.pixel_mask, expected["pixel_mask"]), 0.0) << case_name;
  }
}

// ---------------------------------------------------------------------------------------------

TEST(ProcImage, DecodesPaletteLikePillow) {
  Image img = load_image(test::images_dir() + "/palette_color.png");
  ASSERT_EQ(img.height, 10);
  ASSERT_EQ(img.width, 10);
  ASSERT_EQ(img.rgb.size(), 300u);
  // Values from Pillow: Image.open(...).convert("RGB").
  auto px = [&](int y, int x) { return std::vector<int>(img.rgb.begin() + (y * 10 + x) * 3, img.rgb.begin() + (y * 10 + x) * 3 + 3); };
  EXPECT_EQ(px(0, 0), (std::vector<int>{51, 0, 255}));
  EXPECT_EQ(px(9, 9), (std::vector<int>{102, 0, 204}));
  EXPECT_EQ(px(4, 7), (std::vector<int>{51, 102, 255}));
  int64_t sum = 0, weighted = 0;
  for (size_t i = 0; i < img.rgb.size(); ++i) sum += img.rgb[i], weighted += int64_t(img.rgb[i]) * int64_t(i);
  EXPECT_EQ(sum, 35445);
  EXPECT_EQ(weighted, 5237139);
}

TEST(ProcImage, DecodesJpegLikePillow) {
  Image img = load_image(test::images_dir() + "/rocket.jpg");
  ASSERT_EQ(img.height, 427);
  ASSERT_EQ(img.width, 640);
  int64_t sum = 0;
  for (uint8_t v : img.rgb) sum += v;
  EXPECT_EQ(sum, 53516744);  // np.array(Image.open(...).convert("RGB")).sum()
}

TEST(ProcImage, GrayscalePngBecomesRgb) {
  Image img = load_image(test::images_dir() + "/camera.png");
  ASSERT_EQ(img.height, 512);
  ASSERT_EQ(img.width, 512);
  for (size_t i = 0; i < img.pixels(); i += 997) {
    EXPECT_EQ(img.rgb[3 * i], img.rgb[3 * i + 1]);
    EXPECT_EQ(img.rgb[3 * i], img.rgb[3 * i + 2]);
  }
}

#include "image_decode_cases.inc"

// Every PNG colour type / bit depth Pillow distinguishes (16-bit gray clipped, 16-bit colour's high
// byte, alpha dropped, 1/2/4-bit gray scaled, palette with tRNS and an index past PLTE, Adam7
// interlacing) and grayscale / CMYK JPEGs, against Pillow's Image.open(...).convert("RGB").
TEST(ProcImage, DecodesEveryPngKindAndJpegColourSpaceLikePillow) {
  for (const DecodeCase& c : decode_cases()) {
    Image img = decode_image(c.bytes.data(), c.bytes.size(), c.name);
    EXPECT_EQ(img.height, c.height) << c.name;
    EXPECT_EQ(img.width, c.width) << c.name;
    EXPECT_EQ(img.rgb, c.rgb) << c.name;
  }
  // Truncating any of them is an error, never a crash.
  for (const DecodeCase& c : decode_cases())
    for (size_t cut : {size_t(8), c.bytes.size() / 2, c.bytes.size() - 13})
      EXPECT_THROW(decode_image(c.bytes.data(), cut, c.name), Error) << c.name << " cut at " << cut;
}

TEST(ProcImage, TruncatedJpegIsAnError) {
  try {
    load_image(test::images_dir() + "/truncated.jpg");
    FAIL() << "truncated.jpg decoded without error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST(ProcImage, NotAnImageIsAnError) {
  const uint8_t junk[] = {'G', 'I', 'F', '8', '9', 'a', 0, 0};
  EXPECT_THROW(decode_image(junk, sizeof(junk), "junk.gif"), Error);
  EXPECT_THROW(load_image(test::images_dir() + "/does_not_exist.png"), Error);
}

uint32_t crc32_of(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

TEST(ProcImage, DecompressionBombPngIsRefusedBeforeDecoding) {
  // A 45-byte PNG whose IHDR claims 100000 x 100000 pixels, with no image data at all: refused on
  // the header's dimensions (not as a truncated file).
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  auto be32 = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) png.push_back(uint8_t(v >> s));
  };
  be32(100000);
  be32(100000);
  png.insert(png.end(), {8, 2, 0, 0, 0});  // 8-bit RGB
  be32(crc32_of(png.data() + 12, 17));
  png.insert(png.end(), {0, 0, 0, 0, 'I', 'E', 'N', 'D', 0xAE, 0x42, 0x60, 0x82});
  std::string path = test::temp_dir("proc") + "/bomb.png";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(png.data()), std::streamsize(png.size()));
  try {
    load_image(path);
    FAIL() << "the bomb PNG was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("decompression bomb"), std::string::npos) << e.what();
  }
}

TEST(ProcImage, SavePngRoundTrips) {
  Image img;
  img.height = 3, img.width = 5, img.channels = 3;
  for (int i = 0; i < 45; ++i) img.rgb.push_back(uint8_t(i * 5 + 1));
  std::string path = test::temp_dir("proc") + "/roundtrip.png";
  save_png(path, img);
  Image back = load_image(path);
  EXPECT_EQ(back.height, 3);
  EXPECT_EQ(back.width, 5);
  EXPECT_EQ(back.rgb, img.rgb);
  Image gray;
  gray.height = 2, gray.width = 2, gray.channels = 1, gray.rgb = {0, 100, 200, 255};
  save_png(path, gray);
  back = load_image(path);
  EXPECT_EQ(back.rgb, (std::vector<uint8_t>{0, 0, 0, 100, 100, 100, 200, 200, 200, 255, 255, 255}));
}

// ---------------------------------------------------------------------------------------------

TEST(ProcResample, SameSizeIsACopyAndNearestPicksPillowPixels) {
  Image img;
  img.height = 1, img.width = 5, img.channels = 1, img.rgb = {10, 20, 30, 40, 50};
  EXPECT_EQ(resize_pil(img, 1, 5, Resample::Bicubic).rgb, img.rgb);
  // Pillow: Image.fromarray(np.array([[10,20,30,40,50]], np.uint8)).resize((3, 1), Image.NEAREST)
  EXPECT_EQ(resize_pil(img, 1, 3, Resample::Nearest).rgb, (std::vector<uint8_t>{10, 30, 50}));
  // ... .resize((2, 1), Image.BILINEAR) -> [20, 40] (support widened to 2.5 source pixels);
  // (BOX) -> [20, 45] (windows [0, 3) and [3, 5)).
  EXPECT_EQ(resize_pil(img, 1, 2, Resample::Bilinear).rgb, (std::vector<uint8_t>{20, 40}));
  EXPECT_EQ(resize_pil(img, 1, 2, Resample::Box).rgb, (std::vector<uint8_t>{20, 45}));
  EXPECT_THROW(resize_pil(img, 0, 2, Resample::Box), Error);
  EXPECT_THROW(resample_from_int(6), Error);
}

// Bicubic downscale + center crop with no normalisation: pixel_values are the resampled bytes / 255.
TEST(ProcResample, ConvNextNoNormMatchesGolden) { expect_pixels_match("proc-convnext-nonorm"); }

TEST(ProcConvNext, BackboneCaseMatchesGolden) { expect_pixels_match("convnext-tiny-backbone"); }

TEST(ProcFactory, UnknownTypeIsAnError) {
  EXPECT_THROW(create_image_processor(json{{"image_processor_type", "CLIPImageProcessor"}}), Error);
  EXPECT_THROW(create_image_processor(json::object()), Error);
  EXPECT_THROW(create_image_processor(json{{"image_processor_type", "BitImageProcessor"}, {"size", {{"foo", 3}}}}), Error);
}

TEST(ProcFactory, LegacyFeatureExtractorConfig) {
  // An old ConvNeXt config: int size, feature_extractor_type.
  auto p = create_image_processor(json{{"feature_extractor_type", "ConvNextFeatureExtractor"}, {"size", 224}});
  EXPECT_EQ(p->options().size.shortest_edge, 224);
  EXPECT_EQ(p->options().resample, Resample::Bicubic);
  auto d = create_image_processor(json{{"feature_extractor_type", "DeiTFeatureExtractor"}, {"size", 256}, {"crop_size", 224}});
  EXPECT_EQ(d->options().size.height, 256);
  EXPECT_EQ(d->options().size.width, 256);
  EXPECT_EQ(d->options().crop_size.height, 224);
}

using HW = std::pair<int64_t, int64_t>;

TEST(ProcSizes, ReferenceRounding) {
  EXPECT_EQ(resize_output_size_shortest_edge(300, 451, 200), HW(200, 300));
  EXPECT_EQ(resize_output_size_shortest_edge(451, 300, 200), HW(300, 200));
  // get_size_with_aspect_ratio((427, 640), 192, 320) -> (192, 287); the long side caps it.
  EXPECT_EQ(size_with_aspect_ratio(427, 640, 192, 320), HW(192, 287));
  EXPECT_EQ(size_with_aspect_ratio(300, 451, 800, 1333), HW(800, 1202));
  EXPECT_EQ(size_with_aspect_ratio(100, 1000, 800, 1333), HW(133, 1333));
}

// ---------------------------------------------------------------------------------------------

TEST(ProcDetr, NoPadNoRescaleMatchesGolden) { expect_pixels_match("proc-detr-nopad-norescale"); }

// Two images of different sizes padded to the larger with pixel_mask.
TEST(ProcDetr, ModelCaseMatchesGolden) { expect_pixels_match("detr-tiny-model"); }

TEST(ProcDetr, CocoDetectionLabels) {
  // detr-tiny-model's processor and images with COCO annotations; the expected targets are the
  // reference's (transformers 5.17, DetrImageProcessorPil): crowd objects dropped, boxes resized,
  // normalised, and rescaled for the second image's 1-pixel right padding; "size" is the padded size.
  // Regenerate: scripts/coco_target_values.py (transformers); its --numpy mode, which follows the
  // reference's steps in numpy/Pillow, reproduces every value below bit for bit. By hand, box 0 of
  // image 0: xyxy (45.1, 60, 180.4, 135) * (288/451, 192/300) = (28.8, 38.4, 115.2, 86.4) -> centre
  // (72/288, 62.4/192) = (0.25, 0.325), size (86.4/288, 48/192) = (0.3, 0.25), to float32 rounding;
  // area 10147.5 * 0.64 * 288/451 = 4147.2.
  std::string dir = test::golden_case("detr-tiny-model");
  auto processor = create_image_processor(read_json_file(dir + "/preprocessor_config.json"));
  std::vector<Image> images = {load_image(test::images_dir() + "/chelsea.png"), load_image(test::images_dir() + "/rocket.jpg")};
  json annotations = json::parse(R"([
    {"image_id": 10, "annotations": [
      {"bbox": [45.1, 60.0, 135.29999999999998, 75.0], "category_id": 1, "area": 10147.499999999998, "iscrowd": 0},
      {"bbox": [225.5, 30.0, 202.95000000000002, 240.0], "category_id": 3, "area": 48707.99999999999, "iscrowd": 0}]},
    {"image_id": 11, "annotations": [
      {"bbox": [64.0, 85.4, 192.0, 106.75], "category_id": 2, "area": 20496.0, "iscrowd": 0},
      {"bbox": [320.0, 42.7, 288.0, 341.6], "category_id": 3, "area": 98380.79999999999, "iscrowd": 1}]}])");
  PreprocessInputs inputs;
  inputs.annotations = &annotations;
  BatchFeature out = processor->preprocess(images, inputs);
  ASSERT_EQ(out.labels.size(), 2u);
  auto values = [](const Tensor& t) {
    Tensor d = t.to(DType::F64);
    return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
  };
  const DetectionTarget& a = out.labels[0];
  EXPECT_EQ(values(a.size), (std::vector<double>{192, 288}));
  EXPECT_EQ(values(a.image_id), (std::vector<double>{10}));
  EXPECT_EQ(values(a.class_labels), (std::vector<double>{1, 3}));
  EXPECT_EQ(values(a.boxes), (std::vector<double>{0.25, 0.32500001788139343, 0.29999998211860657, 0.2500000298023224,
                                                  0.7250000238418579, 0.5, 0.45000001788139343, 0.800000011920929}));
  EXPECT_EQ(values(a.area), (std::vector<double>{4147.2001953125, 19906.560546875}));
  EXPECT_EQ(values(a.iscrowd), (std::vector<double>{0, 0}));
  EXPECT_EQ(values(a.orig_size), (std::vector<double>{300, 451}));
  EXPECT_FALSE(a.masks.defined());
  const DetectionTarget& b = out.labels[1];
  EXPECT_EQ(values(b.size), (std::vector<double>{192, 288}));
  EXPECT_EQ(values(b.class_labels), (std::vector<double>{2}));
  EXPECT_EQ(values(b.boxes), (std::vector<double>{0.2491319477558136, 0.32499998807907104, 0.29895833134651184,
                                                  0.24999995529651642}));
  EXPECT_EQ(values(b.area), (std::vector<double>{4132.7998046875}));
  EXPECT_EQ(values(b.orig_size), (std::vector<double>{427, 640}));
  EXPECT_EQ(shape_str(b.boxes.shape()), "[1, 4]");
}

// A panoptic PNG whose colours encode segment ids (r + 256 g + 65536 b).
void write_panoptic_png(const std::string& path, int64_t H, int64_t W) {
  Image png;
  png.height = H, png.width = W, png.channels = 3;
  png.rgb.resize(size_t(H * W * 3));
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      int64_t id = 0;
      if ((x + 2 * y) % 7 == 0 && y < 150) id = 12345;
      if (y >= 10 && y < 100 && x >= 20 && x < 200) id = 1;
      if (y >= 150) id = 300;
      if (y < 5 && x >= W - 11) id = 70000;
      uint8_t* p = &png.rgb[size_t((y * W + x) * 3)];
      p[0] = uint8_t(id % 256), p[1] = uint8_t(id / 256 % 256), p[2] = uint8_t(id / 65536);
    }
  save_png(path, png);
}

TEST(ProcDetr, CocoPanopticLabels) {
  // Expected values from the reference's numpy/PIL code (prepare_coco_panoptic_annotation,
  // masks_to_boxes, resize_annotation with NEAREST masks, normalize_annotation, padding update) on
  // the same PNGs: masks_to_boxes' inclusive maxima, an empty segment's 1e8 minima, the second
  // image padded from 287 to 288 columns. Regenerate: scripts/coco_target_values.py (transformers
  // 5.17.0, DetrImageProcessorPil); checked here with its --numpy mode (numpy + Pillow's NEAREST
  // resize, no transformers), which gives every value below exactly.
  std::string dir = test::golden_case("detr-tiny-model");
  json config = read_json_file(dir + "/preprocessor_config.json");
  config["format"] = "coco_panoptic";
  auto processor = create_image_processor(config);
  std::string tmp = test::temp_dir("proc_panoptic");
  write_panoptic_png(tmp + "/pan0.png", 300, 451);
  write_panoptic_png(tmp + "/pan1.png", 427, 640);
  json annotations = json::array();
  for (int i = 0; i < 2; ++i) {
    json segments = json::array();
    const int64_t ids[5] = {1, 300, 70000, 12345, 5}, cats[5] = {3, 7, 1, 2, 9}, crowd[5] = {0, 1, 0, 0, 0};
    const double areas[5] = {1234.5, 50000.25, 55.0, 4321.0, 0.0};
    for (int k = 0; k < 5; ++k)
      segments.push_back({{"id", ids[k]}, {"category_id", cats[k]}, {"iscrowd", crowd[k]}, {"area", areas[k]}});
    annotations.push_back({{"image_id", 100 + i}, {"file_name", "pan" + std::to_string(i) + ".png"}, {"segments_info", segments}});
  }
  std::vector<Image> images = {load_image(test::images_dir() + "/chelsea.png"), load_image(test::images_dir() + "/rocket.jpg")};
  PreprocessInputs inputs;
  inputs.annotations = &annotations;
  inputs.masks_path = tmp;
  BatchFeature out = processor->preprocess(images, inputs);
  ASSERT_EQ(out.labels.size(), 2u);
  auto values = [](const Tensor& t) {
    Tensor d = t.to(DType::F64);
    return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
  };
  const std::vector<double> boxes[2] = {
      {0.24279379844665527, 0.18166665732860565, 0.39689576625823975, 0.2966666519641876, 0.49889135360717773,
       0.7483332753181458, 0.9977827072143555, 0.49666666984558105, 0.9866962432861328, 0.006666666362434626,
       0.022172927856445312, 0.013333332724869251, 0.49889135360717773, 0.24833333492279053, 0.9977827072143555,
       0.49666666984558105, 110864.7421875, 166666.671875, -221729.484375, -333333.34375},
      {0.17049968242645264, 0.127634659409523, 0.27871638536453247, 0.20843090116977692, 0.49748536944389343,
       0.6744730472564697, 0.9949707388877869, 0.6463700532913208, 0.9871853590011597, 0.004683840554207563,
       0.01557074673473835, 0.009367681108415127, 0.49748536944389343, 0.17447306215763092, 0.9949707388877869,
       0.34894612431526184, 77853.734375, 117096.0234375, -155707.46875, -234192.046875}};
  const std::vector<double> areas[2] = {{504.530029296875, 20434.69140625, 22.47804832458496, 1765.957275390625, 0.0},
                                        {248.92376708984375, 10082.017578125, 11.090163230895996, 871.2835693359375, 0.0}};
  const std::vector<int64_t> mask_sums[2] = {{6670, 27648, 21, 2995, 0}, {3321, 35875, 10, 2272, 0}};
  const std::vector<int64_t> mask_weighted[2] = {{3277956, 13976307, 12012, 1501733, 0}, {1545061, 18050919, 4280, 1157172, 0}};
  for (int i = 0; i < 2; ++i) {
    const DetectionTarget& t = out.labels[i];
    EXPECT_EQ(values(t.size), (std::vector<double>{192, 288}));
    EXPECT_EQ(values(t.image_id), (std::vector<double>{double(100 + i)}));
    EXPECT_EQ(values(t.class_labels), (std::vector<double>{3, 7, 1, 2, 9}));
    EXPECT_EQ(values(t.iscrowd), (std::vector<double>{0, 1, 0, 0, 0}));
    EXPECT_EQ(values(t.orig_size), (std::vector<double>{i ? 427.0 : 300.0, i ? 640.0 : 451.0}));
    EXPECT_EQ(values(t.boxes), boxes[i]) << i;
    EXPECT_EQ(values(t.area), areas[i]) << i;
    ASSERT_TRUE(t.masks.defined());
    ASSERT_EQ(shape_str(t.masks.shape()), "[5, 192, 288]");
    ASSERT_EQ(t.masks.dtype(), DType::Bool);
    const uint8_t* m = static_cast<const uint8_t*>(t.masks.raw());
    for (int k = 0; k < 5; ++k) {
      int64_t sum = 0, weighted = 0;
      for (int64_t p = 0; p < 192 * 288; ++p) sum += m[k * 192 * 288 + p], weighted += m[k * 192 * 288 + p] * (p % 1009);
      EXPECT_EQ(sum, mask_sums[i][k]) << i << " " << k;
      EXPECT_EQ(weighted, mask_weighted[i][k]) << i << " " << k;
    }
  }
}

TEST(ProcDetr, LegacyConfigKeys) {
  // DetrFeatureExtractor-era keys: an int size with max_size, pad_and_return_pixel_mask.
  auto p = create_image_processor(json{{"feature_extractor_type", "DetrFeatureExtractor"}, {"size", 800}, {"max_size", 1000},
                                       {"pad_and_return_pixel_mask", false}});
  EXPECT_EQ(p->options().size.shortest_edge, 800);
  EXPECT_EQ(p->options().size.longest_edge, 1000);
  EXPECT_FALSE(p->options().do_pad);
  auto q = create_image_processor(json{{"image_processor_type", "DetaImageProcessor"}});
  EXPECT_EQ(q->options().size.shortest_edge, 800);
  EXPECT_EQ(q->options().size.longest_edge, 1333);
  EXPECT_TRUE(q->options().do_pad);
  EXPECT_EQ(q->options().resample, Resample::Bilinear);
  EXPECT_THROW(create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}, {"format", "coco_keypoints"}}), Error);
  // Given with do_pad, the legacy key wins: 4.37's __init__ pops pad_and_return_pixel_mask into do_pad.
  for (bool legacy : {false, true}) {
    auto r = create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}, {"do_pad", !legacy},
                                         {"pad_and_return_pixel_mask", legacy}});
    EXPECT_EQ(r->options().do_pad, legacy);
  }
}

TEST(ProcDetr, MismatchedAnnotationsAreAnError) {
  auto p = create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}, {"size", {{"height", 20}, {"width", 20}}}});
  std::vector<Image> images = {load_image(test::images_dir() + "/palette_color.png")};
  json two = json::array({json{{"image_id", 1}, {"annotations", json::array()}}, json{{"image_id", 2}, {"annotations", json::array()}}});
  PreprocessInputs inputs;
  inputs.annotations = &two;
  EXPECT_THROW(p->preprocess(images, inputs), Error);
  json bad = json::array({json{{"annotations", json::array()}}});
  inputs.annotations = &bad;
  EXPECT_THROW(p->preprocess(images, inputs), Error);
  // Integer fields: a float is truncated like Python's int(); one no int64 holds is refused.
  for (json id : {json(1e300), json(9.3e18), json(uint64_t(1) << 63), json(-1e19)}) {
    json huge = json::array({json{{"image_id", id}, {"annotations", json::array()}}});
    inputs.annotations = &huge;
    EXPECT_THROW(p->preprocess(images, inputs), Error) << id.dump();
  }
  json fractional = json::array({json{{"image_id", 7.9}, {"annotations", json::array()}}});
  inputs.annotations = &fractional;
  EXPECT_EQ(p->preprocess(images, inputs).labels.at(0).image_id.at(0), 7);
  json empty = json::array({json{{"image_id", 7}, {"annotations", json::array()}}});
  inputs.annotations = &empty;
  BatchFeature out = p->preprocess(images, inputs);
  ASSERT_EQ(out.labels.size(), 1u);
  EXPECT_EQ(shape_str(out.labels[0].boxes.shape()), "[0, 4]");
  EXPECT_EQ(out.labels[0].size.at(0), 20);
}

// ---- transformers' own COCO fixtures (../shared/fixtures/coco, tests/fixtures/tests_samples/COCO) ----
// The expectations are those of transformers' integration tests (tests/models/detr/
// test_image_processing_detr.py: test_call_pytorch_with_coco_detection_annotations,
// test_batched_coco_detection_annotations, test_call_pytorch_with_coco_panoptic_annotations), at their
// tolerances: values printed to 4 decimals.

std::string coco_fixtures() {
  const std::string dir = std::string(VF_SOURCE_DIR) + "/../shared/fixtures/coco";
  EXPECT_TRUE(std::filesystem::exists(dir + "/000000039769.png")) << "COCO fixtures missing: " << dir;
  return dir;
}

std::vector<double> values_of(const Tensor& t) {
  Tensor d = t.to(DType::F64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

void expect_near_all(const std::vector<double>& ours, const std::vector<double>& want, double atol, double rtol,
                     const std::string& what) {
  ASSERT_EQ(ours.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_LE(std::fabs(ours[i] - want[i]), atol + rtol * std::fabs(want[i])) << what << "[" << i << "]";
}

TEST(ProcDetrFixtures, CocoDetectionAnnotations) {
  const std::string dir = coco_fixtures();
  auto processor = create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}});  // 800 / 1333
  json target = {{"image_id", 39769}, {"annotations", read_json_file(dir + "/coco_annotations.txt")}};
  PreprocessInputs inputs;
  inputs.annotations = &target;
  BatchFeature enc = processor->preprocess({load_image(dir + "/000000039769.png")}, inputs);
  ASSERT_EQ(shape_str(enc.pixel_values.shape()), "[1, 3, 800, 1066]");
  expect_near_all({enc.pixel_values.f32()[0], enc.pixel_values.f32()[1], enc.pixel_values.f32()[2]},
                  {0.2796, 0.3138, 0.3481}, 1e-4, 0, "pixel_values[0, 0, 0, :3]");
  ASSERT_EQ(enc.labels.size(), 1u);
  const DetectionTarget& t = enc.labels[0];
  // torch.allclose defaults: rtol 1e-5, atol 1e-8.
  expect_near_all(values_of(t.area), {5887.9600, 11250.2061, 489353.8438, 837122.7500, 147967.5156, 165732.3438}, 1e-8,
                  1e-5, "area");
  ASSERT_EQ(shape_str(t.boxes.shape()), "[6, 4]");
  const std::vector<double> boxes = values_of(t.boxes);
  expect_near_all({boxes.begin(), boxes.begin() + 4}, {0.5503, 0.2765, 0.0604, 0.2215}, 1e-3, 0, "boxes[0]");
  EXPECT_EQ(values_of(t.image_id), std::vector<double>{39769});
  EXPECT_EQ(values_of(t.iscrowd), std::vector<double>(6, 0.0));
  EXPECT_EQ(values_of(t.class_labels), (std::vector<double>{75, 75, 63, 65, 17, 17}));
  EXPECT_EQ(values_of(t.orig_size), (std::vector<double>{480, 640}));
  EXPECT_EQ(values_of(t.size), (std::vector<double>{800, 1066}));
  EXPECT_FALSE(t.masks.defined());
}

TEST(ProcDetrFixtures, BatchedCocoDetectionAnnotationsWithMasks) {
  const std::string dir = coco_fixtures();
  auto processor = create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}});
  Image image0 = load_image(dir + "/000000039769.png");
  // The reference test resizes the image to 800x800 with PIL (bicubic); only its size matters here.
  Image image1 = resize_pil(image0, 800, 800, Resample::Bicubic);
  // The test scales the boxes (not the polygons) to the second image's size, coords * w_1 / w_0, in
  // dicts that both annotations share: the first image gets the scaled boxes too (clipped to it).
  json objects = read_json_file(dir + "/coco_annotations.txt");
  for (json& obj : objects) {
    json& b = obj["bbox"];
    b = json::array({b[0].get<double>() * 800 / 640, b[1].get<double>() * 800 / 480, b[2].get<double>() * 800 / 640,
                     b[3].get<double>() * 800 / 480});
  }
  json annotations = json::array({{{"image_id", 39769}, {"annotations", objects}}, {{"image_id", 39769}, {"annotations", objects}}});
  PreprocessInputs inputs;
  inputs.annotations = &annotations;
  inputs.return_segmentation_masks = true;
  BatchFeature enc = processor->preprocess({image0, image1}, inputs);
  ASSERT_EQ(shape_str(enc.pixel_values.shape()), "[2, 3, 800, 1066]");
  ASSERT_EQ(enc.labels.size(), 2u);
  expect_near_all(values_of(enc.labels[0].boxes),
                  {0.6879, 0.4609, 0.0755, 0.3691, 0.2118, 0.3359, 0.2601, 0.1566, 0.5011, 0.5000, 0.9979, 1.0000,
                   0.5010, 0.5020, 0.9979, 0.9959, 0.3284, 0.5944, 0.5884, 0.8112, 0.8394, 0.5445, 0.3213, 0.9110},
                  1e-3, 0, "boxes 0");
  expect_near_all(values_of(enc.labels[1].boxes),
                  {0.4130, 0.2765, 0.0453, 0.2215, 0.1272, 0.2016, 0.1561, 0.0940, 0.3757, 0.4933, 0.7488, 0.9865,
                   0.3759, 0.5002, 0.7492, 0.9955, 0.1971, 0.5456, 0.3532, 0.8646, 0.5790, 0.4115, 0.3430, 0.7161},
                  1e-3, 0, "boxes 1");
  // The masks are padded with the images.
  for (int i = 0; i < 2; ++i) {
    const Tensor& m = enc.labels[i].masks;
    ASSERT_TRUE(m.defined());
    EXPECT_EQ(shape_str(m.shape()), "[6, 800, 1066]");
    EXPECT_EQ(m.dtype(), DType::Bool);
  }
  // Image 1 (800x800) is padded from 800 to 1066 columns: nothing of its masks lies there, and every
  // mask has pixels (the polygons lie inside the image).
  const uint8_t* m1 = static_cast<const uint8_t*>(enc.labels[1].masks.raw());
  int64_t padded = 0;
  for (int64_t k = 0; k < 6; ++k) {
    int64_t sum = 0;
    for (int64_t y = 0; y < 800; ++y)
      for (int64_t x = 0; x < 1066; ++x) {
        const uint8_t v = m1[(k * 800 + y) * 1066 + x];
        sum += v;
        if (x >= 800) padded += v;
      }
    EXPECT_GT(sum, 0) << k;
  }
  EXPECT_EQ(padded, 0);
}

TEST(ProcDetrFixtures, PolygonMasksCoverTheAnnotatedAreas) {
  // COCO's `area` of a polygon object is its geometric area: the rasterised mask (one pixel per
  // centre inside, in pycocotools' rounding) must count about as many pixels, off by a fraction of
  // the outline's length (an inverted, emptied or wrongly clipped mask is off by far more; exactness is
  // proc-detr-polygon-masks' job).
  const std::string dir = coco_fixtures();
  for (const json& obj : read_json_file(dir + "/coco_annotations.txt")) {
    const std::vector<uint8_t> mask = coco_segmentation_to_mask(obj["segmentation"], 480, 640);
    int64_t count = 0;
    for (uint8_t v : mask) count += v;
    double perimeter = 0;
    for (const json& poly : obj["segmentation"]) {
      const std::vector<double> p = poly.get<std::vector<double>>();
      const size_t k = p.size() / 2;
      for (size_t i = 0; i < k; ++i)
        perimeter += std::hypot(p[2 * ((i + 1) % k)] - p[2 * i], p[2 * ((i + 1) % k) + 1] - p[2 * i + 1]);
    }
    const double area = obj["area"].get<double>();
    EXPECT_LE(std::fabs(double(count) - area), 0.1 * perimeter + 2) << "object " << obj["id"] << ": " << count
                                                                     << " pixels, area " << area;
  }
}

TEST(ProcDetrFixtures, CocoPanopticAnnotations) {
  const std::string dir = coco_fixtures();
  auto processor = create_image_processor(json{{"image_processor_type", "DetrImageProcessor"}, {"format", "coco_panoptic"}});
  json target = {{"file_name", "000000039769.png"}, {"image_id", 39769},
                 {"segments_info", read_json_file(dir + "/coco_panoptic_annotations.txt")}};
  PreprocessInputs inputs;
  inputs.annotations = &target;
  inputs.masks_path = dir + "/coco_panoptic";
  BatchFeature enc = processor->preprocess({load_image(dir + "/000000039769.png")}, inputs);
  ASSERT_EQ(shape_str(enc.pixel_values.shape()), "[1, 3, 800, 1066]");
  const DetectionTarget& t = enc.labels.at(0);
  expect_near_all(values_of(t.area), {147979.6875, 165527.0469, 484638.5938, 11292.9375, 5879.6562, 7634.1147}, 1e-8,
                  1e-5, "area");
  ASSERT_EQ(shape_str(t.boxes.shape()), "[6, 4]");
  const std::vector<double> boxes = values_of(t.boxes);
  expect_near_all({boxes.begin(), boxes.begin() + 4}, {0.2625, 0.5437, 0.4688, 0.8625}, 1e-3, 0, "boxes[0]");
  EXPECT_EQ(values_of(t.class_labels), (std::vector<double>{17, 17, 63, 75, 75, 93}));
  EXPECT_EQ(values_of(t.iscrowd), std::vector<double>(6, 0.0));
  ASSERT_TRUE(t.masks.defined());
  int64_t sum = 0;
  for (double v : values_of(t.masks)) sum += static_cast<int64_t>(v);
  EXPECT_EQ(sum, 822873);
  EXPECT_EQ(values_of(t.orig_size), (std::vector<double>{480, 640}));
  EXPECT_EQ(values_of(t.size), (std::vector<double>{800, 1066}));
}

}  // namespace
}  // namespace vf
