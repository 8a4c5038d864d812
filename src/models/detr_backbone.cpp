#include "models/detr_backbone.h"

#include "core/position.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/file_pages.h"

namespace vf {

// ---- config -------------------------------------------------------------------------------------

DetrBackboneConfig read_detr_backbone_config(const json& config, const std::vector<int>& timm_out_indices,
                                             const std::vector<std::string>& default_out_features,
                                             bool timm_default) {
  DetrBackboneConfig c;
  c.num_channels = cfg_get<int64_t>(config, "num_channels", 3);
  const bool has_backbone_config = cfg_has(config, "backbone_config");
  // A config that carries a backbone_config uses it (the reference refuses both at once).
  c.use_timm_backbone = has_backbone_config ? false : cfg_get<bool>(config, "use_timm_backbone", timm_default);
  json backbone_kwargs = cfg_get<json>(config, "backbone_kwargs", json::object());

  if (c.use_timm_backbone) {
    c.backbone = cfg_get<std::string>(config, "backbone", "resnet50");
    c.dilation = cfg_get<bool>(config, "dilation", false);
    // timm's output_stride overrides dilation: 16 dilates the last stage, 32 is the plain network;
    // 8 (two dilated stages) is not built here.
    if (cfg_has(backbone_kwargs, "output_stride")) {
      const int64_t output_stride = cfg_get<int64_t>(backbone_kwargs, "output_stride", 32);
      if (output_stride != 16 && output_stride != 32)
        throw ModelError("config.json: backbone_kwargs.output_stride " + std::to_string(output_stride) +
                         " is not supported (16: dilated last stage, or 32)");
      c.dilation = output_stride == 16;
    }
    c.out_indices = cfg_get<std::vector<int>>(backbone_kwargs, "out_indices", timm_out_indices);
    // The input channels: "in_chans" (transformers 4.x, timm's name) or "num_channels" (5.x).
    c.num_channels = cfg_get<int64_t>(backbone_kwargs, "in_chans",
                                      cfg_get<int64_t>(backbone_kwargs, "num_channels", c.num_channels));
    std::sort(c.out_indices.begin(), c.out_indices.end());
    return c;
  }

  json bc = has_backbone_config ? config["backbone_config"] : json::object();
  c.model_type = cfg_get<std::string>(bc, "model_type", "resnet");
  if (c.model_type == "swin") {
    c.swin = read_swin_config(bc);
    c.num_channels = c.swin.num_channels;
    return c;
  }
  if (c.model_type != "resnet")
    throw ModelError("config.json: backbone_config.model_type '" + c.model_type +
                     "' is not supported (the DETR family runs 'resnet' and 'swin' backbones)");
  c.num_channels = cfg_get<int64_t>(bc, "num_channels", 3);
  c.embedding_size = cfg_get<int64_t>(bc, "embedding_size", c.embedding_size);
  c.hidden_sizes = cfg_get<std::vector<int64_t>>(bc, "hidden_sizes", c.hidden_sizes);
  c.depths = cfg_get<std::vector<int64_t>>(bc, "depths", c.depths);
  c.layer_type = cfg_get<std::string>(bc, "layer_type", c.layer_type);
  c.hidden_act = cfg_get<std::string>(bc, "hidden_act", c.hidden_act);
  c.downsample_in_first_stage = cfg_get<bool>(bc, "downsample_in_first_stage", false);
  c.downsample_in_bottleneck = cfg_get<bool>(bc, "downsample_in_bottleneck", false);
  if (c.layer_type != "bottleneck" && c.layer_type != "basic")
    throw ModelError("backbone_config.layer_type '" + c.layer_type + "' is not 'basic' or 'bottleneck'");
  if (c.depths.size() != c.hidden_sizes.size())
    throw ModelError("backbone_config: depths and hidden_sizes differ in length");
  // A ResNet stage always builds its first layer, whatever its depth: a depth below 1 would be
  // silently one layer in the reference and none here.
  for (int64_t d : c.depths)
    if (d < 1) throw ModelError("config key 'backbone_config.depths' has a value " + std::to_string(d) + " below 1");

  std::vector<std::string> stage_names = {"stem"};
  for (size_t i = 1; i <= c.depths.size(); ++i) stage_names.push_back("stage" + std::to_string(i));
  std::vector<std::string> requested;
  if (cfg_has(bc, "out_features")) {
    requested = json_to<std::vector<std::string>>(bc["out_features"], "backbone_config.out_features");
  } else if (cfg_has(bc, "out_indices")) {
    for (int idx : json_to<std::vector<int>>(bc["out_indices"], "backbone_config.out_indices")) {
      int i = idx < 0 ? idx + static_cast<int>(stage_names.size()) : idx;
      if (i < 0 || i >= static_cast<int>(stage_names.size()))
        throw ModelError("backbone_config.out_indices: " + std::to_string(idx) + " is out of range");
      requested.push_back(stage_names[i]);
    }
  } else if (!has_backbone_config) {
    requested = default_out_features;
  } else {
    requested = {stage_names.back()};  // BackboneConfigMixin: the last stage by default
  }
  // Stage order, as the reference's backbones return them.
  for (auto& name : stage_names)
    if (std::find(requested.begin(), requested.end(), name) != requested.end()) c.out_features.push_back(name);
  if (c.out_features.size() != requested.size())
    throw ModelError("backbone_config.out_features: unknown stage name (expected stem or stage1..stage" +
                std::to_string(c.depths.size()) + ")");
  return c;
}

// ---- the ResNet ---------------------------------------------------------------------------------

namespace {

constexpr float kFrozenBatchNormEps = 1e-5f;

// A convolution followed by a frozen batch norm, folded: W' = W * s, b' = bias - mean * s with
// s = weight * rsqrt(var + eps) (FrozenBatchNorm2d's own arithmetic).
Conv2d conv_bn(const Weights& conv_w, const std::string& conv_name, const Weights& bn_w, int64_t out, int64_t in,
               int k, Conv2dOptions opt) {
  Tensor original = conv_w.get(conv_name, {out, in / opt.groups, k, k});
  Tensor weight = original.clone();
  release_file_pages(original);  // the folded copy replaces it
  Tensor gamma = bn_w.get("weight", {out});
  Tensor beta = bn_w.get("bias", {out});
  Tensor mean = bn_w.get("running_mean", {out});
  Tensor var = bn_w.get("running_var", {out});
  bn_w.ignore("num_batches_tracked");
  Tensor bias = Tensor::empty({out});
  const int64_t per_out = weight.numel() / out;
  float* wp = weight.f32();
  for (int64_t o = 0; o < out; ++o) {
    float s = gamma.f32()[o] * (1.0f / std::sqrt(var.f32()[o] + kFrozenBatchNormEps));
    bias.f32()[o] = beta.f32()[o] - mean.f32()[o] * s;
    for (int64_t i = 0; i < per_out; ++i) wp[o * per_out + i] *= s;
  }
  return Conv2d(weight, bias, opt);
}

Conv2dOptions conv_opts(int k, int stride, int dilation, Act act, int groups = 1) {
  Conv2dOptions o;
  o.stride_h = o.stride_w = stride;
  o.dilation_h = o.dilation_w = dilation;
  int pad = k == 1 ? 0 : dilation * (k - 1) / 2;
  o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = pad;
  o.groups = groups;
  o.act = act;
  o.blocked_maps = true;
  return o;
}

// One residual block: basic (conv1, conv2) or bottleneck (conv1, conv2, conv3); the last
// convolution takes the shortcut as its residual and applies the block's activation.
struct ResidualBlock {
  std::vector<Conv2d> convs;
  Conv2d shortcut;  // undefined: identity

