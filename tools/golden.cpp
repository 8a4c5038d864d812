#include "golden.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/ops.h"

namespace vf::check {

void CheckReport::compare(const std::string& name, const Tensor& ours, const Tensor& ref, double abs_tol) {
  if (ours.shape() != ref.shape()) {
    fail(name, "shape " + shape_str(ours.shape()) + ", expected " + shape_str(ref.shape()));
    return;
  }
  ++checked_;
  Tensor a = ours.to(DType::F64), b = ref.to(DType::F64);
  const double* pa = a.data<double>();
  const double* pb = b.data<double>();
  double err = 0;
  bool nan = false;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::isnan(pa[i]) != std::isnan(pb[i])) nan = true;
    if (!std::isnan(pa[i]) && !std::isnan(pb[i])) err = std::max(err, std::fabs(pa[i] - pb[i]));
  }
  bool good = !nan && err <= abs_tol;
  std::printf("  %-40s max|err| = %.3g  (tol %.3g)  %s\n", name.c_str(), err, abs_tol,
              good ? "ok" : (nan ? "FAIL (NaN mismatch)" : "FAIL"));
  if (!good) ++failures_;
}

void CheckReport::compare_scaled(const std::string& name, const Tensor& ours, const Tensor& ref, double rel_tol) {
  double scale = 1.0;
  Tensor b = ref.to(DType::F64);
  for (int64_t i = 0; i < b.numel(); ++i)
    if (std::isfinite(b.data<double>()[i])) scale = std::max(scale, std::fabs(b.data<double>()[i]));
  compare(name, ours, ref, rel_tol * scale);
}

void CheckReport::pass(const std::string& name, const std::string& detail) {
  ++checked_;
  std::printf("  %-40s %s  ok\n", name.c_str(), detail.c_str());
}

void CheckReport::fail(const std::string& name, const std::string& detail) {
  ++checked_;
  ++failures_;
  std::printf("  %-40s %s  FAIL\n", name.c_str(), detail.c_str());
}

bool is_model_output(const std::string& name) {
  return name != "pixel_values" && name != "pixel_mask" && name.rfind("pixel_values_", 0) != 0 &&
         name.rfind("input.", 0) != 0 && name.rfind("post", 0) != 0;
}

Tensor model_output_for(const ModelOutput& out, const std::string& name) {
  if (out.has(name)) return out.get(name);
  if (name == "pred_masks_first4" && out.has("pred_masks")) {
    const Tensor& m = out.get("pred_masks");
    return narrow(m, 1, 0, std::min<int64_t>(4, m.size(1)));
  }
  return Tensor();
}

bool Case::synthetic_full_size() const { return spec.value("weights", "") == "synthetic"; }

}  // namespace vf::check
