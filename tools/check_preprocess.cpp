#include "check_preprocess.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>

#include "io/image.h"

namespace vf::check {
namespace {

constexpr double kLabelTol = 1e-5;

std::string fmt(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.10g", v);
  return buf;
}

// A processed_labels value: a nested list of numbers, or {"tensor": name} stored in expected.
Tensor label_tensor(const Case& c, const json& value, DType dtype) {
  if (value.is_object() && value.contains("tensor")) {
    const Tensor* t = c.find(value["tensor"].get<std::string>());
    if (!t) throw Error("processed_labels refers to tensor '" + value["tensor"].dump() + "' missing from expected");
    return *t;
  }
  Shape shape;
  const json* level = &value;
  while (level->is_array()) {
    shape.push_back(static_cast<int64_t>(level->size()));
    if (level->empty()) break;
    level = &(*level)[0];
  }
  std::vector<double> flat;
  std::function<void(const json&)> walk = [&](const json& v) {
    if (v.is_array()) {
      for (const auto& x : v) walk(x);
    } else if (v.is_boolean()) {
      flat.push_back(v.get<bool>() ? 1.0 : 0.0);
    } else {
      flat.push_back(v.get<double>());
    }
  };
  walk(value);
  if (static_cast<int64_t>(flat.size()) != shape_numel(shape))
    throw Error("processed_labels value is not a rectangular array: " + value.dump().substr(0, 200));
  return Tensor::from_vector<double>(shape, flat).to(dtype);
}

// The reference shape and stats: tensors in expected.safetensors, or lists in case.json.
std::vector<double> reference_values(const Case& c, const std::string& name) {
  if (const Tensor* t = c.find(name)) {
    Tensor d = t->to(DType::F64);
    return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
  }
  if (c.spec.contains(name)) return c.spec[name].get<std::vector<double>>();
  return {};
}

void compare_stats(const Case& c, const Tensor& pixel_values, CheckReport& report) {
  std::vector<double> shape_ref = reference_values(c, "pixel_values_shape");
  Shape want;
  for (double v : shape_ref) want.push_back(static_cast<int64_t>(v));
  if (pixel_values.shape() != want) {
    report.fail("pixel_values_shape", shape_str(pixel_values.shape()) + ", expected " + shape_str(want));
    return;
  }
  report.pass("pixel_values_shape", shape_str(want));
  std::vector<double> ref = reference_values(c, "pixel_values_stats");
  if (ref.empty()) return;
  if (ref.size() != 3) {
    report.fail("pixel_values_stats", "expected 3 reference values, found " + std::to_string(ref.size()));
    return;
  }
  const float* p = pixel_values.f32();
  double s = 0, sa = 0, s2 = 0;
  for (int64_t i = 0; i < pixel_values.numel(); ++i) {
    double v = p[i];
    s += v, sa += std::fabs(v), s2 += v * v;
  }
  const double ours[3] = {s, sa, s2};
  const char* names[3] = {"pixel_values_stats.sum", "pixel_values_stats.sum_abs", "pixel_values_stats.sum_sq"};
  for (int i = 0; i < 3; ++i) {
    double err = std::fabs(ours[i] - ref[i]);
    double tol = kStatsRelTol * std::max(std::fabs(ref[i]), 1.0);
    std::string detail = fmt(ours[i]) + " vs " + fmt(ref[i]) + "  |err| = " + fmt(err) + " (tol " + fmt(tol) + ")";
    if (err <= tol) report.pass(names[i], detail);
    else report.fail(names[i], detail);
  }
}

}  // namespace

void compare_processed_labels(const Case& c, const std::vector<DetectionTarget>& labels, CheckReport& report) {
  const json& ref = c.spec["processed_labels"];
  if (ref.size() != labels.size()) {
    report.fail("processed_labels", std::to_string(labels.size()) + " targets, expected " + std::to_string(ref.size()));
    return;
  }
  for (size_t i = 0; i < labels.size(); ++i) {
    const std::string prefix = "labels." + std::to_string(i) + ".";
    std::map<std::string, const Tensor*> ours;
    for (const auto& [name, t] : labels[i].fields()) ours[name] = t;
    for (auto it = ref[i].begin(); it != ref[i].end(); ++it) {
      auto found = ours.find(it.key());
      if (found == ours.end()) {
        report.fail(prefix + it.key(), "missing from our labels");
        continue;
      }
      const Tensor& t = *found->second;
      const bool is_float = t.dtype() == DType::F32 || t.dtype() == DType::F64;
      Tensor r = label_tensor(c, it.value(), t.dtype() == DType::Bool ? DType::F64 : t.dtype());
      Tensor mine = t.dtype() == DType::Bool ? t.to(DType::F64) : t;
      if (r.numel() == 0 && mine.numel() == 0) {
        report.pass(prefix + it.key(), "empty");
        continue;
      }
      report.compare(prefix + it.key(), mine, r, is_float ? kLabelTol : 0.0);
      ours.erase(found);
    }
    for (const auto& [name, _] : ours) report.fail(prefix + name, "not in the reference's labels");
  }
}

BatchFeature run_preprocess(const Case& c, CheckReport& report, int* pixels_compared) {
  if (pixels_compared) *pixels_compared = 0;
  if (!c.spec.contains("images") || c.spec["images"].empty()) return {};  // postproc-* cases
  auto processor = create_image_processor(c.preprocessor);
  std::vector<Image> images;
  for (const auto& name : c.spec.at("images")) images.push_back(load_image(c.images_dir + "/" + name.get<std::string>()));
  PreprocessInputs inputs;
  if (c.spec.contains("annotations") && !c.spec["annotations"].is_null()) {
    inputs.annotations = &c.spec["annotations"];
    inputs.masks_path = c.spec.contains("masks_path")
                            ? (std::filesystem::path(c.dir) / c.spec["masks_path"].get<std::string>()).string()
                            : c.images_dir;
  }
  if (cfg_has(c.spec, "return_segmentation_masks"))
    inputs.return_segmentation_masks = c.spec["return_segmentation_masks"].get<bool>();
  BatchFeature out = processor->preprocess(images, inputs);
  const int before = report.checked();
  if (const Tensor* ref = c.find("pixel_values")) {
    report.compare("pixel_values", out.pixel_values, *ref, kPixelTol);
  } else if (c.find("pixel_values_shape") || c.spec.contains("pixel_values_shape")) {
    compare_stats(c, out.pixel_values, report);
  }
  if (pixels_compared) *pixels_compared = report.checked() - before;
  if (const Tensor* ref = c.find("pixel_mask")) {
    if (!out.pixel_mask.defined()) report.fail("pixel_mask", "the processor returned no pixel_mask");
    else report.compare("pixel_mask", out.pixel_mask, *ref, 0.0);
  }
  if (c.spec.contains("processed_labels")) compare_processed_labels(c, out.labels, report);
  return out;
}

}  // namespace vf::check