  // Takes the input by value: the sum then accumulates in place in the shortcut (or in the input
  // itself when the caller hands over the only reference). With bfloat16 CPU layers the block's
  // output, read only by the next block's convolutions (and converted where a level is kept), stays
  // bfloat16, as does the shortcut's: no conversion of the residual stream between blocks.
  BlockedMap forward(BlockedMap x) const {
    BlockedMap h = x;
    for (size_t i = 0; i + 1 < convs.size(); ++i) h = convs[i].forward_to_layer(h);
    const Conv2d& last = convs.back();
    if (last.input_dtype() == DType::F32) {
      if (shortcut.defined()) return last.forward(h, shortcut.forward(x));
      return last.forward(h, std::move(x));
    }
    if (shortcut.defined()) return last.forward_to_layer(h, shortcut.forward_to_layer(x));
    return last.forward_to_layer(h, std::move(x));
  }
};

struct TimmResNetSpec {
  bool bottleneck;
  std::vector<int64_t> depths;
  int cardinality = 1;
  int base_width = 64;
};

TimmResNetSpec timm_spec(const std::string& name) {
  if (name == "resnet18") return {false, {2, 2, 2, 2}};
  if (name == "resnet34") return {false, {3, 4, 6, 3}};
  if (name == "resnet26") return {true, {2, 2, 2, 2}};
  if (name == "resnet50") return {true, {3, 4, 6, 3}};
  if (name == "resnet101") return {true, {3, 4, 23, 3}};
  if (name == "resnet152") return {true, {3, 8, 36, 3}};
  if (name == "resnext50_32x4d") return {true, {3, 4, 6, 3}, 32, 4};
  if (name == "resnext101_32x8d") return {true, {3, 4, 23, 3}, 32, 8};
  if (name == "wide_resnet50_2") return {true, {3, 4, 6, 3}, 1, 128};
  if (name == "wide_resnet101_2") return {true, {3, 4, 23, 3}, 1, 128};
  throw ModelError("timm backbone '" + name +
              "' is not supported (resnet18/26/34/50/101/152, resnext50_32x4d, resnext101_32x8d, "
              "wide_resnet50_2, wide_resnet101_2)");
}

}  // namespace

struct DetrConvEncoder::Impl {
  SwinBackbone swin;  // defined for model_type "swin"; the ResNet members below are then unused
  Conv2d stem;
  bool pool_before_stem_output = false;  // transformers' "stem" feature is after the max pool
  std::vector<std::vector<ResidualBlock>> stages;
  std::vector<int> out_levels;  // 0 = stem, i = stage i
};

DetrConvEncoder::DetrConvEncoder(const DetrBackboneConfig& cfg, const Weights& w) {
  auto impl = std::make_shared<Impl>();
  const Act relu = Act::Relu;
  if (!cfg.use_timm_backbone && cfg.model_type == "swin") {
    impl->swin = SwinBackbone(cfg.swin, w);
    channels_ = impl->swin.channels();
    impl_ = std::move(impl);
    return;
  }
  if (cfg.use_timm_backbone) {
    TimmResNetSpec spec = timm_spec(cfg.backbone);
    impl->stem = conv_bn(w, "conv1.weight", w.pp("bn1"), 64, cfg.num_channels, 7, conv_opts(7, 2, 1, relu));
    impl->pool_before_stem_output = false;
    const int expansion = spec.bottleneck ? 4 : 1;
    const int64_t planes_of[4] = {64, 128, 256, 512};
    const int output_stride = cfg.dilation ? 16 : 32;
    int64_t inplanes = 64;
    int net_stride = 4, dilation = 1, prev_dilation = 1;
    std::vector<int64_t> channels_all = {64};
    for (size_t s = 0; s < spec.depths.size(); ++s) {
      const int64_t planes = planes_of[s];
      int stride = s == 0 ? 1 : 2;
      if (net_stride >= output_stride) {
        dilation *= stride;
        stride = 1;
      } else {
        net_stride *= stride;
      }
      const int64_t outplanes = planes * expansion;
      const int64_t width = (planes * spec.base_width / 64) * spec.cardinality;
      Weights lw = w.pp("layer" + std::to_string(s + 1));
      std::vector<ResidualBlock> blocks;
      for (int64_t b = 0; b < spec.depths[s]; ++b) {
        Weights bw = lw.pp(b);
        const int bstride = b == 0 ? stride : 1;
        const int first_dilation = prev_dilation;
        ResidualBlock blk;
        if (spec.bottleneck) {
          blk.convs.push_back(conv_bn(bw, "conv1.weight", bw.pp("bn1"), width, inplanes, 1, conv_opts(1, 1, 1, relu)));
          Conv2dOptions o2 = conv_opts(3, bstride, first_dilation, relu, spec.cardinality);
          blk.convs.push_back(conv_bn(bw, "conv2.weight", bw.pp("bn2"), width, width, 3, o2));
          blk.convs.push_back(
              conv_bn(bw, "conv3.weight", bw.pp("bn3"), outplanes, width, 1, conv_opts(1, 1, 1, relu)));
        } else {
          blk.convs.push_back(conv_bn(bw, "conv1.weight", bw.pp("bn1"), planes, inplanes, 3,
                                      conv_opts(3, bstride, first_dilation, relu)));
          blk.convs.push_back(
              conv_bn(bw, "conv2.weight", bw.pp("bn2"), outplanes, planes, 3, conv_opts(3, 1, dilation, relu)));
        }
        if (b == 0 && (stride != 1 || inplanes != outplanes)) {
          Weights dw = bw.pp("downsample");
          blk.shortcut = conv_bn(dw, "0.weight", dw.pp("1"), outplanes, inplanes, 1,
                                 conv_opts(1, stride, 1, Act::None));
        }
        blocks.push_back(std::move(blk));
        prev_dilation = dilation;
        inplanes = outplanes;
      }
      impl->stages.push_back(std::move(blocks));
      channels_all.push_back(outplanes);
    }
    for (int idx : cfg.out_indices) {
      if (idx < 0 || idx > static_cast<int>(spec.depths.size()))
        throw ModelError("timm backbone out_indices: " + std::to_string(idx) + " is out of range 0.." +
                    std::to_string(spec.depths.size()));
      impl->out_levels.push_back(idx);
      channels_.push_back(channels_all[idx]);
    }
  } else {
    const Act act = act_from_name(cfg.hidden_act);
    Weights ew = w.pp("embedder").pp("embedder");
    impl->stem = conv_bn(ew.pp("convolution"), "weight", ew.pp("normalization"), cfg.embedding_size,
                         cfg.num_channels, 7, conv_opts(7, 2, 1, act));
    impl->pool_before_stem_output = true;
    const bool bottleneck = cfg.layer_type == "bottleneck";
    std::vector<int64_t> channels_all = {cfg.embedding_size};
    int64_t in = cfg.embedding_size;
    for (size_t s = 0; s < cfg.depths.size(); ++s) {
      const int64_t out = cfg.hidden_sizes[s];
      const int stride = s == 0 ? (cfg.downsample_in_first_stage ? 2 : 1) : 2;
      Weights sw = w.pp("encoder").pp("stages").pp(static_cast<int64_t>(s)).pp("layers");
      std::vector<ResidualBlock> blocks;
      for (int64_t b = 0; b < cfg.depths[s]; ++b) {
        Weights bw = sw.pp(b);
        const int64_t bin = b == 0 ? in : out;
        const int bstride = b == 0 ? stride : 1;
        Weights lw = bw.pp("layer");
        auto conv_layer = [&](int idx, int64_t o, int64_t i, int k, int st, Act a) {
          Weights cw = lw.pp(idx);
          return conv_bn(cw.pp("convolution"), "weight", cw.pp("normalization"), o, i, k, conv_opts(k, st, 1, a));
        };
        // The block's inner ResNetConvLayers keep their default activation, "relu", whatever
        // hidden_act says; hidden_act is applied only after the residual sum (and in the stem).
        ResidualBlock blk;
        if (bottleneck) {
          const int64_t reduced = out / 4;
          const bool in_1x1 = cfg.downsample_in_bottleneck;
          blk.convs.push_back(conv_layer(0, reduced, bin, 1, in_1x1 ? bstride : 1, Act::Relu));
          blk.convs.push_back(conv_layer(1, reduced, reduced, 3, in_1x1 ? 1 : bstride, Act::Relu));
          blk.convs.push_back(conv_layer(2, out, reduced, 1, 1, act));
        } else {
          blk.convs.push_back(conv_layer(0, out, bin, 3, bstride, Act::Relu));
          blk.convs.push_back(conv_layer(1, out, out, 3, 1, act));
        }
        if (bin != out || bstride != 1) {
          Weights scw = bw.pp("shortcut");
          blk.shortcut = conv_bn(scw.pp("convolution"), "weight", scw.pp("normalization"), out, bin, 1,
                                 conv_opts(1, bstride, 1, Act::None));
        }
        blocks.push_back(std::move(blk));
      }
      impl->stages.push_back(std::move(blocks));
      channels_all.push_back(out);
      in = out;
    }
    for (auto& name : cfg.out_features) {
      int idx = name == "stem" ? 0 : std::stoi(name.substr(5));
      impl->out_levels.push_back(idx);
      channels_.push_back(channels_all[idx]);
    }
  }
  if (impl->out_levels.empty()) throw ModelError("DETR backbone: no output feature level selected");
  impl_ = std::move(impl);
}

std::vector<DetrFeatureMap> DetrConvEncoder::forward(const Tensor& pixel_values, const Tensor& pixel_mask,
                                                     bool last_level_only) const {
  if (!impl_) throw Error("DetrConvEncoder: not built");
  if (pixel_values.dim() != 4) throw Error("pixel_values must be [B, C, H, W], got " + shape_str(pixel_values.shape()));
  const int64_t B = pixel_values.size(0), H = pixel_values.size(2), W = pixel_values.size(3);
  Tensor mask = pixel_mask;
  if (!mask.defined()) {
    mask = Tensor::empty({B, H, W}, DType::U8);
    std::fill_n(mask.data<uint8_t>(), mask.numel(), uint8_t(1));
  } else if (mask.shape() != Shape{B, H, W}) {
    throw Error("pixel_mask must be " + shape_str({B, H, W}) + ", got " + shape_str(mask.shape()));
  }

  if (impl_->swin.defined()) {
    std::vector<DetrFeatureMap> out;
    for (Tensor& f : impl_->swin.forward(pixel_values))
      out.push_back({f, downsample_pixel_mask(mask, f.size(1), f.size(2))});
    if (last_level_only) out.erase(out.begin(), out.end() - 1);
    return out;
  }
  const int last = *std::max_element(impl_->out_levels.begin(), impl_->out_levels.end());
  // Only the requested levels are kept: an unrequested one (the stem's, for DETR: 55 MB at 800x1066;
  // with last_level_only, all but the last: DETR's first three, 96 MB) is freed as soon as the next
  // stage has read it.
  std::vector<Tensor> levels(last + 1);
  auto requested = [&](int level) {
    if (last_level_only) return level == impl_->out_levels.back();
    return std::find(impl_->out_levels.begin(), impl_->out_levels.end(), level) != impl_->out_levels.end();
  };
  // The maps stay in the convolutions' own layout from the stem's output to the last block; only
  // the levels the model reads are converted to channels-last.
  BlockedMap x = impl_->stem.forward(BlockedMap::from_nchw(pixel_values));
  if (!impl_->pool_before_stem_output && requested(0)) levels[0] = x.to_nhwc();
  if (last > 0 || impl_->pool_before_stem_output) {
    x = max_pool2d(x, 3, 2, 1);
    if (impl_->pool_before_stem_output && requested(0)) levels[0] = x.to_nhwc();
  }
  for (int s = 1; s <= last; ++s) {
    for (auto& blk : impl_->stages[s - 1]) x = blk.forward(std::move(x));
    if (requested(s)) levels[s] = x.to_nhwc();
  }
  std::vector<DetrFeatureMap> out;
  for (int idx : impl_->out_levels) {
    if (!requested(idx)) continue;
    const Tensor& f = levels[idx];
    out.push_back({f, downsample_pixel_mask(mask, f.size(1), f.size(2))});
  }
  return out;
}

// ---- masks and position embeddings --------------------------------------------------------------

int64_t nearest_source_index(int64_t dst, int64_t in, int64_t out) {
  if (in == out) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  return std::min(static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale)), in - 1);
}

