#include "processors/image_processor.h"

#include "core/errors.h"

#include <cfenv>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>

// rescale and normalize must round like numpy: no fused multiply-add.
#pragma GCC optimize("fp-contract=off")

namespace vf {

std::string SizeDict::str() const {
  std::string s = "{";
  auto add = [&](const char* k, int64_t v) {
    if (!v) return;
    if (s.size() > 1) s += ", ";
    s += std::string("\"") + k + "\": " + std::to_string(v);
  };
  add("height", height);
  add("width", width);
  add("shortest_edge", shortest_edge);
  add("longest_edge", longest_edge);
  add("max_height", max_height);
  add("max_width", max_width);
  return s + "}";
}

SizeDict parse_size_dict(const json& value, bool default_to_square, const std::string& param_name, int64_t max_size) {
  SizeDict d;
  // Sizes are pixels: anything past kMaxSizeValue is a corrupt config (and would overflow the
  // aspect-ratio arithmetic), refused before any image is resized.
  constexpr int64_t kMaxSizeValue = int64_t(1) << 20;
  auto as_int = [&](const json& v, const std::string& key) -> int64_t {
    if (!v.is_number()) throw ModelError(param_name + "." + key + " must be a number, got " + v.dump());
    bool in_range = v.is_number_float()
                        ? (v.get<double>() >= 0 && v.get<double>() <= double(kMaxSizeValue))
                        : v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(kMaxSizeValue)
                                                 : (v.get<int64_t>() >= 0 && v.get<int64_t>() <= kMaxSizeValue);
    if (!in_range)
      throw ModelError(param_name + "." + key + " must be an integer from 0 to " + std::to_string(kMaxSizeValue) +
                  " (pixels), got " + v.dump());
    if (v.is_number_float()) {
      double f = v.get<double>();
      if (f != std::floor(f)) throw ModelError(param_name + "." + key + " must be an integer, got " + v.dump());
      return static_cast<int64_t>(f);
    }
    return v.get<int64_t>();
  };
  if (value.is_number()) {
    int64_t s = as_int(value, "");
    if (default_to_square) {
      if (max_size) throw ModelError(param_name + ": an int size with default_to_square cannot take max_size");
      d.height = d.width = s;
    } else {
      d.shortest_edge = s;
      d.longest_edge = max_size;
    }
  } else if (value.is_array()) {
    if (value.size() != 2) throw ModelError(param_name + " must be [height, width], got " + value.dump());
    d.height = as_int(value[0], "0");
    d.width = as_int(value[1], "1");
  } else if (value.is_object()) {
    std::vector<std::string> keys;
    for (auto it = value.begin(); it != value.end(); ++it) {
      const std::string& k = it.key();
      int64_t v = it.value().is_null() ? 0 : as_int(it.value(), k);
      if (k == "height") d.height = v;
      else if (k == "width") d.width = v;
      else if (k == "shortest_edge") d.shortest_edge = v;
      else if (k == "longest_edge") d.longest_edge = v;
      else if (k == "max_height") d.max_height = v;
      else if (k == "max_width") d.max_width = v;
      else
        throw ModelError(param_name + " has an unsupported key '" + k + "' in " + value.dump() +
                    " (expected height/width, shortest_edge[/longest_edge], longest_edge or max_height/max_width)");
      keys.push_back(k);
    }
    std::sort(keys.begin(), keys.end());
    using K = std::vector<std::string>;
    static const std::vector<K> valid = {{"height", "width"},         {"shortest_edge"},
                                         {"longest_edge", "shortest_edge"}, {"longest_edge"},
                                         {"max_height", "max_width"}};
    if (std::find(valid.begin(), valid.end(), keys) == valid.end())
      throw ModelError(param_name + " must have one of the key sets {height, width}, {shortest_edge}, "
                  "{shortest_edge, longest_edge}, {longest_edge}, {max_height, max_width}; got " + value.dump());
  } else {
    throw ModelError(param_name + " must be an int, a [height, width] list or a dict, got " + value.dump());
  }
  return d;
}

std::pair<int64_t, int64_t> resize_output_size_shortest_edge(int64_t height, int64_t width, int64_t size) {
  const bool portrait = width <= height;
  const int64_t s = portrait ? width : height, l = portrait ? height : width;
  const int64_t new_short = size;
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(new_short * l) / static_cast<double>(s));
  return portrait ? std::make_pair(new_long, new_short) : std::make_pair(new_short, new_long);
}

