// vf: the command-line front end. Each subcommand is a thin wrapper over the library.
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "check.h"
#include "core/ops.h"
#include "exit_codes.h"
#include "io/draw.h"
#include "io/file.h"
#include "visionformers.h"

namespace {

int cmd_classify(const std::string& model_dir, const std::vector<std::string>& images, int top_k, bool as_json) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  std::vector<vf::Image> imgs;
  // Like the pipelines' load_image: EXIF orientation applied (ImageOps.exif_transpose).
  for (auto& path : images) imgs.push_back(vf::load_image(path, /*apply_exif_orientation=*/true));
  auto results = vf::classify(p, imgs, top_k);
  if (as_json) {
    nlohmann::json all = nlohmann::json::array();
    for (auto& r : results) {
      nlohmann::json one = nlohmann::json::array();
      for (auto& ls : r) one.push_back({{"label", ls.label}, {"score", ls.score}});
      all.push_back(one);
    }
    std::cout << (results.size() == 1 ? all[0] : all).dump(2) << "\n";
  } else {
    for (size_t i = 0; i < results.size(); ++i) {
      std::printf("%s\n", images[i].c_str());
      for (auto& ls : results[i]) std::printf("  %8.5f  %s\n", ls.score, ls.label.c_str());
    }
  }
  return 0;
}

// OUT.png -> OUT-<suffix>.png, next to it.
std::string suffixed_path(const std::string& path, const std::string& suffix) {
  std::filesystem::path p(path);
  std::filesystem::path ext = p.has_extension() ? p.extension() : std::filesystem::path(".png");
  return (p.parent_path() / (p.stem().string() + "-" + suffix + ext.string())).string();
}

std::string score_text(double score) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", score);
  return buf;
}

// A box corner as the pipeline's int() would give it; a NaN corner (NaN weights or inputs: int()
// raises in Python) is shown as "nan" in text and null in JSON, never as -2147483648.
bool box_is_nan(const vf::DetectedObject& o) {
  return std::isnan(o.x0) || std::isnan(o.y0) || std::isnan(o.x1) || std::isnan(o.y1);
}
std::string corner_text(float exact, int truncated) { return std::isnan(exact) ? "nan" : std::to_string(truncated); }
nlohmann::ordered_json corner_json(float exact, int truncated) {
  return std::isnan(exact) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(truncated);
}

int cmd_detect(const std::string& model_dir, const std::vector<std::string>& images, float threshold, bool as_json,
               const std::string& draw_path) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  std::vector<vf::Image> imgs;
  for (auto& path : images) imgs.push_back(vf::load_image(path, /*apply_exif_orientation=*/true));
  auto results = vf::detect(p, imgs, threshold);
  if (!draw_path.empty()) {
    vf::AtomicOutputs outputs;  // all the images appear together, or none
    for (size_t i = 0; i < results.size(); ++i) {
      // Lowest score first, so that the best boxes end up on top.
      std::vector<vf::BoxAnnotation> boxes;
      for (auto it = results[i].rbegin(); it != results[i].rend(); ++it)
        if (!box_is_nan(*it))
          boxes.push_back({it->box.xmin, it->box.ymin, it->box.xmax, it->box.ymax, vf::palette_color(it->label_id + 1),
                         it->label + " " + score_text(it->score)});
      vf::draw_boxes(imgs[i], boxes);
      vf::save_png(outputs, results.size() == 1 ? draw_path : suffixed_path(draw_path, std::to_string(i)), imgs[i]);
    }
    outputs.commit();
  }
  if (as_json) {
    nlohmann::ordered_json all = nlohmann::ordered_json::array();
    for (auto& r : results) {
      nlohmann::ordered_json one = nlohmann::ordered_json::array();
      for (auto& o : r)
        one.push_back({{"score", o.score},
                       {"label", o.label},
                       {"box", {{"xmin", corner_json(o.x0, o.box.xmin)}, {"ymin", corner_json(o.y0, o.box.ymin)},
                                {"xmax", corner_json(o.x1, o.box.xmax)}, {"ymax", corner_json(o.y1, o.box.ymax)}}}});
      all.push_back(one);
    }
    std::cout << (results.size() == 1 ? all[0] : all).dump(2) << "\n";
  } else {
    for (size_t i = 0; i < results.size(); ++i) {
      std::printf("%s: %zu objects\n", images[i].c_str(), results[i].size());
      for (auto& o : results[i])
        std::printf("  %8.5f  %-20s  [%s, %s, %s, %s]\n", o.score, o.label.c_str(),
                    corner_text(o.x0, o.box.xmin).c_str(), corner_text(o.y0, o.box.ymin).c_str(),
                    corner_text(o.x1, o.box.xmax).c_str(), corner_text(o.y1, o.box.ymax).c_str());
    }
  }
  return 0;
}

