// The DETR-family image processors (models/detr/image_processing_pil_detr.py; the Conditional DETR,
// Deformable DETR and DETA processors are the same code with the same defaults): resize with the
// shortest/longest-edge rule, rescale, normalize, pad the batch to its largest image (or pad_size)
// with a pixel_mask, and turn COCO detection / panoptic annotations into DETR targets.
//
// Annotation arithmetic follows the reference's numpy dtypes: boxes and areas are float32, the
// resize ratios are float32 factors, the padding update multiplies in float64 and stores float32.
#include <algorithm>
#include <cmath>
#include <filesystem>

#include "processors/coco_mask.h"
#include "processors/image_processor.h"

#pragma GCC optimize("fp-contract=off")

namespace vf {
namespace {

enum class AnnotationFormat { CocoDetection, CocoPanoptic };

// A target while it is being transformed (the reference's dict of numpy arrays).
struct Target {
  bool has_size = false;
  int64_t size[2] = {0, 0};
  int64_t image_id = 0;
  int64_t orig_size[2] = {0, 0};
  std::vector<int64_t> class_labels, iscrowd;
  std::vector<float> boxes;  // N x 4
  std::vector<float> area;
  bool has_masks = false;
  int64_t mask_height = 0, mask_width = 0;
  std::vector<uint8_t> masks;  // N x mask_height x mask_width, 0/1

