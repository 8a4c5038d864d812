#include "models/detr_loss.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "core/assignment.h"
#include "core/boxes.h"
#include "core/ops.h"

namespace vf {

namespace {

using Pairs = std::vector<std::pair<int64_t, int64_t>>;  // (query, target index)
using Indices = std::vector<Pairs>;                        // one per image

// The focal matching cost's fixed parameters (DeformableDetrHungarianMatcher, DetaHungarianMatcher).
constexpr float kMatchAlpha = 0.25f;
constexpr float kFocalGamma = 2.0f;
// DETA's assigners (detectron2's RPN / ROI-head sampling).
constexpr int64_t kDetaTopKPerTarget = 4;
constexpr int64_t kDetaStage1Samples = 256;
constexpr double kDetaStage1PositiveFraction = 0.5;
constexpr double kDetaStage2PositiveFraction = 0.25;
constexpr int64_t kDetaStage2Background = 400;

Tensor scalar(double v) { return Tensor::from<float>({1}, {static_cast<float>(v)}); }

int64_t num_targets(const DetectionTarget& t) { return t.class_labels.defined() ? t.class_labels.numel() : 0; }

const int64_t* target_labels(const DetectionTarget& t) { return t.class_labels.data<int64_t>(); }

void check_targets(const std::vector<DetectionTarget>& targets, int64_t batch) {
  if (static_cast<int64_t>(targets.size()) != batch)
    throw Error("detection loss: " + std::to_string(targets.size()) + " targets for a batch of " +
                std::to_string(batch) + " images");
  for (size_t b = 0; b < targets.size(); ++b) {
    const DetectionTarget& t = targets[b];
    const int64_t n = num_targets(t);
    if (n && t.class_labels.dtype() != DType::I64)
      throw Error("detection loss: labels[" + std::to_string(b) + "].class_labels must be int64");
    if (n && (!t.boxes.defined() || t.boxes.dtype() != DType::F32 || t.boxes.shape() != Shape{n, 4}))
      throw Error("detection loss: labels[" + std::to_string(b) + "].boxes must be float32 [" + std::to_string(n) +
                  ", 4], got " + (t.boxes.defined() ? shape_str(t.boxes.shape()) : std::string("nothing")));
  }
}

void check_prediction(const DetrLossPrediction& p, int64_t batch, const std::string& what) {
  if (!p.logits.defined() || p.logits.dtype() != DType::F32 || p.logits.dim() != 3 || p.logits.size(0) != batch)
    throw Error("detection loss: " + what + " logits must be float32 [batch, queries, classes]");
  if (!p.pred_boxes.defined() || p.pred_boxes.dtype() != DType::F32 ||
      p.pred_boxes.shape() != Shape{batch, p.logits.size(1), 4})
    throw Error("detection loss: " + what + " pred_boxes must be float32 [batch, queries, 4], got " +
                (p.pred_boxes.defined() ? shape_str(p.pred_boxes.shape()) : std::string("nothing")));
}

// Generalized IoU of two (cx, cy, w, h) boxes, with the reference's float32 steps.
float giou_center(const float* a, const float* b) {
  const float ax0 = a[0] - 0.5f * a[2], ay0 = a[1] - 0.5f * a[3], ax1 = a[0] + 0.5f * a[2], ay1 = a[1] + 0.5f * a[3];
  const float bx0 = b[0] - 0.5f * b[2], by0 = b[1] - 0.5f * b[3], bx1 = b[0] + 0.5f * b[2], by1 = b[1] + 0.5f * b[3];
  if (!(ax1 >= ax0 && ay1 >= ay0) || !(bx1 >= bx0 && by1 >= by0))
    throw Error("detection loss: a box has negative width or height (boxes must be (cx, cy, w, h) with w, h >= 0)");
  const float area_a = (ax1 - ax0) * (ay1 - ay0), area_b = (bx1 - bx0) * (by1 - by0);
  const float iw = std::max(std::min(ax1, bx1) - std::max(ax0, bx0), 0.0f);
  const float ih = std::max(std::min(ay1, by1) - std::max(ay0, by0), 0.0f);
  const float inter = iw * ih;
  const float uni = area_a + area_b - inter;
  const float ew = std::max(std::max(ax1, bx1) - std::min(ax0, bx0), 0.0f);
  const float eh = std::max(std::max(ay1, by1) - std::min(ay0, by0), 0.0f);
  const float enclosing = ew * eh;
  return inter / uni - (enclosing - uni) / enclosing;
}

// ---- Hungarian matching ---------------------------------------------------------------------------

Indices hungarian(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets, const DetrLossConfig& cfg) {
  const int64_t batch = p.logits.size(0), queries = p.logits.size(1), classes = p.logits.size(2);
  Indices indices(static_cast<size_t>(batch));
  const float wc = static_cast<float>(cfg.class_cost), wb = static_cast<float>(cfg.bbox_cost),
              wg = static_cast<float>(cfg.giou_cost);
  if (wc == 0 && wb == 0 && wg == 0) throw Error("detection loss: all costs of the matcher can't be 0");
  for (int64_t b = 0; b < batch; ++b) {
    const DetectionTarget& t = targets[b];
    const int64_t n = num_targets(t);
    if (n == 0) continue;
    const int64_t* ids = target_labels(t);
    for (int64_t j = 0; j < n; ++j)
      if (ids[j] < 0 || ids[j] >= classes)
        throw Error("detection loss: class label " + std::to_string(ids[j]) + " is outside the " +
                    std::to_string(classes) + " logits");
    Tensor prob = p.logits[b].clone();  // [Q, C]
    if (cfg.match_cost == DetrMatchCost::Softmax) {
      softmax_lastdim_inplace(prob);
    } else {
      for (int64_t i = 0; i < prob.numel(); ++i) prob.f32()[i] = sigmoid(prob.f32()[i]);
    }
    const float* pr = prob.f32();
    const float* pb = p.pred_boxes.f32() + b * queries * 4;
    const float* tb = t.boxes.f32();
    std::vector<double> cost(static_cast<size_t>(queries * n));
    for (int64_t q = 0; q < queries; ++q) {
      for (int64_t j = 0; j < n; ++j) {
        const float pq = pr[q * classes + ids[j]];
        float class_cost;
        if (cfg.match_cost == DetrMatchCost::Softmax) {
          class_cost = -pq;
        } else {
          const float neg = (1 - kMatchAlpha) * std::pow(pq, kFocalGamma) * (-std::log(1 - pq + 1e-8f));
          const float pos = kMatchAlpha * std::pow(1 - pq, kFocalGamma) * (-std::log(pq + 1e-8f));
          class_cost = pos - neg;
        }
        float l1 = 0;
        for (int k = 0; k < 4; ++k) l1 += std::fabs(pb[q * 4 + k] - tb[j * 4 + k]);
        const float giou_cost = -giou_center(pb + q * 4, tb + j * 4);
        cost[q * n + j] = static_cast<double>(wb * l1 + wc * class_cost + wg * giou_cost);
      }
    }
    indices[b] = linear_sum_assignment(cost.data(), queries, n);
  }
  return indices;
}

// ---- DETA's IoU assigners ---------------------------------------------------------------------------

// detectron2's Matcher on an IoU matrix [M targets, N predictions]: each prediction's best target and
// a label per prediction from the thresholds; with low-quality matches, every prediction that ties a
// target's best IoU becomes positive.
void iou_match(const Tensor& iou, const std::vector<double>& thresholds, const std::vector<int>& labels,
               std::vector<int64_t>& matches, std::vector<int>& match_labels) {
  const int64_t m = iou.size(0), n = iou.size(1);
  matches.assign(static_cast<size_t>(n), 0);
  match_labels.assign(static_cast<size_t>(n), labels[0]);
  if (m == 0 || n == 0) return;
  const float* v = iou.f32();
  for (int64_t j = 0; j < n; ++j) {
    int64_t best = 0;
    for (int64_t i = 1; i < m; ++i)
      if (v[i * n + j] > v[best * n + j]) best = i;
    matches[j] = best;
    const double val = v[best * n + j];
    for (size_t l = 0; l < labels.size(); ++l) {
      const double low = l == 0 ? -std::numeric_limits<double>::infinity() : thresholds[l - 1];
      const double high = l == thresholds.size() ? std::numeric_limits<double>::infinity() : thresholds[l];
      if (val >= low && val < high) match_labels[j] = labels[l];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    float highest = v[i * n];
    for (int64_t j = 1; j < n; ++j) highest = std::max(highest, v[i * n + j]);
    for (int64_t j = 0; j < n; ++j)
      if (v[i * n + j] == highest) match_labels[j] = 1;
  }
}

// DETA's sample_topk_per_gt: a target matched by c sampled predictions is given instead its
// min(c, k) best-overlapping predictions.
Pairs topk_per_target(const std::vector<int64_t>& gt_inds, const Tensor& iou, int64_t k) {
  Pairs out;
  if (gt_inds.empty()) return out;
  std::map<int64_t, int64_t> counts;
  for (int64_t g : gt_inds) ++counts[g];
  const int64_t n = iou.size(1);
  k = std::min(k, n);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (auto [g, c] : counts) {
    const float* row = iou.f32() + g * n;
    for (int64_t j = 0; j < n; ++j) order[j] = j;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (int64_t r = 0; r < std::min(c, k); ++r) out.emplace_back(order[r], g);
  }
  return out;
}

// The random subsampling of the reference (torch.randperm) keeps every positive whenever there are
// at most `max_positive` of them, which is the usual case; beyond that we keep the first ones.
Indices deta_assign(const Tensor& proposals, const std::vector<DetectionTarget>& targets, bool first_stage,
                    int64_t num_queries) {
  const int64_t batch = proposals.size(0);
  Indices indices(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    const DetectionTarget& t = targets[b];
    const int64_t m = num_targets(t);
    if (first_stage && m == 0) continue;
    const Tensor props = center_to_corners(proposals[b]);
    const Tensor iou = m ? box_iou(center_to_corners(t.boxes), props).iou : Tensor::zeros({0, props.size(0)});
    std::vector<int64_t> matches;
    std::vector<int> labels;
    std::vector<int64_t> positives;
    int64_t max_positive;
    if (first_stage) {
      iou_match(iou, {0.3, 0.7}, {0, -1, 1}, matches, labels);
      for (size_t j = 0; j < labels.size(); ++j)
        if (labels[j] == 1) positives.push_back(static_cast<int64_t>(j));
      max_positive = static_cast<int64_t>(kDetaStage1Samples * kDetaStage1PositiveFraction);
    } else {
      iou_match(iou, {0.6}, {0, 1}, matches, labels);
      for (size_t j = 0; j < labels.size(); ++j) {
        int64_t cls = m ? target_labels(t)[matches[j]] : kDetaStage2Background;
        if (labels[j] == 0) cls = kDetaStage2Background;
        if (labels[j] == -1) cls = -1;
        if (cls != -1 && cls != kDetaStage2Background) positives.push_back(static_cast<int64_t>(j));
      }
      max_positive = static_cast<int64_t>(static_cast<double>(num_queries) * kDetaStage2PositiveFraction);
    }
    if (static_cast<int64_t>(positives.size()) > max_positive) positives.resize(static_cast<size_t>(max_positive));
    std::vector<int64_t> gt_inds;
    for (int64_t j : positives) gt_inds.push_back(matches[j]);
    indices[b] = topk_per_target(gt_inds, iou, kDetaTopKPerTarget);
  }
  return indices;
}

// ---- the loss terms ---------------------------------------------------------------------------------

using LossDict = std::vector<std::pair<std::string, double>>;

// The class of every query: its matched target's label, else `fill`.
std::vector<int64_t> query_classes(const Indices& idx, const std::vector<DetectionTarget>& targets, int64_t batch,
                                   int64_t queries, int64_t fill) {
  std::vector<int64_t> cls(static_cast<size_t>(batch * queries), fill);
  for (int64_t b = 0; b < batch; ++b)
    for (auto [q, j] : idx[b]) cls[b * queries + q] = target_labels(targets[b])[j];
  return cls;
}

// Sigmoid focal loss summed over all elements (the reference's mean over dim 1 and sum, times the
// size of dim 1, before dividing by num_boxes).
double focal_sum(float x, float target, double alpha) {
  const double p = sigmoid(x);
  const double ce = std::max<double>(x, 0) - static_cast<double>(x) * target + std::log1p(std::exp(-std::fabs(static_cast<double>(x))));
  const double p_t = p * target + (1 - p) * (1 - target);
  double loss = ce * (1 - p_t) * (1 - p_t);
  if (alpha >= 0) loss *= alpha * target + (1 - alpha) * (1 - target);
  return loss;
}

void loss_labels(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets, const Indices& idx,
                 double num_boxes, const DetrLossConfig& cfg, LossDict& out, const std::string& suffix) {
  const int64_t batch = p.logits.size(0), queries = p.logits.size(1), classes = p.logits.size(2);
  const float* x = p.logits.f32();
  if (cfg.class_loss == DetrClassLoss::CrossEntropy) {
    // F.cross_entropy with class weights: the no-object class (the last) weighs eos_coefficient;
    // the mean divides by the summed weights.
    const int64_t no_object = classes - 1;
    const std::vector<int64_t> cls = query_classes(idx, targets, batch, queries, no_object);
    double num = 0, den = 0;
    for (int64_t r = 0; r < batch * queries; ++r) {
      const float* row = x + r * classes;
      double mx = row[0];
      for (int64_t c = 1; c < classes; ++c) mx = std::max<double>(mx, row[c]);
      double s = 0;
      for (int64_t c = 0; c < classes; ++c) s += std::exp(row[c] - mx);
      const double nll = -(row[cls[r]] - mx - std::log(s));
      const double w = cls[r] == no_object ? cfg.eos_coefficient : 1.0;
      num += w * nll;
      den += w;
    }
    out.emplace_back("loss_ce" + suffix, num / den);
    return;
  }
  // Sigmoid focal loss against one-hot targets (no column for "no object").
  const std::vector<int64_t> cls = query_classes(idx, targets, batch, queries, classes);
  double sum = 0;
  for (int64_t r = 0; r < batch * queries; ++r)
    for (int64_t c = 0; c < classes; ++c) sum += focal_sum(x[r * classes + c], cls[r] == c ? 1.0f : 0.0f, cfg.focal_alpha);
  out.emplace_back("loss_ce" + suffix, sum / num_boxes);
}

void loss_boxes(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets, const Indices& idx,
                double num_boxes, LossDict& out, const std::string& suffix) {
  const int64_t queries = p.logits.size(1);
  double l1 = 0, giou = 0;
  for (size_t b = 0; b < idx.size(); ++b) {
    const float* pb = p.pred_boxes.f32() + static_cast<int64_t>(b) * queries * 4;
    for (auto [q, j] : idx[b]) {
      const float* tb = targets[b].boxes.f32() + j * 4;
      for (int k = 0; k < 4; ++k) l1 += std::fabs(pb[q * 4 + k] - tb[k]);
      giou += 1.0 - giou_center(pb + q * 4, tb);
    }
  }
  out.emplace_back("loss_bbox" + suffix, l1 / num_boxes);
  out.emplace_back("loss_giou" + suffix, giou / num_boxes);
}

void loss_cardinality(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets,
                      const DetrLossConfig& cfg, LossDict& out, const std::string& suffix) {
  const int64_t batch = p.logits.size(0), queries = p.logits.size(1), classes = p.logits.size(2);
  double err = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t card = 0;
    for (int64_t q = 0; q < queries; ++q) {
      const float* row = p.logits.f32() + (b * queries + q) * classes;
      const int64_t arg = std::max_element(row, row + classes) - row;  // first maximum
      if (cfg.cardinality == DetrCardinality::ArgmaxNotLast)
        card += arg != classes - 1;
      else
        card += sigmoid(row[arg]) > 0.5f;
    }
    err += std::fabs(static_cast<double>(card - num_targets(targets[b])));
  }
  out.emplace_back("cardinality_error" + suffix, err / static_cast<double>(batch));
}

void loss_masks(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets, const Indices& idx,
                double num_boxes, LossDict& out) {
  if (!p.pred_masks.defined() || p.pred_masks.dim() != 4)
    throw Error("detection loss: the mask losses need pred_masks [batch, queries, height, width]");
  // Targets are padded (zeros) to the largest mask size of the batch, as nested_tensor_from_tensor_list.
  int64_t th = 0, tw = 0;
  for (const DetectionTarget& t : targets) {
    if (!t.masks.defined() || t.masks.dim() != 3 || t.masks.size(0) != num_targets(t))
      throw Error("detection loss: the mask losses need labels[i].masks [num_targets, height, width]");
    th = std::max(th, t.masks.size(1));
    tw = std::max(tw, t.masks.size(2));
  }
  int64_t pairs = 0;
  for (const Pairs& ps : idx) pairs += static_cast<int64_t>(ps.size());
  if (pairs == 0) {
    out.emplace_back("loss_mask", 0.0);
    out.emplace_back("loss_dice", 0.0);
    return;
  }
  const int64_t queries = p.pred_masks.size(1), mh = p.pred_masks.size(2), mw = p.pred_masks.size(3);
  Tensor src = Tensor::empty({1, pairs, mh, mw});
  std::vector<std::pair<int64_t, int64_t>> tgt;  // (image, target)
  int64_t k = 0;
  for (size_t b = 0; b < idx.size(); ++b)
    for (auto [q, j] : idx[b]) {
      const float* m = p.pred_masks.f32() + (static_cast<int64_t>(b) * queries + q) * mh * mw;
      std::copy(m, m + mh * mw, src.f32() + k * mh * mw);
      tgt.emplace_back(static_cast<int64_t>(b), j);
      ++k;
    }
  const Tensor up = interpolate_bilinear(src, th, tw);
  double focal = 0, dice = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    const Tensor tm = targets[tgt[i].first].masks.to(DType::F32);
    const int64_t h = tm.size(1), w = tm.size(2);
    const float* t = tm.f32() + tgt[i].second * h * w;
    const float* s = up.f32() + i * th * tw;
    double fsum = 0, inter = 0, psum = 0, tsum = 0;
    for (int64_t y = 0; y < th; ++y)
      for (int64_t x = 0; x < tw; ++x) {
        const float tv = (y < h && x < w) ? t[y * w + x] : 0.0f;
        const float sv = s[y * tw + x];
        fsum += focal_sum(sv, tv, 0.25);
        const double pv = sigmoid(sv);
        inter += pv * tv;
        psum += pv;
        tsum += tv;
      }
    focal += fsum / static_cast<double>(th * tw);
    dice += 1.0 - (2 * inter + 1) / (psum + tsum + 1);
  }
  out.emplace_back("loss_mask", focal / num_boxes);
  out.emplace_back("loss_dice", dice / num_boxes);
}

void all_terms(const DetrLossPrediction& p, const std::vector<DetectionTarget>& targets, const Indices& idx,
               double num_boxes, const DetrLossConfig& cfg, bool masks, LossDict& out, const std::string& suffix) {
  loss_labels(p, targets, idx, num_boxes, cfg, out, suffix);
  loss_boxes(p, targets, idx, num_boxes, out, suffix);
  loss_cardinality(p, targets, cfg, out, suffix);
  if (masks) loss_masks(p, targets, idx, num_boxes, out);
}

}  // namespace

