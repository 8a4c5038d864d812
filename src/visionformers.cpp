#include "visionformers.h"

#include "io/file.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <climits>
#include <filesystem>
#include <set>

#include "io/checkpoint.h"
#include "io/json.h"
#include "processors/detr_postprocess.h"

namespace vf {

namespace fs = std::filesystem;

Pretrained Pretrained::from_pretrained(const std::string& dir, const std::string& architecture) {
  Pretrained p;
  p.dir = dir;
  if (!fs::is_directory(dir)) throw InputError(dir + ": not a model folder (expected a folder with config.json)");
  // Links may lead only inside the folder (or, in a Hub cache snapshot, into its blobs/).
  auto inside = [&](const fs::path& f) {
    if (fs::exists(fs::symlink_status(f)) && !path_inside_model_folder(dir, f.string()))
      throw InputError(f.string() + ": leads outside the model folder through a symbolic link");
    return f.string();
  };
  p.config = read_json_file(inside(fs::path(dir) / "config.json"));
  fs::path pre = fs::path(dir) / "preprocessor_config.json";
  if (fs::exists(fs::symlink_status(pre))) {
    inside(pre);
    p.preprocessor = read_json_file(pre.string());
    try {
      p.processor = create_image_processor(p.preprocessor);
    } catch (const ModelError& e) {  // name the file
      throw ModelError(pre.string() + ": " + e.what());
    }
  }
  auto store = load_checkpoint(dir);
  try {
    p.model = create_model(p.config, architecture, Weights(store));
    store->check_complete();
  } catch (const ModelError& e) {  // name config.json (what it says, or implies of the weights)
    throw ModelError((fs::path(dir) / "config.json").string() + ": " + e.what());
  }
  return p;
}

ModelOutput Pretrained::run(const std::vector<Image>& images, bool output_hidden_states, bool output_attentions) const {
  if (!processor) throw InputError(dir + ": no preprocessor_config.json (the image processor settings are needed to run the model)");
  BatchFeature f;
  try {
    f = processor->preprocess(images);
  } catch (const ModelError& e) {  // a processor setting that cannot apply: name the file
    throw ModelError((fs::path(dir) / "preprocessor_config.json").string() + ": " + e.what());
  }
  ModelInputs in;
  in.pixel_values = f.pixel_values;
  in.pixel_mask = f.pixel_mask;
  in.output_hidden_states = output_hidden_states;
  in.output_attentions = output_attentions;
  return model->forward(in);
}

std::vector<std::vector<LabelScore>> classify(const Pretrained& p, const std::vector<Image>& images, int top_k) {
  ModelOutput out = p.run(images);
  if (!out.has("logits")) throw ModelError(p.model->architecture + " has no classification head (no logits)");
  const Tensor& logits = out.get("logits");
  int64_t n = logits.size(0), c = logits.size(-1);
  std::vector<std::vector<LabelScore>> result(n);
  for (int64_t b = 0; b < n; ++b) {
    const float* z = logits.f32() + b * c;
    float m = *std::max_element(z, z + c);
    double s = 0;
    for (int64_t k = 0; k < c; ++k) s += std::exp(double(z[k]) - m);
    std::vector<LabelScore> all;
    for (int64_t k = 0; k < c; ++k) {
      std::string label = k < int64_t(p.model->id2label.size()) ? p.model->id2label[k] : "LABEL_" + std::to_string(k);
      all.push_back({label, float(std::exp(double(z[k]) - m) / s)});
    }
    std::stable_sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.score > b.score; });
    all.resize(std::min<size_t>(all.size(), std::max(top_k, 0)));
    result[b] = std::move(all);
  }
  return result;
}

namespace {

std::string label_name(const Pretrained& p, int64_t id) {
  if (id >= 0 && id < static_cast<int64_t>(p.model->id2label.size())) return p.model->id2label[id];
  return "LABEL_" + std::to_string(id);
}

// torch's float -> int32 conversion (`.int()`): truncation toward zero; NaN and out-of-range values
// give INT_MIN, as the x86 conversion instruction does.
int to_int32(float v) {
  if (!(v > -2147483649.0f && v < 2147483648.0f)) return INT_MIN;
  return static_cast<int>(v);
}

const Tensor& require_output(const Pretrained& p, const ModelOutput& out, const char* name, const char* what) {
  if (!out.has(name))
    throw ModelError(p.dir + ": " + p.model->architecture + " gives no " + name + " (" + what + ")");
  return out.get(name);
}

}  // namespace

