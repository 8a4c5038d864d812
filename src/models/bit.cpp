#include "models/bit.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>

#include "core/file_pages.h"
#include "models/common.h"
#include "models/image_classification.h"

#include <optional>

namespace vf {

BitConfig BitConfig::from_json(const json& j) {
  BitConfig c;
  c.num_channels = cfg_get(j, "num_channels", c.num_channels);
  c.embedding_size = cfg_get(j, "embedding_size", c.embedding_size);
  c.hidden_sizes = cfg_get(j, "hidden_sizes", c.hidden_sizes);
  c.depths = cfg_get(j, "depths", c.depths);
  c.layer_type = cfg_get(j, "layer_type", c.layer_type);
  c.hidden_act = cfg_get(j, "hidden_act", c.hidden_act);
  c.global_padding = cfg_get<std::string>(j, "global_padding", "");
  std::transform(c.global_padding.begin(), c.global_padding.end(), c.global_padding.begin(), ::toupper);
  c.num_groups = cfg_get(j, "num_groups", c.num_groups);
  c.embedding_dynamic_padding = cfg_get(j, "embedding_dynamic_padding", c.embedding_dynamic_padding);
  c.output_stride = cfg_get(j, "output_stride", c.output_stride);
  c.width_factor = cfg_get(j, "width_factor", c.width_factor);
  if (c.layer_type != "preactivation" && c.layer_type != "bottleneck")
    throw ModelError("BitConfig: layer_type '" + c.layer_type + "' is not preactivation or bottleneck");
  if (!c.global_padding.empty() && c.global_padding != "SAME" && c.global_padding != "VALID")
    throw ModelError("BitConfig: global_padding '" + c.global_padding + "' is not supported");
  if (c.depths.size() != c.hidden_sizes.size()) throw ModelError("BitConfig: depths and hidden_sizes differ in length");
  // The reference splits the drop-path rates by depths: a negative depth fails there.
  for (int64_t d : c.depths)
    if (d < 0) throw ModelError("config key 'depths' has a negative value " + std::to_string(d));
  c.stage_names = {"stem"};
  for (size_t i = 1; i <= c.depths.size(); ++i) c.stage_names.push_back("stage" + std::to_string(i));
  return c;
}

namespace {
int make_div(double value, int divisor = 8) {
  int v = std::max(divisor, static_cast<int>(value + divisor / 2.0) / divisor * divisor);
  if (v < 0.9 * value) v += divisor;
  return v;
}
}  // namespace

// get_padding_value: None -> symmetric; "SAME" -> static when stride 1 and the kernel is odd
// after dilation, else TF-style padding computed per input; "VALID" -> none.
WeightStandardizedConv2d WeightStandardizedConv2d::load(const Weights& w, const BitConfig& cfg, int in, int out,
                                                        int kernel, int stride, int dilation, float eps) {
  Tensor original = w.get("weight", {out, in, kernel, kernel});
  Tensor weight = original.clone();
  release_file_pages(original);  // the standardised copy replaces it
  int64_t fan = int64_t(in) * kernel * kernel;
  float* p = weight.f32();
  for (int o = 0; o < out; ++o) {
    float* row = p + o * fan;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < fan; ++i) mean += row[i];
    mean /= fan;
    for (int64_t i = 0; i < fan; ++i) var += (row[i] - mean) * (row[i] - mean);
    var /= fan;
    double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < fan; ++i) row[i] = float((row[i] - mean) * inv);
  }
  Conv2dOptions opt;
  opt.stride_h = opt.stride_w = stride;
  opt.dilation_h = opt.dilation_w = dilation;
  int symmetric = ((stride - 1) + dilation * (kernel - 1)) / 2;
  if (cfg.global_padding == "SAME") {
    if (stride == 1 && (dilation * (kernel - 1)) % 2 == 0) opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = symmetric;
    else opt.dynamic_same = true;
  } else if (cfg.global_padding.empty()) {
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = symmetric;
  }
  return {Conv2d(weight, Tensor(), opt)};
}

BitGroupNormActivation BitGroupNormActivation::load(const Weights& w, const BitConfig& cfg, int channels,
                                                    bool apply_activation) {
  BitGroupNormActivation n;
  n.weight = w.get("weight", {channels});
  n.bias = w.get("bias", {channels});
  n.groups = cfg.num_groups;
  n.act = apply_activation ? act_from_name(cfg.hidden_act) : Act::None;
  return n;
}

Tensor BitGroupNormActivation::operator()(const Tensor& x) const {
  return group_norm_nhwc(x, groups, weight, bias, 1e-5f, act);
}

Tensor BitGroupNormActivation::operator()(const Tensor& x, const WeightStandardizedConv2d& next) const {
  return group_norm_nhwc(x, groups, weight, bias, 1e-5f, act, next.conv.input_dtype());
}