DetrLossConfig detr_loss_config(const json& config, const std::string& architecture) {
  const std::string model_type = cfg_get<std::string>(config, "model_type", "");
  DetrLossConfig c;
  const bool segmentation = architecture.find("ForSegmentation") != std::string::npos;
  if (model_type == "detr") {
    c.match_cost = DetrMatchCost::Softmax;
    c.class_loss = DetrClassLoss::CrossEntropy;
    c.cardinality = DetrCardinality::ArgmaxNotLast;
  } else if (model_type == "conditional_detr" || model_type == "deformable_detr") {
    // DeformableDetrForObjectDetectionLoss; the segmentation variant keeps the softmax matcher.
    c.match_cost = segmentation ? DetrMatchCost::Softmax : DetrMatchCost::Focal;
    c.class_loss = DetrClassLoss::Focal;
    c.cardinality = DetrCardinality::SigmoidAboveHalf;
  } else if (model_type == "deta") {
    c.match_cost = DetrMatchCost::Focal;
    c.class_loss = DetrClassLoss::Focal;
    c.cardinality = DetrCardinality::ArgmaxNotLast;
    c.deta = true;
  } else {
    throw Error("detection loss: no DETR-family loss for model_type '" + model_type + "'");
  }
  c.class_cost = cfg_get<double>(config, "class_cost", model_type == "conditional_detr" ? 2.0 : 1.0);
  c.bbox_cost = cfg_get<double>(config, "bbox_cost", 5.0);
  c.giou_cost = cfg_get<double>(config, "giou_cost", 2.0);
  c.eos_coefficient = cfg_get<double>(config, "eos_coefficient", 0.1);
  c.focal_alpha = cfg_get<double>(config, "focal_alpha", 0.25);
  c.bbox_loss_coefficient = cfg_get<double>(config, "bbox_loss_coefficient", 5.0);
  c.giou_loss_coefficient = cfg_get<double>(config, "giou_loss_coefficient", 2.0);
  c.mask_loss_coefficient = cfg_get<double>(config, "mask_loss_coefficient", 1.0);
  c.dice_loss_coefficient = cfg_get<double>(config, "dice_loss_coefficient", 1.0);
  c.masks = segmentation;
  c.auxiliary_loss = cfg_get<bool>(config, "auxiliary_loss", false);
  c.decoder_layers = cfg_get<int64_t>(config, "decoder_layers", 6);
  c.assign_first_stage = c.deta && cfg_get<bool>(config, "assign_first_stage", true);
  c.assign_second_stage = c.deta && cfg_get<bool>(config, "assign_second_stage", true);
  c.num_queries = cfg_get<int64_t>(config, "num_queries", model_type == "deta" ? 900 : 100);
  return c;
}