Tensor downsample_pixel_mask(const Tensor& mask, int64_t h, int64_t w) {
  if (mask.dim() != 3) throw Error("pixel_mask must be [B, H, W], got " + shape_str(mask.shape()));
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  Tensor m = mask.dtype() == DType::F32 ? mask : mask.to(DType::F32);
  const float* src = m.f32();
  Tensor out = Tensor::empty({B, h, w}, DType::U8);
  uint8_t* dst = out.data<uint8_t>();
  std::vector<int64_t> xs(w);
  for (int64_t j = 0; j < w; ++j) xs[j] = nearest_source_index(j, W, w);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i) {
      const float* row = src + (b * H + nearest_source_index(i, H, h)) * W;
      for (int64_t j = 0; j < w; ++j) dst[(b * h + i) * w + j] = row[xs[j]] != 0.0f;
    }
  return out;
}

namespace {
// dim_t = temperature ** (2 * (i // 2) / F), in float32 like the reference.
Tensor sine_dim_t(int64_t F, float temperature) {
  Tensor dim_t = Tensor::empty({F});
  for (int64_t i = 0; i < F; ++i)
    dim_t.f32()[i] = std::pow(temperature, static_cast<float>(2 * (i / 2)) / static_cast<float>(F));
  return dim_t;
}
}  // namespace

