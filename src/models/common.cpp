#include "models/common.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>

namespace vf {

Tensor classification_loss(const Tensor& logits_in, const Tensor& labels, const json& config) {
  Tensor logits = logits_in.cpu().to(DType::F32);  // the loss is computed on the host
  int64_t num_labels = logits.size(-1);
  int64_t batch = logits.numel() / std::max<int64_t>(num_labels, 1);
  bool integer_labels = labels.dtype() == DType::I64 || labels.dtype() == DType::I32;
  std::string problem = cfg_get<std::string>(config, "problem_type", "");
  if (problem.empty()) {
    if (num_labels == 1) problem = "regression";
    else if (integer_labels) problem = "single_label_classification";
    else problem = "multi_label_classification";
  }
  const float* z = logits.f32();
  double loss = 0;
  if (problem == "regression") {
    Tensor y = labels.to(DType::F32);
    if (y.numel() != logits.numel()) throw Error("regression labels of shape " + shape_str(labels.shape()) + " for logits " + shape_str(logits.shape()));
    for (int64_t i = 0; i < y.numel(); ++i) { double d = double(z[i]) - y.f32()[i]; loss += d * d; }
    loss /= std::max<int64_t>(y.numel(), 1);
  } else if (problem == "single_label_classification") {
    Tensor y = labels.to(DType::I64);
    if (y.numel() != batch) throw Error("expected " + std::to_string(batch) + " labels, got " + shape_str(labels.shape()));
    int64_t counted = 0;
    for (int64_t b = 0; b < batch; ++b) {
      int64_t t = y.data<int64_t>()[b];
      if (t == -100) continue;  // ignore_index
      if (t < 0 || t >= num_labels) throw Error("label " + std::to_string(t) + " out of range [0, " + std::to_string(num_labels) + ")");
      const float* row = z + b * num_labels;
      double m = *std::max_element(row, row + num_labels), s = 0;
      for (int64_t k = 0; k < num_labels; ++k) s += std::exp(double(row[k]) - m);
      loss += (m + std::log(s)) - row[t];
      ++counted;
    }
    loss = counted ? loss / counted : NAN;
  } else if (problem == "multi_label_classification") {
    Tensor y = labels.to(DType::F32);
    if (y.numel() != logits.numel()) throw Error("multi-label labels of shape " + shape_str(labels.shape()) + " for logits " + shape_str(logits.shape()));
    for (int64_t i = 0; i < y.numel(); ++i) {
      double x = z[i], t = y.f32()[i];
      loss += std::max(x, 0.0) - x * t + std::log1p(std::exp(-std::fabs(x)));
    }
    loss /= std::max<int64_t>(y.numel(), 1);
  } else {
    throw ModelError("unknown problem_type '" + problem + "'");
  }
  return Tensor::from<float>({1}, {float(loss)});
}

std::vector<int> backbone_out_indices(const json& config, const std::vector<std::string>& stage_names) {
  int n = static_cast<int>(stage_names.size());
  auto features = cfg_get<std::vector<std::string>>(config, "out_features", {});
  auto indices = cfg_get<std::vector<int>>(config, "out_indices", {});
  std::vector<int> out;
  if (!features.empty()) {
    for (auto& f : features) {
      auto it = std::find(stage_names.begin(), stage_names.end(), f);
      if (it == stage_names.end()) throw ModelError("out_features names unknown stage '" + f + "'");
      out.push_back(static_cast<int>(it - stage_names.begin()));
    }
    if (!indices.empty()) {
      if (indices.size() != features.size()) throw ModelError("out_features and out_indices differ in length");
      for (size_t i = 0; i < indices.size(); ++i)
        if (((indices[i] % n) + n) % n != out[i]) throw ModelError("out_features and out_indices disagree");
    }
  } else if (!indices.empty()) {
    for (int i : indices) {
      if (i < -n || i >= n) throw ModelError("out_indices has " + std::to_string(i) + " for " + std::to_string(n) + " stages");
      out.push_back((i + n) % n);
    }
  } else {
    out.push_back(n - 1);
  }
  std::sort(out.begin(), out.end());  // feature maps come out in stage order
  return out;
}

Weights base_model_weights(const Weights& root, const std::string& prefix) {
  return root.has_module(prefix) ? root.pp(prefix) : root;
}

int config_num_labels(const json& config) {
  auto it = config.find("id2label");
  if (it != config.end() && it->is_object() && !it->empty()) return static_cast<int>(it->size());
  return cfg_get<int>(config, "num_labels", 2);
}

Tensor as_nchw_1x1(const Tensor& pooled) { return pooled.reshape({pooled.size(0), pooled.size(1), 1, 1}); }

}  // namespace vf
