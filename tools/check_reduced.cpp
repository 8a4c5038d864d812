#include "check_reduced.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/ops.h"
#include "processors/detr_postprocess.h"

namespace vf::check {

namespace {

struct Diff {
  double max_diff = 0, max_ref = 0;
  double sq_diff = 0, sq_ref = 0;  // sums of squares: the relative RMS difference
  bool finite = true;
  double rel_rms() const { return sq_ref > 0 ? std::sqrt(sq_diff / sq_ref) : (sq_diff > 0 ? 1.0 : 0.0); }
};

Diff diff_of(const std::vector<double>& a, const std::vector<double>& b) {
  Diff d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) && !(std::isinf(a[i]) && a[i] == b[i])) d.finite = false;
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) continue;
    d.max_diff = std::max(d.max_diff, std::fabs(a[i] - b[i]));
    d.max_ref = std::max(d.max_ref, std::fabs(b[i]));
    d.sq_diff += (a[i] - b[i]) * (a[i] - b[i]);
    d.sq_ref += b[i] * b[i];
  }
  return d;
}

std::vector<double> values(const Tensor& t) {
  Tensor d = t.cpu().to(DType::F64);
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}

int64_t argmax(const double* row, int64_t n) { return std::max_element(row, row + n) - row; }

// The reference's lead of its best class over the runner-up (how close a top-1 call was).
double top_two_gap(const double* row, int64_t n) {
  double first = -std::numeric_limits<double>::infinity(), second = first;
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] > first) { second = first; first = row[i]; }
    else if (row[i] > second) second = row[i];
  }
  return first - second;
}

template <class... A>
std::string fmt(const char* f, A... a) {
  char b[320];
  std::snprintf(b, sizeof b, f, a...);
  return b;
}

void classification_top1(const std::string& name, const std::vector<double>& ours, const std::vector<double>& ref,
                         int64_t rows, int64_t classes, const Diff& d, CheckReport& report) {
  int64_t agree = 0, first_bad = -1;
  for (int64_t r = 0; r < rows; ++r) {
    if (argmax(&ours[r * classes], classes) == argmax(&ref[r * classes], classes)) ++agree;
    else if (first_bad < 0) first_bad = r;
  }
  std::string detail = fmt("top-1 %lld/%lld equal, max|diff| = %.3g (max|ref| %.3g)", (long long)agree,
                            (long long)rows, d.max_diff, d.max_ref);
  if (first_bad >= 0) {
    const double* r = &ref[first_bad * classes];
    detail += fmt("; row %lld: ours %lld, reference %lld (its top two %.3g apart)", (long long)first_bad,
                  (long long)argmax(&ours[first_bad * classes], classes), (long long)argmax(r, classes),
                  top_two_gap(r, classes));
  }
  if (first_bad < 0) report.pass(name, detail);
  else report.fail(name, detail);
}

void detection_classes(const Case& c, const std::string& name, const std::vector<double>& ours,
                       const std::vector<double>& ref, int64_t queries, int64_t classes, const Diff& d,
                       CheckReport& report) {
  DetrPostKind kind = detr_post_kind(cfg_get<std::string>(c.config, "model_type", c.spec.value("family", "")));
  // DETR's last class is "no object": a query's class and score are its best real class's.
  const int64_t real = kind == DetrPostKind::Detr ? classes - 1 : classes;
  int64_t confident = 0, kept = 0, agree_all = 0;
  double worst_gap = -1;
  for (int64_t q = 0; q < queries; ++q) {
    const double* r = &ref[q * classes];
    const double* o = &ours[q * classes];
    const int64_t rc = argmax(r, real), oc = argmax(o, real);
    if (rc == oc) ++agree_all;
    double score;
    if (kind == DetrPostKind::Detr) {
      double m = *std::max_element(r, r + classes), sum = 0;
      for (int64_t k = 0; k < classes; ++k) sum += std::exp(r[k] - m);
      score = std::exp(r[rc] - m) / sum;
    } else {
      score = 1 / (1 + std::exp(-r[rc]));
    }
    if (score < 0.5) continue;
    ++confident;
    if (rc == oc) ++kept;
    else worst_gap = std::max(worst_gap, top_two_gap(r, real));
  }
  std::string detail =
      fmt("class kept on %lld/%lld queries scored >= 0.5 (all queries: %lld/%lld), max|diff| = %.3g (max|ref| %.3g)",
          (long long)kept, (long long)confident, (long long)agree_all, (long long)queries, d.max_diff, d.max_ref);
  if (worst_gap >= 0) detail += fmt("; the changed ones' reference top two classes are <= %.3g apart", worst_gap);
  if (kept == confident) report.pass(name, detail);
  else report.fail(name, detail);
}

}  // namespace

void compare_reduced_precision(const Case& c, const ModelOutput& out, DType dtype, CheckReport& report) {
  std::printf("  (%s: reduced-precision criteria, not the float32 tolerances)\n", dtype_name(dtype));
  for (auto& [name, ref_t] : c.expected) {
    if (!is_model_output(name)) continue;
    const Tensor ours_t = model_output_for(out, name);
    if (!ours_t.defined()) {
      report.fail(name, "not produced by the model");
      continue;
    }
    if (ours_t.shape() != ref_t.shape()) {
      report.fail(name, "shape " + shape_str(ours_t.shape()) + ", reference " + shape_str(ref_t.shape()));
      continue;
    }
    if (ref_t.dtype() != DType::F32 && ref_t.dtype() != DType::F64) {  // integer / bool outputs: exact
      report.compare(name, ours_t, ref_t, 0);
      continue;
    }
    const std::vector<double> ours = values(ours_t), ref = values(ref_t);
    const Diff d = diff_of(ours, ref);
    if (!d.finite) {
      report.fail(name, "not finite where the reference is");
      continue;
    }
    const bool is_logits = name.size() >= 6 && name.compare(name.size() - 6, 6, "logits") == 0;
    const bool is_loss = name == "loss" || name.rfind("loss_dict.", 0) == 0;
    if (is_loss) {
      std::printf("  %-40s |diff| = %.3g (reference %.4g)  reported\n", name.c_str(), d.max_diff, d.max_ref);
    } else if (is_logits && ref_t.dim() == 2 && ref_t.size(1) > 1) {
      classification_top1(name, ours, ref, ref_t.size(0), ref_t.size(1), d, report);
    } else if (name == "logits" && ref_t.dim() == 3 && ref_t.size(2) > 1) {
      detection_classes(c, name, ours, ref, ref_t.size(0) * ref_t.size(1), ref_t.size(2), d, report);
    } else if (name == "pred_boxes") {
      const std::string detail = fmt("max|diff| = %.3g (criterion 1e-2 of the image side)", d.max_diff);
      if (d.max_diff <= 1e-2) report.pass(name, detail);
      else report.fail(name, detail);
    } else {
      const std::string detail =
          fmt("relative RMS diff %.3g (bound 0.1), max|diff| = %.3g (max|ref| %.3g)", d.rel_rms(), d.max_diff, d.max_ref);
      if (d.rel_rms() <= 0.1) report.pass(name, detail);
      else report.fail(name, detail);
    }
  }
}

}  // namespace vf::check