namespace {
// Python's round(): half to even.
int64_t py_round(double x) {
  const int old = std::fegetround();
  std::fesetround(FE_TONEAREST);
  double r = std::nearbyint(x);
  std::fesetround(old);
  return static_cast<int64_t>(r);
}
}  // namespace

std::pair<int64_t, int64_t> size_with_aspect_ratio(int64_t height, int64_t width, int64_t size, int64_t max_size) {
  double raw_size = 0;
  bool have_raw = false;
  if (max_size) {
    const double min_original = static_cast<double>(std::min(height, width));
    const double max_original = static_cast<double>(std::max(height, width));
    if (max_original / min_original * static_cast<double>(size) > static_cast<double>(max_size)) {
      raw_size = static_cast<double>(max_size) * min_original / max_original;
      have_raw = true;
      size = py_round(raw_size);
    }
  }
  int64_t oh, ow;
  if ((height <= width && height == size) || (width <= height && width == size)) {
    oh = height, ow = width;
  } else if (width < height) {
    ow = size;
    oh = have_raw ? static_cast<int64_t>(raw_size * static_cast<double>(height) / static_cast<double>(width))
                  : static_cast<int64_t>(static_cast<double>(size * height) / static_cast<double>(width));
  } else {
    oh = size;
    ow = have_raw ? static_cast<int64_t>(raw_size * static_cast<double>(width) / static_cast<double>(height))
                  : static_cast<int64_t>(static_cast<double>(size * width) / static_cast<double>(height));
  }
  return {oh, ow};
}

std::pair<int64_t, int64_t> size_for_max_height_width(int64_t height, int64_t width, int64_t max_height,
                                                      int64_t max_width) {
  const double hs = static_cast<double>(max_height) / static_cast<double>(height);
  const double ws = static_cast<double>(max_width) / static_cast<double>(width);
  const double s = std::min(hs, ws);
  return {static_cast<int64_t>(static_cast<double>(height) * s), static_cast<int64_t>(static_cast<double>(width) * s)};
}

// ---------------------------------------------------------------------------------------------

namespace {

std::vector<float> read_mean_std(const json& config, const std::string& key, const std::vector<float>& fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  std::vector<float> v;
  if (it->is_number()) {
    v.assign(3, static_cast<float>(it->get<double>()));
  } else if (it->is_array()) {
    for (const auto& x : *it) {
      if (!x.is_number()) throw ModelError("config key '" + key + "' must hold numbers, got " + it->dump());
      v.push_back(static_cast<float>(x.get<double>()));
    }
  } else {
    throw ModelError("config key '" + key + "' must be a number or a list, got " + it->dump());
  }
  if (v.size() != 3) throw ModelError("config key '" + key + "' must have 3 values (one per RGB channel), got " + it->dump());
  return v;
}

}  // namespace

ImageProcessor::ImageProcessor(std::string type, const json& config, const Defaults& d) : type_(std::move(type)) {
  if (!config.is_object()) throw ModelError("preprocessor config must be a JSON object");
  opt_.default_to_square = cfg_get<bool>(config, "default_to_square", d.default_to_square);
  opt_.do_resize = cfg_get<bool>(config, "do_resize", d.do_resize);
  const json size = cfg_has(config, "size") ? config["size"] : d.size;
  if (!size.is_null()) opt_.size = parse_size_dict(size, opt_.default_to_square, "size");
  try {
    opt_.resample = resample_from_int(cfg_get<int>(config, "resample", static_cast<int>(d.resample)));
  } catch (const ModelError& e) {
    throw ModelError("config key 'resample': " + std::string(e.what()));
  }
  opt_.do_center_crop = cfg_get<bool>(config, "do_center_crop", d.do_center_crop);
  const json crop = cfg_has(config, "crop_size") ? config["crop_size"] : d.crop_size;
  if (!crop.is_null()) opt_.crop_size = parse_size_dict(crop, true, "crop_size");
  opt_.do_rescale = cfg_get<bool>(config, "do_rescale", d.do_rescale);
  opt_.rescale_factor = cfg_get<double>(config, "rescale_factor", 1.0 / 255);
  opt_.do_normalize = cfg_get<bool>(config, "do_normalize", d.do_normalize);
  opt_.image_mean = read_mean_std(config, "image_mean", d.image_mean);
  opt_.image_std = read_mean_std(config, "image_std", d.image_std);
  opt_.do_convert_rgb = cfg_get<bool>(config, "do_convert_rgb", d.do_convert_rgb);
  opt_.do_pad = cfg_get<bool>(config, "do_pad", d.do_pad);
  if (cfg_has(config, "pad_size")) opt_.pad_size = parse_size_dict(config["pad_size"], true, "pad_size");
  // validate_preprocess_arguments
  if (opt_.do_normalize && (opt_.image_mean.empty() || opt_.image_std.empty()))
    throw ModelError(type_ + ": image_mean and image_std must be given when do_normalize is true");
  if (opt_.do_center_crop && (!opt_.crop_size.height || !opt_.crop_size.width))
    throw ModelError(type_ + ": crop_size must have height and width when do_center_crop is true, got " +
                opt_.crop_size.str());
  if (opt_.do_resize && opt_.size.empty()) throw ModelError(type_ + ": size must be given when do_resize is true");
}

