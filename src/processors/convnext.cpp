// ConvNextImageProcessor (models/convnext/image_processing_pil_convnext.py): below 384 the short side
// is resized to int(shortest_edge / crop_pct) and the center shortest_edge x shortest_edge kept;
// from 384 up the image is warped to shortest_edge x shortest_edge. It never pads (do_pad is ignored).
#include "processors/image_processor.h"

namespace vf {
namespace {

class ConvNextImageProcessor : public ImageProcessor {
 public:
  ConvNextImageProcessor(const std::string& type, const json& config)
      : ImageProcessor(type, config, defaults()),
        crop_pct_(cfg_get<double>(config, "crop_pct", 224.0 / 256.0)) {
    if (opt_.do_resize && !opt_.size.shortest_edge)
      throw ModelError(type_ + ": size must contain 'shortest_edge', got " + opt_.size.str());
    if (!(crop_pct_ > 0)) throw ModelError(type_ + ": config key 'crop_pct' must be positive, got " + std::to_string(crop_pct_));
    // int(shortest_edge / crop_pct) must be a size at all (1e-300 would overflow the conversion).
    if (opt_.do_resize && opt_.size.shortest_edge < 384 &&
        !(static_cast<double>(opt_.size.shortest_edge) / crop_pct_ <= double(int64_t(1) << 20)))
      throw ModelError(type_ + ": config key 'crop_pct' " + std::to_string(crop_pct_) + " resizes shortest_edge " +
                       std::to_string(opt_.size.shortest_edge) + " past 1048576 pixels");
    // The reference's _preprocess (resize, center crop, rescale, normalize) has no padding step:
    // do_pad and pad_size in the config have no effect.
    opt_.do_pad = false;
    opt_.pad_size = SizeDict{};
  }

 protected:
  Image resize(const Image& image, const SizeDict& size, Resample resample) const override {
    const int64_t shortest_edge = size.shortest_edge;
    if (shortest_edge < 384) {
      const auto resize_shortest_edge = static_cast<int64_t>(static_cast<double>(shortest_edge) / crop_pct_);
      auto [h, w] = resize_output_size_shortest_edge(image.height, image.width, resize_shortest_edge);
      return center_crop(resize_pil(image, h, w, resample), shortest_edge, shortest_edge);
    }
    return resize_pil(image, shortest_edge, shortest_edge, resample);
  }

 private:
  static Defaults defaults() {
    Defaults d;
    d.resample = Resample::Bicubic;
    d.image_mean = {0.5f, 0.5f, 0.5f};  // IMAGENET_STANDARD_MEAN
    d.image_std = {0.5f, 0.5f, 0.5f};   // IMAGENET_STANDARD_STD
    d.size = {{"shortest_edge", 384}};
    d.default_to_square = false;
    d.do_resize = d.do_rescale = d.do_normalize = true;
    return d;
  }

  double crop_pct_;
};

}  // namespace

std::unique_ptr<ImageProcessor> make_convnext_image_processor(const std::string& type, const json& config) {
  return std::make_unique<ConvNextImageProcessor>(type, config);
}

}  // namespace vf
