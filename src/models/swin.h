// Swin Transformer as a backbone (transformers' SwinBackbone), readable beside modeling_swin.py:
// SwinEmbeddings (SwinPatchEmbeddings + norm), SwinEncoder of SwinStages, each a run of SwinLayers
// (window attention with a relative position bias, every second layer on windows shifted by half a
// window) and a SwinPatchMerging, then one layer norm per returned stage (hidden_states_norms).
//
// The DETR family builds it from `backbone_config` with model_type "swin" (DETA's
// jozhang97/deta-swin-large); weights keep the Hub's names below the backbone's prefix
// (embeddings.patch_embeddings.projection, encoder.layers.N.blocks.M.attention.self.query, ...,
// encoder.layers.N.downsample.reduction, hidden_states_norms.stageN).
//
// SwinBackbone runs its encoder with always_partition: every layer partitions windows of
// window_size and keeps its shift whatever the map size (a map smaller than a window is padded up
// to one), unlike SwinModel, which shrinks the window to small maps.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "core/weights.h"

namespace vf {

// SwinConfig (4.37 defaults) as far as the backbone reads it.
struct SwinConfig {
  int64_t image_size = 224;
  int64_t patch_size = 4;
  int64_t num_channels = 3;
  int64_t embed_dim = 96;
  std::vector<int64_t> depths = {2, 2, 6, 2};
  std::vector<int64_t> num_heads = {3, 6, 12, 24};
  int64_t window_size = 7;
  double mlp_ratio = 4.0;
  bool qkv_bias = true;
  std::string hidden_act = "gelu";
  bool use_absolute_embeddings = false;
  float layer_norm_eps = 1e-5f;
  // Indices into stage_names ("stem", "stage1".."stageN"), ascending: stageK is the output of
  // encoder layer K-1 before its patch merging; "stem" the embeddings.
  std::vector<int> out_indices;
};

// A `backbone_config` object with model_type "swin". Throws ModelError on values the reference
// cannot run either (heads that do not divide a stage's width, absolute position embeddings).
SwinConfig read_swin_config(const json& backbone_config);

// stage_names of SwinConfig: "stem", "stage1".."stage<len(depths)>".
std::vector<std::string> swin_stage_names(const SwinConfig& cfg);

// The relative_position_index buffer of SwinSelfAttention: int64 [window^2, window^2], entry (i, j)
// = (hi - hj + window - 1) * (2 window - 1) + (wi - wj + window - 1) for tokens i = (hi, wi),
// j = (hj, wj) in row-major order inside the window.
Tensor swin_relative_position_index(int64_t window);

// SwinLayer.get_attn_mask for an H x W (padded) map: float32 [windows, window^2, window^2], 0
// between tokens of the same region of the shifted map and -100 across regions (regions cut at
// H - window and H - shift, and likewise along W). Undefined when shift is 0.
Tensor swin_shifted_window_mask(int64_t H, int64_t W, int64_t window, int64_t shift);

class SwinBackbone {
 public:
  SwinBackbone() = default;
  // `w` scoped to the backbone (DETA: "model.backbone.model").
  SwinBackbone(const SwinConfig& cfg, const Weights& w);
  // pixel_values float32 [B, C, H, W] -> one channels-last map [B, h, w, C_k] per out index, in
  // stage order (the reference returns them NCHW).
  std::vector<Tensor> forward(const Tensor& pixel_values) const;
  // Channels of each returned map (BackboneMixin.channels).
  const std::vector<int64_t>& channels() const { return channels_; }
  bool defined() const { return impl_ != nullptr; }
  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
  std::vector<int64_t> channels_;
};

}  // namespace vf
