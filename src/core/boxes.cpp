#include "core/boxes.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/backend.h"
#include "core/ops.h"

namespace vf {

namespace {

void require_boxes(const Tensor& t, const char* what, bool two_dims) {
  if (!t.defined()) throw Error(std::string(what) + ": boxes tensor is undefined");
  if (t.dtype() != DType::F32) throw Error(std::string(what) + ": boxes must be float32, got " + dtype_name(t.dtype()));
  if (t.dim() < 1 || t.size(-1) != 4 || (two_dims && t.dim() != 2))
    throw Error(std::string(what) + ": boxes must have shape " + (two_dims ? "[N, 4]" : "[..., 4]") + ", got " +
                shape_str(t.shape()));
}

// Indices sorted by decreasing score, NaN first; equal scores keep their input order (torchvision's
// stable descending torch.sort).
std::vector<int64_t> order_by_score(const float* scores, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score_above(scores[a], scores[b]); });
  return order;
}

}  // namespace

Tensor center_to_corners(const Tensor& boxes) {
  require_boxes(boxes, "center_to_corners", false);
  Tensor out = Tensor::empty(boxes.shape());
  const float* b = boxes.f32();
  float* o = out.f32();
  const int64_t n = boxes.numel() / 4;
  for (int64_t i = 0; i < n; ++i) {
    const float cx = b[4 * i], cy = b[4 * i + 1], w = b[4 * i + 2], h = b[4 * i + 3];
    o[4 * i] = cx - 0.5f * w;
    o[4 * i + 1] = cy - 0.5f * h;
    o[4 * i + 2] = cx + 0.5f * w;
    o[4 * i + 3] = cy + 0.5f * h;
  }
  return out;
}

Tensor corners_to_center(const Tensor& boxes) {
  require_boxes(boxes, "corners_to_center", false);
  Tensor out = Tensor::empty(boxes.shape());
  const float* b = boxes.f32();
  float* o = out.f32();
  const int64_t n = boxes.numel() / 4;
  for (int64_t i = 0; i < n; ++i) {
    const float x0 = b[4 * i], y0 = b[4 * i + 1], x1 = b[4 * i + 2], y1 = b[4 * i + 3];
    o[4 * i] = (x0 + x1) / 2;
    o[4 * i + 1] = (y0 + y1) / 2;
    o[4 * i + 2] = x1 - x0;
    o[4 * i + 3] = y1 - y0;
  }
  return out;
}

Tensor box_area(const Tensor& boxes) {
  require_boxes(boxes, "box_area", true);
  const int64_t n = boxes.size(0);
  Tensor out = Tensor::empty({n});
  const float* b = boxes.f32();
  for (int64_t i = 0; i < n; ++i) out.f32()[i] = (b[4 * i + 2] - b[4 * i]) * (b[4 * i + 3] - b[4 * i + 1]);
  return out;
}

BoxIou box_iou(const Tensor& a, const Tensor& b) {
  require_boxes(a, "box_iou", true);
  require_boxes(b, "box_iou", true);
  const int64_t n = a.size(0), m = b.size(0);
  Tensor area_a = box_area(a), area_b = box_area(b);
  BoxIou r{Tensor::empty({n, m}), Tensor::empty({n, m})};
  const float* pa = a.f32();
  const float* pb = b.f32();
  for (int64_t i = 0; i < n; ++i) {
    const float* bi = pa + 4 * i;
    for (int64_t j = 0; j < m; ++j) {
      const float* bj = pb + 4 * j;
      const float w = std::max(std::min(bi[2], bj[2]) - std::max(bi[0], bj[0]), 0.0f);
      const float h = std::max(std::min(bi[3], bj[3]) - std::max(bi[1], bj[1]), 0.0f);
      const float inter = w * h;
      const float uni = area_a.f32()[i] + area_b.f32()[j] - inter;
      r.iou.f32()[i * m + j] = inter / uni;
      r.union_area.f32()[i * m + j] = uni;
    }
  }
  return r;
}

