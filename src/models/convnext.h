// ConvNeXT and ConvNeXT V2 (the same network; V2 replaces layer scale with global response
// norm). Mirrors transformers' modeling_convnext.py; convnextv2.cpp registers the V2 classes.
#pragma once

#include <string>
#include <vector>

#include "core/ops.h"
#include "models/model.h"

namespace vf {

struct ConvNextConfig {
  int num_channels = 3;
  int patch_size = 4;
  int num_stages = 4;
  std::vector<int> hidden_sizes = {96, 192, 384, 768};
  std::vector<int> depths = {3, 3, 9, 3};
  std::string hidden_act = "gelu";
  double layer_norm_eps = 1e-12;
  double layer_scale_init_value = 1e-6;  // V1 only: a layer scale exists when > 0
  bool v2 = false;                        // ConvNeXT V2: GRN after the activation, no layer scale
  std::vector<std::string> stage_names;

  static ConvNextConfig from_json(const json& j, bool v2);
};

// LayerNorm over channels; on NHWC maps "channels_first" and "channels_last" are the same op.
struct ConvNextLayerNorm {
  Tensor weight, bias;
  float eps = 1e-6f;
  static ConvNextLayerNorm load(const Weights& w, int channels, float eps = 1e-6f);
  // out_dtype: what the layer reading the result takes (Linear/Conv2d::input_dtype).
  Tensor operator()(const Tensor& x, DType out_dtype = DType::F32) const { return layer_norm(x, weight, bias, eps, out_dtype); }
};

struct ConvNextEmbeddings {
  Conv2d patch_embeddings;
  ConvNextLayerNorm layernorm;
  static ConvNextEmbeddings load(const Weights& w, const ConvNextConfig& cfg);
  Tensor operator()(const Tensor& pixel_values_nhwc) const { return layernorm(patch_embeddings.forward(pixel_values_nhwc)); }
};

struct ConvNextLayer {
  Conv2d dwconv;
  ConvNextLayerNorm layernorm;
  Linear pwconv1, pwconv2;
  Act act = Act::Gelu;
  bool act_fused = true;
  Tensor grn_weight, grn_bias;  // V2
  Tensor layer_scale_parameter; // V1 (folded into pwconv2 at load)
  static ConvNextLayer load(const Weights& w, const ConvNextConfig& cfg, int dim);
  // The block's output accumulates in its input's storage when the caller hands that over (moves it).
  Tensor operator()(Tensor x) const;
};

struct ConvNextStage {
  bool has_downsampling = false;
  ConvNextLayerNorm downsampling_norm;
  Conv2d downsampling_conv;
  std::vector<ConvNextLayer> layers;
  static ConvNextStage load(const Weights& w, const ConvNextConfig& cfg, int in, int out, int stride, int depth);
  // In the layers' compute dtype (see ConvNextLayer::operator()).
  Tensor operator()(Tensor x) const;
};

struct ConvNextEncoder {
  std::vector<ConvNextStage> stages;
  static ConvNextEncoder load(const Weights& w, const ConvNextConfig& cfg);
};

struct ConvNextModel {
  ConvNextConfig config;
  ConvNextEmbeddings embeddings;
  ConvNextEncoder encoder;
  bool has_layernorm = true;  // the final pooled layernorm (absent in the backbone)
  Tensor layernorm_weight, layernorm_bias;
  static ConvNextModel load(const Weights& w, const ConvNextConfig& cfg, bool with_final_layernorm = true);
  // last_hidden_state and hidden_states.N are NCHW; pooler_output is [B, C].
  ModelOutput forward(const Tensor& pixel_values, bool output_hidden_states) const;
};

// The four task classes for either version (model_type "convnext" or "convnextv2").
std::unique_ptr<Model> build_convnext_model(const json& config, const std::string& arch, const Weights& w, bool v2);

}  // namespace vf
