#include "check_post.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "processors/detr_postprocess.h"

namespace vf::check {

namespace {

constexpr double kBoxRelTol = 1e-3;         // box coordinates: 1e-3 * max(1, image side)
constexpr double kPostprocPixelFrac = 0.999;  // segmentation maps of postproc-* cases (exact inputs)
constexpr double kModelPixelFrac = 0.97;      // segmentation maps computed from a model's outputs

std::string fmt(const char* f, double a) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, a);
  return buf;
}

// A result value of case.json: inlined (a number or nested lists) or {"tensor": name, ...} naming a
// tensor of expected.safetensors. Flattened to doubles with its shape.
struct RefArray {
  std::vector<double> v;
  Shape shape;
};

void flatten(const json& j, size_t depth, RefArray& out, const std::string& what) {
  if (j.is_number() || j.is_boolean()) {
    if (depth != out.shape.size()) throw Error("case.json: ragged array in " + what);
    out.v.push_back(j.is_boolean() ? (j.get<bool>() ? 1.0 : 0.0) : j.get<double>());
    return;
  }
  if (!j.is_array()) throw Error("case.json: unexpected value in " + what + ": " + j.dump().substr(0, 80));
  if (depth == out.shape.size()) {
    out.shape.push_back(static_cast<int64_t>(j.size()));
  } else if (depth > out.shape.size() || out.shape[depth] != static_cast<int64_t>(j.size())) {
    throw Error("case.json: ragged array in " + what);
  }
  for (const json& e : j) flatten(e, depth + 1, out, what);
}

RefArray ref_array(const Case& c, const json& j, const std::string& what) {
  RefArray r;
  if (j.is_object()) {
    const std::string name = j.value("tensor", "");
    const Tensor* t = c.find(name);
    if (name.empty() || !t) throw Error("expected.safetensors has no tensor '" + name + "' (" + what + ")");
    Tensor d = t->to(DType::F64);
    r.v.assign(d.data<double>(), d.data<double>() + d.numel());
    r.shape = t->shape();
    return r;
  }
  flatten(j, 0, r, what);
  return r;
}

