// `vf check`, post-processing stage: runs every entry of case.json `post` through the DETR-family
// post-processing and compares with the reference results (tolerances: goldens README).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/detection_target.h"
#include "golden.h"
#include "models/model.h"

namespace vf::check {

// `model_outputs` supplies logits / pred_boxes / pred_masks (for `postproc-*` cases, pass
// c.expected). The processor variant comes from case.json `family` (else `processor`, else the
// config's model_type). One report line per compared result.
void run_post(const Case& c, const std::map<std::string, Tensor>& model_outputs, CheckReport& report);
void run_post(const Case& c, const ModelOutput& model_outputs, CheckReport& report);

// case.json `labels` of a DETR-family loss case (a list of {"class_labels": [...], "boxes": [[cx, cy, w, h],
// ...]} dicts, optionally "masks" [n][H][W]) as the models' targets.
std::vector<DetectionTarget> detection_targets_from_json(const json& labels);

}  // namespace vf::check
