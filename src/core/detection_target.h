// One image's object-detection target: what the DETR-family processors return in `labels` and
// what the DETR-family models take as `labels` (the same dict in transformers).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace vf {

struct DetectionTarget {
  Tensor size;          // int64 [2]: the resized (or, after padding, the padded) height, width
  Tensor image_id;      // int64 [1]
  Tensor class_labels;  // int64 [N]
  Tensor boxes;         // float32 [N, 4]: normalised (cx, cy, w, h) with do_convert_annotations, else xyxy pixels
  Tensor area;          // float32 [N]
  Tensor iscrowd;       // int64 [N]
  Tensor orig_size;     // int64 [2]
  Tensor masks;         // bool or float32 [N, H, W] (panoptic, or return_segmentation_masks)

  // The defined fields, by their reference names.
  std::vector<std::pair<std::string, const Tensor*>> fields() const {
    std::vector<std::pair<std::string, const Tensor*>> f;
    auto add = [&](const char* name, const Tensor& t) {
      if (t.defined()) f.emplace_back(name, &t);
    };
    add("size", size);
    add("image_id", image_id);
    add("class_labels", class_labels);
    add("boxes", boxes);
    add("area", area);
    add("iscrowd", iscrowd);
    add("orig_size", orig_size);
    add("masks", masks);
    return f;
  }
};

}  // namespace vf
