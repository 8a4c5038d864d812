#include "visionformers.h"

#include "io/file.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <climits>
#include <filesystem>
#include <functional>
#include <future>
#include <set>

#include "core/backend.h"
#include "hub/hub.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "processors/detr_postprocess.h"

namespace vf {

namespace fs = std::filesystem;

namespace {
Device g_default_device;
DType g_default_dtype = DType::F32;
}  // namespace
Device default_device() { return g_default_device; }
void set_default_device(Device d) { g_default_device = d; }
DType default_dtype() { return g_default_dtype; }
void set_default_dtype(DType t) { g_default_dtype = t; }

Pretrained Pretrained::from_pretrained(const std::string& dir_or_id, const LoadOptions& options) {
  const std::string& architecture = options.architecture;
  const std::string dir = hub::resolve_model(dir_or_id);  // "org/name[@revision]": the Hub cache's snapshot
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
    LoadDeviceScope on(options.device.value_or(default_device()), options.dtype.value_or(default_dtype()));
    p.model = create_model(p.config, architecture, Weights(store));
    store->check_complete();
  } catch (const ModelError& e) {  // name config.json (what it says, or implies of the weights)
    throw ModelError((fs::path(dir) / "config.json").string() + ": " + e.what());
  }
  // The model holds what it needs (in place or as its own reordered copies): checkpoint tensors
  // nobody kept, and the buffers load-time folding freed, go back to the system.
  store.reset();
  pool_release_cached();
  return p;
}

namespace {

ModelOutput forward(const Pretrained& p, const Tensor& pixel_values, const Tensor& pixel_mask,
                    bool output_hidden_states = false, bool output_attentions = false,
                    bool outputs_on_device = false) {
  ModelInputs in;
  in.pixel_values = pixel_values;
  in.pixel_mask = pixel_mask;
  in.output_hidden_states = output_hidden_states;
  in.output_attentions = output_attentions;
  return outputs_on_device ? p.model->infer_on_device(in) : p.model->infer(in);
}

// The model's image processor on `images`; a processor setting that cannot apply names its file.
BatchFeature preprocess(const Pretrained& p, const std::vector<Image>& images) {
  if (!p.processor)
    throw InputError(p.dir + ": no preprocessor_config.json (the image processor settings are needed to run the model)");
  try {
    return p.processor->preprocess(images);
  } catch (const ModelError& e) {
    throw ModelError((fs::path(p.dir) / "preprocessor_config.json").string() + ": " + e.what());
  }
}

}  // namespace

namespace {

// One forward of run_batches: images of one processed size.
struct ForwardJob {
  std::vector<size_t> indices;
  Tensor pixel_values, pixel_mask;
};

// The forwards of images [begin, end): each image preprocessed alone, those of one processed size
// stacked. On a GPU the inputs start uploading at once, beside the forward in flight.
std::vector<ForwardJob> prepare_forwards(const Pretrained& p, const std::vector<Image>& images, size_t begin,
                                         size_t end) {
  std::vector<BatchFeature> features;
  for (size_t i = begin; i < end; ++i) features.push_back(preprocess(p, {images[i]}));
  std::vector<ForwardJob> jobs;
  std::vector<bool> done(features.size(), false);
  for (size_t first = 0; first < features.size(); ++first) {
    if (done[first]) continue;
    ForwardJob job;
    std::vector<Tensor> values, masks;
    for (size_t j = first; j < features.size(); ++j) {
      if (done[j] || features[j].pixel_values.shape() != features[first].pixel_values.shape()) continue;
      done[j] = true;
      job.indices.push_back(begin + j);
      values.push_back(features[j].pixel_values);
      if (features[j].pixel_mask.defined()) masks.push_back(features[j].pixel_mask);
    }
    const bool one = values.size() == 1;
    job.pixel_values = one ? values[0] : cat(values, 0);
    job.pixel_mask = masks.empty() ? Tensor() : one ? masks[0] : cat(masks, 0);
    if (const Device d = p.model->device; !d.is_cpu())
      if (Tensor up = backend(d).upload_beside(job.pixel_values); up.defined()) job.pixel_values = up;
    jobs.push_back(std::move(job));
  }
  return jobs;
}

}  // namespace

