// Bounding-box operations shared by the DETR family: format conversions, IoU / generalized IoU
// (transformers' loss_for_object_detection box utilities) and non-maximum suppression
// (torchvision.ops.nms / batched_nms semantics).
//
// All boxes are float32. "Corners" is (x0, y0, x1, y1); "center" is (cx, cy, w, h).
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace vf {

// [..., 4] center -> corners: (cx - 0.5 w, cy - 0.5 h, cx + 0.5 w, cy + 0.5 h).
Tensor center_to_corners(const Tensor& boxes);
// [..., 4] corners -> center: ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0).
Tensor corners_to_center(const Tensor& boxes);

// [N, 4] corners -> [N]: (x1 - x0) * (y1 - y0).
Tensor box_area(const Tensor& boxes);

// Pairwise IoU of corner boxes a [N, 4] and b [M, 4]: iou [N, M] and the union areas [N, M].
struct BoxIou {
  Tensor iou;
  Tensor union_area;
};
BoxIou box_iou(const Tensor& a, const Tensor& b);

// Pairwise generalized IoU [N, M] (https://giou.stanford.edu). Throws, as the reference does, when
// a box has x1 < x0 or y1 < y0 (degenerate boxes give inf / NaN).
Tensor generalized_box_iou(const Tensor& a, const Tensor& b);

// torchvision.ops.nms: visits boxes by score, highest first (a stable sort, so equal scores keep
// their input order), keeps a box unless a kept box overlaps it with IoU > iou_threshold. Returns
// the kept indices in that visiting order. boxes [N, 4] corners, scores [N].
std::vector<int64_t> nms(const Tensor& boxes, const Tensor& scores, double iou_threshold);
// The same on raw arrays (boxes: n x 4 floats).
std::vector<int64_t> nms(const float* boxes, const float* scores, int64_t n, double iou_threshold);

// torchvision.ops.batched_nms: NMS within each group of `group_ids` (int64 [N], e.g. class labels
// or feature levels), never across groups. Reproduces torchvision's two CPU code paths, which can
// differ in the last float bit of an IoU: up to 4000 box coordinates it offsets each group's boxes
// by id * (max coordinate + 1) and runs one NMS; above that it runs NMS per group. Returns kept
// indices sorted by decreasing score.
std::vector<int64_t> batched_nms(const Tensor& boxes, const Tensor& scores, const Tensor& group_ids,
                                 double iou_threshold);

// ---- two-stage proposals ----

// DETA's first-stage proposal choice (DetaModel.forward with assign_first_stage, transformers 4.x
// modeling_deta.py), batched and on the device of its inputs: logits [B, S] (the first class's logit
// of every position), coord_logits [B, S, 4], the positions laid out level after level
// (level_sizes: height * width of each, summing to S) -> int64 [B, k]. Per image: the proposal
// boxes clamp(center_to_corners(sigmoid(coord_logits)), 0, 1); per level the pre_nms_topk best of
// sigmoid(logit) * (position in the level) (topk_indices: where a level has fewer positions, the
// zero-score positions of other levels in index order); batched_nms of those at iou_threshold within
// levels, scored by the logits; the plain top-k of the logits when fewer than k are kept; then the
// first k / levels of each level in score order, topped up with the first of the rest. k and
// pre_nms_topk are at most S.
Tensor level_nms_proposals(const Tensor& logits, const Tensor& coord_logits, const std::vector<int64_t>& level_sizes,
                           int64_t k, int64_t pre_nms_topk, double iou_threshold);
// level_nms_proposals of one image on the host, from the sigmoids it takes: scores [S] =
// sigmoid(logits), centers [S, 4] = sigmoid(coord_logits). The CPU op computes those with
// vf::sigmoid; a GPU's sigmoid may round differently in the last bit, so tests of a GPU's selection
// feed this the GPU's sigmoids.
std::vector<int64_t> level_nms_select(const float* logits, const float* scores, const float* centers,
                                      const std::vector<int64_t>& level_sizes, int64_t k, int64_t pre_nms_topk,
                                      double iou_threshold);

// ---- in logit space, as ops (on the device of their inputs: a decoder's reference points and box
// refinement stay where its hidden states are) ----

// log(x' / (1 - x')) with x clamped to [0, 1] and both x' and 1 - x' floored at eps: the reference's
// inverse_sigmoid. Elementwise.
Tensor inverse_sigmoid(const Tensor& x, float eps = 1e-5f);

// sigmoid(delta + [inverse_sigmoid(reference), 0, ...]): a box head's offsets [..., 4] applied to
// reference points [..., nc] (nc <= 4: points or boxes, the same leading dimensions), as the
// iterative box refinement and the detection heads do.
Tensor refine_boxes(const Tensor& delta, const Tensor& reference, float eps = 1e-5f);

}  // namespace vf