BitEmbeddings BitEmbeddings::load(const Weights& w, const BitConfig& cfg) {
  BitEmbeddings e;
  e.convolution = WeightStandardizedConv2d::load(w.pp("convolution"), cfg, cfg.num_channels, cfg.embedding_size, 7, 2);
  e.pad_before_pool = cfg.global_padding != "SAME";
  e.dynamic_pool_padding = cfg.embedding_dynamic_padding;
  e.has_norm = cfg.layer_type != "preactivation";
  if (e.has_norm) e.norm = BitGroupNormActivation::load(w.pp("norm"), cfg, cfg.embedding_size);
  return e;
}

Tensor BitEmbeddings::operator()(const Tensor& pixel_values) const {
  Tensor x = convolution(pixel_values);
  if (pad_before_pool) x = pad_nhwc(x, 1, 1, 1, 1, 0.0f);
  if (has_norm) x = norm(x);
  // BitMaxPool2d: kernel 3, stride 2; the dynamic variant pads with zeros (not -inf) first.
  if (dynamic_pool_padding) {
    auto pad = [](int64_t size) { return std::max<int64_t>(((size + 1) / 2 - 1) * 2 + 3 - size, 0); };
    int64_t ph = pad(x.size(1)), pw = pad(x.size(2));
    if (ph > 0 || pw > 0)
      x = pad_nhwc(x, int(ph / 2), int(pw / 2), int(ph - ph / 2), int(pw - pw / 2), 0.0f);
  }
  return max_pool2d_nhwc(x, 3, 2, 0, 0, 0, 0);
}

Tensor BitDownsampleConv::operator()(const Tensor& x) const {
  Tensor y = conv(x);
  return has_norm ? norm(y) : y;
}

BitBottleneckLayer BitBottleneckLayer::load(const Weights& w, const BitConfig& cfg, int in, int out, int stride,
                                            int dilation, int first_dilation, bool is_first_layer) {
  BitBottleneckLayer l;
  l.preactivation = cfg.layer_type == "preactivation";
  int mid = make_div(out * 0.25);
  if (is_first_layer) {
    l.has_downsample = true;
    l.downsample.conv = WeightStandardizedConv2d::load(w.pp("downsample").pp("conv"), cfg, in, out, 1, stride);
    l.downsample.has_norm = !l.preactivation;
    if (!l.preactivation) l.downsample.norm = BitGroupNormActivation::load(w.pp("downsample").pp("norm"), cfg, out, false);
  }
  if (l.preactivation) {
    // The pre-activation block applies no dilation to its 3x3 convolution (as the reference).
    l.norm1 = BitGroupNormActivation::load(w.pp("norm1"), cfg, in);
    l.conv1 = WeightStandardizedConv2d::load(w.pp("conv1"), cfg, in, mid, 1);
    l.norm2 = BitGroupNormActivation::load(w.pp("norm2"), cfg, mid);
    l.conv2 = WeightStandardizedConv2d::load(w.pp("conv2"), cfg, mid, mid, 3, stride);
    l.norm3 = BitGroupNormActivation::load(w.pp("norm3"), cfg, mid);
    l.conv3 = WeightStandardizedConv2d::load(w.pp("conv3"), cfg, mid, out, 1);
  } else {
    l.conv1 = WeightStandardizedConv2d::load(w.pp("conv1"), cfg, in, mid, 1);
    l.norm1 = BitGroupNormActivation::load(w.pp("norm1"), cfg, mid);
    l.conv2 = WeightStandardizedConv2d::load(w.pp("conv2"), cfg, mid, mid, 3, stride, first_dilation);
    l.norm2 = BitGroupNormActivation::load(w.pp("norm2"), cfg, mid);
    l.conv3 = WeightStandardizedConv2d::load(w.pp("conv3"), cfg, mid, out, 1);
    l.norm3 = BitGroupNormActivation::load(w.pp("norm3"), cfg, out, false);
    l.activation = act_from_name(cfg.hidden_act);
  }
  return l;
}

Tensor BitBottleneckLayer::operator()(Tensor hidden_states) const {
  if (preactivation) {
    // The normalised maps feed only convolutions (the downsample's too: it has no norm here).
    Tensor preact = norm1(hidden_states, conv1);
    Tensor shortcut = has_downsample ? downsample(preact) : std::move(hidden_states);
    Tensor x = conv1(preact);
    preact = Tensor();
    x = conv2(norm2(x, conv2));
    return conv3.conv.forward(norm3(x, conv3), std::move(shortcut));  // in place unless the caller keeps the input
  }
  Tensor shortcut = has_downsample ? downsample(hidden_states) : hidden_states;
  Tensor x = norm1(conv1(hidden_states), conv2);
  x = norm2(conv2(x), conv3);
  x = norm3(conv3(x));
  add_inplace(x, shortcut);
  act_inplace(x, activation);
  return x;
}

Tensor BitStage::operator()(Tensor h) const {
  for (auto& layer : layers) h = layer(std::move(h));
  return h;
}