namespace {
// The loss and the matching run on the host: the predictions are small beside the forward pass.
DetrLossPrediction on_host(const DetrLossPrediction& p) {
  return {p.logits.cpu(), p.pred_boxes.cpu(), p.pred_masks.cpu(), p.init_reference.cpu(), p.anchors.cpu()};
}
}  // namespace

std::vector<std::vector<std::pair<int64_t, int64_t>>> detr_hungarian_match(const DetrLossPrediction& p_in,
                                                                           const std::vector<DetectionTarget>& targets,
                                                                           const DetrLossConfig& cfg) {
  const DetrLossPrediction p = on_host(p_in);
  check_prediction(p, p.logits.defined() ? p.logits.size(0) : 0, "");
  check_targets(targets, p.logits.size(0));
  return hungarian(p, targets, cfg);
}

DetrLossOutput detr_loss(const DetrLossInputs& in_any, const DetrLossConfig& cfg) {
  DetrLossInputs in = in_any;
  in.outputs = on_host(in.outputs);
  for (DetrLossPrediction& a : in.auxiliary) a = on_host(a);
  if (in.enc_outputs) in.enc_outputs = on_host(*in.enc_outputs);
  const DetrLossPrediction& main = in.outputs;
  if (!main.logits.defined() || main.logits.dim() != 3) throw Error("detection loss: logits must be [batch, queries, classes]");
  const int64_t batch = main.logits.size(0);
  check_prediction(main, batch, "");
  check_targets(in.targets, batch);
  for (size_t i = 0; i < in.auxiliary.size(); ++i) check_prediction(in.auxiliary[i], batch, "auxiliary");

  int64_t total = 0;
  for (const DetectionTarget& t : in.targets) total += num_targets(t);
  const double num_boxes = std::max<double>(static_cast<double>(total), 1.0);

  Indices indices;
  if (cfg.deta && cfg.assign_second_stage) {
    if (!main.init_reference.defined() || main.init_reference.shape() != Shape{batch, main.logits.size(1), 4})
      throw Error("detection loss: DETA's second-stage assigner needs init_reference [batch, queries, 4]");
    indices = deta_assign(main.init_reference, in.targets, false, cfg.num_queries);
  } else {
    indices = hungarian(main, in.targets, cfg);
  }

  LossDict dict;
  all_terms(main, in.targets, indices, num_boxes, cfg, cfg.masks, dict, "");
  for (size_t i = 0; i < in.auxiliary.size(); ++i) {
    // Intermediate layers get no mask losses (too costly, says the reference). DETA's second-stage
    // assignment is reused for them.
    const Indices aux_idx = cfg.deta && cfg.assign_second_stage ? indices : hungarian(in.auxiliary[i], in.targets, cfg);
    all_terms(in.auxiliary[i], in.targets, aux_idx, num_boxes, cfg, false, dict, "_" + std::to_string(i));
  }
  if (in.enc_outputs) {
    // Encoder proposals are class-agnostic: every target becomes class 0.
    const DetrLossPrediction& enc = *in.enc_outputs;
    check_prediction(enc, batch, "encoder");
    std::vector<DetectionTarget> binary = in.targets;
    for (DetectionTarget& t : binary) t.class_labels = Tensor::zeros({num_targets(t)}, DType::I64);
    Indices enc_idx;
    if (cfg.assign_first_stage) {
      if (!enc.anchors.defined() || enc.anchors.shape() != Shape{batch, enc.logits.size(1), 4})
        throw Error("detection loss: DETA's first-stage assigner needs anchors [batch, proposals, 4]");
      enc_idx = deta_assign(enc.anchors, binary, true, cfg.num_queries);
    } else {
      enc_idx = hungarian(enc, binary, cfg);
    }
    all_terms(enc, binary, enc_idx, num_boxes, cfg, false, dict, "_enc");
  }

  // The weighted total over the terms that have a weight.
  std::map<std::string, double> weight = {{"loss_ce", 1.0},
                                          {"loss_bbox", cfg.bbox_loss_coefficient},
                                          {"loss_giou", cfg.giou_loss_coefficient}};
  if (cfg.masks) {
    weight["loss_mask"] = cfg.mask_loss_coefficient;
    weight["loss_dice"] = cfg.dice_loss_coefficient;
  }
  if (cfg.auxiliary_loss) {
    const std::map<std::string, double> base = weight;
    for (int64_t i = 0; i + 1 < cfg.decoder_layers; ++i)
      for (auto& [k, v] : base) weight[k + "_" + std::to_string(i)] = v;
    if (cfg.deta)
      for (auto& [k, v] : base) weight[k + "_enc"] = v;
  }
  double loss = 0;
  DetrLossOutput out;
  for (auto& [k, v] : dict) {
    auto it = weight.find(k);
    if (it != weight.end()) loss += v * it->second;
    out.loss_dict.emplace_back(k, scalar(v));
  }
  out.loss = scalar(loss);
  return out;
}

}  // namespace vf