  size_t count() const { return class_labels.size(); }
};

int64_t json_int(const json& v, const std::string& what) {
  if (!v.is_number()) throw Error("annotation field '" + what + "' must be a number, got " + v.dump());
  if (!json_integers_fit<int64_t>(v)) throw Error("annotation field '" + what + "' is out of range: " + v.dump());
  // A float is truncated like Python's int().
  return v.is_number_float() ? static_cast<int64_t>(v.get<double>()) : v.get<int64_t>();
}

double json_number(const json& v, const std::string& what) {
  if (!v.is_number()) throw Error("annotation field '" + what + "' must be a number, got " + v.dump());
  return v.get<double>();
}

// prepare_coco_detection_annotation: crowd objects dropped, xywh -> clipped xyxy, degenerate boxes
// dropped.
// With return_masks, every kept object's `segmentation` rasterised as convert_coco_poly_to_mask does
// (coco_mask.h); the reference rasterises every non-crowd object before dropping degenerate boxes,
// so a bad segmentation of a dropped object is still an error.
Target prepare_coco_detection(int64_t height, int64_t width, const json& target, bool return_masks) {
  Target t;
  t.image_id = json_int(target.at("image_id"), "image_id");
  t.orig_size[0] = height, t.orig_size[1] = width;
  const float fw = static_cast<float>(width), fh = static_cast<float>(height);
  for (const json& obj : target.at("annotations")) {
    if (obj.contains("iscrowd") && json_int(obj["iscrowd"], "iscrowd") != 0) continue;
    std::vector<uint8_t> mask;
    if (return_masks) {
      if (!obj.contains("segmentation")) throw Error("annotation has no 'segmentation' (return_segmentation_masks)");
      mask = coco_segmentation_to_mask(obj["segmentation"], height, width);
    }
    const json& bbox = obj.at("bbox");
    if (!bbox.is_array() || bbox.size() != 4) throw Error("annotation bbox must be [x, y, w, h], got " + bbox.dump());
    float b[4];
    for (int k = 0; k < 4; ++k) b[k] = static_cast<float>(json_number(bbox[k], "bbox"));
    b[2] += b[0];
    b[3] += b[1];
    b[0] = std::min(std::max(b[0], 0.0f), fw);
    b[2] = std::min(std::max(b[2], 0.0f), fw);
    b[1] = std::min(std::max(b[1], 0.0f), fh);
    b[3] = std::min(std::max(b[3], 0.0f), fh);
    if (!(b[3] > b[1] && b[2] > b[0])) continue;
    t.class_labels.push_back(json_int(obj.at("category_id"), "category_id"));
    t.area.push_back(static_cast<float>(json_number(obj.at("area"), "area")));
    t.iscrowd.push_back(obj.contains("iscrowd") ? json_int(obj["iscrowd"], "iscrowd") : 0);
    t.boxes.insert(t.boxes.end(), b, b + 4);
    t.masks.insert(t.masks.end(), mask.begin(), mask.end());
  }
  if (return_masks) t.has_masks = true, t.mask_height = height, t.mask_width = width;
  return t;
}

// masks_to_boxes: per mask the min/max pixel coordinates (max is the last pixel's index, not one
// past it; an empty mask gives (1e8, 1e8, 0, 0)).
void masks_to_boxes(const Target& t, std::vector<float>& boxes) {
  const int64_t H = t.mask_height, W = t.mask_width;
  boxes.assign(t.count() * 4, 0.0f);
  for (size_t i = 0; i < t.count(); ++i) {
    const uint8_t* m = t.masks.data() + i * size_t(H * W);
    float xmin = 1e8f, ymin = 1e8f, xmax = 0, ymax = 0;
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        if (m[y * W + x]) {
          xmin = std::min(xmin, float(x)), xmax = std::max(xmax, float(x));
          ymin = std::min(ymin, float(y)), ymax = std::max(ymax, float(y));
        }
    boxes[4 * i] = xmin, boxes[4 * i + 1] = ymin, boxes[4 * i + 2] = xmax, boxes[4 * i + 3] = ymax;
  }
}

// prepare_coco_panoptic_annotation: the PNG's RGB colour is the segment id (r + 256 g + 65536 b).
Target prepare_coco_panoptic(int64_t height, int64_t width, const json& target, const std::string& masks_path,
                             bool return_masks) {
  Target t;
  t.image_id = json_int(target.contains("image_id") ? target["image_id"] : target.at("id"), "image_id");
  t.has_size = true;
  t.size[0] = t.orig_size[0] = height;
  t.size[1] = t.orig_size[1] = width;
  if (!target.contains("segments_info")) return t;
  if (!target.contains("file_name")) throw Error("coco_panoptic annotation has no 'file_name'");
  const std::string path = (std::filesystem::path(masks_path) / target["file_name"].get<std::string>()).string();
  Image png = load_image(path);
  t.mask_height = png.height, t.mask_width = png.width;
  const size_t hw = png.pixels();
  const json& segments = target["segments_info"];
  t.masks.assign(segments.size() * hw, 0);
  for (size_t i = 0; i < segments.size(); ++i) {
    const json& seg = segments[i];
    const uint32_t id = static_cast<uint32_t>(json_int(seg.at("id"), "id"));
    uint8_t* m = t.masks.data() + i * hw;
    for (size_t p = 0; p < hw; ++p) {
      const uint8_t* c = &png.rgb[3 * p];
      m[p] = (uint32_t(c[0]) + 256u * c[1] + 65536u * c[2]) == id;
    }
    t.class_labels.push_back(json_int(seg.at("category_id"), "category_id"));
    t.iscrowd.push_back(json_int(seg.at("iscrowd"), "iscrowd"));
    t.area.push_back(static_cast<float>(json_number(seg.at("area"), "area")));
  }
  masks_to_boxes(t, t.boxes);
  t.has_masks = return_masks;
  if (!return_masks) t.masks.clear();
  return t;
}

// resize_annotation: boxes and area scaled by float32 ratios, masks resized with NEAREST and
// thresholded at 0.5.
void resize_annotation(Target& t, int64_t orig_h, int64_t orig_w, int64_t new_h, int64_t new_w) {
  const double ratio_h = static_cast<double>(new_h) / static_cast<double>(orig_h);
  const double ratio_w = static_cast<double>(new_w) / static_cast<double>(orig_w);
  const float rw = static_cast<float>(ratio_w), rh = static_cast<float>(ratio_h);
  for (size_t i = 0; i < t.count(); ++i) {
    float* b = &t.boxes[4 * i];
    b[0] *= rw, b[1] *= rh, b[2] *= rw, b[3] *= rh;
  }
  const float area_ratio = static_cast<float>(ratio_w * ratio_h);
  for (float& a : t.area) a *= area_ratio;
  if (t.has_masks) {
    std::vector<uint8_t> resized(t.count() * size_t(new_h * new_w));
    for (size_t i = 0; i < t.count(); ++i) {
      Image m;
      m.height = t.mask_height, m.width = t.mask_width, m.channels = 1;
      m.rgb.assign(t.masks.begin() + i * size_t(m.height * m.width), t.masks.begin() + (i + 1) * size_t(m.height * m.width));
      Image r = resize_pil(m, new_h, new_w, Resample::Nearest);
      for (size_t p = 0; p < r.rgb.size(); ++p) resized[i * size_t(new_h * new_w) + p] = r.rgb[p] > 0.5f;
    }
    t.masks = std::move(resized);
    t.mask_height = new_h, t.mask_width = new_w;
  }
  t.has_size = true;
  t.size[0] = new_h, t.size[1] = new_w;
}

// normalize_annotation: xyxy -> (cx, cy, w, h) / (W, H, W, H), in float32.
void normalize_annotation(Target& t, int64_t height, int64_t width) {
  const float fw = static_cast<float>(width), fh = static_cast<float>(height);
  for (size_t i = 0; i < t.count(); ++i) {
    float* b = &t.boxes[4 * i];
    const float cx = (b[0] + b[2]) / 2, cy = (b[1] + b[3]) / 2, w = b[2] - b[0], h = b[3] - b[1];
    b[0] = cx / fw, b[1] = cy / fh, b[2] = w / fw, b[3] = h / fh;
  }
}

// _update_annotation_for_padded_image.
void pad_annotation(Target& t, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, bool update_boxes) {
  t.has_size = true;
  t.size[0] = out_h, t.size[1] = out_w;
  if (t.has_masks) {
    std::vector<uint8_t> padded(t.count() * size_t(out_h * out_w), 0);
    const int64_t h = std::min(t.mask_height, out_h), w = std::min(t.mask_width, out_w);
    for (size_t i = 0; i < t.count(); ++i)
      for (int64_t y = 0; y < h; ++y)
        std::copy_n(t.masks.begin() + i * size_t(t.mask_height * t.mask_width) + y * t.mask_width, w,
                    padded.begin() + i * size_t(out_h * out_w) + y * out_w);
    t.masks = std::move(padded);
    t.mask_height = out_h, t.mask_width = out_w;
  }
  if (update_boxes) {
    // boxes (float32) *= a float64 array: the product is taken in float64.
    const double sx = static_cast<double>(in_w) / static_cast<double>(out_w);
    const double sy = static_cast<double>(in_h) / static_cast<double>(out_h);
    for (size_t i = 0; i < t.count(); ++i) {
      float* b = &t.boxes[4 * i];
      b[0] = static_cast<float>(b[0] * sx), b[1] = static_cast<float>(b[1] * sy);
      b[2] = static_cast<float>(b[2] * sx), b[3] = static_cast<float>(b[3] * sy);
    }
  }
}

DetectionTarget to_tensors(const Target& t) {
  DetectionTarget d;
  const int64_t n = static_cast<int64_t>(t.count());
  if (t.has_size) d.size = Tensor::from<int64_t>({2}, {t.size[0], t.size[1]});
  d.image_id = Tensor::from<int64_t>({1}, {t.image_id});
  d.class_labels = Tensor::from_vector<int64_t>({n}, t.class_labels);
  d.boxes = Tensor::from_vector<float>({n, 4}, t.boxes);
  d.area = Tensor::from_vector<float>({n}, t.area);
  d.iscrowd = Tensor::from_vector<int64_t>({n}, t.iscrowd);
  d.orig_size = Tensor::from<int64_t>({2}, {t.orig_size[0], t.orig_size[1]});
  if (t.has_masks) {
    d.masks = Tensor::empty({n, t.mask_height, t.mask_width}, DType::Bool);
    std::copy(t.masks.begin(), t.masks.end(), static_cast<uint8_t*>(d.masks.raw()));
  }
  return d;
}

// The __init__ of the DETR processors: legacy `size` ints with `max_size`, `pad_and_return_pixel_mask`.
json detr_config(const json& config) {
  json c = config;
  if (cfg_has(config, "size")) {
    const json& size = config["size"];
    int64_t max_size = 1333;
    if (config.contains("max_size")) max_size = config["max_size"].is_null() ? 0 : json_int(config["max_size"], "max_size");
    if (size.is_number()) {
      c["size"] = json{{"shortest_edge", json_int(size, "size")}};
      if (max_size) c["size"]["longest_edge"] = max_size;
    }
  }
  // 4.37's __init__ pops the legacy key into do_pad, so it wins over a do_pad given with it.
  if (cfg_has(config, "pad_and_return_pixel_mask")) c["do_pad"] = config["pad_and_return_pixel_mask"];
  return c;
}

class DetrImageProcessor : public ImageProcessor {
 public:
  DetrImageProcessor(const std::string& type, const json& config)
      : ImageProcessor(type, detr_config(config), defaults()) {
    const std::string format = cfg_get<std::string>(config, "format", "coco_detection");
    if (format == "coco_detection") format_ = AnnotationFormat::CocoDetection;
    else if (format == "coco_panoptic") format_ = AnnotationFormat::CocoPanoptic;
    else throw Error(type_ + ": unsupported annotation format '" + format + "' (coco_detection or coco_panoptic)");
    // Backwards compatibility in the reference: do_convert_annotations follows do_normalize.
    do_convert_annotations_ = cfg_get<bool>(config, "do_convert_annotations", opt_.do_normalize);
    opt_.do_center_crop = false;  // not a step of these processors
  }

