// Post-processing of the DETR family's outputs into detections and segmentations, as the
// reference image processors do (DetrImageProcessor, ConditionalDetrImageProcessor,
// DeformableDetrImageProcessor and the 4.x DetaImageProcessor `post_process_*` methods).
//
// Each family scores its queries differently:
//   DETR              softmax over the classes plus "no object"; a query's score is its best real class
//   Conditional DETR  sigmoid; the top-k (query, class) pairs over all queries
//   Deformable DETR   as Conditional DETR
//   DETA              sigmoid; the top 10,000 pairs, class-wise NMS, the first 100 kept
// Inputs are the models' outputs: logits [B, Q, C(+1)], pred_boxes [B, Q, 4] (normalised cx, cy, w, h),
// pred_masks [B, Q, H, W] (mask logits).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace vf {

enum class DetrPostKind { Detr, ConditionalDetr, DeformableDetr, Deta };

// From a model_type ("detr", "conditional_detr", "deformable_detr", "deta"), a golden case's family,
// or a processor class name ("DetrImageProcessor", "DeformableDetrImageProcessorFast", ...).
DetrPostKind detr_post_kind(const std::string& name);
const char* detr_post_kind_name(DetrPostKind kind);

struct TargetSize {
  int64_t height = 0;
  int64_t width = 0;
};

// ---- object detection ---------------------------------------------------------------------------
struct ObjectDetectionOptions {
  double threshold = 0.5;               // keep scores > threshold
  std::vector<TargetSize> target_sizes;  // one per image: boxes in pixels; empty: relative [0, 1]
  int64_t top_k = 100;                   // Conditional / Deformable DETR
  double nms_threshold = 0.7;            // DETA
};

// One image's detections, best score first; boxes are (x0, y0, x1, y1).
struct Detections {
  Tensor scores;  // float32 [n]
  Tensor labels;  // int64 [n]
  Tensor boxes;   // float32 [n, 4]
};

std::vector<Detections> post_process_object_detection(DetrPostKind kind, const Tensor& logits,
                                                      const Tensor& pred_boxes,
                                                      const ObjectDetectionOptions& opt = {});

// ---- segmentation (DETR and Conditional DETR) ----------------------------------------------------
// logits and pred_masks may live on a device (Model::infer_on_device): the per-pixel work (sigmoid,
// bilinear resize, score weighting, argmax over queries, areas) then runs there through core ops
// (argmax_planes, count_at_least, bincount), and only the [H, W] map and per-query counts come back;
// query selection, segment ids and RLE stay on the host. Results are on the host either way. The
// device ops compute the CPU's float expressions (first maximum wins), so the emulated device gives
// the CPU's results exactly; on a GPU the sigmoid's expf may differ in the last bit and semantic's
// einsum is a cuBLAS product summed in another order, which can move a pixel whose margin is that small.
// Per image: int64 [H, W] class ids, at target_sizes[i] (bilinear resize of the class scores) or at
// the masks' resolution when target_sizes is empty.
std::vector<Tensor> post_process_semantic_segmentation(DetrPostKind kind, const Tensor& logits,
                                                       const Tensor& pred_masks,
                                                       const std::vector<TargetSize>& target_sizes = {});

struct SegmentInfo {
  int64_t id = 0;
  int64_t label_id = 0;
  bool was_fused = false;
  double score = 0;  // rounded to 6 decimals, as the reference
};

struct SegmentationResult {
  // int32 [H, W] segment ids (0 where no segment). When no query passes the threshold, the
  // reference returns a float32 map filled with -1 instead, and so do we.
  Tensor segmentation;
  // With return_coco_annotation (instance segmentation): the run-length encoding of each distinct
  // value of `segmentation`, in increasing order of value (COCO RLE: 1-based start, length, ...).
  bool has_rle = false;
  std::vector<std::vector<int64_t>> rle;
  std::vector<SegmentInfo> segments_info;
};

struct SegmentationOptions {
  double threshold = 0.5;
  double mask_threshold = 0.5;
  double overlap_mask_area_threshold = 0.8;
  std::vector<int64_t> label_ids_to_fuse;  // panoptic only
  std::vector<TargetSize> target_sizes;
  bool return_coco_annotation = false;     // instance only
};

std::vector<SegmentationResult> post_process_instance_segmentation(DetrPostKind kind, const Tensor& logits,
                                                                   const Tensor& pred_masks,
                                                                   const SegmentationOptions& opt = {});
std::vector<SegmentationResult> post_process_panoptic_segmentation(DetrPostKind kind, const Tensor& logits,
                                                                   const Tensor& pred_masks,
                                                                   const SegmentationOptions& opt = {});

// COCO run-length encoding of a binary mask given as row-major values (non-zero = inside).
std::vector<int64_t> binary_mask_to_rle(const uint8_t* mask, int64_t n);

}  // namespace vf
