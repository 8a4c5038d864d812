// The JSON form of the front door's results, shared by `vf classify|detect|segment --json` and the
// server's answers (POST /v1/models/{name} returns exactly what the CLI prints for one image).
// Keys and their order are those of transformers' pipelines.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "visionformers.h"

namespace vf::serve {

// [{"label", "score"}, ...], best first.
nlohmann::ordered_json classify_json(const std::vector<LabelScore>& labels);
// [{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...].
nlohmann::ordered_json detect_json(const std::vector<DetectedObject>& objects);
// [{"score" (null for semantic), "label"[, "mask": path]}, ...]; mask_paths empty or one per segment.
nlohmann::ordered_json segment_json(const SegmentedImage& seg, const std::vector<std::string>& mask_paths = {});

// The CLI's text for a list of per-image results: the only element alone when there is one image.
std::string cli_json_text(const nlohmann::ordered_json& per_image);

}  // namespace vf::serve
