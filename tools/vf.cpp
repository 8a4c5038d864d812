// vf: the command-line front end. Each subcommand is a thin wrapper over the library.
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>
#include <nlohmann/json.hpp>

#include "batch.h"
#include "check.h"
#include "core/ops.h"
#include "exit_codes.h"
#include "io/draw.h"
#include "io/file.h"
#include "serve/results_json.h"
#include "serve/server.h"
#include "visionformers.h"

namespace {

// What classify, detect and segment share: their images and how results come out.
struct RunOptions {
  std::vector<std::string> inputs;  // image files and folders
  int batch_size = 1;
  bool json = false, jsonl = false, keep_going = false;
};

// Results in the chosen format, image by image as batches finish: text lines, one JSONL line
// {"path", "result"} each, or (--json) one document at the end — a list with null for a skipped
// image, or the bare result when a single image file was given.
class Results {
 public:
  Results(const RunOptions& o, const std::vector<std::string>& paths)
      : o_(o), paths_(paths), collected_(paths.size()),
        bare_(o.inputs.size() == 1 && paths.size() == 1 && !std::filesystem::is_directory(o.inputs[0])) {}

  void add(size_t index, nlohmann::ordered_json result, const std::string& text) {
    if (o_.jsonl)
      std::cout << nlohmann::ordered_json{{"path", paths_[index]}, {"result", std::move(result)}}.dump() << "\n";
    else if (o_.json)
      collected_[index] = std::move(result);
    else
      std::cout << text;
  }
  void end_batch() { std::cout.flush(); }
  void finish() {
    if (!o_.json) return;
    nlohmann::ordered_json all = nlohmann::ordered_json::array();
    for (auto& r : collected_) all.push_back(std::move(r));
    std::cout << (bare_ ? all[0] : all).dump(2) << "\n";
  }

