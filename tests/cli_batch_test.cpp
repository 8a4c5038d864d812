// `vf classify|detect|segment` over folders and batches (tools/batch.cpp, the batch_size of
// vf::classify / vf::detect): folder expansion, batches against one-image runs, --jsonl,
// --coco-results, --keep-going, on the vendored tiny models.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "batch.h"
#include "io/file.h"
#include "io/json.h"
#include "test_util.h"
#include "vf_binary.h"
#include "visionformers.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

std::string image(const std::string& name) { return test::images_dir() + "/" + name; }

// A fresh scratch folder.
std::string fresh_dir(const std::string& name) {
  const std::string dir = test::temp_dir(name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void copy(const std::string& from, const std::string& to) {
  fs::create_directories(fs::path(to).parent_path());
  fs::copy_file(from, to, fs::copy_options::overwrite_existing);
}

std::vector<json> json_lines(const std::string& text) {
  std::vector<json> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) lines.push_back(parse_json_text(line, "vf --jsonl line"));
  return lines;
}

// Chelsea, chelsea mirrored (another image of the same size) and the square camera: a batch of
// the three runs the two chelseas in one forward and the camera in another.
std::vector<Image> three_images() {
  Image chelsea = load_image(image("chelsea.png"), true);
  Image mirrored = chelsea;
  for (int64_t y = 0; y < chelsea.height; ++y)
    for (int64_t x = 0; x < chelsea.width; ++x)
      for (int64_t c = 0; c < 3; ++c)
        mirrored.rgb[(y * chelsea.width + x) * 3 + c] = chelsea.rgb[(y * chelsea.width + chelsea.width - 1 - x) * 3 + c];
  return {chelsea, load_image(image("camera.png"), true), mirrored};
}

// The batch's detections equal the one-image runs' within the goldens' tolerances (nothing is padded:
// see visionformers.h, "Batches"): sorted scores
// position by position within 1e-4; each single-run detection (away from the top-k cutoff, where
// near-ties may trade places) found in the batch with its label, score within 1e-4 and corners
// within 1e-3 of the image's longer side.
void expect_batch_detections_equal_single(const std::string& case_name) {
  Pretrained p = Pretrained::from_pretrained(test::golden_case(case_name));
  const std::vector<Image> images = three_images();
  const auto single = detect(p, images, 0.0f, /*batch_size=*/1);
  const auto batch = detect(p, images, 0.0f, /*batch_size=*/3);
  ASSERT_EQ(single.size(), 3u);
  ASSERT_EQ(batch.size(), 3u);
  double max_score_diff = 0;
  for (size_t b = 0; b < 3; ++b) {
    ASSERT_EQ(batch[b].size(), single[b].size()) << "image " << b;
    ASSERT_GT(single[b].size(), 2u);
    for (size_t i = 0; i < single[b].size(); ++i) {
      EXPECT_NEAR(batch[b][i].score, single[b][i].score, 1e-4) << "image " << b << " position " << i;
      max_score_diff = std::max<double>(max_score_diff, std::abs(batch[b][i].score - single[b][i].score));
    }
    const double tol = 1e-3 * std::max(images[b].height, images[b].width);
    const float cutoff = single[b].back().score;
    for (const DetectedObject& s : single[b]) {
      if (s.score <= cutoff + 1e-4) continue;
      bool found = false;
      for (const DetectedObject& o : batch[b])
        found = found || (o.label_id == s.label_id && std::abs(o.score - s.score) <= 1e-4 &&
                          std::abs(o.x0 - s.x0) <= tol && std::abs(o.y0 - s.y0) <= tol &&
                          std::abs(o.x1 - s.x1) <= tol && std::abs(o.y1 - s.y1) <= tol);
      EXPECT_TRUE(found) << case_name << " image " << b << ": label " << s.label_id << " score " << s.score
                         << " box " << s.x0 << "," << s.y0 << "," << s.x1 << "," << s.y1 << " not in the batch";
    }
  }
  std::printf("%s: batch of 3 vs one by one, max score difference %.3g\n", case_name.c_str(), max_score_diff);
}

}  // namespace

// ---- folders, ids, files --------------------------------------------------------------------------