BitEncoder BitEncoder::load(const Weights& w, const BitConfig& cfg) {
  BitEncoder e;
  int prev = cfg.embedding_size;
  int current_stride = 4, dilation = 1;
  for (size_t s = 0; s < cfg.depths.size(); ++s) {
    int out = make_div(double(cfg.hidden_sizes[s]) * cfg.width_factor);
    int stride = s == 0 ? 1 : 2;
    if (current_stride >= cfg.output_stride) {
      dilation *= stride;
      stride = 1;
    }
    BitStage stage;
    int first_dilation = (dilation == 1 || dilation == 2) ? 1 : 2;
    Weights ws = w.pp("stages").pp(int64_t(s)).pp("layers");
    for (int i = 0; i < cfg.depths[s]; ++i) {
      stage.layers.push_back(BitBottleneckLayer::load(ws.pp(i), cfg, i == 0 ? prev : out, out, i == 0 ? stride : 1,
                                                      dilation, first_dilation, i == 0));
      first_dilation = dilation;
    }
    e.stages.push_back(std::move(stage));
    prev = out;
    current_stride *= stride;
  }
  return e;
}

BitModel BitModel::load(const Weights& w, const BitConfig& cfg) {
  BitModel m;
  m.config = cfg;
  m.embedder = BitEmbeddings::load(w.pp("embedder"), cfg);
  m.encoder = BitEncoder::load(w.pp("encoder"), cfg);
  m.has_norm = cfg.layer_type == "preactivation";
  if (m.has_norm) m.norm = BitGroupNormActivation::load(w.pp("norm"), cfg, cfg.hidden_sizes.back());
  return m;
}

ModelOutput BitModel::forward(const Tensor& pixel_values, bool output_hidden_states) const {
  if (pixel_values.dim() != 4 || pixel_values.size(1) != config.num_channels)
    throw Error("BiT expects pixel_values [B, " + std::to_string(config.num_channels) + ", H, W], got " +
                shape_str(pixel_values.shape()));
  ModelOutput out;
  std::vector<Tensor> hidden_states;
  Tensor h = embedder(nchw_to_nhwc(pixel_values));
  for (auto& stage : encoder.stages) {
    if (output_hidden_states) hidden_states.push_back(nhwc_to_nchw(h));
    h = stage(std::move(h));
  }
  if (output_hidden_states) hidden_states.push_back(nhwc_to_nchw(h));
  if (has_norm) h = norm(h);
  out.set("last_hidden_state", nhwc_to_nchw(h));
  out.set("pooler_output", as_nchw_1x1(global_avg_pool_nhwc(h)));
  if (output_hidden_states) out.set_list("hidden_states", hidden_states);
  return out;
}

namespace {

class BitForTask : public Model {
 public:
  BitForTask(const json& config, const std::string& arch, const Weights& w) : config_(config), arch_(arch) {
    BitConfig cfg = BitConfig::from_json(config);
    bit_ = BitModel::load(arch == "BitModel" ? base_model_weights(w, "bit") : w.pp("bit"), cfg);
    if (arch == "BitForImageClassification") {
      classifier_.emplace(cfg.hidden_sizes.back(), config_num_labels(config), w.pp("classifier").pp("1"));
    }
    if (arch == "BitBackbone") out_indices_ = backbone_out_indices(config, cfg.stage_names);
  }

  ModelOutput forward(const ModelInputs& in) const override {
    if (arch_ == "BitModel") return bit_.forward(in.pixel_values, in.output_hidden_states);
    if (arch_ == "BitBackbone") {
      ModelOutput base = bit_.forward(in.pixel_values, true);
      ModelOutput out;
      for (size_t i = 0; i < out_indices_.size(); ++i)
        out.set("feature_maps." + std::to_string(i), base.get("hidden_states." + std::to_string(out_indices_[i])));
      if (in.output_hidden_states)
        for (auto& [k, v] : base.items())
          if (k.rfind("hidden_states.", 0) == 0) out.set(k, v);
      return out;
    }
    ModelOutput base = bit_.forward(in.pixel_values, in.output_hidden_states);
    const Tensor& pooled = base.get("pooler_output");
    Tensor flat = pooled.reshape({pooled.size(0), pooled.size(1)});
    Tensor logits = classifier_->forward(flat);
    ModelOutput out;
    if (in.labels.defined()) out.set("loss", classification_loss(logits, in.labels, config_));
    out.set("logits", logits);
    for (auto& [k, v] : base.items())
      if (k.rfind("hidden_states.", 0) == 0) out.set(k, v);
    return out;
  }

 private:
  json config_;
  std::string arch_;
  BitModel bit_;
  std::optional<ClassifierHead> classifier_;
  std::vector<int> out_indices_;
};

}  // namespace

void register_bit_models() {
  register_model({"bit",
                  {"BitModel", "BitForImageClassification", "BitBackbone"},
                  [](const json& config, const std::string& arch, const Weights& w) -> std::unique_ptr<Model> {
                    return std::make_unique<BitForTask>(config, arch, w);
                  }});
}

}  // namespace vf
