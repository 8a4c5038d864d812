#include "serve/results_json.h"

#include <cmath>

namespace vf::serve {

using ojson = nlohmann::ordered_json;

ojson classify_json(const std::vector<LabelScore>& labels) {
  ojson out = ojson::array();
  for (const auto& ls : labels) out.push_back({{"label", ls.label}, {"score", ls.score}});
  return out;
}

namespace {
// A box corner as the pipeline's int() gives it; a NaN corner (NaN weights or inputs, where int()
// raises in Python) is null, since JSON has no NaN, never -2147483648.
ojson corner_json(float exact, int truncated) { return std::isnan(exact) ? ojson(nullptr) : ojson(truncated); }
}  // namespace

ojson detect_json(const std::vector<DetectedObject>& objects) {
  ojson out = ojson::array();
  for (const auto& o : objects)
    out.push_back({{"score", o.score},
                   {"label", o.label},
                   {"box", {{"xmin", corner_json(o.x0, o.box.xmin)}, {"ymin", corner_json(o.y0, o.box.ymin)},
                            {"xmax", corner_json(o.x1, o.box.xmax)}, {"ymax", corner_json(o.y1, o.box.ymax)}}}});
  return out;
}

ojson segment_json(const SegmentedImage& seg, const std::vector<std::string>& mask_paths) {
  ojson out = ojson::array();
  for (size_t i = 0; i < seg.segments.size(); ++i) {
    const Segment& s = seg.segments[i];
    ojson one = {{"score", s.score ? ojson(*s.score) : ojson(nullptr)}, {"label", s.label}};
    if (i < mask_paths.size() && !mask_paths[i].empty()) one["mask"] = mask_paths[i];
    out.push_back(std::move(one));
  }
  return out;
}

std::string cli_json_text(const ojson& per_image) {
  return (per_image.size() == 1 ? per_image[0] : per_image).dump(2) + "\n";
}

}  // namespace vf::serve