 private:
  const RunOptions& o_;
  const std::vector<std::string>& paths_;
  std::vector<nlohmann::ordered_json> collected_;  // null until an image has a result
  bool bare_;
};

using ProcessFn = std::function<void(const std::vector<size_t>&, const std::vector<vf::Image>&, Results&)>;

// Runs `process` over the inputs batch by batch; progress and the summary line on stderr. Exit
// code: 0, or 65 when --keep-going skipped every image.
int run_images(const RunOptions& o, const std::vector<std::string>& paths, const ProcessFn& process) {
  if (paths.empty()) throw vf::InputError("no image files in the given paths (" + std::to_string(o.inputs.size()) + " given)");
  Results results(o, paths);
  vf::cli::BatchOptions bo;
  // Where the library prepares each forward's input while the one before runs (a GPU), the decoder
  // reads ahead too (BatchOptions::prefetch), and several forwards' images are handed over at once.
  const bool ahead = vf::prepares_ahead(vf::default_device());
  bo.batch_size = o.batch_size * (ahead ? 4 : 1);
  bo.keep_going = o.keep_going;
  bo.progress = ::isatty(STDERR_FILENO) == 1;
  bo.prefetch = ahead;
  vf::cli::BatchSummary summary = vf::cli::run_in_batches(
      paths, bo, [&](const std::vector<size_t>& indices, const std::vector<vf::Image>& images) {
        process(indices, images, results);
        results.end_batch();
      });
  results.finish();
  std::fprintf(stderr, "%s\n", summary.line().c_str());
  return summary.done == 0 ? vf::exit_code::kBadInput : vf::exit_code::kOk;
}

int cmd_classify(const std::string& model_dir, const RunOptions& o, int top_k) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  const std::vector<std::string> paths = vf::cli::expand_image_paths(o.inputs);
  return run_images(o, paths, [&](const std::vector<size_t>& indices, const std::vector<vf::Image>& images,
                                  Results& out) {
    auto results = vf::classify(p, images, top_k, o.batch_size);
    for (size_t i = 0; i < results.size(); ++i) {
      std::string text = paths[indices[i]] + "\n";
      for (auto& ls : results[i]) {
        char line[64];
        std::snprintf(line, sizeof line, "  %8.5f  ", ls.score);
        text += line + ls.label + "\n";
      }
      out.add(indices[i], vf::serve::classify_json(results[i]), text);
    }
  });
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

int cmd_detect(const std::string& model_dir, const RunOptions& o, float threshold, const std::string& draw_path,
               const std::string& coco_path) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  const std::vector<std::string> paths = vf::cli::expand_image_paths(o.inputs);
  const std::vector<int64_t> image_ids = vf::cli::coco_image_ids(paths);
  // The results file is created up front, so that an unwritable target fails before a long run.
  vf::AtomicOutputs coco_out;
  std::FILE* coco_file = coco_path.empty() ? nullptr : coco_out.add(coco_path);
  nlohmann::ordered_json coco = nlohmann::ordered_json::array();
  int rc = run_images(o, paths, [&](const std::vector<size_t>& indices, const std::vector<vf::Image>& images,
                                    Results& out) {
    auto results = vf::detect(p, images, threshold, o.batch_size);
    for (size_t i = 0; i < results.size(); ++i) {
      const size_t n = indices[i];
      if (!draw_path.empty()) {
        // Lowest score first, so that the best boxes end up on top.
        std::vector<vf::BoxAnnotation> boxes;
        for (auto it = results[i].rbegin(); it != results[i].rend(); ++it)
          if (!box_is_nan(*it))
            boxes.push_back({it->box.xmin, it->box.ymin, it->box.xmax, it->box.ymax, vf::palette_color(it->label_id + 1),
                             it->label + " " + score_text(it->score)});
        vf::Image drawn = images[i];
        vf::draw_boxes(drawn, boxes);
        vf::save_png(paths.size() == 1 ? draw_path : suffixed_path(draw_path, std::to_string(n)), drawn);
      }
      char head[64];
      std::snprintf(head, sizeof head, ": %zu objects\n", results[i].size());
      std::string text = paths[n] + head;
      for (auto& d : results[i]) {
        if (!coco_path.empty()) coco.push_back(vf::cli::coco_result(image_ids[n], d));
        char line[160];
        std::snprintf(line, sizeof line, "  %8.5f  %-20s  [%s, %s, %s, %s]\n", d.score, d.label.c_str(),
                      corner_text(d.x0, d.box.xmin).c_str(), corner_text(d.y0, d.box.ymin).c_str(),
                      corner_text(d.x1, d.box.xmax).c_str(), corner_text(d.y1, d.box.ymax).c_str());
        text += line;
      }
      out.add(n, vf::serve::detect_json(results[i]), text);
    }
  });
  if (coco_file) {
    std::fputs((coco.dump() + "\n").c_str(), coco_file);
    coco_out.commit();
  }
  return rc;
}

