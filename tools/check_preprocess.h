// `vf check`, preprocessing stage: loads the case's images, runs its image processor and compares
// pixel_values / pixel_mask (or, for full-size synthetic cases, the shape and float64 stats of
// pixel_values) and the DETR-family `processed_labels` with the goldens.
#pragma once

#include "golden.h"
#include "processors/image_processor.h"

namespace vf::check {

// Runs the processor of c.preprocessor on case.json's `images` (from c.images_dir), passing
// case.json's `annotations` when present (panoptic masks are looked up in case.json's
// `masks_path`, relative to the case folder, else in the images folder). Reports every comparison
// and returns the processor's output for the model stage (empty for a case without images).
// `pixels_compared`, when given, receives how many pixel_values items (tensor or shape/stats) were
// compared.
BatchFeature run_preprocess(const Case& c, CheckReport& report, int* pixels_compared = nullptr);

// Compares `labels` with case.json's `processed_labels` (ints exact, floats within 1e-5).
void compare_processed_labels(const Case& c, const std::vector<DetectionTarget>& labels, CheckReport& report);

}  // namespace vf::check