Tensor generalized_box_iou(const Tensor& a, const Tensor& b) {
  require_boxes(a, "generalized_box_iou", true);
  require_boxes(b, "generalized_box_iou", true);
  for (const Tensor* t : {&a, &b}) {
    const float* p = t->f32();
    for (int64_t i = 0; i < t->size(0); ++i)
      if (!(p[4 * i + 2] >= p[4 * i] && p[4 * i + 3] >= p[4 * i + 1]))
        throw Error("generalized_box_iou: box " + std::to_string(i) + " is not in (x0, y0, x1, y1) corner format " +
                    "with x1 >= x0 and y1 >= y0");
  }
  BoxIou iu = box_iou(a, b);
  const int64_t n = a.size(0), m = b.size(0);
  Tensor out = Tensor::empty({n, m});
  const float* pa = a.f32();
  const float* pb = b.f32();
  for (int64_t i = 0; i < n; ++i) {
    const float* bi = pa + 4 * i;
    for (int64_t j = 0; j < m; ++j) {
      const float* bj = pb + 4 * j;
      const float w = std::max(std::max(bi[2], bj[2]) - std::min(bi[0], bj[0]), 0.0f);
      const float h = std::max(std::max(bi[3], bj[3]) - std::min(bi[1], bj[1]), 0.0f);
      const float enclosing = w * h;
      const float uni = iu.union_area.f32()[i * m + j];
      out.f32()[i * m + j] = iu.iou.f32()[i * m + j] - (enclosing - uni) / enclosing;
    }
  }
  return out;
}

std::vector<int64_t> nms(const float* boxes, const float* scores, int64_t n, double iou_threshold) {
  std::vector<int64_t> keep;
  if (n <= 0) return keep;
  // The boxes in score order, a coordinate per array, so that a kept box is compared with all later
  // ones in one vectorised pass. Boxes already suppressed are compared too (the reference skips
  // them): that only suppresses them again, so the kept list is the same, and the IoU is the same
  // expression in the same order.
  const std::vector<int64_t> order = order_by_score(scores, n);
  std::vector<float> x1(n), y1(n), x2(n), y2(n), area(n);
  for (int64_t o = 0; o < n; ++o) {
    const float* b = boxes + 4 * order[o];
    x1[o] = b[0], y1[o] = b[1], x2[o] = b[2], y2[o] = b[3];
    area[o] = (b[2] - b[0]) * (b[3] - b[1]);
  }
  std::vector<uint8_t> suppressed(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    if (suppressed[i]) continue;
    keep.push_back(order[i]);
    const float ax1 = x1[i], ay1 = y1[i], ax2 = x2[i], ay2 = y2[i], a = area[i];
    for (int64_t j = i + 1; j < n; ++j) {
      const float w = std::max(0.0f, std::min(ax2, x2[j]) - std::max(ax1, x1[j]));
      const float h = std::max(0.0f, std::min(ay2, y2[j]) - std::max(ay1, y1[j]));
      const float inter = w * h;
      const float iou = inter / (a + area[j] - inter);
      suppressed[j] |= static_cast<uint8_t>(iou > iou_threshold);
    }
  }
  return keep;
}

std::vector<int64_t> nms(const Tensor& boxes, const Tensor& scores, double iou_threshold) {
  require_boxes(boxes, "nms", true);
  if (scores.dtype() != DType::F32 || scores.dim() != 1 || scores.size(0) != boxes.size(0))
    throw Error("nms: scores must be float32 [" + std::to_string(boxes.size(0)) + "], got " +
                dtype_name(scores.dtype()) + " " + shape_str(scores.shape()));
  return nms(boxes.f32(), scores.f32(), boxes.size(0), iou_threshold);
}

