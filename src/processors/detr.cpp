#include "processors/image_processor.h"
namespace vf {
std::unique_ptr<ImageProcessor> make_detr_image_processor(const std::string& type, const json& config) {
  throw Error(type + ": not implemented yet");
}
}  // namespace vf