  BatchFeature preprocess(const std::vector<Image>& images, const PreprocessInputs& inputs) const override {
    if (images.empty()) throw Error(type_ + ": no images to preprocess");
    std::vector<const json*> annotations;
    if (inputs.annotations && !inputs.annotations->is_null()) {
      const json& a = *inputs.annotations;
      if (a.is_object()) annotations.push_back(&a);
      else if (a.is_array()) for (const json& x : a) annotations.push_back(&x);
      else throw Error(type_ + ": annotations must be a dict or a list of dicts");
      if (annotations.size() != images.size())
        throw Error(type_ + ": the number of images (" + std::to_string(images.size()) + ") and annotations (" +
                    std::to_string(annotations.size()) + ") do not match");
      for (const json* x : annotations) validate(*x);
    }
    const bool have_targets = !annotations.empty();
    std::vector<Image> processed;
    std::vector<Target> targets;
    for (size_t i = 0; i < images.size(); ++i) {
      const Image& image = images[i];
      Target t;
      if (have_targets) {
        if (format_ == AnnotationFormat::CocoDetection)
          t = prepare_coco_detection(image.height, image.width, *annotations[i],
                                     inputs.return_segmentation_masks.value_or(false));
        else
          t = prepare_coco_panoptic(image.height, image.width, *annotations[i], inputs.masks_path,
                                    inputs.return_segmentation_masks.value_or(true));
      }
      Image im = opt_.do_resize ? resize(image, opt_.size, opt_.resample) : image;
      if (have_targets && opt_.do_resize) resize_annotation(t, image.height, image.width, im.height, im.width);
      if (have_targets && do_convert_annotations_) normalize_annotation(t, im.height, im.width);
      processed.push_back(std::move(im));
      targets.push_back(std::move(t));
    }
    int64_t H = processed[0].height, W = processed[0].width;
    if (opt_.do_pad) {
      if (!opt_.pad_size.empty()) {
        H = opt_.pad_size.height, W = opt_.pad_size.width;
        if (!H || !W) throw ModelError(type_ + ": pad_size must have height and width, got " + opt_.pad_size.str());
      } else {
        for (const Image& im : processed) H = std::max(H, im.height), W = std::max(W, im.width);
      }
    }
    for (const Image& im : processed) {
      if (opt_.do_pad && (im.height > H || im.width > W))
        throw ModelError(type_ + ": config key 'pad_size' " + std::to_string(H) + "x" +
                    std::to_string(W) + " is smaller than an image of " + std::to_string(im.height) + "x" +
                    std::to_string(im.width));
      if (!opt_.do_pad && (im.height != H || im.width != W))
        throw ModelError(type_ + ": with do_pad false the processed images must all have one size (" +
                    std::to_string(im.height) + "x" + std::to_string(im.width) + " vs " + std::to_string(H) + "x" +
                    std::to_string(W) + ")");
    }
    BatchFeature out = stack(processed, H, W);
    if (opt_.do_pad) {
      const int64_t B = static_cast<int64_t>(processed.size());
      out.pixel_mask = Tensor::zeros({B, H, W}, DType::I64);
      int64_t* mask = out.pixel_mask.data<int64_t>();
      for (int64_t b = 0; b < B; ++b) {
        const Image& im = processed[b];
        for (int64_t y = 0; y < im.height; ++y) std::fill_n(mask + (b * H + y) * W, im.width, int64_t(1));
        if (have_targets && (im.height != H || im.width != W))
          pad_annotation(targets[b], im.height, im.width, H, W, do_convert_annotations_);
      }
    }
    if (have_targets)
      for (const Target& t : targets) out.labels.push_back(to_tensors(t));
    return out;
  }