bool prepares_ahead(Device d) {
  static const bool allowed = [] {
    const char* e = std::getenv("VF_PREFETCH");
    return !(e && std::string(e) == "0");
  }();
  return allowed && !d.is_cpu();
}

// Each image is processed alone and images of one processed size share a forward, unpadded: padding
// a DETR-family batch changes its outputs (the backbone's borders see the padding, Deformable
// DETR's / DETA's input GroupNorm averages over it), while the pipelines run every image alone.
void run_batches(const Pretrained& p, const std::vector<Image>& images, int batch_size, const ForwardFn& use,
                 bool outputs_on_device) {
  const size_t step = batch_size > 0 ? static_cast<size_t>(batch_size) : std::max<size_t>(images.size(), 1);
  const bool ahead = prepares_ahead(p.model->device);
  auto prepare = [&](size_t begin) { return prepare_forwards(p, images, begin, std::min(images.size(), begin + step)); };
  std::future<std::vector<ForwardJob>> next;
  if (ahead && !images.empty()) next = std::async(std::launch::async, prepare, size_t(0));
  for (size_t begin = 0; begin < images.size(); begin += step) {
    std::vector<ForwardJob> jobs = ahead ? next.get() : prepare(begin);
    if (ahead && begin + step < images.size()) next = std::async(std::launch::async, prepare, begin + step);
    for (const ForwardJob& job : jobs)
      use(forward(p, job.pixel_values, job.pixel_mask, false, false, outputs_on_device), job.indices);
  }
}

ModelOutput Pretrained::run(const std::vector<Image>& images, bool output_hidden_states, bool output_attentions) const {
  BatchFeature f = preprocess(*this, images);
  return forward(*this, f.pixel_values, f.pixel_mask, output_hidden_states, output_attentions);
}

std::vector<std::vector<LabelScore>> classify(const Pretrained& p, const std::vector<Image>& images, int top_k,
                                              int batch_size) {
  std::vector<std::vector<LabelScore>> result(images.size());
  run_batches(p, images, batch_size, [&](const ModelOutput& out, const std::vector<size_t>& indices) {
    std::vector<std::vector<LabelScore>> all = classify_output(p, out, top_k);
    for (size_t b = 0; b < indices.size(); ++b) result[indices[b]] = std::move(all[b]);
  });
  return result;
}

