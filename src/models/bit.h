// BiT (Big Transfer): ResNet v2 with weight-standardised convolutions and group norm.
// Mirrors transformers' modeling_bit.py.
#pragma once

#include <string>
#include <vector>

#include "core/ops.h"
#include "models/model.h"

namespace vf {

struct BitConfig {
  int num_channels = 3;
  int embedding_size = 64;
  std::vector<int> hidden_sizes = {256, 512, 1024, 2048};
  std::vector<int> depths = {3, 4, 6, 3};
  std::string layer_type = "preactivation";  // or "bottleneck"
  std::string hidden_act = "relu";
  std::string global_padding;                // "", "SAME" or "VALID" (None in the reference)
  int num_groups = 32;
  bool embedding_dynamic_padding = false;
  int output_stride = 32;
  int width_factor = 1;
  std::vector<std::string> stage_names;      // "stem", "stage1", ...

  static BitConfig from_json(const json& j);
};

// Conv2d whose weights are standardised once at load (per output channel, biased variance).
struct WeightStandardizedConv2d {
  Conv2d conv;
  static WeightStandardizedConv2d load(const Weights& w, const BitConfig& cfg, int in, int out, int kernel,
                                       int stride = 1, int dilation = 1, float eps = 1e-8f);
  Tensor operator()(const Tensor& x) const { return conv.forward(x); }
};

struct BitGroupNormActivation {
  Tensor weight, bias;
  int groups = 32;
  Act act = Act::None;
  static BitGroupNormActivation load(const Weights& w, const BitConfig& cfg, int channels, bool apply_activation = true);
  Tensor operator()(const Tensor& x) const;
  // For an output only `next` reads: in the dtype it takes as it is (bfloat16 under --dtype bfloat16).
  Tensor operator()(const Tensor& x, const WeightStandardizedConv2d& next) const;
};

struct BitEmbeddings {
  WeightStandardizedConv2d convolution;
  bool pad_before_pool = false;  // ConstantPad2d(1) when global_padding is not SAME
  bool dynamic_pool_padding = false;
  bool has_norm = false;
  BitGroupNormActivation norm;
  static BitEmbeddings load(const Weights& w, const BitConfig& cfg);
  Tensor operator()(const Tensor& pixel_values_nhwc) const;
};

struct BitDownsampleConv {
  WeightStandardizedConv2d conv;
  bool has_norm = false;
  BitGroupNormActivation norm;
  Tensor operator()(const Tensor& x) const;
};

// One bottleneck block: pre-activation (v2) or plain (v1.5) per config.layer_type.
struct BitBottleneckLayer {
  bool preactivation = true;
  bool has_downsample = false;
  BitDownsampleConv downsample;
  BitGroupNormActivation norm1, norm2, norm3;
  WeightStandardizedConv2d conv1, conv2, conv3;
  Act activation = Act::Relu;
  static BitBottleneckLayer load(const Weights& w, const BitConfig& cfg, int in, int out, int stride, int dilation,
                                 int first_dilation, bool is_first_layer);
  // Takes the input by value: the residual sum then accumulates in place in it when the caller hands
  // over the only reference.
  Tensor operator()(Tensor x) const;
};

struct BitStage {
  std::vector<BitBottleneckLayer> layers;
  Tensor operator()(Tensor x) const;
};

struct BitEncoder {
  std::vector<BitStage> stages;
  static BitEncoder load(const Weights& w, const BitConfig& cfg);
};

struct BitModel {
  BitConfig config;
  BitEmbeddings embedder;
  BitEncoder encoder;
  bool has_norm = false;
  BitGroupNormActivation norm;
  static BitModel load(const Weights& w, const BitConfig& cfg);
  // Outputs in NCHW: last_hidden_state, pooler_output, hidden_states.N (when asked).
  ModelOutput forward(const Tensor& pixel_values, bool output_hidden_states) const;
};

}  // namespace vf
