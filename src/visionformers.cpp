#include "visionformers.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "io/checkpoint.h"
#include "io/json.h"

namespace vf {

namespace fs = std::filesystem;

Pretrained Pretrained::from_pretrained(const std::string& dir, const std::string& architecture) {
  Pretrained p;
  p.dir = dir;
  if (!fs::is_directory(dir)) throw Error(dir + ": not a model folder");
  p.config = read_json_file((fs::path(dir) / "config.json").string());
  fs::path pre = fs::path(dir) / "preprocessor_config.json";
  if (fs::exists(pre)) {
    p.preprocessor = read_json_file(pre.string());
    p.processor = create_image_processor(p.preprocessor);
  }
  auto store = load_checkpoint(dir);
  p.model = create_model(p.config, architecture, Weights(store));
  store->check_complete();
  return p;
}

ModelOutput Pretrained::run(const std::vector<Image>& images, bool output_hidden_states, bool output_attentions) const {
  if (!processor) throw Error(dir + ": no preprocessor_config.json");
  BatchFeature f = processor->preprocess(images);
  ModelInputs in;
  in.pixel_values = f.pixel_values;
  in.pixel_mask = f.pixel_mask;
  in.output_hidden_states = output_hidden_states;
  in.output_attentions = output_attentions;
  return model->forward(in);
}

std::vector<std::vector<LabelScore>> classify(const Pretrained& p, const std::vector<Image>& images, int top_k) {
  ModelOutput out = p.run(images);
  if (!out.has("logits")) throw Error(p.model->architecture + " has no classification head (no logits)");
  const Tensor& logits = out.get("logits");
  int64_t n = logits.size(0), c = logits.size(-1);
  std::vector<std::vector<LabelScore>> result(n);
  for (int64_t b = 0; b < n; ++b) {
    const float* z = logits.f32() + b * c;
    float m = *std::max_element(z, z + c);
    double s = 0;
    for (int64_t k = 0; k < c; ++k) s += std::exp(double(z[k]) - m);
    std::vector<LabelScore> all;
    for (int64_t k = 0; k < c; ++k) {
      std::string label = k < int64_t(p.model->id2label.size()) ? p.model->id2label[k] : "LABEL_" + std::to_string(k);
      all.push_back({label, float(std::exp(double(z[k]) - m) / s)});
    }
    std::stable_sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.score > b.score; });
    all.resize(std::min<size_t>(all.size(), std::max(top_k, 0)));
    result[b] = std::move(all);
  }
  return result;
}

}  // namespace vf