std::vector<std::vector<LabelScore>> classify_output(const Pretrained& p, const ModelOutput& out, int top_k) {
  if (!out.has("logits")) throw ModelError(p.model->architecture + " has no classification head (no logits)");
  const Tensor& logits = out.get("logits");
  const int64_t c = logits.size(-1);
  std::vector<std::vector<LabelScore>> result(static_cast<size_t>(logits.size(0)));
  for (size_t b = 0; b < result.size(); ++b) {
    const float* z = logits.f32() + static_cast<int64_t>(b) * c;
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

std::vector<std::vector<DetectedObject>> detect(const Pretrained& p, const std::vector<Image>& images, float threshold,
                                                int batch_size) {
  std::vector<std::vector<DetectedObject>> result(images.size());
  run_batches(p, images, batch_size, [&](const ModelOutput& out, const std::vector<size_t>& indices) {
    std::vector<const Image*> batch;
    for (size_t i : indices) batch.push_back(&images[i]);
    std::vector<std::vector<DetectedObject>> all = detect_output(p, out, batch, threshold);
    for (size_t b = 0; b < indices.size(); ++b) result[indices[b]] = std::move(all[b]);
  });
  return result;
}

std::vector<std::vector<DetectedObject>> detect_output(const Pretrained& p, const ModelOutput& out,
                                                       const std::vector<const Image*>& images, float threshold) {
  const DetrPostKind kind = detr_post_kind(p.model->model_type);
  ObjectDetectionOptions opt;
  opt.threshold = threshold;
  for (const Image* image : images) opt.target_sizes.push_back({image->height, image->width});
  const Tensor& logits = require_output(p, out, "logits", "not an object detection model");
  const Tensor& pred_boxes = require_output(p, out, "pred_boxes", "not an object detection model");
  const std::vector<Detections> all = post_process_object_detection(kind, logits, pred_boxes, opt);
  std::vector<std::vector<DetectedObject>> result(all.size());
  for (size_t b = 0; b < all.size(); ++b) {
    const Detections& d = all[b];
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
    result[b] = std::move(objects);
  }
  return result;
}

namespace {

void check_segmentation(const Pretrained& p, const SegmentParams& params, DetrPostKind kind) {
  const std::string& task = params.task;
  if (task != "panoptic" && task != "instance" && task != "semantic")
    throw Error("segmentation task '" + task + "': expected panoptic, instance or semantic");
  if (kind != DetrPostKind::Detr && kind != DetrPostKind::ConditionalDetr)
    throw ModelError(p.dir + ": " + p.model->model_type +
                " has no segmentation post-processing (DETR and Conditional DETR segmentation models do)");
}

// The post-processing of one forward's images.
std::vector<SegmentedImage> post_segmentation(const Pretrained& p, DetrPostKind kind, const SegmentParams& params,
                                           const ModelOutput& out, const std::vector<const Image*>& images) {
  const char* what = "not a segmentation model: use a DetrForSegmentation / ConditionalDetrForSegmentation checkpoint";
  const Tensor& logits = require_output(p, out, "logits", what);
  const Tensor& pred_masks = require_output(p, out, "pred_masks", what);
  std::vector<TargetSize> target_sizes;
  for (const Image* image : images) target_sizes.push_back({image->height, image->width});

  std::vector<SegmentedImage> result(images.size());
  if (params.task == "semantic") {
    std::vector<Tensor> maps = post_process_semantic_segmentation(kind, logits, pred_masks, target_sizes);
    for (size_t b = 0; b < maps.size(); ++b) {
      SegmentedImage& seg = result[b];
      seg.map = maps[b].to(DType::I32);
      std::set<int64_t> present;  // np.unique: sorted
      const int64_t* c = maps[b].data<int64_t>();
      for (int64_t i = 0, n = maps[b].numel(); i < n; ++i) present.insert(c[i]);
      for (int64_t id : present) {
        Segment s;
        s.id = id;
        s.label_id = id;
        s.label = label_name(p, id);
        seg.segments.push_back(std::move(s));
      }
    }
    return result;
  }

  SegmentationOptions opt;
  opt.threshold = params.threshold;
  opt.mask_threshold = params.mask_threshold;
  opt.overlap_mask_area_threshold = params.overlap_mask_area_threshold;
  opt.target_sizes = target_sizes;
  std::vector<SegmentationResult> rs = params.task == "panoptic"
                                           ? post_process_panoptic_segmentation(kind, logits, pred_masks, opt)
                                           : post_process_instance_segmentation(kind, logits, pred_masks, opt);
  for (size_t b = 0; b < rs.size(); ++b) {
    SegmentedImage& seg = result[b];
    const SegmentationResult& r = rs[b];
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
  }
  return result;
}

}  // namespace

std::vector<SegmentedImage> segment(const Pretrained& p, const std::vector<Image>& images, const SegmentParams& params,
                                    int batch_size) {
  const DetrPostKind kind = detr_post_kind(p.model->model_type);
  check_segmentation(p, params, kind);
  std::vector<SegmentedImage> result(images.size());
  // The outputs stay on the model's device: the masks are resized, weighed and compared there, and
  // only the segment map and the per-query areas come back (detr_postprocess.h).
  run_batches(
      p, images, batch_size,
      [&](const ModelOutput& out, const std::vector<size_t>& indices) {
        std::vector<const Image*> batch;
        for (size_t i : indices) batch.push_back(&images[i]);
        std::vector<SegmentedImage> segs = post_segmentation(p, kind, params, out, batch);
        for (size_t b = 0; b < indices.size(); ++b) result[indices[b]] = std::move(segs[b]);
      },
      true);
  return result;
}

std::vector<SegmentedImage> segment_output(const Pretrained& p, const ModelOutput& out,
                                           const std::vector<const Image*>& images, const SegmentParams& params) {
  const DetrPostKind kind = detr_post_kind(p.model->model_type);
  check_segmentation(p, params, kind);
  return post_segmentation(p, kind, params, out, images);
}

SegmentedImage segment(const Pretrained& p, const Image& image, const SegmentParams& params) {
  return std::move(segment(p, std::vector<Image>{image}, params, 1)[0]);
}

SegmentedImage segment(const Pretrained& p, const Image& image, const std::string& task, double threshold) {
  SegmentParams params;
  params.task = task;
  params.threshold = threshold;
  return segment(p, image, params);
}

}  // namespace vf
