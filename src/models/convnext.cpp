#include "models/convnext.h"

#include "core/errors.h"
#include "core/file_pages.h"

#include "models/common.h"
#include "models/image_classification.h"

#include <optional>

namespace vf {

ConvNextConfig ConvNextConfig::from_json(const json& j, bool v2) {
  ConvNextConfig c;
  c.v2 = v2;
  c.num_channels = cfg_get(j, "num_channels", c.num_channels);
  c.patch_size = cfg_get(j, "patch_size", c.patch_size);
  c.num_stages = cfg_get(j, "num_stages", c.num_stages);
  c.hidden_sizes = cfg_get(j, "hidden_sizes", c.hidden_sizes);
  c.depths = cfg_get(j, "depths", c.depths);
  c.hidden_act = cfg_get(j, "hidden_act", c.hidden_act);
  c.layer_norm_eps = cfg_get(j, "layer_norm_eps", c.layer_norm_eps);
  if (!v2) c.layer_scale_init_value = cfg_get(j, "layer_scale_init_value", c.layer_scale_init_value);
  if (int(c.hidden_sizes.size()) < c.num_stages || int(c.depths.size()) < c.num_stages)
    throw ModelError("ConvNextConfig: hidden_sizes/depths shorter than num_stages");
  // The reference splits the drop-path rates by depths: a negative depth fails there.
  for (int64_t d : c.depths)
    if (d < 0) throw ModelError("config key 'depths' has a negative value " + std::to_string(d));
  c.stage_names = {"stem"};
  for (int i = 1; i <= c.num_stages; ++i) c.stage_names.push_back("stage" + std::to_string(i));
  return c;
}

ConvNextLayerNorm ConvNextLayerNorm::load(const Weights& w, int channels, float eps) {
  return {w.get("weight", {channels}), w.get("bias", {channels}), eps};
}

ConvNextEmbeddings ConvNextEmbeddings::load(const Weights& w, const ConvNextConfig& cfg) {
  ConvNextEmbeddings e;
  int c = cfg.hidden_sizes[0], p = cfg.patch_size;
  Conv2dOptions opt;
  opt.stride_h = opt.stride_w = p;
  e.patch_embeddings = Conv2d(w.pp("patch_embeddings").get("weight", {c, cfg.num_channels, p, p}),
                              w.pp("patch_embeddings").get("bias", {c}), opt);
  e.layernorm = ConvNextLayerNorm::load(w.pp("layernorm"), c);
  return e;
}

ConvNextLayer ConvNextLayer::load(const Weights& w, const ConvNextConfig& cfg, int dim) {
  ConvNextLayer l;
  Conv2dOptions dw;
  dw.pad_top = dw.pad_left = dw.pad_bottom = dw.pad_right = 3;
  dw.groups = dim;
  l.dwconv = Conv2d(w.pp("dwconv").get("weight", {dim, 1, 7, 7}), w.pp("dwconv").get("bias", {dim}), dw);
  l.layernorm = ConvNextLayerNorm::load(w.pp("layernorm"), dim);
  l.act = act_from_name(cfg.hidden_act);
  // Activations oneDNN cannot fuse run as a separate pass.
  l.act_fused = l.act == Act::Gelu || l.act == Act::GeluTanh || l.act == Act::Relu || l.act == Act::Silu ||
                l.act == Act::Sigmoid || l.act == Act::Tanh || l.act == Act::None;
  l.pwconv1 = Linear(w.pp("pwconv1").get("weight", {4 * dim, dim}), w.pp("pwconv1").get("bias", {4 * dim}),
                     l.act_fused ? l.act : Act::None);
  Tensor w2 = w.pp("pwconv2").get("weight", {dim, 4 * dim});
  Tensor b2 = w.pp("pwconv2").get("bias", {dim});
  if (cfg.v2) {
    l.grn_weight = w.pp("grn").get("weight", {1, 1, 1, 4 * dim}).reshape({4 * dim});
    l.grn_bias = w.pp("grn").get("bias", {1, 1, 1, 4 * dim}).reshape({4 * dim});
  } else if (cfg.layer_scale_init_value > 0) {
    // gamma * (x W^T + b) == x (gamma W)^T + gamma b: the layer scale folds into pwconv2.
    l.layer_scale_parameter = w.get("layer_scale_parameter", {dim});
    Tensor original = w2;
    w2 = w2.clone();
    b2 = b2.clone();
    release_file_pages(original);  // the scaled copy replaces it
    for (int o = 0; o < dim; ++o) {
      float g = l.layer_scale_parameter.f32()[o];
      for (int i = 0; i < 4 * dim; ++i) w2.f32()[o * 4 * dim + i] *= g;
      b2.f32()[o] *= g;
    }
  }
  l.pwconv2 = Linear(w2, b2);
  return l;
}

Tensor ConvNextLayer::operator()(Tensor features) const {
  Tensor x = layernorm(dwconv.forward(features), pwconv1.input_dtype());
  // The hidden layer in pwconv1's compute dtype where only pwconv2 reads it, or V2's response norm
  // on the CPU (which reads bfloat16; on a device it reads float32, and so does act_inplace).
  const bool grn_reads_it = grn_weight.defined() && pwconv1.input_dtype() == DType::BF16;
  x = act_fused && (!grn_weight.defined() || grn_reads_it) ? pwconv1.forward_to_layer(x) : pwconv1.forward(x);
  if (!act_fused) act_inplace(x, act);
  if (grn_weight.defined()) x = grn_nhwc(x, grn_weight, grn_bias, 1e-6f, pwconv2.input_dtype());
  // The sum in the residual stream's dtype, as PyTorch's autocast promotes it: float32 after the
  // embeddings' float32 norm, bfloat16 after a bfloat16 downsampling convolution (a bfloat16 CPU
  // model), which the next layer's depthwise convolution then reads without a conversion. In place
  // unless the caller keeps the input.
  if (features.dtype() == DType::F32) return pwconv2.forward(x, std::move(features));
  return pwconv2.forward_to_layer(x, std::move(features));
}

ConvNextStage ConvNextStage::load(const Weights& w, const ConvNextConfig& cfg, int in, int out, int stride, int depth) {
  ConvNextStage s;
  if (in != out || stride > 1) {
    s.has_downsampling = true;
    s.downsampling_norm = ConvNextLayerNorm::load(w.pp("downsampling_layer").pp("0"), in);
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = stride;
    s.downsampling_conv = Conv2d(w.pp("downsampling_layer").pp("1").get("weight", {out, in, 2, 2}),
                                 w.pp("downsampling_layer").pp("1").get("bias", {out}), opt);
  }
  for (int j = 0; j < depth; ++j) s.layers.push_back(ConvNextLayer::load(w.pp("layers").pp(j), cfg, out));
  return s;
}

Tensor ConvNextStage::operator()(Tensor x) const {
  Tensor h = std::move(x);
  if (has_downsampling) {
    const Tensor normed = downsampling_norm(h, downsampling_conv.input_dtype());
    // A bfloat16 residual stream where the layers compute in bfloat16 on the CPU (ConvNextLayer).
    h = downsampling_conv.input_dtype() == DType::BF16 ? downsampling_conv.forward_to_layer(normed)
                                                       : downsampling_conv.forward(normed);
  }
  for (auto& layer : layers) h = layer(std::move(h));
  return h;
}

ConvNextEncoder ConvNextEncoder::load(const Weights& w, const ConvNextConfig& cfg) {
  ConvNextEncoder e;
  int prev = cfg.hidden_sizes[0];
  for (int i = 0; i < cfg.num_stages; ++i) {
    e.stages.push_back(ConvNextStage::load(w.pp("stages").pp(i), cfg, prev, cfg.hidden_sizes[i], i > 0 ? 2 : 1, cfg.depths[i]));
    prev = cfg.hidden_sizes[i];
  }
  return e;
}

ConvNextModel ConvNextModel::load(const Weights& w, const ConvNextConfig& cfg, bool with_final_layernorm) {
  ConvNextModel m;
  m.config = cfg;
  m.embeddings = ConvNextEmbeddings::load(w.pp("embeddings"), cfg);
  m.encoder = ConvNextEncoder::load(w.pp("encoder"), cfg);
  m.has_layernorm = with_final_layernorm;
  if (with_final_layernorm) {
    m.layernorm_weight = w.pp("layernorm").get("weight", {cfg.hidden_sizes.back()});
    m.layernorm_bias = w.pp("layernorm").get("bias", {cfg.hidden_sizes.back()});
  }
  return m;
}

ModelOutput ConvNextModel::forward(const Tensor& pixel_values, bool output_hidden_states) const {
  if (pixel_values.dim() != 4 || pixel_values.size(1) != config.num_channels)
    throw Error("ConvNeXT expects pixel_values [B, " + std::to_string(config.num_channels) + ", H, W], got " +
                shape_str(pixel_values.shape()));
  ModelOutput out;
  std::vector<Tensor> hidden_states;
  // The stages' outputs are bfloat16 on a bfloat16 CPU model (the residual stream): float32 where
  // they are returned (to() hands a float32 tensor back as it is).
  Tensor h = embeddings(nchw_to_nhwc(pixel_values));
  if (output_hidden_states) hidden_states.push_back(h);
  for (auto& stage : encoder.stages) {
    h = stage(std::move(h));
    if (output_hidden_states) hidden_states.push_back(h.to(DType::F32));
  }
  h = h.to(DType::F32);
  out.set("last_hidden_state", nhwc_to_nchw(h));
  if (has_layernorm)
    out.set("pooler_output", layer_norm(global_avg_pool_nhwc(h), layernorm_weight, layernorm_bias, float(config.layer_norm_eps)));
  for (size_t i = 0; i < hidden_states.size(); ++i)
    out.set("hidden_states." + std::to_string(i), hidden_states[i]);  // NHWC; converted by the caller
  return out;
}

namespace {

class ConvNextForTask : public Model {
 public:
  ConvNextForTask(const json& config, const std::string& arch, const Weights& w, bool v2)
      : config_(config), arch_(arch) {
    ConvNextConfig cfg = ConvNextConfig::from_json(config, v2);
    std::string prefix = v2 ? "convnextv2" : "convnext";
    bool model_only = arch == "ConvNextModel" || arch == "ConvNextV2Model";
    backbone_ = arch == "ConvNextBackbone" || arch == "ConvNextV2Backbone";
    Weights base = model_only ? base_model_weights(w, prefix) : backbone_ ? w : w.pp(prefix);
    model_ = ConvNextModel::load(base, cfg, !backbone_);
    if (backbone_) {
      out_indices_ = backbone_out_indices(config, cfg.stage_names);
      for (int idx : out_indices_) {
        int channels = cfg.hidden_sizes[std::max(idx - 1, 0)];
        norms_.push_back(ConvNextLayerNorm::load(w.pp("hidden_states_norms").pp(cfg.stage_names[idx]), channels));
      }
    } else if (!model_only) {
      classifier_.emplace(cfg.hidden_sizes.back(), config_num_labels(config), w.pp("classifier"));
    }
  }