Tensor sine_position_embedding(const Tensor& mask, const SinePositionEmbeddingOptions& opt, Device device) {
  if (mask.dim() != 3 || mask.dtype() != DType::U8) throw Error("sine_position_embedding: mask must be uint8 [B, h, w]");
  const int64_t B = mask.size(0), h = mask.size(1), w = mask.size(2), F = opt.num_position_features;
  const Tensor dim_t = sine_dim_t(F, opt.temperature);
  // The cumulative sums (cheap) here; the 2F sines and cosines per position where they will be used.
  Tensor y_embed = Tensor::empty({B * h * w}), x_embed = Tensor::empty({B * h * w});
  const uint8_t* m = mask.data<uint8_t>();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* mb = m + b * h * w;
    float* ye = y_embed.f32() + b * h * w;
    float* xe = x_embed.f32() + b * h * w;
    for (int64_t j = 0; j < w; ++j) {  // cumsum over rows
      float acc = 0;
      for (int64_t i = 0; i < h; ++i) ye[i * w + j] = acc += mb[i * w + j];
    }
    for (int64_t i = 0; i < h; ++i) {  // cumsum over columns
      float acc = 0;
      for (int64_t j = 0; j < w; ++j) xe[i * w + j] = acc += mb[i * w + j];
    }
    if (opt.normalize) {
      const float eps = 1e-6f, off = opt.deformable_offset ? 0.5f : 0.0f;
      // In this order the normalisers (the last row, each row's last column) change last.
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) {
          ye[i * w + j] = (ye[i * w + j] - off) / (ye[(h - 1) * w + j] + eps) * opt.scale;
          xe[i * w + j] = (xe[i * w + j] - off) / (xe[i * w + w - 1] + eps) * opt.scale;
        }
    }
  }
  return sine_expand(y_embed.to(device), x_embed.to(device), dim_t.to(device)).reshape({B, h, w, 2 * F});
}