std::vector<double> tensor_values(const Tensor& t) {
  Tensor d = t.to(DType::F64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

std::vector<TargetSize> parse_target_sizes(const json& kw) {
  std::vector<TargetSize> ts;
  auto it = kw.find("target_sizes");
  if (it == kw.end() || it->is_null()) return ts;
  for (const json& s : *it) {
    if (!s.is_array() || s.size() != 2) throw Error("case.json: target_sizes entries must be [height, width]");
    ts.push_back({s[0].get<int64_t>(), s[1].get<int64_t>()});
  }
  return ts;
}

void reject_unknown_kwargs(const json& kw, const std::set<std::string>& known, const std::string& fn) {
  for (auto it = kw.begin(); it != kw.end(); ++it)
    if (!known.count(it.key())) throw Error("case.json: " + fn + " kwarg '" + it.key() + "' is not supported");
}

const Tensor& output(const std::map<std::string, Tensor>& outs, const std::string& name) {
  auto it = outs.find(name);
  if (it == outs.end()) throw Error("the model outputs have no '" + name + "' for post-processing");
  return it->second;
}

// ---- detections -----------------------------------------------------------------------------------

void compare_detections(const std::string& name, const Detections& ours, const Case& c, const json& ref,
                        double threshold, int64_t cap, double side, CheckReport& report) {
  const RefArray rs = ref_array(c, ref.at("scores"), name + " scores");
  const RefArray rl = ref_array(c, ref.at("labels"), name + " labels");
  const RefArray rb = ref_array(c, ref.at("boxes"), name + " boxes");
  const size_t rn = rs.v.size();
  if (rl.v.size() != rn || rb.v.size() != 4 * rn)
    throw Error("case.json: " + name + " scores, labels and boxes disagree in length");
  const std::vector<double> os = tensor_values(ours.scores), ol = tensor_values(ours.labels),
                            ob = tensor_values(ours.boxes);
  const size_t on = os.size();
  // Every comparison below is false for a NaN, which would let a NaN score or box match anything
  // (or hide as "below the cut-off"): a NaN fails outright.
  auto has_nan = [](const std::vector<double>& v) { return std::any_of(v.begin(), v.end(), [](double x) { return std::isnan(x); }); };
  if (has_nan(rs.v) || has_nan(rb.v)) throw Error("case.json: " + name + " reference scores or boxes hold NaN");
  if (has_nan(os) || has_nan(ob) || has_nan(ol)) {
    report.fail(name, "NaN in our " + std::string(has_nan(os) ? "scores" : has_nan(ob) ? "boxes" : "labels"));
    return;
  }

  // The cut-off: the threshold, or the last score of a full top-k.
  double cut = threshold;
  if (cap > 0 && static_cast<int64_t>(rn) >= cap && rn > 0) cut = std::max(cut, *std::min_element(rs.v.begin(), rs.v.end()));
  const double box_tol = kBoxRelTol * std::max(1.0, side);

  std::vector<char> used(on, 0);
  size_t required = 0, matched = 0;
  std::string problem;
  for (size_t i = 0; i < rn; ++i) {
    if (!(rs.v[i] > cut + kScoreTol)) continue;
    ++required;
    size_t best = on;
    double best_err = INFINITY;
    for (size_t j = 0; j < on; ++j) {
      if (used[j] || ol[j] != rl.v[i] || !(std::fabs(os[j] - rs.v[i]) <= kScoreTol)) continue;
      double err = 0;
      for (int k = 0; k < 4; ++k) err = std::max(err, std::fabs(ob[4 * j + k] - rb.v[4 * i + k]));
      if (err <= box_tol && err < best_err) best = j, best_err = err;
    }
    if (best == on) {
      if (problem.empty())
        problem = "reference detection " + std::to_string(i) + " (label " + std::to_string((int64_t)rl.v[i]) +
                  ", score " + fmt("%.6f", rs.v[i]) + ") not found";
      continue;
    }
    used[best] = 1;
    ++matched;
  }
  // Nothing of ours clearly above the cut-off may be missing from the reference either.
  for (size_t j = 0; j < on; ++j)
    if (!used[j] && os[j] > cut + kScoreTol && problem.empty())
      problem = "extra detection " + std::to_string(j) + " (label " + std::to_string((int64_t)ol[j]) + ", score " +
                fmt("%.6f", os[j]) + ") not in the reference";

  const std::string detail = std::to_string(matched) + "/" + std::to_string(required) + " detections above cut-off " +
                             fmt("%.4g", cut) + " matched (ours " + std::to_string(on) + ", reference " +
                             std::to_string(rn) + ")";
  if (problem.empty())
    report.pass(name, detail);
  else
    report.fail(name, detail + ": " + problem);
}

// ---- segmentation maps ----------------------------------------------------------------------------

void compare_map(const std::string& name, const Tensor& ours, const RefArray& ref, double min_frac,
                 CheckReport& report) {
  if (ours.shape() != ref.shape) {
    report.fail(name, "map shape " + shape_str(ours.shape()) + ", expected " + shape_str(ref.shape));
    return;
  }
  const std::vector<double> o = tensor_values(ours);
  size_t equal = 0;
  for (size_t i = 0; i < o.size(); ++i) equal += o[i] == ref.v[i];
  const double frac = o.empty() ? 1.0 : static_cast<double>(equal) / static_cast<double>(o.size());
  const std::string detail = fmt("%.4f%%", 100.0 * frac) + " of pixels equal (need " + fmt("%.1f%%", 100.0 * min_frac) + ")";
  if (frac >= min_frac)
    report.pass(name, detail);
  else
    report.fail(name, detail);
}

// RLE lists -> for each pixel, the index of the list (i.e. of the sorted distinct value) covering it.
std::vector<int64_t> rle_to_index_map(const json& rle, int64_t n, const std::string& what) {
  std::vector<int64_t> map(static_cast<size_t>(n), -1);
  for (size_t v = 0; v < rle.size(); ++v) {
    const json& runs = rle[v];
    if (runs.size() % 2) throw Error("case.json: odd-length run-length encoding in " + what);
    for (size_t k = 0; k + 1 < runs.size(); k += 2) {
      const int64_t start = runs[k].get<int64_t>() - 1, len = runs[k + 1].get<int64_t>();
      if (start < 0 || len < 0 || start + len > n) throw Error("case.json: run outside the map in " + what);
      for (int64_t p = start; p < start + len; ++p) map[p] = static_cast<int64_t>(v);
    }
  }
  return map;
}

void compare_segments_info(const std::string& name, const std::vector<SegmentInfo>& ours, const json& ref,
                           CheckReport& report) {
  std::string problem;
  if (ours.size() != ref.size()) {
    problem = std::to_string(ours.size()) + " segments, expected " + std::to_string(ref.size());
  } else {
    for (size_t i = 0; i < ours.size() && problem.empty(); ++i) {
      const json& r = ref[i];
      const std::string at = "segment " + std::to_string(i) + ": ";
      if (ours[i].label_id != r.at("label_id").get<int64_t>())
        problem = at + "label_id " + std::to_string(ours[i].label_id) + ", expected " + r.at("label_id").dump();
      else if (ours[i].id != r.at("id").get<int64_t>())
        problem = at + "id " + std::to_string(ours[i].id) + ", expected " + r.at("id").dump();
      else if (r.contains("was_fused") && ours[i].was_fused != r.at("was_fused").get<bool>())
        problem = at + "was_fused differs";
      else if (!(std::fabs(ours[i].score - r.at("score").get<double>()) <= kScoreTol))  // NaN fails
        problem = at + "score " + fmt("%.6f", ours[i].score) + ", expected " + r.at("score").dump();
    }
  }
  const std::string detail = std::to_string(ref.size()) + " segments";
  if (problem.empty())
    report.pass(name, detail + " match");
  else
    report.fail(name, detail + ": " + problem);
}

void compare_segmentation(const std::string& name, const SegmentationResult& ours, const Case& c, const json& ref,
                          bool rle, double min_frac, CheckReport& report) {
  const json& seg = ref.at("segmentation");
  if (rle && seg.is_array() && ours.has_rle) {
    const int64_t n = ours.segmentation.numel();
    const std::vector<int64_t> want = rle_to_index_map(seg, n, name);
    json our_rle = json::array();
    for (const auto& runs : ours.rle) our_rle.push_back(runs);
    const std::vector<int64_t> got = rle_to_index_map(our_rle, n, name);
    size_t equal = 0;
    for (int64_t p = 0; p < n; ++p) equal += got[p] == want[p];
    const double frac = n ? static_cast<double>(equal) / static_cast<double>(n) : 1.0;
    const std::string detail = "RLE: " + fmt("%.4f%%", 100.0 * frac) + " of pixels equal";
    if (frac >= min_frac && ours.rle.size() == seg.size())
      report.pass(name + " segmentation", detail);
    else
      report.fail(name + " segmentation", detail + ", " + std::to_string(ours.rle.size()) + " runs lists, expected " +
                                              std::to_string(seg.size()));
  } else {
    compare_map(name + " segmentation", ours.segmentation, ref_array(c, seg, name + " segmentation"), min_frac, report);
  }
  compare_segments_info(name + " segments_info", ours.segments_info, ref.at("segments_info"), report);
}

// ---- one post entry ----------------------------------------------------------------------------------

void run_entry(const Case& c, size_t index, const json& entry, DetrPostKind kind,
               const std::map<std::string, Tensor>& outs, double min_frac, CheckReport& report) {
  const std::string fn = entry.at("fn").get<std::string>();
  const json kw = entry.value("kwargs", json::object());
  const json& result = entry.at("result");
  const std::string base = "post" + std::to_string(index);
  auto item_name = [&](size_t i) { return base + "." + std::to_string(i) + " " + fn.substr(std::string("post_process_").size()); };
  if (fn.rfind("post_process_", 0) != 0) throw Error("case.json: unknown post-processing function '" + fn + "'");
  const std::vector<TargetSize> targets = parse_target_sizes(kw);
  const Tensor& logits = output(outs, "logits");

  if (fn == "post_process_object_detection") {
    reject_unknown_kwargs(kw, {"threshold", "target_sizes", "top_k", "nms_threshold"}, fn);
    ObjectDetectionOptions opt;
    opt.threshold = cfg_get<double>(kw, "threshold", 0.5);
    opt.top_k = cfg_get<int64_t>(kw, "top_k", 100);
    opt.nms_threshold = cfg_get<double>(kw, "nms_threshold", 0.7);
    opt.target_sizes = targets;
    const std::vector<Detections> dets = post_process_object_detection(kind, logits, output(outs, "pred_boxes"), opt);
    if (dets.size() != result.size())
      throw Error(base + ": " + std::to_string(dets.size()) + " images, reference has " + std::to_string(result.size()));
    const int64_t pairs = logits.size(1) * logits.size(2);
    int64_t cap = 0;
    if (kind == DetrPostKind::ConditionalDetr || kind == DetrPostKind::DeformableDetr) cap = std::min(opt.top_k, pairs);
    if (kind == DetrPostKind::Deta) cap = 100;
    for (size_t i = 0; i < dets.size(); ++i) {
      const double side = targets.empty() ? 1.0 : static_cast<double>(std::max(targets[i].height, targets[i].width));
      compare_detections(item_name(i), dets[i], c, result[i], opt.threshold, cap, side, report);
    }
    return;
  }

  const Tensor& masks = output(outs, "pred_masks");
  if (fn == "post_process_semantic_segmentation") {
    reject_unknown_kwargs(kw, {"target_sizes", "return_segmentation_scores"}, fn);
    const std::vector<Tensor> maps = post_process_semantic_segmentation(kind, logits, masks, targets);
    if (maps.size() != result.size())
      throw Error(base + ": " + std::to_string(maps.size()) + " images, reference has " + std::to_string(result.size()));
    for (size_t i = 0; i < maps.size(); ++i) {
      const json& r = result[i].is_object() && result[i].contains("segmentation") ? result[i]["segmentation"] : result[i];
      compare_map(item_name(i), maps[i], ref_array(c, r, item_name(i)), min_frac, report);
    }
    return;
  }

  const bool panoptic = fn == "post_process_panoptic_segmentation";
  if (!panoptic && fn != "post_process_instance_segmentation")
    throw Error("case.json: unknown post-processing function '" + fn + "'");
  if (panoptic)
    reject_unknown_kwargs(kw, {"threshold", "mask_threshold", "overlap_mask_area_threshold", "label_ids_to_fuse",
                               "target_sizes"}, fn);
  else
    reject_unknown_kwargs(kw, {"threshold", "mask_threshold", "overlap_mask_area_threshold", "target_sizes",
                               "return_coco_annotation"}, fn);
  SegmentationOptions opt;
  opt.threshold = cfg_get<double>(kw, "threshold", 0.5);
  opt.mask_threshold = cfg_get<double>(kw, "mask_threshold", 0.5);
  opt.overlap_mask_area_threshold = cfg_get<double>(kw, "overlap_mask_area_threshold", 0.8);
  opt.label_ids_to_fuse = cfg_get<std::vector<int64_t>>(kw, "label_ids_to_fuse", {});
  opt.return_coco_annotation = cfg_get<bool>(kw, "return_coco_annotation", false);
  opt.target_sizes = targets;
  const std::vector<SegmentationResult> segs = panoptic
                                                   ? post_process_panoptic_segmentation(kind, logits, masks, opt)
                                                   : post_process_instance_segmentation(kind, logits, masks, opt);
  if (segs.size() != result.size())
    throw Error(base + ": " + std::to_string(segs.size()) + " images, reference has " + std::to_string(result.size()));
  for (size_t i = 0; i < segs.size(); ++i)
    compare_segmentation(item_name(i), segs[i], c, result[i], opt.return_coco_annotation, min_frac, report);
}

}  // namespace

void run_post(const Case& c, const std::map<std::string, Tensor>& model_outputs, CheckReport& report) {
  auto it = c.spec.find("post");
  if (it == c.spec.end() || it->is_null() || it->empty()) return;
  std::string family = cfg_get<std::string>(c.spec, "family", "");
  if (family.empty()) family = cfg_get<std::string>(c.spec, "processor", "");
  if (family.empty()) family = cfg_get<std::string>(c.config, "model_type", "");
  const DetrPostKind kind = detr_post_kind(family);
  // Post-processing-only cases feed the exact reference inputs; model cases feed our own outputs.
  const bool exact_inputs = cfg_get<std::string>(c.spec, "task", "") == "post-processing" ||
                            !cfg_has(c.spec, "model_class");
  const double min_frac = exact_inputs ? kPostprocPixelFrac : kModelPixelFrac;
  for (size_t i = 0; i < it->size(); ++i) {
    try {
      run_entry(c, i, (*it)[i], kind, model_outputs, min_frac, report);
    } catch (const std::exception& e) {
      report.fail("post" + std::to_string(i), e.what());
    }
  }
}

std::vector<DetectionTarget> detection_targets_from_json(const json& labels) {
  if (!labels.is_array()) throw Error("case.json: detection labels must be a list of dicts, one per image");
  std::vector<DetectionTarget> targets;
  for (size_t i = 0; i < labels.size(); ++i) {
    const json& l = labels[i];
    const std::string what = "labels[" + std::to_string(i) + "]";
    if (!l.is_object() || !l.contains("class_labels") || !l.contains("boxes"))
      throw Error("case.json: " + what + " must have class_labels and boxes");
    RefArray cls, boxes;
    flatten(l["class_labels"], 0, cls, what + ".class_labels");
    flatten(l["boxes"], 0, boxes, what + ".boxes");
    const int64_t n = static_cast<int64_t>(cls.v.size());
    if (static_cast<int64_t>(boxes.v.size()) != 4 * n)
      throw Error("case.json: " + what + " has " + std::to_string(n) + " class labels but " +
                  std::to_string(boxes.v.size()) + " box coordinates");
    DetectionTarget t;
    t.class_labels = Tensor::from_vector<int64_t>({n}, std::vector<int64_t>(cls.v.begin(), cls.v.end()));
    t.boxes = Tensor::from_vector<float>({n, 4}, std::vector<float>(boxes.v.begin(), boxes.v.end()));
    if (l.contains("masks")) {
      RefArray m;
      flatten(l["masks"], 0, m, what + ".masks");
      if (m.shape.size() != 3 || m.shape[0] != n) throw Error("case.json: " + what + ".masks must be [n, height, width]");
      t.masks = Tensor::from_vector<float>(m.shape, std::vector<float>(m.v.begin(), m.v.end()));
    }
    targets.push_back(std::move(t));
  }
  return targets;
}

void run_post(const Case& c, const ModelOutput& model_outputs, CheckReport& report) {
  std::map<std::string, Tensor> outs;
  for (const auto& [name, t] : model_outputs.items()) outs[name] = t;
  run_post(c, outs, report);
}

}  // namespace vf::check