TEST(CliBatch, FoldersAreSearchedRecursivelyInPathOrder) {
  const std::string dir = fresh_dir("batch_expand");
  for (const char* f : {"d/b.JPG", "d/a.png", "d/sub/c.jpeg", "d/sub2/z.TiFf", "d/notes.txt", "d/sub/x.webp",
                        "d/sub/deeper/y.gif", "d/w.bmp", "d/v.tif", "d/noext", "x.png"})
  {
    fs::create_directories(fs::path(dir + "/" + f).parent_path());
    test::write_bytes(dir + "/" + f, "x");
  }
  fs::create_directories(dir + "/d/empty");
  const std::vector<std::string> got = cli::expand_image_paths({dir + "/x.png", dir + "/d", dir + "/missing.jpg"});
  const std::vector<std::string> want = {dir + "/x.png",          dir + "/d/a.png",     dir + "/d/b.JPG",
                                         dir + "/d/sub/c.jpeg",   dir + "/d/sub/deeper/y.gif",
                                         dir + "/d/sub/x.webp",   dir + "/d/sub2/z.TiFf", dir + "/d/v.tif",
                                         dir + "/d/w.bmp",        dir + "/missing.jpg"};
  EXPECT_EQ(got, want);
  EXPECT_TRUE(cli::has_image_extension("a/B.JPEG"));
  EXPECT_FALSE(cli::has_image_extension("a/jpg"));
  EXPECT_FALSE(cli::has_image_extension("a.jpg.txt"));
}

