// DeiTImageProcessor (models/deit/image_processing_pil_deit.py): the PilBackend pipeline, a fixed
// height x width resize then center crop, mean and std 0.5.
#include "processors/image_processor.h"

namespace vf {
namespace {

class DeiTImageProcessor : public ImageProcessor {
 public:
  DeiTImageProcessor(const std::string& type, const json& config) : ImageProcessor(type, config, defaults()) {}

 private:
  static Defaults defaults() {
    Defaults d;
    d.resample = Resample::Bicubic;
    d.image_mean = {0.5f, 0.5f, 0.5f};  // IMAGENET_STANDARD_MEAN
    d.image_std = {0.5f, 0.5f, 0.5f};   // IMAGENET_STANDARD_STD
    d.size = {{"height", 256}, {"width", 256}};
    d.crop_size = {{"height", 224}, {"width", 224}};
    d.do_resize = d.do_center_crop = d.do_rescale = d.do_normalize = true;
    return d;
  }
};

}  // namespace

std::unique_ptr<ImageProcessor> make_deit_image_processor(const std::string& type, const json& config) {
  return std::make_unique<DeiTImageProcessor>(type, config);
}

}  // namespace vf