Image ImageProcessor::resize(const Image& image, const SizeDict& size, Resample resample) const {
  std::pair<int64_t, int64_t> hw;
  if (size.shortest_edge && size.longest_edge)
    hw = size_with_aspect_ratio(image.height, image.width, size.shortest_edge, size.longest_edge);
  else if (size.shortest_edge)
    hw = resize_output_size_shortest_edge(image.height, image.width, size.shortest_edge);
  else if (size.max_height && size.max_width)
    hw = size_for_max_height_width(image.height, image.width, size.max_height, size.max_width);
  else if (size.height && size.width)
    hw = {size.height, size.width};
  else
    throw ModelError(type_ + ": size must contain 'height' and 'width', 'max_height' and 'max_width', or "
                "'shortest_edge'; got " + size.str());
  return resize_pil(image, hw.first, hw.second, resample);
}

Image ImageProcessor::center_crop(const Image& image, int64_t crop_height, int64_t crop_width) {
  if (crop_height <= 0 || crop_width <= 0)
    throw ModelError("center_crop: crop size " + std::to_string(crop_height) + "x" + std::to_string(crop_width) +
                " must be positive");
  const int64_t H = image.height, W = image.width, C = image.channels;
  int64_t top = (H - crop_height) / 2, left = (W - crop_width) / 2;
  // Python's // floors: only matters when the crop is larger than the image.
  if ((H - crop_height) < 0 && (H - crop_height) % 2) top -= 1;
  if ((W - crop_width) < 0 && (W - crop_width) % 2) left -= 1;
  Image out;
  out.height = crop_height;
  out.width = crop_width;
  out.channels = C;
  out.rgb.assign(size_t(crop_height) * size_t(crop_width) * size_t(C), 0);
  // Cropping a zero-padded canvas: the image sits at (top_pad, left_pad) = ceil(diff / 2) of a
  // max-sized canvas and the crop window moves by the same amount, so it reads image row
  // (y + top) for output row y, zero outside the image.
  for (int64_t y = 0; y < crop_height; ++y) {
    const int64_t sy = y + top;
    if (sy < 0 || sy >= H) continue;
    for (int64_t x = 0; x < crop_width; ++x) {
      const int64_t sx = x + left;
      if (sx < 0 || sx >= W) continue;
      std::memcpy(&out.rgb[(y * crop_width + x) * C], &image.rgb[(sy * W + sx) * C], size_t(C));
    }
  }
  return out;
}

void ImageProcessor::to_pixel_values(const Image& image, float* out, int64_t out_height, int64_t out_width) const {
  if (image.channels != 3) throw Error(type_ + ": expected an RGB image, got " + std::to_string(image.channels) + " channels");
  const int64_t H = image.height, W = image.width;
  const double factor = opt_.rescale_factor;
  const bool rescale = opt_.do_rescale, normalize = opt_.do_normalize;
#pragma omp parallel for collapse(2) schedule(static) if (H * W > 16384)
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < H; ++y) {
      const float mean = normalize ? opt_.image_mean[c] : 0.f, std = normalize ? opt_.image_std[c] : 1.f;
      const uint8_t* in = image.rgb.data() + y * W * 3 + c;
      float* o = out + (c * out_height + y) * out_width;
      for (int64_t x = 0; x < W; ++x) {
        // rescale: image.astype(float64) * scale, then .astype(float32)
        float v = rescale ? static_cast<float>(static_cast<double>(in[3 * x]) * factor) : static_cast<float>(in[3 * x]);
        // normalize: (image - mean) / std with float32 mean and std
        if (normalize) v = (v - mean) / std;
        o[x] = v;
      }
    }
  }
}