std::vector<int64_t> batched_nms(const Tensor& boxes, const Tensor& scores, const Tensor& group_ids,
                                 double iou_threshold) {
  require_boxes(boxes, "batched_nms", true);
  const int64_t n = boxes.size(0);
  if (scores.dtype() != DType::F32 || scores.dim() != 1 || scores.size(0) != n)
    throw Error("batched_nms: scores must be float32 [" + std::to_string(n) + "], got " +
                dtype_name(scores.dtype()) + " " + shape_str(scores.shape()));
  if (group_ids.dim() != 1 || group_ids.size(0) != n)
    throw Error("batched_nms: group ids must have shape [" + std::to_string(n) + "], got " +
                shape_str(group_ids.shape()));
  if (n == 0) return {};
  const Tensor ids = group_ids.dtype() == DType::I64 ? group_ids : group_ids.to(DType::I64);
  const int64_t* gid = ids.data<int64_t>();
  const float* b = boxes.f32();
  const float* s = scores.f32();

  // torchvision switches strategy on boxes.numel() > 4000 (on CPU).
  if (boxes.numel() <= 4000) {
    // boxes.max(), which is NaN when any coordinate is (then no box is suppressed).
    float max_coord = b[0];
    for (int64_t i = 1; i < 4 * n; ++i)
      max_coord = std::isnan(max_coord) || std::isnan(b[i]) ? NAN : std::max(max_coord, b[i]);
    std::vector<float> shifted(static_cast<size_t>(4 * n));
    for (int64_t i = 0; i < n; ++i) {
      const float offset = static_cast<float>(gid[i]) * (max_coord + 1.0f);
      for (int k = 0; k < 4; ++k) shifted[4 * i + k] = b[4 * i + k] + offset;
    }
    return nms(shifted.data(), s, n, iou_threshold);
  }

  std::vector<int64_t> groups(gid, gid + n);
  std::sort(groups.begin(), groups.end());
  groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
  std::vector<uint8_t> kept(static_cast<size_t>(n), 0);
  std::vector<int64_t> members;
  std::vector<float> gb, gs;
  for (int64_t g : groups) {
    members.clear();
    gb.clear();
    gs.clear();
    for (int64_t i = 0; i < n; ++i)
      if (gid[i] == g) {
        members.push_back(i);
        gb.insert(gb.end(), b + 4 * i, b + 4 * i + 4);
        gs.push_back(s[i]);
      }
    for (int64_t k : nms(gb.data(), gs.data(), static_cast<int64_t>(members.size()), iou_threshold))
      kept[members[k]] = 1;
  }
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < n; ++i)
    if (kept[i]) keep.push_back(i);
  std::stable_sort(keep.begin(), keep.end(), [&](int64_t x, int64_t y) { return score_above(s[x], s[y]); });
  return keep;
}

// ---- two-stage proposals ----

std::vector<int64_t> level_nms_select(const float* logits, const float* scores, const float* centers,
                                      const std::vector<int64_t>& level_sizes, int64_t k, int64_t pre_nms_topk,
                                      double iou_threshold) {
  const int64_t L = static_cast<int64_t>(level_sizes.size());
  const int64_t S = std::accumulate(level_sizes.begin(), level_sizes.end(), int64_t{0});
  std::vector<int64_t> level_ids;
  level_ids.reserve(static_cast<size_t>(S));
  for (int64_t l = 0; l < L; ++l) level_ids.insert(level_ids.end(), static_cast<size_t>(level_sizes[l]), l);

  // Proposal boxes: center_to_corners(sigmoid(coord logits)).clamp(0, 1) (a NaN stays NaN).
  Tensor boxes = center_to_corners(Tensor::from_vector<float>({S, 4}, std::vector<float>(centers, centers + 4 * S)));
  for (int64_t i = 0; i < boxes.numel(); ++i) boxes.f32()[i] = std::min(std::max(boxes.f32()[i], 0.f), 1.f);

  // Per level, the top pre_nms_topk of sigmoid(logit) * (position in the level). When a level has
  // fewer positions the rest are zero-score positions of other levels, in index order (torch.topk
  // leaves the order of ties unspecified). They are duplicates of positions their own level already
  // holds whenever no level exceeds pre_nms_topk positions, and NMS drops duplicates.
  std::vector<float> level_score(static_cast<size_t>(S));
  std::vector<int64_t> pre_nms_inds;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t s = 0; s < S; ++s) level_score[s] = scores[s] * static_cast<float>(level_ids[s] == l);
    auto top = topk_indices(level_score.data(), S, pre_nms_topk);
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
  for (int64_t i : batched_nms(pre_boxes, pre_scores, pre_levels, iou_threshold)) keep_inds.push_back(pre_nms_inds[i]);
  if (static_cast<int64_t>(keep_inds.size()) < k) keep_inds = topk_indices(logits, S, k);

  // Keep the first k / L of each level (in score order), then top up with the first of the rest.
  const int64_t q_per_l = k / L;
  std::vector<int64_t> per_level(static_cast<size_t>(L), 0);
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

