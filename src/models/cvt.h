// CvT (Wu et al., "CvT: Introducing Convolutions to Vision Transformers"), as transformers'
// models/cvt/modeling_cvt.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace vf {

// configuration_cvt.py: one entry per stage in every list; the number of stages is len(depth).
struct CvtConfig {
  int64_t num_channels = 3;
  std::vector<int64_t> patch_sizes = {7, 3, 3};
  std::vector<int64_t> patch_stride = {4, 2, 2};
  std::vector<int64_t> patch_padding = {2, 1, 1};
  std::vector<int64_t> embed_dim = {64, 192, 384};
  std::vector<int64_t> num_heads = {1, 3, 6};
  std::vector<int64_t> depth = {1, 2, 10};
  std::vector<double> mlp_ratio = {4.0, 4.0, 4.0};
  std::vector<double> attention_drop_rate = {0.0, 0.0, 0.0};  // training only
  std::vector<double> drop_rate = {0.0, 0.0, 0.0};            // training only
  std::vector<double> drop_path_rate = {0.0, 0.0, 0.1};       // training only
  std::vector<bool> qkv_bias = {true, true, true};
  std::vector<bool> cls_token = {false, false, true};
  std::vector<std::string> qkv_projection_method = {"dw_bn", "dw_bn", "dw_bn"};
  std::vector<int64_t> kernel_qkv = {3, 3, 3};
  std::vector<int64_t> padding_kv = {1, 1, 1};
  std::vector<int64_t> stride_kv = {2, 2, 2};
  std::vector<int64_t> padding_q = {1, 1, 1};
  std::vector<int64_t> stride_q = {1, 1, 1};
  double initializer_range = 0.02;  // training only
  double layer_norm_eps = 1e-12;    // unused by the reference: its LayerNorms keep PyTorch's 1e-5

  int64_t num_stages() const { return static_cast<int64_t>(depth.size()); }
  static CvtConfig from_json(const json& config);
};

}  // namespace vf
