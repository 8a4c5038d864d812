#include "processors/detr_postprocess.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <set>

#include "core/boxes.h"
#include "core/device_lock.h"
#include "core/ops.h"

namespace vf {

namespace {

// DETA's post-processing: candidates before NMS, and detections kept after it.
constexpr int64_t kDetaPreNmsTopK = 10000;
constexpr int64_t kDetaMaxDetections = 100;

void require_f32(const Tensor& t, const char* name, int64_t dims, const char* what) {
  if (!t.defined()) throw Error(std::string("post-processing: ") + name + " is missing");
  if (t.dtype() != DType::F32 || t.dim() != dims)
    throw Error(std::string("post-processing: ") + name + " must be a float32 " + what + " tensor, got " +
                dtype_name(t.dtype()) + " " + shape_str(t.shape()));
}

void require_target_sizes(const std::vector<TargetSize>& ts, int64_t batch) {
  if (ts.empty()) return;
  if (static_cast<int64_t>(ts.size()) != batch)
    throw Error("post-processing: " + std::to_string(ts.size()) + " target sizes for a batch of " +
                std::to_string(batch) + " (make sure that you pass in as many target sizes as images)");
  for (const TargetSize& t : ts)
    if (t.height <= 0 || t.width <= 0)
      throw Error("post-processing: target size (" + std::to_string(t.height) + ", " + std::to_string(t.width) +
                  ") must be positive");
}

// Softmax of each row of a [rows, c] block (a copy).
Tensor softmax_rows(const Tensor& x) {
  Tensor y = x.clone();
  softmax_lastdim_inplace(y);
  return y;
}

// Python's round(x, 6): the decimal rounding of the exact binary value.
double round6(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6f", x);
  return std::strtod(buf, nullptr);
}

Detections make_detections(const std::vector<float>& scores, const std::vector<int64_t>& labels,
                           const std::vector<float>& boxes) {
  const int64_t n = static_cast<int64_t>(scores.size());
  Detections d;
  d.scores = Tensor::from_vector<float>({n}, scores);
  d.labels = Tensor::from_vector<int64_t>({n}, labels);
  d.boxes = Tensor::from_vector<float>({n, 4}, boxes);
  return d;
}

}  // namespace

DetrPostKind detr_post_kind(const std::string& name) {
  std::string s;
  for (char ch : name)
    if (ch != '_' && ch != '-') s += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  auto starts = [&](const char* p) { return s.rfind(p, 0) == 0; };
  if (starts("conditionaldetr")) return DetrPostKind::ConditionalDetr;
  if (starts("deformabledetr")) return DetrPostKind::DeformableDetr;
  if (starts("deta")) return DetrPostKind::Deta;
  if (starts("detr")) return DetrPostKind::Detr;
  throw Error("post-processing: no DETR-family post-processing for '" + name +
              "' (expected detr, conditional_detr, deformable_detr or deta, or their processor class)");
}

const char* detr_post_kind_name(DetrPostKind kind) {
  switch (kind) {
    case DetrPostKind::Detr: return "detr";
    case DetrPostKind::ConditionalDetr: return "conditional_detr";
    case DetrPostKind::DeformableDetr: return "deformable_detr";
    case DetrPostKind::Deta: return "deta";
  }
  return "?";
}

// ---- object detection ---------------------------------------------------------------------------

std::vector<Detections> post_process_object_detection(DetrPostKind kind, const Tensor& logits,
                                                      const Tensor& pred_boxes, const ObjectDetectionOptions& opt) {
  require_f32(logits, "logits", 3, "[batch, queries, classes]");
  require_f32(pred_boxes, "pred_boxes", 3, "[batch, queries, 4]");
  const int64_t batch = logits.size(0), queries = logits.size(1), classes = logits.size(2);
  if (pred_boxes.size(0) != batch || pred_boxes.size(1) != queries || pred_boxes.size(2) != 4)
    throw Error("post-processing: pred_boxes " + shape_str(pred_boxes.shape()) + " do not match logits " +
                shape_str(logits.shape()));
  require_target_sizes(opt.target_sizes, batch);
  // Tensor-vs-Python-float comparisons run in float32.
  const float threshold = static_cast<float>(opt.threshold);

  Tensor corners = center_to_corners(pred_boxes);
  if (!opt.target_sizes.empty()) {
    float* c = corners.f32();
    for (int64_t b = 0; b < batch; ++b) {
      const float w = static_cast<float>(opt.target_sizes[b].width), h = static_cast<float>(opt.target_sizes[b].height);
      const float scale[4] = {w, h, w, h};
      for (int64_t q = 0; q < queries; ++q)
        for (int k = 0; k < 4; ++k) c[(b * queries + q) * 4 + k] *= scale[k];
    }
  }

  std::vector<Detections> results;
  for (int64_t b = 0; b < batch; ++b) {
    const float* box = corners.f32() + b * queries * 4;
    std::vector<float> scores, out_boxes;
    std::vector<int64_t> labels;
    auto emit = [&](float score, int64_t label, int64_t query) {
      scores.push_back(score);
      labels.push_back(label);
      out_boxes.insert(out_boxes.end(), box + 4 * query, box + 4 * query + 4);
    };

    if (kind == DetrPostKind::Detr) {
      // Softmax over the classes and "no object" (the last one), best real class per query, in
      // query order.
      if (classes < 2) throw Error("post-processing: DETR logits need at least one class plus no-object");
      Tensor prob = softmax_rows(logits[b]);
      for (int64_t q = 0; q < queries; ++q) {
        const float* p = prob.f32() + q * classes;
        int64_t best = 0;
        for (int64_t c = 1; c < classes - 1; ++c)
          if (p[c] > p[best]) best = c;
        if (p[best] > threshold) emit(p[best], best, q);
      }
      results.push_back(make_detections(scores, labels, out_boxes));
      continue;
    }

    // Sigmoid scores of every (query, class) pair, flattened query-major.
    const int64_t n = queries * classes;
    std::vector<float> prob(static_cast<size_t>(n));
    const float* l = logits.f32() + b * n;
    for (int64_t i = 0; i < n; ++i) prob[i] = sigmoid(l[i]);

    if (kind == DetrPostKind::ConditionalDetr || kind == DetrPostKind::DeformableDetr) {
      for (int64_t i : topk_indices(prob.data(), n, opt.top_k))
        if (prob[i] > threshold) emit(prob[i], i % classes, i / classes);
      results.push_back(make_detections(scores, labels, out_boxes));
      continue;
    }

    // DETA: top 10,000 pairs, class-wise NMS among them, the first 100 survivors, then the threshold.
    const std::vector<int64_t> top = topk_indices(prob.data(), n, kDetaPreNmsTopK);
    const int64_t m = static_cast<int64_t>(top.size());
    std::vector<float> cand_boxes(static_cast<size_t>(4 * m)), cand_scores(static_cast<size_t>(m));
    std::vector<int64_t> cand_labels(static_cast<size_t>(m));
    for (int64_t k = 0; k < m; ++k) {
      const int64_t i = top[k];
      cand_scores[k] = prob[i];
      cand_labels[k] = i % classes;
      std::copy(box + 4 * (i / classes), box + 4 * (i / classes) + 4, cand_boxes.begin() + 4 * k);
    }
    std::vector<int64_t> keep =
        batched_nms(Tensor::from_vector<float>({m, 4}, cand_boxes), Tensor::from_vector<float>({m}, cand_scores),
                    Tensor::from_vector<int64_t>({m}, cand_labels), opt.nms_threshold);
    if (static_cast<int64_t>(keep.size()) > kDetaMaxDetections) keep.resize(kDetaMaxDetections);
    for (int64_t k : keep)
      if (cand_scores[k] > threshold) {
        scores.push_back(cand_scores[k]);
        labels.push_back(cand_labels[k]);
        out_boxes.insert(out_boxes.end(), cand_boxes.begin() + 4 * k, cand_boxes.begin() + 4 * k + 4);
      }
    results.push_back(make_detections(scores, labels, out_boxes));
  }
  return results;
}

// ---- segmentation ---------------------------------------------------------------------------------

namespace {

void require_segmentation_inputs(DetrPostKind kind, const Tensor& logits, const Tensor& pred_masks, const char* fn) {
  if (kind == DetrPostKind::DeformableDetr || kind == DetrPostKind::Deta)
    throw Error(std::string("post-processing: the ") + detr_post_kind_name(kind) + " image processor has no " + fn);
  require_f32(logits, "logits", 3, "[batch, queries, classes]");
  require_f32(pred_masks, "pred_masks", 4, "[batch, queries, height, width]");
  if (pred_masks.size(0) != logits.size(0) || pred_masks.size(1) != logits.size(1))
    throw Error("post-processing: pred_masks " + shape_str(pred_masks.shape()) + " do not match logits " +
                shape_str(logits.shape()));
}

// Held while work on the outputs' device is enqueued (device_lock.h); nothing for host outputs.
std::unique_lock<std::mutex> hold_device_of(const Tensor& logits, const Tensor& pred_masks) {
  if (logits.is_cpu() && pred_masks.is_cpu()) return std::unique_lock<std::mutex>();
  return std::unique_lock<std::mutex>(device_work_mutex());
}

// The kept queries' mask probabilities of image b, on pred_masks' device: the sigmoid of their mask
// logits [k, mh, mw], resized to the target when there is one.
Tensor kept_mask_probs(const Tensor& pred_masks, int64_t b, const std::vector<int64_t>& kept,
                       const TargetSize* target) {
  const int64_t queries = pred_masks.size(1), mh = pred_masks.size(2), mw = pred_masks.size(3);
  const int64_t k_count = static_cast<int64_t>(kept.size());
  Tensor probs = gather_rows(pred_masks[b].reshape({1, queries, mh * mw}),
                             Tensor::from_vector<int64_t>({1, k_count}, kept));
  act_inplace(probs, Act::Sigmoid);
  probs = probs.reshape({1, k_count, mh, mw});
  if (target) probs = interpolate_bilinear(probs, target->height, target->width);
  return probs.reshape({k_count, probs.size(2), probs.size(3)});
}

// transformers' compute_segments: weigh each kept query's mask probabilities [k, H, W] by its score,
// give every pixel to the strongest query, keep a query's segment when it has pixels and at least
// overlap_mask_area_threshold of its own (score-weighted) mask >= mask_threshold; classes in
// label_ids_to_fuse share one segment id. The per-pixel work runs where mask_probs lives; only the
// owner map and the per-query areas come to the host.
SegmentationResult compute_segments(const Tensor& mask_probs, const std::vector<float>& pred_scores,
                                    const std::vector<int64_t>& pred_labels, const SegmentationOptions& opt,
                                    const std::vector<int64_t>& label_ids_to_fuse) {
  const int64_t k_count = mask_probs.size(0), height = mask_probs.size(1), width = mask_probs.size(2);
  const Tensor scores = Tensor::from_vector<float>({k_count}, pred_scores);
  const Tensor owner_here = argmax_planes(mask_probs, scores, DType::I32);
  const Tensor area_t = bincount(owner_here, k_count).cpu();
  const Tensor original_area_t =
      count_at_least(mask_probs, scores, static_cast<float>(opt.mask_threshold)).cpu();
  const Tensor owner = owner_here.cpu();
  const int64_t* area = area_t.data<int64_t>();
  const int64_t* original_area = original_area_t.data<int64_t>();

  SegmentationResult r;
  std::vector<int32_t> segment_of(static_cast<size_t>(k_count), 0);
  std::vector<std::pair<int64_t, int64_t>> fused_ids;  // label -> segment id
  int64_t current_id = 0;
  const std::set<int64_t> fuse(label_ids_to_fuse.begin(), label_ids_to_fuse.end());
  for (int64_t k = 0; k < k_count; ++k) {
    const int64_t label = pred_labels[k];
    const bool should_fuse = fuse.count(label) != 0;
    bool exists = area[k] > 0 && original_area[k] > 0;
    if (exists) {
      // An int64 / int64 tensor division gives float32, compared as a Python float.
      const float ratio = static_cast<float>(area[k]) / static_cast<float>(original_area[k]);
      if (!(static_cast<double>(ratio) > opt.overlap_mask_area_threshold)) exists = false;
    }
    if (!exists) continue;
    auto fused = std::find_if(fused_ids.begin(), fused_ids.end(), [&](auto& e) { return e.first == label; });
    if (fused != fused_ids.end())
      current_id = fused->second;
    else
      ++current_id;
    segment_of[k] = static_cast<int32_t>(current_id);
    r.segments_info.push_back({current_id, label, should_fuse, round6(pred_scores[k])});
    if (should_fuse && fused == fused_ids.end()) fused_ids.emplace_back(label, current_id);
  }

  r.segmentation = Tensor::empty({height, width}, DType::I32);
  int32_t* seg = r.segmentation.data<int32_t>();
  const int32_t* o = owner.data<int32_t>();
  for (int64_t p = 0, n = height * width; p < n; ++p) seg[p] = segment_of[o[p]];
  return r;
}

std::vector<SegmentationResult> instance_or_panoptic(DetrPostKind kind, const Tensor& logits_in,
                                                     const Tensor& pred_masks, const SegmentationOptions& opt,
                                                     bool panoptic) {
  const auto hold = hold_device_of(logits_in, pred_masks);
  const Tensor logits = logits_in.cpu();  // small: the query scores are picked on the host
  const int64_t batch = logits.size(0), queries = logits.size(1), classes = logits.size(2);
  const int64_t mh = pred_masks.size(2), mw = pred_masks.size(3);
  require_target_sizes(opt.target_sizes, batch);
  // The last logit is "no object" here for Conditional DETR too (the reference reuses DETR's code).
  const int64_t no_object = classes - 1;
  const float threshold = static_cast<float>(opt.threshold);

  std::vector<SegmentationResult> results;
  for (int64_t b = 0; b < batch; ++b) {
    Tensor prob = softmax_rows(logits[b]);
    std::vector<int64_t> kept;
    std::vector<float> scores;
    std::vector<int64_t> labels;
    for (int64_t q = 0; q < queries; ++q) {
      const float* p = prob.f32() + q * classes;
      int64_t best = 0;
      for (int64_t c = 1; c < classes; ++c)
        if (p[c] > p[best]) best = c;
      if (best != no_object && p[best] > threshold) {
        kept.push_back(q);
        scores.push_back(p[best]);
        labels.push_back(best);
      }
    }
    const TargetSize* target = opt.target_sizes.empty() ? nullptr : &opt.target_sizes[b];
    if (kept.empty()) {
      SegmentationResult r;
      r.segmentation = Tensor::full({target ? target->height : mh, target ? target->width : mw}, -1.0f);
      results.push_back(std::move(r));
      continue;
    }
    SegmentationResult r = compute_segments(kept_mask_probs(pred_masks, b, kept, target), scores, labels, opt,
                                            panoptic ? opt.label_ids_to_fuse : std::vector<int64_t>{});
    if (!panoptic && opt.return_coco_annotation) {
      const int32_t* seg = r.segmentation.data<int32_t>();
      const int64_t n = r.segmentation.numel();
      std::set<int32_t> values(seg, seg + n);
      std::vector<uint8_t> mask(static_cast<size_t>(n));
      for (int32_t v : values) {
        for (int64_t p = 0; p < n; ++p) mask[p] = seg[p] == v;
        r.rle.push_back(binary_mask_to_rle(mask.data(), n));
      }
      r.has_rle = true;
    }
    results.push_back(std::move(r));
  }
  return results;
}

}  // namespace

std::vector<Tensor> post_process_semantic_segmentation(DetrPostKind kind, const Tensor& logits_in,
                                                       const Tensor& pred_masks,
                                                       const std::vector<TargetSize>& target_sizes) {
  require_segmentation_inputs(kind, logits_in, pred_masks, "post_process_semantic_segmentation");
  const auto hold = hold_device_of(logits_in, pred_masks);
  const Tensor logits = logits_in.cpu();  // small: the class weights are made on the host
  const int64_t batch = logits.size(0), queries = logits.size(1), classes = logits.size(2);
  const int64_t mh = pred_masks.size(2), mw = pred_masks.size(3), mn = mh * mw;
  require_target_sizes(target_sizes, batch);
  // DETR drops its "no object" class; Conditional DETR (sigmoid-trained, no such class) keeps all.
  const int64_t used = kind == DetrPostKind::Detr ? classes - 1 : classes;
  if (used < 1) throw Error("post-processing: logits have no classes");

  std::vector<Tensor> results;
  for (int64_t b = 0; b < batch; ++b) {
    Tensor prob = softmax_rows(logits[b]);
    Tensor class_by_query = Tensor::empty({used, queries});  // [C, Q]
    for (int64_t c = 0; c < used; ++c)
      for (int64_t q = 0; q < queries; ++q) class_by_query.f32()[c * queries + q] = prob.f32()[q * classes + c];
    // The per-pixel work where the masks are.
    Tensor mask_probs = pred_masks[b].reshape({queries, mn}).clone();
    act_inplace(mask_probs, Act::Sigmoid);
    // einsum("qc,qhw->chw")
    Tensor seg = matmul(class_by_query.to(pred_masks.device()), mask_probs).reshape({1, used, mh, mw});
    if (!target_sizes.empty()) seg = interpolate_bilinear(seg, target_sizes[b].height, target_sizes[b].width);
    results.push_back(argmax_planes(seg.reshape({used, seg.size(2), seg.size(3)})).cpu());
  }
  return results;
}

std::vector<SegmentationResult> post_process_instance_segmentation(DetrPostKind kind, const Tensor& logits,
                                                                   const Tensor& pred_masks,
                                                                   const SegmentationOptions& opt) {
  require_segmentation_inputs(kind, logits, pred_masks, "post_process_instance_segmentation");
  return instance_or_panoptic(kind, logits, pred_masks, opt, false);
}

std::vector<SegmentationResult> post_process_panoptic_segmentation(DetrPostKind kind, const Tensor& logits,
                                                                   const Tensor& pred_masks,
                                                                   const SegmentationOptions& opt) {
  require_segmentation_inputs(kind, logits, pred_masks, "post_process_panoptic_segmentation");
  return instance_or_panoptic(kind, logits, pred_masks, opt, true);
}

std::vector<int64_t> binary_mask_to_rle(const uint8_t* mask, int64_t n) {
  std::vector<int64_t> runs;
  uint8_t prev = 0;
  for (int64_t i = 0; i <= n; ++i) {
    const uint8_t cur = i < n ? (mask[i] != 0) : 0;
    if (cur != prev) {
      if (cur)
        runs.push_back(i + 1);  // 1-based start
      else
        runs.push_back(i + 1 - runs.back());  // length
      prev = cur;
    }
  }
  return runs;
}

}  // namespace vf