  ModelOutput forward(const ModelInputs& in) const override {
    bool want_hidden = in.output_hidden_states || backbone_;
    ModelOutput base = model_.forward(in.pixel_values, want_hidden);
    ModelOutput out;
    if (backbone_) {
      for (size_t i = 0; i < out_indices_.size(); ++i)
        out.set("feature_maps." + std::to_string(i),
                nhwc_to_nchw(norms_[i](base.get("hidden_states." + std::to_string(out_indices_[i])))));
    } else if (arch_.find("ForImageClassification") != std::string::npos) {
      const Tensor& pooled = base.get("pooler_output");
      Tensor logits = classifier_->forward(pooled);
      if (in.labels.defined()) out.set("loss", classification_loss(logits, in.labels, config_));
      out.set("logits", logits);
    } else {
      out.set("last_hidden_state", base.get("last_hidden_state"));
      out.set("pooler_output", base.get("pooler_output"));
    }
    if (in.output_hidden_states)
      for (auto& [k, v] : base.items())
        if (k.rfind("hidden_states.", 0) == 0) out.set(k, nhwc_to_nchw(v));
    return out;
  }

 private:
  json config_;
  std::string arch_;
  bool backbone_ = false;
  ConvNextModel model_;
  std::optional<ClassifierHead> classifier_;
  std::vector<int> out_indices_;
  std::vector<ConvNextLayerNorm> norms_;
};

}  // namespace

std::unique_ptr<Model> build_convnext_model(const json& config, const std::string& arch, const Weights& w, bool v2) {
  return std::make_unique<ConvNextForTask>(config, arch, w, v2);
}

void register_convnext_models() {
  register_model({"convnext",
                  {"ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"},
                  [](const json& config, const std::string& arch, const Weights& w) {
                    return build_convnext_model(config, arch, w, false);
                  }});
}

}  // namespace vf
