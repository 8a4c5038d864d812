// vf: the command-line front end. Each subcommand is a thin wrapper over the library.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "check.h"
#include "core/ops.h"
#include "visionformers.h"

namespace {

int cmd_classify(const std::string& model_dir, const std::vector<std::string>& images, int top_k, bool as_json) {
  auto p = vf::Pretrained::from_pretrained(model_dir);
  std::vector<vf::Image> imgs;
  for (auto& path : images) imgs.push_back(vf::load_image(path));
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

  auto* info = app.add_subcommand("info", "what a model folder holds");
  info->add_option("model", model_dir)->required();

  auto* check = app.add_subcommand("check", "run a golden case folder and compare with its expected results");
  check->add_option("case", case_dir)->required();
  check->add_option("--images", images_dir, "folder of the case's images")->required();

  CLI11_PARSE(app, argc, argv);
  vf::set_num_threads(threads);
  try {
    if (*classify) return cmd_classify(model_dir, images, top_k, as_json);
    if (*info) return cmd_info(model_dir);
    if (*check) return vf::check::run_check(case_dir, images_dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vf: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
