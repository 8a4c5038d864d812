// `vf check`: runs one golden case folder (format: ../shared/goldens/README.md) and compares.
//
// The driver (check.cpp) runs the stages in order; each stage reports through CheckReport, which
// prints one line per compared item and remembers whether everything passed.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "models/model.h"

namespace vf::check {

// Tolerances of the goldens' README.
constexpr double kPixelTol = 1e-5;
constexpr double kTinyRelTol = 1e-4;     // float outputs, tiny cases: 1e-4 * max(1, max|ref|)
constexpr double kSynthRelTol = 1e-3;    // full-size synthetic cases
constexpr double kLossRelTol = 1e-4;
constexpr double kStatsRelTol = 1e-6;
constexpr double kScoreTol = 1e-4;

class CheckReport {
 public:
  // Prints "  name  max|err| = e  (tol t)  ok|FAIL" and records the result.
  void compare(const std::string& name, const Tensor& ours, const Tensor& ref, double abs_tol);
  // Float outputs scaled by max(1, max|ref|).
  void compare_scaled(const std::string& name, const Tensor& ours, const Tensor& ref, double rel_tol);
  void pass(const std::string& name, const std::string& detail);
  void fail(const std::string& name, const std::string& detail);
  bool ok() const { return failures_ == 0; }
  int failures() const { return failures_; }
  int checked() const { return checked_; }  // items reported, passed or failed

 private:
  int failures_ = 0;
  int checked_ = 0;
};

// A case folder, parsed once.
struct Case {
  std::string dir;
  std::string images_dir;
  json spec;                                  // case.json
  json config;                                // config.json (empty object when absent)
  json preprocessor;                          // preprocessor_config.json (empty when absent)
  std::map<std::string, Tensor> expected;     // expected.safetensors
  bool synthetic_full_size() const;           // "*-synth": tolerance 1e-3, stats instead of pixels
  double output_tol() const { return synthetic_full_size() ? kSynthRelTol : kTinyRelTol; }
  const Tensor* find(const std::string& name) const {
    auto it = expected.find(name);
    return it == expected.end() ? nullptr : &it->second;
  }
};

// Whether expected.safetensors' `name` is a model output (not an input or bookkeeping tensor, which
// other stages compare, or none).
bool is_model_output(const std::string& name);

// Our output that the reference's `name` stands for: `out`'s tensor of that name, or for
// pred_masks_first4 the first four queries of pred_masks [B, Q, H, W]. Undefined when the model
// did not produce it.
Tensor model_output_for(const ModelOutput& out, const std::string& name);

// Stages (each in its own file). They return normally after reporting; an Error thrown inside
// is reported by the driver as a failure of that stage.
struct Preprocessed;  // defined in check_preprocess.h
}  // namespace vf::check
