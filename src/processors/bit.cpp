// BitImageProcessor (models/bit/image_processing_pil_bit.py): the PilBackend pipeline with CLIP's
// mean and std, shortest-edge resize then center crop.
#include "processors/image_processor.h"

namespace vf {
namespace {

class BitImageProcessor : public ImageProcessor {
 public:
  BitImageProcessor(const std::string& type, const json& config) : ImageProcessor(type, config, defaults()) {}

 private:
  static Defaults defaults() {
    Defaults d;
    d.resample = Resample::Bicubic;
    d.image_mean = {0.48145466f, 0.4578275f, 0.40821073f};  // OPENAI_CLIP_MEAN
    d.image_std = {0.26862954f, 0.26130258f, 0.27577711f};  // OPENAI_CLIP_STD
    d.size = {{"shortest_edge", 224}};
    d.default_to_square = false;
    d.crop_size = {{"height", 224}, {"width", 224}};
    d.do_resize = d.do_center_crop = d.do_rescale = d.do_normalize = d.do_convert_rgb = true;
    return d;
  }
};

}  // namespace

std::unique_ptr<ImageProcessor> make_bit_image_processor(const std::string& type, const json& config) {
  return std::make_unique<BitImageProcessor>(type, config);
}

}  // namespace vf