Tensor level_nms_proposals(const Tensor& logits, const Tensor& coord_logits, const std::vector<int64_t>& level_sizes,
                           int64_t k, int64_t pre_nms_topk, double iou_threshold) {
  if (logits.dim() != 2 || logits.dtype() != DType::F32)
    throw Error("level_nms_proposals: logits must be float32 [B, S], got " + shape_str(logits.shape()));
  const int64_t B = logits.size(0), S = logits.size(1);
  if (coord_logits.dtype() != DType::F32 || coord_logits.shape() != Shape{B, S, 4} ||
      coord_logits.device() != logits.device())
    throw Error("level_nms_proposals: coord_logits must be float32 [" + std::to_string(B) + ", " + std::to_string(S) +
                ", 4] on the logits' device, got " + shape_str(coord_logits.shape()));
  if (level_sizes.empty() || std::any_of(level_sizes.begin(), level_sizes.end(), [](int64_t n) { return n <= 0; }) ||
      std::accumulate(level_sizes.begin(), level_sizes.end(), int64_t{0}) != S)
    throw Error("level_nms_proposals: the level sizes must be positive and sum to S = " + std::to_string(S));
  if (k < 0 || k > S || pre_nms_topk < 1 || pre_nms_topk > S)
    throw Error("level_nms_proposals: k = " + std::to_string(k) + " and pre_nms_topk = " + std::to_string(pre_nms_topk) +
                " must be within the " + std::to_string(S) + " positions");
  if (!logits.is_cpu())
    return backend(logits.device()).level_nms_proposals(logits, coord_logits, level_sizes, k, pre_nms_topk, iou_threshold);
  Tensor r = Tensor::empty({B, k}, DType::I64);
  std::vector<float> scores(static_cast<size_t>(S)), centers(static_cast<size_t>(4 * S));
  for (int64_t b = 0; b < B; ++b) {
    const float* lg = logits.f32() + b * S;
    const float* cl = coord_logits.f32() + b * S * 4;
    for (int64_t s = 0; s < S; ++s) scores[s] = sigmoid(lg[s]);
    for (int64_t i = 0; i < 4 * S; ++i) centers[i] = sigmoid(cl[i]);
    const std::vector<int64_t> chosen =
        level_nms_select(lg, scores.data(), centers.data(), level_sizes, k, pre_nms_topk, iou_threshold);
    std::copy(chosen.begin(), chosen.end(), r.data<int64_t>() + b * k);
  }
  return r;
}

// ---- in logit space ----

namespace {

float inverse_sigmoid_of(float x, float eps) {
  x = std::clamp(x, 0.f, 1.f);
  return std::log(std::max(x, eps) / std::max(1.f - x, eps));
}

}  // namespace

Tensor inverse_sigmoid(const Tensor& x, float eps) {
  if (x.dtype() != DType::F32) throw Error(std::string("inverse_sigmoid: float32 expected, got ") + dtype_name(x.dtype()));
  if (!x.is_cpu()) return backend(x.device()).inverse_sigmoid(x, eps);
  Tensor y = Tensor::empty(x.shape());
  const float* px = x.f32();
  float* py = y.f32();
  const int64_t n = x.numel();
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) py[i] = inverse_sigmoid_of(px[i], eps);
  return y;
}

Tensor refine_boxes(const Tensor& delta, const Tensor& reference, float eps) {
  if (delta.dtype() != DType::F32 || reference.dtype() != DType::F32 || delta.dim() < 1 || delta.size(-1) != 4 ||
      reference.dim() != delta.dim() || reference.size(-1) < 1 || reference.size(-1) > 4 ||
      delta.numel() / 4 != reference.numel() / reference.size(-1))
    throw Error("refine_boxes: expected float32 [..., 4] offsets and [..., 1 to 4] references, got " +
                shape_str(delta.shape()) + " and " + shape_str(reference.shape()));
  if (Device d = op_device({&delta, &reference}); !d.is_cpu()) return backend(d).refine_boxes(delta, reference, eps);
  const int64_t rows = delta.numel() / 4, nc = reference.size(-1);
  Tensor out = Tensor::empty(delta.shape());
  const float* d = delta.f32();
  const float* r = reference.f32();
  float* o = out.f32();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < 4; ++k) {
      float v = d[i * 4 + k];
      if (k < nc) v += inverse_sigmoid_of(r[i * nc + k], eps);
      o[i * 4 + k] = sigmoid(v);
    }
  return out;
}

}  // namespace vf
