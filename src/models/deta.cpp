#include "models/deta.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/boxes.h"
#include "core/ops.h"

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

std::vector<int64_t> deta_first_stage_proposals(const std::vector<float>& logits, const Tensor& coord_logits,
                                                const MultiScaleLayout& layout, int64_t k) {
  const int64_t S = static_cast<int64_t>(logits.size());
  const int64_t L = static_cast<int64_t>(layout.levels.size());
  constexpr int64_t pre_nms_topk = 1000;
  if (S < pre_nms_topk)
    throw ModelError("DETA: assign_first_stage takes the top " + std::to_string(pre_nms_topk) +
                " positions of every level, but the image has only " + std::to_string(S) +
                " positions in all (the reference fails too)");

  std::vector<int64_t> level_ids(S);
  for (int64_t l = 0; l < L; ++l)
    std::fill_n(level_ids.begin() + layout.levels[l].start, layout.levels[l].height * layout.levels[l].width, l);

  // Proposal boxes: center_to_corners(sigmoid(coord logits)).clamp(0, 1).
  Tensor boxes = coord_logits.clone();
  for (int64_t i = 0; i < boxes.numel(); ++i) boxes.f32()[i] = sigmoid(boxes.f32()[i]);
  boxes = center_to_corners(boxes);
  for (int64_t i = 0; i < boxes.numel(); ++i) boxes.f32()[i] = std::min(std::max(boxes.f32()[i], 0.f), 1.f);

  // Per level, the top 1000 of sigmoid(logit) * (position in the level). When a level has fewer than
  // 1000 positions the rest are zero-score positions of other levels; we take those in index order
  // (torch.topk leaves the order of ties unspecified). They are duplicates of positions their own
  // level already holds whenever no level exceeds 1000 positions, and NMS drops duplicates.
  std::vector<float> score(S), level_score(S);
  for (int64_t s = 0; s < S; ++s) score[s] = sigmoid(logits[s]);
  std::vector<int64_t> pre_nms_inds;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t s = 0; s < S; ++s) level_score[s] = score[s] * static_cast<float>(level_ids[s] == l);
    auto top = topk_proposals(level_score, pre_nms_topk);
    pre_nms_inds.insert(pre_nms_inds.end(), top.begin(), top.end());
  }
  const int64_t N = static_cast<int64_t>(pre_nms_inds.size());
  Tensor pre_boxes = Tensor::empty({N, 4});
  Tensor pre_scores = Tensor::empty({N});
  Tensor pre_levels = Tensor::empty({N}, DType::I64);
  for (int64_t i = 0; i < N; ++i) {
    std::copy_n(boxes.f32() + pre_nms_inds[i] * 4, 4, pre_boxes.f32() + i * 4);
    pre_scores.f32()[i] = logits[pre_nms_inds[i]];
    pre_levels.data<int64_t>()[i] = level_ids[pre_nms_inds[i]];
  }
  std::vector<int64_t> keep_inds;
  for (int64_t i : batched_nms(pre_boxes, pre_scores, pre_levels, 0.9)) keep_inds.push_back(pre_nms_inds[i]);
  if (static_cast<int64_t>(keep_inds.size()) < k) keep_inds = topk_proposals(logits, k);

  // Keep the first k / L of each level (in score order), then top up with the first of the rest.
  const int64_t q_per_l = k / L;
  std::vector<int64_t> per_level(L, 0);
  std::vector<char> keep(keep_inds.size(), 0);
  int64_t kept = 0;
  for (size_t i = 0; i < keep_inds.size(); ++i)
    if (++per_level[level_ids[keep_inds[i]]] <= q_per_l) {
      keep[i] = 1;
      ++kept;
    }
  for (size_t i = 0; i < keep_inds.size() && kept < k; ++i)
    if (!keep[i]) {
      keep[i] = 1;
      ++kept;
    }
  std::vector<int64_t> r;
  for (size_t i = 0; i < keep_inds.size(); ++i)
    if (keep[i]) r.push_back(keep_inds[i]);
  return r;
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
