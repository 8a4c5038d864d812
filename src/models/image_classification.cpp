#include "models/image_classification.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace vf {

int64_t config_num_labels(const json& config) {
  if (cfg_has(config, "num_labels")) return cfg_get<int64_t>(config, "num_labels", 2);
  auto it = config.find("id2label");
  if (it != config.end() && it->is_object()) return static_cast<int64_t>(it->size());
  return 2;
}

ClassifierHead::ClassifierHead(int64_t hidden, int64_t num_labels, const Weights& w) {
  if (num_labels > 0) linear_ = Linear(w.get("weight", {num_labels, hidden}), w.get("bias", {num_labels}));
}

Tensor ClassifierHead::forward(const Tensor& x) const { return linear_.defined() ? linear_.forward(x) : x.clone(); }

ClassificationLossConfig ClassificationLossConfig::from_json(const json& config) {
  ClassificationLossConfig c;
  c.num_labels = config_num_labels(config);
  c.problem_type = cfg_get<std::string>(config, "problem_type", "");
  if (!c.problem_type.empty() && c.problem_type != "regression" && c.problem_type != "single_label_classification" &&
      c.problem_type != "multi_label_classification")
    throw Error("config problem_type '" + c.problem_type +
                "' is not one of regression, single_label_classification, multi_label_classification");
  return c;
}

namespace {

Tensor scalar(double v) {
  Tensor t = Tensor::empty({});
  t.f32()[0] = static_cast<float>(v);
  return t;
}

bool is_integer_labels(const Tensor& labels) {
  return labels.dtype() == DType::I64 || labels.dtype() == DType::I32;
}

}  // namespace

Tensor image_classification_loss(const Tensor& logits, const Tensor& labels, const ClassificationLossConfig& cfg) {
  const int64_t n = cfg.num_labels;
  if (logits.dim() != 2 || logits.size(1) != n)
    throw Error("classification loss: logits " + shape_str(logits.shape()) + " are not [batch, " + std::to_string(n) +
                "]");
  std::string problem = cfg.problem_type;
  if (problem.empty()) {
    if (n == 1)
      problem = "regression";
    else if (n > 1 && is_integer_labels(labels))
      problem = "single_label_classification";
    else
      problem = "multi_label_classification";
  }
  const int64_t B = logits.size(0);
  const float* x = logits.f32();

  if (problem == "regression") {
    // MSELoss(logits.squeeze(), labels.squeeze()) for one label, MSELoss(logits, labels) otherwise:
    // the same elements pair up in both cases.
    Tensor y = labels.to(DType::F32);
    if (y.numel() != logits.numel())
      throw Error("regression loss: " + std::to_string(y.numel()) + " labels for logits " + shape_str(logits.shape()));
    double s = 0;
    for (int64_t i = 0; i < y.numel(); ++i) {
      double d = static_cast<double>(x[i]) - y.f32()[i];
      s += d * d;
    }
    return scalar(s / static_cast<double>(y.numel()));
  }

  if (problem == "single_label_classification") {
    // cross_entropy(logits.view(-1, n), labels.view(-1)), ignore_index -100, mean over the rest.
    if (!is_integer_labels(labels))
      throw Error("single-label classification loss needs integer class labels, got " +
                  std::string(dtype_name(labels.dtype())));
    Tensor y = labels.to(DType::I64);
    if (y.numel() != B)
      throw Error("classification loss: " + std::to_string(y.numel()) + " labels for a batch of " + std::to_string(B));
    double s = 0;
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      int64_t t = y.data<int64_t>()[b];
      if (t == -100) continue;
      if (t < 0 || t >= n)
        throw Error("classification loss: label " + std::to_string(t) + " is outside [0, " + std::to_string(n) + ")");
      const float* row = x + b * n;
      double mx = *std::max_element(row, row + n), z = 0;
      for (int64_t j = 0; j < n; ++j) z += std::exp(static_cast<double>(row[j]) - mx);
      s += mx + std::log(z) - row[t];
      ++count;
    }
    return scalar(count ? s / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN());
  }

  // multi_label_classification: BCEWithLogitsLoss(logits, labels), mean over every element.
  Tensor y = labels.to(DType::F32);
  if (y.numel() != logits.numel())
    throw Error("multi-label loss: labels " + shape_str(labels.shape()) + " do not match logits " +
                shape_str(logits.shape()));
  double s = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    double v = x[i], t = y.f32()[i];
    s += std::max(v, 0.0) - v * t + std::log1p(std::exp(-std::fabs(v)));
  }
  return scalar(s / static_cast<double>(y.numel()));
}

}  // namespace vf
