// The convolutional backbone shared by the DETR family (DETR, Conditional DETR, Deformable DETR,
// DETA): a ResNet with frozen batch norm, the pixel mask brought down to every feature level, and
// the 2-D position embeddings computed from that mask.
//
// Readable beside modeling_detr.py's DetrConvEncoder / DetrSinePositionEmbedding /
// DetrLearnedPositionEmbedding (and their Deformable copies) and modeling_resnet.py.
//
// Two ResNets load here, chosen as the reference's `load_backbone` chooses:
//  - timm (`use_timm_backbone: true`, `backbone: "resnet50"`): tensor names conv1, bn1,
//    layer1.0.conv1 ... layer4.2.bn3, layerN.0.downsample.0/1; `dilation` (DC5) turns the last
//    stage's stride into dilation (timm's output_stride 16); `out_indices` pick layers (0 = stem
//    after act1, 1..4 = layer1..layer4).
//  - transformers ResNet (`backbone_config` with model_type "resnet"): embedder.embedder.*,
//    encoder.stages.N.layers.M.{layer.K,shortcut}.{convolution,normalization}; `out_features` pick
//    stages ("stem" = after the max pool, "stage1".."stage4").
// A `backbone_config` with model_type "swin" builds transformers' SwinBackbone instead (models/swin.h).
// Every BatchNorm is the reference's FrozenBatchNorm2d (eps 1e-5), folded into its convolution at
// load. Between its convolutions the maps stay in their blocked layout (core BlockedMap); the feature
// maps returned are channels-last, [B, h, w, C].
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "core/weights.h"
#include "models/swin.h"

namespace vf {

struct DetrBackboneConfig {
  bool use_timm_backbone = true;
  // backbone_config.model_type when timm is off: "resnet" or "swin".
  std::string model_type = "resnet";
  SwinConfig swin;
  // timm
  std::string backbone = "resnet50";
  bool dilation = false;            // DC5: output_stride 16
  std::vector<int> out_indices;     // timm feature indices, ascending
  // transformers ResNet (ResNetConfig, 4.37 defaults)
  int64_t embedding_size = 64;
  std::vector<int64_t> hidden_sizes = {256, 512, 1024, 2048};
  std::vector<int64_t> depths = {3, 4, 6, 3};
  std::string layer_type = "bottleneck";  // or "basic"
  std::string hidden_act = "relu";
  bool downsample_in_first_stage = false;
  bool downsample_in_bottleneck = false;
  std::vector<std::string> out_features;  // "stem", "stage1".."stageN", in stage order
  int64_t num_channels = 3;
};

// Reads the backbone part of a DETR-family config.json the way the family's config class does.
//  `timm_out_indices`: what the family passes to timm (DETR / Conditional DETR: {1,2,3,4};
//    Deformable DETR: num_feature_levels > 1 ? {2,3,4} : {4}); `backbone_kwargs.out_indices`
//    overrides it.
//  `default_out_features`: out_features of the default ResNetConfig when `backbone_config` is absent
//    and timm is off (DETR: {"stage4"}; DETA: {"stage2","stage3","stage4"}).
//  `timm_default`: the family's use_timm_backbone default (true for DETR, Conditional and
//    Deformable DETR; DETA has no timm option: pass false).
DetrBackboneConfig read_detr_backbone_config(const json& config, const std::vector<int>& timm_out_indices,
                                             const std::vector<std::string>& default_out_features,
                                             bool timm_default = true);

// One feature level: the map and the pixel mask at its resolution.
struct DetrFeatureMap {
  Tensor features;  // float32 [B, h, w, C] (channels-last)
  Tensor mask;      // uint8 [B, h, w], 1 on real pixels, 0 on padding
};

// DetrConvEncoder: the backbone network plus the mask downsampling.
class DetrConvEncoder {
 public:
  DetrConvEncoder() = default;
  // `w` is scoped to the network itself: DETR-style checkpoints "model.backbone.conv_encoder.model",
  // DETA "model.backbone.model".
  DetrConvEncoder(const DetrBackboneConfig& cfg, const Weights& w);
  // pixel_values float32 [B, C, H, W] (as the processor returns them); pixel_mask [B, H, W] of any
  // numeric dtype, nonzero on real pixels (undefined: all ones). One entry per selected level, in
  // order of increasing stride; with `last_level_only`, the last level alone (a caller that reads no
  // other: the others are neither converted nor kept, and their memory is reused as the network goes on).
  std::vector<DetrFeatureMap> forward(const Tensor& pixel_values, const Tensor& pixel_mask,
                                      bool last_level_only = false) const;
  // Channels of each returned level (the reference's backbone.channels).
  const std::vector<int64_t>& intermediate_channel_sizes() const { return channels_; }
  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
  std::vector<int64_t> channels_;
};

// The source index F.interpolate(mode="nearest") reads for output index `dst` when resizing
// `in` -> `out` elements (scale in/out computed in float, as PyTorch does).
int64_t nearest_source_index(int64_t dst, int64_t in, int64_t out);

// F.interpolate(mask[None].float(), size=(h, w)).bool()[0] (mode "nearest"): mask [B, H, W] of any
// numeric dtype -> uint8 [B, h, w].
Tensor downsample_pixel_mask(const Tensor& mask, int64_t h, int64_t w);

// The sine position embedding of DetrSinePositionEmbedding (`deformable_offset` false) and
// DeformableDetrSinePositionEmbedding (`deformable_offset` true: cumsum - 0.5 before normalising).
struct SinePositionEmbeddingOptions {
  int64_t num_position_features = 64;  // per axis; the embedding has 2x this many channels
  float temperature = 10000.0f;
  bool normalize = false;
  float scale = 6.283185307179586f;  // 2 pi
  bool deformable_offset = false;
};
// mask: uint8 [B, h, w] (1 on real pixels) -> float32 [B, h, w, 2F]: F channels of y then F of x,
// i.e. the reference's [B, 2F, h, w] in channels-last order (flatten to [B, h*w, 2F] with reshape).
Tensor sine_position_embedding(const Tensor& mask, const SinePositionEmbeddingOptions& opt,
                               Device device = Device::cpu());  // the embedding on `device`

// Each coordinate c of coords [..., n] as num_pos_feats interleaved sin/cos features of
// c * 2 pi / temperature^(2 (i // 2) / num_pos_feats) -> [..., n * num_pos_feats]: the embedding of
// Conditional DETR's reference points (gen_sine_position_embeddings, `swap_xy`: the first two
// coordinates trade places, DETR's [y, x] order) and of two-stage proposals (get_proposal_pos_embed).
// On the device of coords.
Tensor sine_embed_coordinates(const Tensor& coords, int64_t num_pos_feats, float temperature, bool swap_xy);

// DetrLearnedPositionEmbedding: row_embeddings / column_embeddings, 50 positions each.
class LearnedPositionEmbedding {
 public:
  LearnedPositionEmbedding() = default;
  // `w` scoped to the module (holds row_embeddings.weight, column_embeddings.weight [50, dim]).
  LearnedPositionEmbedding(const Weights& w, int64_t embedding_dim);
  // -> float32 [batch, h, w, 2*dim]: column (x) embedding then row (y) embedding. Throws past 50.
  Tensor forward(int64_t batch, int64_t h, int64_t w) const;
  bool defined() const { return row_.defined(); }

 private:
  Tensor row_, column_;
  int64_t dim_ = 0;
};

}  // namespace vf
