// `vf check --dtype bfloat16|float16`: the model's outputs against the float32 reference by what a
// reduced-precision run must keep (README: reduced precision), not by the float32 tolerances.
#pragma once

#include "golden.h"
#include "models/model.h"

namespace vf::check {

// Criteria (any device):
//   2-D `*logits` [B, C] (classification): the top-1 class of every row equals the reference's.
//   `pred_boxes` (normalised cx, cy, w, h): max |diff| <= 1e-2.
//   3-D `logits` [B, Q, C] (detection): every query the reference scores >= 0.5 (its family's
//     score: DETR's softmax over the real classes, the others' sigmoid) keeps its class.
//   every other float output: ||diff||_2 / ||ref||_2 <= 0.1, a gross-error bound (a wrong kernel or
//     layout is off by ~100%; bfloat16 itself reaches ~6% in the deepest hidden states of tiny
//     random-weight models).
//   losses: reported, not judged (a loss sums the differences above).
// Each output also prints its max |diff| and max |ref|.
void compare_reduced_precision(const Case& c, const ModelOutput& out, DType dtype, CheckReport& report);

}  // namespace vf::check
