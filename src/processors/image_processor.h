// Image processors: preprocessor_config.json -> pixel_values, as transformers' PIL-backend image
// processors compute them (image_processing_pil_*.py on top of image_processing_backends.PilBackend).
//
// The reference's dtypes are kept step by step: resize and center crop run on uint8 images (PIL),
// rescale multiplies in float64 and stores float32, normalize runs in float32, padding fills the
// float image with zeros. One file per family (bit.cpp, convnext.cpp, deit.cpp, detr.cpp) holds its
// class defaults and any step it overrides.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/detection_target.h"
#include "core/tensor.h"
#include "io/image.h"
#include "processors/resample.h"

namespace vf {

// transformers' SizeDict: the keys a size may have; 0 means absent (the reference tests truthiness).
struct SizeDict {
  int64_t height = 0, width = 0;
  int64_t shortest_edge = 0, longest_edge = 0;
  int64_t max_height = 0, max_width = 0;

  bool empty() const { return !height && !width && !shortest_edge && !longest_edge && !max_height && !max_width; }
  std::string str() const;
};

// get_size_dict: an int becomes {height, width} (default_to_square) or {shortest_edge[, longest_edge =
// max_size]}, a [h, w] list {height, width}; a dict must hold one of the reference's key sets.
SizeDict parse_size_dict(const json& value, bool default_to_square, const std::string& param_name,
                         int64_t max_size = 0);

// image_transforms.get_resize_output_image_size(default_to_square=False): the short side becomes
// `size`, the long one int(size * long / short). Returns {height, width}.
std::pair<int64_t, int64_t> resize_output_size_shortest_edge(int64_t height, int64_t width, int64_t size);
// image_transforms.get_size_with_aspect_ratio (max_size 0 = None), with Python's round-half-even.
std::pair<int64_t, int64_t> size_with_aspect_ratio(int64_t height, int64_t width, int64_t size, int64_t max_size);
// image_utils.get_image_size_for_max_height_width.
std::pair<int64_t, int64_t> size_for_max_height_width(int64_t height, int64_t width, int64_t max_height,
                                                      int64_t max_width);

// The processor's output.
struct BatchFeature {
  Tensor pixel_values;  // float32 [B, 3, H, W]
  Tensor pixel_mask;    // int64 [B, H, W]; DETR family with do_pad, else undefined
  std::vector<DetectionTarget> labels;  // one per image when annotations were given
};

// Extra inputs of a preprocess call (the DETR family's `annotations`, `masks_path`,
// `return_segmentation_masks`).
struct PreprocessInputs {
  const json* annotations = nullptr;  // one COCO detection / panoptic dict per image, or a single dict
  std::string masks_path;             // folder of the panoptic PNGs
  std::optional<bool> return_segmentation_masks;
};

// Options every PIL-backend processor reads (ImagesKwargs), resolved from the config and the
// class defaults.
struct ImageProcessorOptions {
  bool do_resize = false;
  SizeDict size;
  Resample resample = Resample::Bilinear;
  bool do_center_crop = false;
  SizeDict crop_size;
  bool do_rescale = false;
  double rescale_factor = 1.0 / 255;
  bool do_normalize = false;
  std::vector<float> image_mean, image_std;  // float32, as normalize casts them to the image dtype
  bool do_convert_rgb = false;
  bool do_pad = false;
  SizeDict pad_size;  // empty = pad to the batch's largest image
  bool default_to_square = true;
};

class ImageProcessor {
 public:
  virtual ~ImageProcessor() = default;

  // Preprocesses a batch of RGB images (all outputs must end up the same size, as with
  // return_tensors="pt"). Throws vf::Error when they do not.
  virtual BatchFeature preprocess(const std::vector<Image>& images, const PreprocessInputs& inputs = {}) const;

  const std::string& type() const { return type_; }
  const ImageProcessorOptions& options() const { return opt_; }

 protected:
  // Class defaults of a family, overridden by the config's non-null keys.
  struct Defaults {
    bool do_resize = false;
    json size;  // as a config would write it (null: none)
    Resample resample = Resample::Bilinear;
    bool do_center_crop = false;
    json crop_size;
    bool do_rescale = false;
    bool do_normalize = false;
    std::vector<float> image_mean, image_std;
    bool do_convert_rgb = false;
    bool do_pad = false;
    bool default_to_square = true;
  };
  ImageProcessor(std::string type, const json& config, const Defaults& defaults);

  // PilBackend.resize: the size dict picks the output size; a uint8 PIL resize.
  virtual Image resize(const Image& image, const SizeDict& size, Resample resample) const;
  // image_transforms.center_crop (zero-padded when the crop is larger than the image).
  static Image center_crop(const Image& image, int64_t crop_height, int64_t crop_width);
  // rescale (float64 product stored as float32) then normalize (float32), written channels-first
  // into `out` (a [3, out_h, out_w] slot, already zero where the image does not reach).
  void to_pixel_values(const Image& image, float* out, int64_t out_height, int64_t out_width) const;
  // Stacks per-image float results into pixel_values padded to (height, width) with zeros.
  BatchFeature stack(const std::vector<Image>& images, int64_t height, int64_t width) const;

  std::string type_;
  ImageProcessorOptions opt_;
};

// Builds the processor named by `image_processor_type` (or the legacy `feature_extractor_type`).
// Throws vf::Error for an unknown or missing type.
std::unique_ptr<ImageProcessor> create_image_processor(const json& preprocessor_config);

// Family constructors (bit.cpp, convnext.cpp, deit.cpp, detr.cpp), used by the factory.
std::unique_ptr<ImageProcessor> make_bit_image_processor(const std::string& type, const json& config);
std::unique_ptr<ImageProcessor> make_convnext_image_processor(const std::string& type, const json& config);
std::unique_ptr<ImageProcessor> make_deit_image_processor(const std::string& type, const json& config);
std::unique_ptr<ImageProcessor> make_detr_image_processor(const std::string& type, const json& config);

}  // namespace vf
