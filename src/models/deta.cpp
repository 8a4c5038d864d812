#include "models/deta.h"

#include <string>
#include <vector>

#include "core/boxes.h"
#include "core/errors.h"

namespace vf {

DeformableDetrConfig read_deta_config(const json& config) {
  DeformableDetrConfig d;
  d.num_queries = 900;
  d.max_position_embeddings = 2048;
  d.encoder_ffn_dim = 2048;
  d.decoder_ffn_dim = 1024;
  d.num_feature_levels = 5;
  d.two_stage = true;
  d.with_box_refine = true;
  d.assign_first_stage = true;
  d.assign_second_stage = true;
  d.disable_custom_kernels = true;
  d.use_timm_backbone = false;
  d.use_pretrained_backbone = false;
  d.backbone = "";
  return read_deformable_detr_config(config, d, /*timm_default=*/false, {"stage2", "stage3", "stage4"});
}

Tensor deta_first_stage_proposals(const Tensor& logits, const Tensor& coord_logits, const MultiScaleLayout& layout,
                                  int64_t k) {
  // modeling_deta.py's constants: the top 1000 positions of every level, NMS at IoU 0.9.
  constexpr int64_t pre_nms_topk = 1000;
  constexpr double nms_iou = 0.9;
  const int64_t S = logits.size(1);
  if (S < pre_nms_topk)
    throw ModelError("DETA: assign_first_stage takes the top " + std::to_string(pre_nms_topk) +
                     " positions of every level, but the image has only " + std::to_string(S) +
                     " positions in all (the reference fails too)");
  std::vector<int64_t> level_sizes;
  for (const DeformLevel& l : layout.levels) level_sizes.push_back(l.height * l.width);
  return level_nms_proposals(logits, coord_logits, level_sizes, k, pre_nms_topk, nms_iou);
}

DeformableDetrVariant deta_variant(const DeformableDetrConfig& cfg) {
  DeformableDetrVariant v;
  v.name = "Deta";
  v.backbone_path = "backbone.model";
  v.pix_trans = true;
  if (cfg.assign_first_stage) v.select_proposals = deta_first_stage_proposals;
  v.return_output_proposals = true;
  return v;
}

DetaForObjectDetection::DetaForObjectDetection(const DeformableDetrConfig& cfg, const Weights& w) : cfg_(cfg) {
  heads_ = load_deformable_detr_heads(w, cfg);
  model_ = std::make_unique<DetaModel>(cfg, w.pp("model"), heads_);
}

ModelOutput DetaForObjectDetection::forward(const ModelInputs& inputs) const {
  DeformableDetrModelOutput o =
      model_->run(inputs.pixel_values, inputs.pixel_mask, inputs.output_hidden_states, inputs.output_attentions);
  DeformableDetrPredictions p = deformable_detr_predictions(*heads_, o, /*all_levels=*/!inputs.targets.empty());
  ModelOutput out;
  if (!inputs.targets.empty()) deformable_detr_loss(cfg_, /*deta=*/true, p, o, inputs.targets, out);
  out.set("logits", p.outputs_class.back());
  out.set("pred_boxes", p.outputs_coord.back());
  o.append_to(out, /*with_output_proposals=*/true);
  return out;
}

void register_deta_models() {
  register_model({"deta",
                  {"DetaModel", "DetaForObjectDetection"},
                  [](const json& config, const std::string& arch, const Weights& w) -> std::unique_ptr<Model> {
                    DeformableDetrConfig cfg = read_deta_config(config);
                    if (arch == "DetaForObjectDetection") return std::make_unique<DetaForObjectDetection>(cfg, w);
                    Weights mw = w.has("model.level_embed") ? w.pp("model") : w;
                    return std::make_unique<DetaModel>(cfg, mw, nullptr);
                  }});
}

}  // namespace vf
