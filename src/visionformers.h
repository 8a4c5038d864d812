// The library's front door: load a Hub model folder, run images through it.
//
//   auto p = vf::Pretrained::from_pretrained("facebook-convnext-tiny-224/");
//   auto out = p.run({vf::load_image("cat.jpg")});          // pixel_values -> ModelOutput
//   auto top = vf::classify(p, {vf::load_image("cat.jpg")}, 5);
//   auto boxes = vf::detect(vf::Pretrained::from_pretrained("detr-resnet-50/"), {img}, 0.9);
//   auto seg = vf::segment(vf::Pretrained::from_pretrained("detr-resnet-50-panoptic/"), img, "panoptic");
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "io/image.h"
#include "models/model.h"
#include "processors/image_processor.h"

namespace vf {

// The device models are loaded for when LoadOptions names none: the CPU unless the program set
// another (the vf CLI's --device).
Device default_device();
void set_default_device(Device d);
DType default_dtype();  // float32 unless set
void set_default_dtype(DType t);

struct LoadOptions {
  std::string architecture;      // overrides config.architectures[0]
  std::optional<Device> device;  // where the model runs (default_device() when empty)
  std::optional<DType> dtype;    // what its convolutions and linear layers compute in (default_dtype()
                                 // when empty): float32 is exact; bfloat16 / float16 trade digits for speed
};

struct Pretrained {
  std::string dir;
  json config;        // config.json
  json preprocessor;  // preprocessor_config.json
  std::shared_ptr<Model> model;
  std::shared_ptr<ImageProcessor> processor;

  // Reads config.json, preprocessor_config.json and the weights (model.safetensors, a sharded
  // index, or pytorch_model.bin). `architecture` overrides config.architectures[0]. `dir_or_id` is a
  // folder, or a Hub id "org/name[@revision]" fetched into huggingface_hub's cache (src/hub/hub.h).
  static Pretrained from_pretrained(const std::string& dir_or_id, const LoadOptions& options);
  static Pretrained from_pretrained(const std::string& dir_or_id, const std::string& architecture = "") {
    LoadOptions options;
    options.architecture = architecture;
    return from_pretrained(dir_or_id, options);
  }

  // The processor, then the model.
  ModelOutput run(const std::vector<Image>& images, bool output_hidden_states = false,
                  bool output_attentions = false) const;
};

// Batches (classify, detect, segment): the images are taken `batch_size` at a time, each is
// processed alone, and those of one processed size share a forward; images of different sizes run
// in separate forwards, never padded to one size. So every image's results are those of a run of it
// alone, as the pipelines run images: a padded DETR-family batch (Pretrained::run on images of
// several sizes, as the processor pads them) changes the outputs of its padded images, since the
// backbone's borders see the padding and Deformable DETR's / DETA's input GroupNorm averages over it
// (as the reference computes them; on the tiny test models by up to 2e-2 in score).

// The batches' building block, for callers that post-process themselves (the server): runs the
// images `batch_size` at a time (<= 0: all at once) as above, and gives `use` each forward's output
// with its images' indices into `images`, increasing within a forward. With outputs_on_device the
// outputs stay on the model's device (Model::infer_on_device), for post-processing that runs there.
using ForwardFn = std::function<void(const ModelOutput& out, const std::vector<size_t>& indices)>;
void run_batches(const Pretrained& p, const std::vector<Image>& images, int batch_size, const ForwardFn& use,
                 bool outputs_on_device = false);
// Whether run_batches prepares the next forward (preprocessing, and on a GPU its upload) on a thread of
// its own while the current one runs, for a model on `d`: on a device, unless VF_PREFETCH=0 (to
// compare); never on the CPU, where the forward has every core.
bool prepares_ahead(Device d);

struct LabelScore {
  std::string label;
  float score;
};

// Softmax over the logits (a DeiT-with-teacher's averaged logits too), the top k per image, as
// transformers' image-classification pipeline. Batches: see "Batches" above (0: all at once).
std::vector<std::vector<LabelScore>> classify(const Pretrained& p, const std::vector<Image>& images, int top_k = 5,
                                              int batch_size = 0);
// The same post-processing of one forward's output (its rows are images).
std::vector<std::vector<LabelScore>> classify_output(const Pretrained& p, const ModelOutput& out, int top_k = 5);

// ---- object detection (DETR family), as transformers' object-detection pipeline ----------------

// The pipeline's box: the corners in pixels of the original image, truncated toward zero
// (`box.int()`). Not clipped: a box may reach past the image.
struct BoundingBox {
  int xmin = 0, ymin = 0, xmax = 0, ymax = 0;
};

struct DetectedObject {
  float score = 0;
  int64_t label_id = 0;
  std::string label;  // id2label[label_id] ("LABEL_<id>" when the config names none)
  BoundingBox box;
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // the exact corners before truncation
};

// Per image, the detections scoring above `threshold`, best first, through its model_type's
// post_process_object_detection (detr: softmax; conditional_detr / deformable_detr: sigmoid top-100;
// deta: sigmoid top-10k + NMS 0.7) with target_sizes = each image's own size. Batches: see
// "Batches" above (the default, 1, runs each image alone as the pipeline does; 0: all at once).
std::vector<std::vector<DetectedObject>> detect(const Pretrained& p, const std::vector<Image>& images,
                                                float threshold = 0.5f, int batch_size = 1);
// The same post-processing of one forward's output, whose rows are `images` (for their sizes).
std::vector<std::vector<DetectedObject>> detect_output(const Pretrained& p, const ModelOutput& out,
                                                       const std::vector<const Image*>& images, float threshold = 0.5f);

// ---- segmentation (DetrForSegmentation, ConditionalDetrForSegmentation), as the image-segmentation
// pipeline --------------------------------------------------------------------------------------

struct Segment {
  int64_t id = 0;        // the value of its pixels in SegmentedImage::map
  int64_t label_id = 0;
  std::string label;
  std::optional<double> score;  // none for semantic segmentation (the pipeline's score=None)
  bool was_fused = false;
};

struct SegmentedImage {
  // int32 [height, width] at the original image size. Panoptic / instance: segment ids, 0 where no
  // segment (and -1 everywhere when no query passed the threshold, as the reference). Semantic:
  // class ids, and each class present is one segment whose id is its class id.
  Tensor map;
  std::vector<Segment> segments;
};

struct SegmentParams {
  std::string task = "panoptic";  // "panoptic", "instance" or "semantic"
  double threshold = 0.9;         // the pipeline's defaults
  double mask_threshold = 0.5;
  double overlap_mask_area_threshold = 0.5;
};

// The pipeline's post-processing of one image: post_process_{panoptic,instance,semantic}_segmentation
// with target_sizes = the image size; segments in the reference's order (semantic: increasing class).
SegmentedImage segment(const Pretrained& p, const Image& image, const SegmentParams& params = {});
// The same for each image (batches: see "Batches" above; 0: all at once). A padded batch would be
// worse here: the reference resizes a padded image's whole mask, padding included, to its size.
std::vector<SegmentedImage> segment(const Pretrained& p, const std::vector<Image>& images,
                                    const SegmentParams& params = {}, int batch_size = 1);
SegmentedImage segment(const Pretrained& p, const Image& image, const std::string& task, double threshold = 0.9);
// The same post-processing of one forward's output, whose rows are `images` (for their sizes).
std::vector<SegmentedImage> segment_output(const Pretrained& p, const ModelOutput& out,
                                           const std::vector<const Image*>& images, const SegmentParams& params = {});

}  // namespace vf