int cmd_segment(const std::string& model_dir, const RunOptions& o, const vf::SegmentParams& params,
                const std::string& out_path) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  const std::vector<std::string> paths = vf::cli::expand_image_paths(o.inputs);
  return run_images(o, paths, [&](const std::vector<size_t>& indices, const std::vector<vf::Image>& images,
                                  Results& out) {
    std::vector<vf::SegmentedImage> segs = vf::segment(p, images, params, o.batch_size);
    for (size_t i = 0; i < segs.size(); ++i) {
      const size_t n = indices[i];
      const vf::SegmentedImage& seg = segs[i];
      std::vector<std::string> mask_paths(seg.segments.size());
      if (!out_path.empty()) {
        // Several images: image n's map is OUT-<n>.png and its masks OUT-<n>-<i>.png.
        const std::string map_path = paths.size() == 1 ? out_path : suffixed_path(out_path, std::to_string(n));
        // One colour per segment: its class's for semantic maps (stable across images), its id's otherwise.
        std::vector<std::pair<int64_t, vf::Rgb>> colors;
        for (auto& s : seg.segments)
          colors.push_back({s.id, vf::palette_color(params.task == "semantic" ? s.label_id + 1 : s.id)});
        vf::AtomicOutputs outputs;  // the map and every mask appear together, or none
        vf::save_png(outputs, map_path, vf::render_segments(seg.map, colors));
        for (size_t k = 0; k < seg.segments.size(); ++k) {
          mask_paths[k] = suffixed_path(map_path, std::to_string(k));
          vf::save_png(outputs, mask_paths[k], vf::render_mask(seg.map, seg.segments[k].id));
        }
        outputs.commit();
      }
      std::string text = paths[n] + ": " + std::to_string(seg.segments.size()) + " segments (" + params.task + ")\n";
      for (size_t k = 0; k < seg.segments.size(); ++k) {
        const auto& s = seg.segments[k];
        std::string score = s.score ? score_text(*s.score) : "-";
        char line[64];
        std::snprintf(line, sizeof line, "  id %-4lld %8s  ", static_cast<long long>(s.id), score.c_str());
        text += line + s.label + (mask_paths[k].empty() ? "" : "  ") + mask_paths[k] + "\n";
      }
      out.add(n, vf::serve::segment_json(seg, out_path.empty() ? std::vector<std::string>{} : mask_paths), text);
    }
  });
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
  std::string device_name = "cpu", dtype_name = "float32";
  auto add_device_option = [&device_name, &dtype_name](CLI::App* cmd) {
    cmd->add_option("--device", device_name, "cpu, cuda or cuda:N (builds with -DVF_CUDA=ON)")->capture_default_str();
    cmd->add_option("--dtype", dtype_name,
                    "what convolutions and linear layers compute in: float32 (exact), bfloat16 or float16 "
                    "(README: reduced precision)")
        ->capture_default_str();
  };

  std::string model_dir, case_dir, images_dir;
  RunOptions run;
  int top_k = 5;

  // The options classify, detect and segment share.
  auto add_run_options = [&run](CLI::App* cmd) {
    cmd->add_option("--batch-size", run.batch_size, "images per forward (DETR family: padded and masked as a batch)")
        ->check(CLI::Range(1, 4096))
        ->capture_default_str();
    auto* json = cmd->add_flag("--json", run.json, "JSON output (a list per image)");
    cmd->add_flag("--jsonl", run.jsonl, "one JSON line per image as it finishes: {\"path\", \"result\"}")->excludes(json);
    cmd->add_flag("--keep-going", run.keep_going, "report an unreadable image on stderr and skip it");
  };

  auto* classify = app.add_subcommand("classify", "image classification, like transformers' pipeline");
  add_device_option(classify);
  // With no arguments: the bundled tiny ConvNeXT (random weights) on the bundled image.
  model_dir = VF_ASSETS_DIR "/tiny-convnext";
  std::vector<std::string> classify_inputs = {VF_ASSETS_DIR "/cat.jpg"};
  classify->add_option("model", model_dir, "model folder (config.json, weights); default: bundled tiny model");
  classify->add_option("images", classify_inputs, "image files or folders; default: bundled image");
  classify->add_option("--top-k", top_k, "labels per image");
  add_run_options(classify);

  float threshold = 0.5f;
  std::string draw_path, coco_path;
  std::vector<std::string> detect_inputs;
  auto* detect = app.add_subcommand("detect", "object detection, like transformers' object-detection pipeline");
  add_device_option(detect);
  detect->add_option("model", model_dir, "model folder (config.json, weights)")->required();
  detect->add_option("images", detect_inputs, "image files or folders (searched recursively)")->required();
  detect->add_option("--threshold", threshold, "keep detections scoring above this")->capture_default_str();
  add_run_options(detect);
  detect->add_option("--draw", draw_path, "write the image with its boxes as PNG (OUT-<i>.png for several images)");
  detect->add_option("--coco-results", coco_path, "write the detections as a COCO results list (JSON)");

  vf::SegmentParams seg_params;
  std::string out_path;
  std::vector<std::string> segment_inputs;
  auto* segment = app.add_subcommand("segment", "image segmentation, like transformers' image-segmentation pipeline");
  add_device_option(segment);
  segment->add_option("model", model_dir, "model folder (config.json, weights)")->required();
  segment->add_option("images", segment_inputs, "image files or folders (searched recursively)")->required();
  segment->add_option("--task", seg_params.task, "panoptic, instance or semantic")
      ->check(CLI::IsMember({"panoptic", "instance", "semantic"}))
      ->capture_default_str();
  segment->add_option("--threshold", seg_params.threshold, "keep segments scoring above this")->capture_default_str();
  segment->add_option("--mask-threshold", seg_params.mask_threshold)->capture_default_str();
  segment->add_option("--overlap-mask-area-threshold", seg_params.overlap_mask_area_threshold)->capture_default_str();
  add_run_options(segment);
  segment->add_option("--out", out_path,
                      "write a colour map (one colour per segment) as PNG, and each mask as OUT-<i>.png "
                      "(several images: OUT-<n>.png, OUT-<n>-<i>.png)");

  auto* info = app.add_subcommand("info", "what a model folder holds");
  add_device_option(info);
  info->add_option("model", model_dir)->required();

  std::vector<std::string> serve_models;
  vf::serve::ServerOptions serve_opt;
  auto* serve = app.add_subcommand("serve", "HTTP server: Open Inference Protocol v2 and /v1/models/NAME (README: server)");
  add_device_option(serve);
  serve->add_option("models", serve_models, "[NAME=]MODEL ... (NAME: the folder's last component)")->required();
  serve->add_option("--host", serve_opt.host)->capture_default_str();
  serve->add_option("--port", serve_opt.port, "0: any free port")->capture_default_str();
  serve->add_option("--max-batch", serve_opt.max_batch, "images per forward (dynamic batching)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  serve->add_option("--max-queue", serve_opt.max_queue, "requests waiting per model before 503")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();

  auto* check = app.add_subcommand("check", "run a golden case folder and compare with its expected results");
  add_device_option(check);
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
  vf::Device device;
  try {
    device = vf::Device::parse(device_name);
  } catch (const vf::Error& e) {
    std::fprintf(stderr, "vf: error: --device: %s\n", e.what());
    return vf::exit_code::kUsage;
  }
  vf::set_default_device(device);
  try {
    vf::set_default_dtype(vf::parse_compute_dtype(dtype_name));
    vf::check_compute_dtype(device, vf::default_dtype());  // this machine cannot: a usage error, said up front
  } catch (const vf::Error& e) {
    std::fprintf(stderr, "vf: error: --dtype: %s\n", e.what());
    return vf::exit_code::kUsage;
  }
  try {
    if (*classify) {
      run.inputs = classify_inputs;
      return cmd_classify(model_dir, run, top_k);
    }
    if (*detect) {
      run.inputs = detect_inputs;
      return cmd_detect(model_dir, run, threshold, draw_path, coco_path);
    }
    if (*segment) {
      run.inputs = segment_inputs;
      return cmd_segment(model_dir, run, seg_params, out_path);
    }
    if (*info) return cmd_info(model_dir);
    if (*serve) {
      std::vector<vf::serve::ModelSpec> specs;
      for (auto& m : serve_models) specs.push_back(vf::serve::parse_model_arg(m));
      return vf::serve::serve_until_signal(specs, serve_opt);
    }
    if (*check) return vf::check::run_check(case_dir, images_dir, device, vf::default_dtype());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vf: error: %s\n", e.what());
    return vf::exit_code::for_exception(e);
  }
  return 0;
}