TEST(CliBatch, CocoImageIds) {
  EXPECT_EQ(cli::coco_image_ids({"a/000000039769.jpg", "b/7.png", "000000000000.jpg"}),
            (std::vector<int64_t>{39769, 7, 0}));
  // One name is not a number: positions from 1, for every image.
  EXPECT_EQ(cli::coco_image_ids({"a/000000039769.jpg", "cat.png", "12.jpg"}), (std::vector<int64_t>{1, 2, 3}));
  // Two files with the same number: positions too.
  EXPECT_EQ(cli::coco_image_ids({"a/5.jpg", "b/005.png"}), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(cli::coco_image_ids({"1e3.jpg", "-4.jpg"}), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(cli::coco_image_ids({"1234567890123456789.jpg"}), (std::vector<int64_t>{1}));  // past 18 digits
}

TEST(CliBatch, CocoResultIsXYWidthHeight) {
  DetectedObject o;
  o.score = 0.75f;
  o.label_id = 17;
  o.x0 = 10.25f, o.y0 = -2.5f, o.x1 = 30.75f, o.y1 = 42.0f;
  const auto r = cli::coco_result(39769, o);
  EXPECT_EQ(r.dump(), R"({"image_id":39769,"category_id":17,"bbox":[10.25,-2.5,20.5,44.5],"score":0.75})");
}

TEST(CliBatch, WriteFileAtomicallyReplacesEvenALink) {
  const std::string dir = fresh_dir("batch_atomic");
  const std::string target = dir + "/out.json", elsewhere = dir + "/elsewhere.txt";
  write_file_atomically(target, "first");
  EXPECT_EQ(test::read_bytes(target), "first");
  write_file_atomically(target, "second");
  EXPECT_EQ(test::read_bytes(target), "second");
  // A link at the target is replaced, never written through.
  test::write_bytes(elsewhere, "keep");
  fs::remove(target);
  fs::create_symlink(elsewhere, target);
  write_file_atomically(target, "third");
  EXPECT_FALSE(fs::is_symlink(target));
  EXPECT_EQ(test::read_bytes(target), "third");
  EXPECT_EQ(test::read_bytes(elsewhere), "keep");
  {
    AtomicOutputs never;  // not committed: removed
    never.add(dir + "/never.json");
  }
  EXPECT_FALSE(fs::exists(dir + "/never.json"));
  // Nothing else is left in the folder.
  size_t files = 0;
  for (auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 2u);
  EXPECT_THROW(write_file_atomically(dir + "/no/such/folder/out.json", "x"), Error);
}

// ---- batches against one-image runs -------------------------------------------------------------

TEST(CliBatch, DeformableDetrBatchEqualsSingleRuns) {
  expect_batch_detections_equal_single("deformable-detr-tiny-det");
}

TEST(CliBatch, ConditionalDetrBatchEqualsSingleRuns) {
  expect_batch_detections_equal_single("conditional-detr-tiny-det");
}

TEST(CliBatch, ClassifyBatchEqualsSingleRuns) {
  Pretrained p = Pretrained::from_pretrained(std::string(VF_SOURCE_DIR) + "/assets/tiny-convnext");
  const std::vector<Image> images = three_images();
  const auto single = classify(p, images, 5, /*batch_size=*/1);
  const auto batch = classify(p, images, 5, /*batch_size=*/3);
  const auto pairs = classify(p, images, 5, /*batch_size=*/2);
  ASSERT_EQ(single.size(), 3u);
  ASSERT_EQ(batch.size(), 3u);
  ASSERT_EQ(pairs.size(), 3u);
  for (size_t b = 0; b < 3; ++b) {
    ASSERT_EQ(single[b].size(), 5u);
    ASSERT_EQ(batch[b].size(), 5u);
    for (size_t i = 0; i < 5; ++i) {
      EXPECT_EQ(batch[b][i].label, single[b][i].label) << b << " " << i;
      EXPECT_NEAR(batch[b][i].score, single[b][i].score, 1e-4) << b << " " << i;
      EXPECT_NEAR(pairs[b][i].score, single[b][i].score, 1e-4) << b << " " << i;
    }
  }
  // The three images are told apart at all.
  EXPECT_NE(single[0][0].score, single[1][0].score);
}

// ---- the vf binary ------------------------------------------------------------------------------

namespace {

// A folder of COCO-named images, one in a subfolder, and a file that is not an image.
std::string coco_folder(const std::string& name) {
  const std::string dir = fresh_dir(name) + "/images";
  copy(image("rocket.jpg"), dir + "/000000000042.jpg");
  copy(image("camera.png"), dir + "/000000000100.png");
  copy(image("chelsea.png"), dir + "/sub/000000000007.png");
  test::write_bytes(dir + "/README.txt", "not an image");
  return dir;
}

}  // namespace

TEST(CliBatchVf, JsonlCocoResultsAndJsonAgree) {
  const std::string dir = coco_folder("batch_vf_coco");
  const std::string scratch = fs::path(dir).parent_path().string();
  const std::string model = test::golden_case("deformable-detr-tiny-det");
  const std::string coco_path = scratch + "/results.json";
  const std::vector<std::string> order = {dir + "/000000000042.jpg", dir + "/000000000100.png",
                                          dir + "/sub/000000000007.png"};
  const std::vector<int64_t> ids = {42, 100, 7};

  test::CommandResult r =
      test::run_vf({"detect", model, dir, "--threshold", "0.3", "--batch-size", "3", "--json", "--coco-results", coco_path},
                   scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.err.find("vf: 3 images in "), std::string::npos) << r.err;
  const json got = parse_json_text(r.out, "vf detect --json");
  ASSERT_TRUE(got.is_array());
  ASSERT_EQ(got.size(), 3u);
  const json coco = read_json_file(coco_path);
  ASSERT_TRUE(coco.is_array());

  // Every detection of --json, in order, is one COCO entry: its image's id, its label's id, its score,
  // and a bbox whose corners truncate to the --json box.
  Pretrained p = Pretrained::from_pretrained(model);
  std::vector<Image> images;
  for (auto& path : order) images.push_back(load_image(path, true));
  const auto lib = detect(p, images, 0.3f, 3);
  size_t k = 0, total = 0;
  for (size_t b = 0; b < 3; ++b) {
    ASSERT_EQ(got[b].size(), lib[b].size());
    for (size_t i = 0; i < got[b].size(); ++i, ++k) {
      ASSERT_LT(k, coco.size());
      const json& g = got[b][i];
      const json& c = coco[k];
      EXPECT_EQ(c["image_id"].get<int64_t>(), ids[b]);
      EXPECT_EQ("obj_" + std::to_string(c["category_id"].get<int64_t>()), g["label"].get<std::string>());
      EXPECT_EQ(c["score"].get<double>(), g["score"].get<double>());
      const auto bbox = c["bbox"].get<std::vector<double>>();
      ASSERT_EQ(bbox.size(), 4u);
      EXPECT_EQ(static_cast<int>(std::trunc(bbox[0])), g["box"]["xmin"].get<int>());
      EXPECT_EQ(static_cast<int>(std::trunc(bbox[1])), g["box"]["ymin"].get<int>());
      EXPECT_EQ(static_cast<int>(std::trunc(bbox[0] + bbox[2])), g["box"]["xmax"].get<int>());
      EXPECT_EQ(static_cast<int>(std::trunc(bbox[1] + bbox[3])), g["box"]["ymax"].get<int>());
      // By hand from the library's exact corners: [x0, y0, x1 - x0, y1 - y0].
      const DetectedObject& o = lib[b][i];
      EXPECT_NEAR(bbox[0], o.x0, 1e-3);
      EXPECT_NEAR(bbox[1], o.y0, 1e-3);
      EXPECT_NEAR(bbox[2], double(o.x1) - o.x0, 1e-3);
      EXPECT_NEAR(bbox[3], double(o.y1) - o.y0, 1e-3);
      EXPECT_GT(bbox[2], 0);
      EXPECT_GT(bbox[3], 0);
      ++total;
    }
  }
  EXPECT_EQ(coco.size(), k);
  EXPECT_GT(total, 0u);

  // --jsonl: one line per image, in path order, each {"path", "result"} with what --json printed.
  r = test::run_vf({"detect", model, dir, "--threshold", "0.3", "--batch-size", "3", "--jsonl"}, scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  const std::vector<json> lines = json_lines(r.out);
  ASSERT_EQ(lines.size(), 3u) << r.out;
  for (size_t b = 0; b < 3; ++b) {
    EXPECT_EQ(lines[b].size(), 2u);
    EXPECT_EQ(lines[b]["path"], order[b]);
    ASSERT_EQ(lines[b]["result"].size(), got[b].size());
    for (size_t i = 0; i < got[b].size(); ++i) {
      EXPECT_EQ(lines[b]["result"][i]["label"], got[b][i]["label"]);
      EXPECT_NEAR(lines[b]["result"][i]["score"].get<double>(), got[b][i]["score"].get<double>(), 1e-6);
      EXPECT_EQ(lines[b]["result"][i]["box"], got[b][i]["box"]);
    }
  }
  // No file left beside the results.
  size_t files = 0;
  for (auto& e : fs::directory_iterator(scratch)) files += e.path().filename().string().find("results") != std::string::npos;
  EXPECT_EQ(files, 1u);
}

TEST(CliBatchVf, NonNumericNamesNumberImagesInOrder) {
  const std::string scratch = fresh_dir("batch_vf_ids");
  copy(image("rocket.jpg"), scratch + "/in/rocket.jpg");
  copy(image("chelsea.png"), scratch + "/in/000000000007.png");
  const std::string model = test::golden_case("deformable-detr-tiny-det");
  test::CommandResult r =
      test::run_vf({"detect", model, scratch + "/in", "--threshold", "0", "--coco-results", scratch + "/c.json"}, scratch);
  ASSERT_EQ(r.rc, 0) << r.err;
  const json coco = read_json_file(scratch + "/c.json");
  ASSERT_FALSE(coco.empty());
  std::vector<int64_t> seen;
  for (auto& c : coco)
    if (seen.empty() || seen.back() != c["image_id"].get<int64_t>()) seen.push_back(c["image_id"].get<int64_t>());
  EXPECT_EQ(seen, (std::vector<int64_t>{1, 2}));  // 000000000007.png, then rocket.jpg
}

TEST(CliBatchVf, ClassifyFolderInBatchesEqualsOneByOne) {
  const std::string dir = coco_folder("batch_vf_classify");
  const std::string scratch = fs::path(dir).parent_path().string();
  const std::string model = std::string(VF_SOURCE_DIR) + "/assets/tiny-convnext";
  test::CommandResult one = test::run_vf({"classify", model, dir, "--jsonl"}, scratch);
  ASSERT_EQ(one.rc, 0) << one.err;
  test::CommandResult two = test::run_vf({"classify", model, dir, "--jsonl", "--batch-size", "2"}, scratch);
  ASSERT_EQ(two.rc, 0) << two.err;
  const auto a = json_lines(one.out), b = json_lines(two.out);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a[i]["path"], b[i]["path"]);
    ASSERT_EQ(a[i]["result"].size(), 5u);
    for (size_t k = 0; k < 5; ++k) {
      EXPECT_EQ(a[i]["result"][k]["label"], b[i]["result"][k]["label"]);
      EXPECT_NEAR(a[i]["result"][k]["score"].get<double>(), b[i]["result"][k]["score"].get<double>(), 1e-4);
    }
  }
  EXPECT_EQ(a[2]["path"], dir + "/sub/000000000007.png");
}

TEST(CliBatchVf, UnreadableImageStopsOrIsSkipped) {
  const std::string scratch = fresh_dir("batch_vf_keep_going");
  const std::string dir = scratch + "/in";
  copy(image("rocket.jpg"), dir + "/c.jpg");
  copy(image("truncated.jpg"), dir + "/b.jpg");  // ends before its last scanline
  copy(image("chelsea.png"), dir + "/a.png");
  const std::string model = test::golden_case("deformable-detr-tiny-det");

  // Without --keep-going: the run stops at b.jpg with exit code 65, naming it.
  test::CommandResult r = test::run_vf({"detect", model, dir, "--jsonl", "--batch-size", "2"}, scratch);
  EXPECT_EQ(r.rc, 65);
  EXPECT_NE(r.err.find(dir + "/b.jpg"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("c.jpg"), std::string::npos) << r.out;

  // With it: reported, skipped, counted in the summary; the others have results; exit code 0.
  r = test::run_vf({"detect", model, dir, "--jsonl", "--batch-size", "2", "--keep-going", "--threshold", "0.2"},
                   scratch);
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.err.find("vf: skipped: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(dir + "/b.jpg"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("vf: 2 images in "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 unreadable skipped"), std::string::npos) << r.err;
  const auto lines = json_lines(r.out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["path"], dir + "/a.png");
  EXPECT_EQ(lines[1]["path"], dir + "/c.jpg");

  // --json keeps each image's place: null for the skipped one.
  r = test::run_vf({"detect", model, dir, "--json", "--keep-going"}, scratch);
  EXPECT_EQ(r.rc, 0) << r.err;
  const json all = parse_json_text(r.out, "vf detect --json");
  ASSERT_EQ(all.size(), 3u);
  EXPECT_TRUE(all[0].is_array());
  EXPECT_TRUE(all[1].is_null());
  EXPECT_TRUE(all[2].is_array());

  // Nothing readable at all: exit code 65 even with --keep-going.
  r = test::run_vf({"detect", model, dir + "/b.jpg", "--keep-going"}, scratch);
  EXPECT_EQ(r.rc, 65);
  EXPECT_NE(r.err.find("vf: 0 images in "), std::string::npos) << r.err;
  // A folder without images is an input error.
  fs::create_directories(scratch + "/empty");
  r = test::run_vf({"detect", model, scratch + "/empty"}, scratch);
  EXPECT_EQ(r.rc, 65);
  EXPECT_NE(r.err.find("no image files"), std::string::npos) << r.err;
}

TEST(CliBatchVf, BadOptionsStopBeforeAnyImage) {
  const std::string scratch = fresh_dir("batch_vf_usage");
  const std::string model = test::golden_case("deformable-detr-tiny-det");
  EXPECT_EQ(test::run_vf({"detect", model, image("rocket.jpg"), "--batch-size", "0"}, scratch).rc, 64);
  EXPECT_EQ(test::run_vf({"detect", model, image("rocket.jpg"), "--json", "--jsonl"}, scratch).rc, 64);
  // A results file that cannot be created (its folder does not exist: exit 65, as for every output):
  // the run stops before the first image.
  test::CommandResult r =
      test::run_vf({"detect", model, image("rocket.jpg"), "--jsonl", "--coco-results", scratch + "/no/such/r.json"},
                   scratch);
  EXPECT_EQ(r.rc, 65);
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_NE(r.err.find(scratch + "/no/such/r.json"), std::string::npos) << r.err;
}