int cmd_segment(const std::string& model_dir, const std::string& image_path, const vf::SegmentParams& params,
                bool as_json, const std::string& out_path) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  vf::Image img = vf::load_image(image_path, /*apply_exif_orientation=*/true);
  vf::SegmentedImage seg = vf::segment(p, img, params);
  std::vector<std::string> mask_paths(seg.segments.size());
  if (!out_path.empty()) {
    // One colour per segment: its class's for semantic maps (stable across images), its id's otherwise.
    std::vector<std::pair<int64_t, vf::Rgb>> colors;
    for (auto& s : seg.segments)
      colors.push_back({s.id, vf::palette_color(params.task == "semantic" ? s.label_id + 1 : s.id)});
    vf::AtomicOutputs outputs;  // the map and every mask appear together, or none
    vf::save_png(outputs, out_path, vf::render_segments(seg.map, colors));
    for (size_t i = 0; i < seg.segments.size(); ++i) {
      mask_paths[i] = suffixed_path(out_path, std::to_string(i));
      vf::save_png(outputs, mask_paths[i], vf::render_mask(seg.map, seg.segments[i].id));
    }
    outputs.commit();
  }
  if (as_json) {
    nlohmann::ordered_json all = nlohmann::ordered_json::array();
    for (size_t i = 0; i < seg.segments.size(); ++i) {
      const auto& s = seg.segments[i];
      nlohmann::ordered_json one = {{"score", s.score ? nlohmann::ordered_json(*s.score) : nlohmann::ordered_json(nullptr)},
                            {"label", s.label}};
      if (!mask_paths[i].empty()) one["mask"] = mask_paths[i];
      all.push_back(one);
    }
    std::cout << all.dump(2) << "\n";
  } else {
    std::printf("%s: %zu segments (%s)\n", image_path.c_str(), seg.segments.size(), params.task.c_str());
    for (size_t i = 0; i < seg.segments.size(); ++i) {
      const auto& s = seg.segments[i];
      std::string score = s.score ? score_text(*s.score) : "-";
      std::printf("  id %-4lld %8s  %s%s%s\n", static_cast<long long>(s.id), score.c_str(), s.label.c_str(),
                  mask_paths[i].empty() ? "" : "  ", mask_paths[i].c_str());
    }
  }
  return 0;
}

int cmd_info(const std::string& model_dir) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  std::printf("model_type:   %s\n", p.model->model_type.c_str());
  std::printf("architecture: %s\n", p.model->architecture.c_str());
  if (p.processor) std::printf("processor:    %s\n", p.processor->type().c_str());
  std::printf("labels:       %zu\n", p.model->id2label.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vf: Hugging Face vision models without Python"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "worker threads (default: all cores)");

  std::string model_dir, case_dir, images_dir;
  std::vector<std::string> images;
  int top_k = 5;
  bool as_json = false;

  auto* classify = app.add_subcommand("classify", "image classification, like transformers' pipeline");
  // With no arguments: the bundled tiny ConvNeXT (random weights) on the bundled image.
  model_dir = VF_ASSETS_DIR "/tiny-convnext";
  images = {VF_ASSETS_DIR "/cat.jpg"};
  classify->add_option("model", model_dir, "model folder (config.json, weights); default: bundled tiny model");
  classify->add_option("images", images, "image files; default: bundled image");
  classify->add_option("--top-k", top_k, "labels per image");
  classify->add_flag("--json", as_json, "JSON output");

  float threshold = 0.5f;
  std::string draw_path;
  std::vector<std::string> detect_images;
  auto* detect = app.add_subcommand("detect", "object detection, like transformers' object-detection pipeline");
  detect->add_option("model", model_dir, "model folder (config.json, weights)")->required();
  detect->add_option("images", detect_images, "image files")->required();
  detect->add_option("--threshold", threshold, "keep detections scoring above this")->capture_default_str();
  detect->add_flag("--json", as_json, "JSON output");
  detect->add_option("--draw", draw_path, "write the image with its boxes as PNG (OUT-<i>.png for several images)");

  vf::SegmentParams seg_params;
  std::string seg_image, out_path;
  auto* segment = app.add_subcommand("segment", "image segmentation, like transformers' image-segmentation pipeline");
  segment->add_option("model", model_dir, "model folder (config.json, weights)")->required();
  segment->add_option("image", seg_image, "image file")->required();
  segment->add_option("--task", seg_params.task, "panoptic, instance or semantic")
      ->check(CLI::IsMember({"panoptic", "instance", "semantic"}))
      ->capture_default_str();
  segment->add_option("--threshold", seg_params.threshold, "keep segments scoring above this")->capture_default_str();
  segment->add_option("--mask-threshold", seg_params.mask_threshold)->capture_default_str();
  segment->add_option("--overlap-mask-area-threshold", seg_params.overlap_mask_area_threshold)->capture_default_str();
  segment->add_flag("--json", as_json, "JSON output");
  segment->add_option("--out", out_path, "write a colour map (one colour per segment) as PNG, and each mask as OUT-<i>.png");

  auto* info = app.add_subcommand("info", "what a model folder holds");
  info->add_option("model", model_dir)->required();

  auto* check = app.add_subcommand("check", "run a golden case folder and compare with its expected results");
  check->add_option("case", case_dir)->required();
  check->add_option("--images", images_dir, "folder of the case's images")->required();

  // Exit codes: tools/exit_codes.h (docs/exit-codes.md).
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);  // prints help / the error
    return rc == 0 ? 0 : vf::exit_code::kUsage;
  }
  vf::set_num_threads(threads);
  try {
    if (*classify) return cmd_classify(model_dir, images, top_k, as_json);
    if (*detect) return cmd_detect(model_dir, detect_images, threshold, as_json, draw_path);
    if (*segment) return cmd_segment(model_dir, seg_image, seg_params, as_json, out_path);
    if (*info) return cmd_info(model_dir);
    if (*check) return vf::check::run_check(case_dir, images_dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vf: error: %s\n", e.what());
    return vf::exit_code::for_exception(e);
  }
  return 0;
}