 protected:
  Image resize(const Image& image, const SizeDict& size, Resample resample) const override {
    std::pair<int64_t, int64_t> hw;
    if (size.shortest_edge && size.longest_edge)
      hw = size_with_aspect_ratio(image.height, image.width, size.shortest_edge, size.longest_edge);
    else if (size.max_height && size.max_width)
      hw = size_for_max_height_width(image.height, image.width, size.max_height, size.max_width);
    else if (size.height && size.width)
      hw = {size.height, size.width};
    else
      throw ModelError(type_ + ": size must contain 'height' and 'width' or 'shortest_edge' and 'longest_edge' (or "
                  "'max_height' and 'max_width'); got " + size.str());
    return resize_pil(image, hw.first, hw.second, resample);
  }

 private:
  static Defaults defaults() {
    Defaults d;
    d.resample = Resample::Bilinear;
    d.image_mean = {0.485f, 0.456f, 0.406f};  // IMAGENET_DEFAULT_MEAN
    d.image_std = {0.229f, 0.224f, 0.225f};   // IMAGENET_DEFAULT_STD
    d.do_resize = d.do_rescale = d.do_normalize = d.do_pad = true;
    d.size = {{"shortest_edge", 800}, {"longest_edge", 1333}};
    d.default_to_square = false;
    return d;
  }

  // validate_annotations.
  void validate(const json& a) const {
    const bool ok = format_ == AnnotationFormat::CocoDetection
                        ? a.is_object() && a.contains("image_id") && a.contains("annotations") && a["annotations"].is_array()
                        : a.is_object() && a.contains("image_id") && a.contains("segments_info") &&
                              a.contains("file_name") && a["segments_info"].is_array();
    if (!ok)
      throw ModelError(type_ + ": invalid " +
                  (format_ == AnnotationFormat::CocoDetection
                       ? std::string("COCO detection annotation (expected {image_id, annotations: [...]})")
                       : std::string("COCO panoptic annotation (expected {image_id, file_name, segments_info: [...]})")) +
                  ", got " + a.dump().substr(0, 200));
  }

  AnnotationFormat format_ = AnnotationFormat::CocoDetection;
  bool do_convert_annotations_ = true;
};

}  // namespace

std::unique_ptr<ImageProcessor> make_detr_image_processor(const std::string& type, const json& config) {
  return std::make_unique<DetrImageProcessor>(type, config);
}

}  // namespace vf