Tensor sine_embed_coordinates(const Tensor& coords, int64_t num_pos_feats, float temperature, bool swap_xy) {
  if (coords.dim() < 1 || coords.size(-1) < 1 || coords.dtype() != DType::F32 || num_pos_feats < 1)
    throw Error("sine_embed_coordinates: expected float32 [..., n], got " + shape_str(coords.shape()));
  const int64_t n = coords.size(-1), rows = coords.numel() / n, F = num_pos_feats;
  const Tensor dim_t = sine_dim_t(F, temperature).to(coords.device());
  const Tensor scaled = scale(coords, 6.283185307179586f).reshape({rows, n});
  auto column = [&](int64_t c) { return narrow(scaled, 1, c, 1).reshape({rows}); };
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (swap_xy && n >= 2) std::swap(order[0], order[1]);
  // sine_expand embeds two coordinates at a time ([rows, 2F]); an odd last one takes half of a pair.
  std::vector<Tensor> parts;
  for (int64_t i = 0; i < n; i += 2) {
    if (i + 1 < n)
      parts.push_back(sine_expand(column(order[i]), column(order[i + 1]), dim_t));
    else
      parts.push_back(narrow(sine_expand(column(order[i]), column(order[i]), dim_t), 1, 0, F));
  }
  Shape shape = coords.shape();
  shape.back() = n * F;
  return (parts.size() == 1 ? parts[0] : cat(parts, 1)).reshape(shape);
}

LearnedPositionEmbedding::LearnedPositionEmbedding(const Weights& w, int64_t embedding_dim) : dim_(embedding_dim) {
  row_ = w.get("row_embeddings.weight", {50, embedding_dim});
  column_ = w.get("column_embeddings.weight", {50, embedding_dim});
}

Tensor LearnedPositionEmbedding::forward(int64_t batch, int64_t h, int64_t w) const {
  if (h > 50 || w > 50)
    throw Error("learned position embedding covers 50x50 feature positions, got " + std::to_string(h) + "x" +
                std::to_string(w));
  Tensor out = Tensor::empty({batch, h, w, 2 * dim_});
  float* o = out.f32();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        float* dst = o + ((b * h + i) * w + j) * 2 * dim_;
        std::copy_n(column_.f32() + j * dim_, dim_, dst);
        std::copy_n(row_.f32() + i * dim_, dim_, dst + dim_);
      }
  return out;
}

}  // namespace vf
