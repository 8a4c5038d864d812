// DeiT (Touvron et al., "Training data-efficient image transformers & distillation through
// attention"), as transformers' models/deit/modeling_deit.py.
#pragma once

#include <cstdint>
#include <string>

#include "core/config.h"

namespace vf {

// configuration_deit.py, every option with its default.
struct DeiTConfig {
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  std::string hidden_act = "gelu";
  float hidden_dropout_prob = 0.0f;           // training only
  float attention_probs_dropout_prob = 0.0f;  // training only
  float initializer_range = 0.02f;            // training only
  float layer_norm_eps = 1e-12f;
  int64_t image_size_h = 224, image_size_w = 224;  // image_size: int or [h, w]
  int64_t patch_size_h = 16, patch_size_w = 16;    // patch_size: int or [h, w]
  int64_t num_channels = 3;
  bool qkv_bias = true;
  int64_t encoder_stride = 16;
  int64_t pooler_output_size = 768;  // None -> hidden_size
  std::string pooler_act = "tanh";

  static DeiTConfig from_json(const json& config);
};

}  // namespace vf