BatchFeature ImageProcessor::stack(const std::vector<Image>& images, int64_t height, int64_t width) const {
  BatchFeature out;
  const int64_t B = static_cast<int64_t>(images.size());
  out.pixel_values = Tensor::zeros({B, 3, height, width});
  for (int64_t b = 0; b < B; ++b)
    to_pixel_values(images[b], out.pixel_values.f32() + b * 3 * height * width, height, width);
  return out;
}

BatchFeature ImageProcessor::preprocess(const std::vector<Image>& images, const PreprocessInputs& inputs) const {
  if (images.empty()) throw Error(type_ + ": no images to preprocess");
  if (inputs.annotations && !inputs.annotations->is_null())
    throw Error(type_ + " does not take annotations (only the DETR-family processors do)");
  std::vector<Image> processed;
  processed.reserve(images.size());
  for (const Image& img : images) {
    Image im = opt_.do_resize ? resize(img, opt_.size, opt_.resample) : img;
    if (opt_.do_center_crop) im = center_crop(im, opt_.crop_size.height, opt_.crop_size.width);
    processed.push_back(std::move(im));
  }
  int64_t H = processed[0].height, W = processed[0].width;
  if (opt_.do_pad) {
    if (!opt_.pad_size.empty()) {
      if (!opt_.pad_size.height || !opt_.pad_size.width)
        throw ModelError(type_ + ": pad_size must have height and width, got " + opt_.pad_size.str());
      H = opt_.pad_size.height, W = opt_.pad_size.width;
    } else {
      for (const Image& im : processed) H = std::max(H, im.height), W = std::max(W, im.width);
    }
  }
  for (const Image& im : processed)
    if (opt_.do_pad && !opt_.pad_size.empty() && (im.height > H || im.width > W))
      throw ModelError(type_ + ": config key 'pad_size' " + std::to_string(H) + "x" + std::to_string(W) +
                       " is smaller than an image of " + std::to_string(im.height) + "x" + std::to_string(im.width));
    else if (opt_.do_pad ? (im.height > H || im.width > W) : (im.height != H || im.width != W))
      throw ModelError(type_ + ": processed images have different sizes (" + std::to_string(im.height) + "x" +
                  std::to_string(im.width) + " vs " + std::to_string(H) + "x" + std::to_string(W) +
                  (opt_.do_pad ? ", larger than pad_size" : "; enable do_pad or use one size") + ")");
  return stack(processed, H, W);
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<ImageProcessor> create_image_processor(const json& config) {
  if (!config.is_object()) throw ModelError("preprocessor_config.json must hold a JSON object");
  std::string type;
  if (cfg_has(config, "image_processor_type")) type = cfg_get<std::string>(config, "image_processor_type", "");
  else if (cfg_has(config, "feature_extractor_type")) type = cfg_get<std::string>(config, "feature_extractor_type", "");
  else
    throw ModelError("preprocessor config names no processor: neither 'image_processor_type' nor "
                "'feature_extractor_type' is set");
  // The fast (torchvision) and PIL class names map to the same reference output here.
  std::string base = type;
  for (const char* suffix : {"Fast", "Pil"})
    if (base.size() > std::strlen(suffix) && base.ends_with(suffix)) base.resize(base.size() - std::strlen(suffix));
  using Make = std::unique_ptr<ImageProcessor> (*)(const std::string&, const json&);
  static const std::map<std::string, Make> table = {
      {"BitImageProcessor", make_bit_image_processor},
      {"ConvNextImageProcessor", make_convnext_image_processor},
      {"ConvNextFeatureExtractor", make_convnext_image_processor},
      {"DeiTImageProcessor", make_deit_image_processor},
      {"DeiTFeatureExtractor", make_deit_image_processor},
      {"DetrImageProcessor", make_detr_image_processor},
      {"DetrFeatureExtractor", make_detr_image_processor},
      {"ConditionalDetrImageProcessor", make_detr_image_processor},
      {"ConditionalDetrFeatureExtractor", make_detr_image_processor},
      {"DeformableDetrImageProcessor", make_detr_image_processor},
      {"DeformableDetrFeatureExtractor", make_detr_image_processor},
      {"DetaImageProcessor", make_detr_image_processor},
  };
  auto it = table.find(base);
  if (it == table.end()) {
    std::string known;
    for (const auto& [name, _] : table) known += (known.empty() ? "" : ", ") + name;
    throw ModelError("unsupported image processor type '" + type + "' (supported: " + known + ")");
  }
  return it->second(base, config);
}

}  // namespace vf