std::vector<std::vector<DetectedObject>> detect(const Pretrained& p, const std::vector<Image>& images, float threshold) {
  const DetrPostKind kind = detr_post_kind(p.model->model_type);
  std::vector<std::vector<DetectedObject>> result;
  result.reserve(images.size());
  for (const Image& image : images) {
    ModelOutput out = p.run({image});
    ObjectDetectionOptions opt;
    opt.threshold = threshold;
    opt.target_sizes = {{image.height, image.width}};
    const Tensor& logits = require_output(p, out, "logits", "not an object detection model");
    const Tensor& pred_boxes = require_output(p, out, "pred_boxes", "not an object detection model");
    Detections d = post_process_object_detection(kind, logits, pred_boxes, opt)[0];
    const int64_t n = d.scores.numel();
    const float* scores = d.scores.f32();
    const int64_t* labels = d.labels.data<int64_t>();
    const float* boxes = d.boxes.f32();
    std::vector<DetectedObject> objects(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      DetectedObject& o = objects[i];
      o.score = scores[i];
      o.label_id = labels[i];
      o.label = label_name(p, o.label_id);
      o.x0 = boxes[4 * i];
      o.y0 = boxes[4 * i + 1];
      o.x1 = boxes[4 * i + 2];
      o.y1 = boxes[4 * i + 3];
      o.box = {to_int32(o.x0), to_int32(o.y0), to_int32(o.x1), to_int32(o.y1)};
    }
    result.push_back(std::move(objects));
  }
  return result;
}

SegmentedImage segment(const Pretrained& p, const Image& image, const SegmentParams& params) {
  const std::string& task = params.task;
  if (task != "panoptic" && task != "instance" && task != "semantic")
    throw Error("segmentation task '" + task + "': expected panoptic, instance or semantic");
  const DetrPostKind kind = detr_post_kind(p.model->model_type);
  if (kind != DetrPostKind::Detr && kind != DetrPostKind::ConditionalDetr)
    throw ModelError(p.dir + ": " + p.model->model_type +
                " has no segmentation post-processing (DETR and Conditional DETR segmentation models do)");
  ModelOutput out = p.run({image});
  const char* what = "not a segmentation model: use a DetrForSegmentation / ConditionalDetrForSegmentation checkpoint";
  const Tensor& logits = require_output(p, out, "logits", what);
  const Tensor& pred_masks = require_output(p, out, "pred_masks", what);
  const std::vector<TargetSize> target_sizes = {{image.height, image.width}};

  SegmentedImage seg;
  if (task == "semantic") {
    Tensor classes = post_process_semantic_segmentation(kind, logits, pred_masks, target_sizes)[0];
    seg.map = classes.to(DType::I32);
    std::set<int64_t> present;  // np.unique: sorted
    const int64_t* c = classes.data<int64_t>();
    for (int64_t i = 0, n = classes.numel(); i < n; ++i) present.insert(c[i]);
    for (int64_t id : present) {
      Segment s;
      s.id = id;
      s.label_id = id;
      s.label = label_name(p, id);
      seg.segments.push_back(std::move(s));
    }
    return seg;
  }

  SegmentationOptions opt;
  opt.threshold = params.threshold;
  opt.mask_threshold = params.mask_threshold;
  opt.overlap_mask_area_threshold = params.overlap_mask_area_threshold;
  opt.target_sizes = target_sizes;
  SegmentationResult r = task == "panoptic" ? post_process_panoptic_segmentation(kind, logits, pred_masks, opt)[0]
                                            : post_process_instance_segmentation(kind, logits, pred_masks, opt)[0];
  seg.map = r.segmentation.dtype() == DType::I32 ? r.segmentation : r.segmentation.to(DType::I32);
  for (const SegmentInfo& info : r.segments_info) {
    Segment s;
    s.id = info.id;
    s.label_id = info.label_id;
    s.label = label_name(p, info.label_id);
    s.score = info.score;
    s.was_fused = info.was_fused;
    seg.segments.push_back(std::move(s));
  }
  return seg;
}

SegmentedImage segment(const Pretrained& p, const Image& image, const std::string& task, double threshold) {
  SegmentParams params;
  params.task = task;
  params.threshold = threshold;
  return segment(p, image, params);
}

}  // namespace vf
