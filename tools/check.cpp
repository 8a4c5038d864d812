// `vf check CASE_DIR --images DIR`: the golden-case driver (format: ../shared/goldens/README.md).
//
// Stages: the processor on the case's images (check_preprocess.cpp), the model on the processor's
// output with the case's labels, every model tensor of expected.safetensors, then the
// post-processing calls of case.json (check_post.cpp). Exit 0 when all pass, 1 on a mismatch, an
// error or a case that compares nothing of what it is about, 2 when the case's family is not
// supported.
#include "check.h"

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "check_post.h"
#include "check_preprocess.h"
#include "check_reduced.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/synthetic.h"
#include "core/ops.h"
#include "models/model.h"

namespace vf::check {

namespace fs = std::filesystem;

namespace {

Case load_case(const std::string& dir, const std::string& images_dir) {
  Case c;
  c.dir = dir;
  c.images_dir = images_dir;
  c.spec = read_json_file((fs::path(dir) / "case.json").string());
  auto opt_json = [&](const char* name) {
    fs::path p = fs::path(dir) / name;
    return fs::exists(p) ? read_json_file(p.string()) : json::object();
  };
  c.config = opt_json("config.json");
  c.preprocessor = opt_json("preprocessor_config.json");
  fs::path expected = fs::path(dir) / "expected.safetensors";
  if (fs::exists(expected))
    for (auto& [name, t] : read_safetensors(expected.string())) c.expected[name] = t;
  return c;
}

// case.json `labels`: class indices for classification heads, DETR-style dicts for detection.
void set_labels(const json& labels, ModelInputs& in) {
  if (!labels.is_array() || labels.empty()) throw Error("case.json labels must be a non-empty list");
  if (labels[0].is_object()) {
    in.targets = detection_targets_from_json(labels);
  } else if (labels[0].is_number_integer()) {
    in.labels = Tensor::from_vector<int64_t>({int64_t(labels.size())}, labels.get<std::vector<int64_t>>());
  } else {
    std::vector<float> v;
    Shape shape{int64_t(labels.size())};
    if (labels[0].is_array()) {
      shape.push_back(int64_t(labels[0].size()));
      for (auto& row : labels)
        for (auto& x : row) v.push_back(x.get<float>());
    } else {
      for (auto& x : labels) v.push_back(x.get<float>());
    }
    in.labels = Tensor::from_vector<float>(shape, v);
  }
}

std::shared_ptr<WeightStore> load_case_weights(const Case& c) {
  std::string weights = c.spec.value("weights", "");
  if (weights == "synthetic") return synthesize_weights(read_json_file((fs::path(c.dir) / "weights.json").string()));
  return load_weights_file((fs::path(c.dir) / weights).string());
}

void compare_outputs(const Case& c, const ModelOutput& out, CheckReport& report) {
  double tol = c.output_tol();
  for (auto& [name, ref] : c.expected) {
    if (!is_model_output(name)) continue;
    const Tensor ours = model_output_for(out, name);
    if (!ours.defined()) {
      report.fail(name, "not produced by the model");
      continue;
    }
    bool is_loss = name == "loss" || name.rfind("loss_dict.", 0) == 0;
    if (is_loss) {
      // A loss is a scalar (PyTorch returns shape [] or [1]); relative error 1e-4.
      if (ours.numel() != 1 || ref.numel() != 1) {
        report.fail(name, "expected one value, got " + shape_str(ours.shape()));
        continue;
      }
      double r = ref.item(), o = ours.item();
      double tol_abs = kLossRelTol * std::max(std::fabs(r), 1e-12);
      report.compare(name, Tensor::from<double>({1}, {o}), Tensor::from<double>({1}, {r}), tol_abs);
    } else {
      report.compare_scaled(name, ours, ref, tol);
    }
  }
}

}  // namespace

int run_check(const std::string& case_dir, const std::string& images_dir, Device device, DType dtype) {
  Case c = load_case(case_dir, images_dir);
  CheckReport report;
  std::string name = fs::path(case_dir).filename().string();
  if (name.empty()) name = fs::path(case_dir).parent_path().filename().string();
  std::string model_class = c.spec.contains("model_class") && c.spec["model_class"].is_string()
                                ? c.spec["model_class"].get<std::string>() : "";
  std::printf("case %s (%s, %s)\n", name.c_str(), c.spec.value("family", "?").c_str(),
              model_class.empty() ? c.spec.value("task", "?").c_str() : model_class.c_str());

  if (!model_class.empty()) {
    std::string model_type = cfg_get<std::string>(c.config, "model_type", "");
    if (!is_supported_model_type(model_type) || !is_supported_architecture(model_type, model_class)) {
      std::printf("  not supported yet: %s / %s\n", model_type.c_str(), model_class.c_str());
      return 2;
    }
  }

  // A case passes only if it compared what it is about (a case whose expected.safetensors is missing
  // or names nothing we compare would otherwise pass with "0 compared").
  int pixels_compared = 0, outputs_compared = 0, post_compared = 0;
  std::map<std::string, Tensor> outputs;
  bool postproc_only = c.spec.value("task", "") == "post-processing";
  if (postproc_only) {
    outputs = c.expected;
  } else {
    BatchFeature features = run_preprocess(c, report, &pixels_compared);
    if (!model_class.empty()) {
      auto store = load_case_weights(c);
      std::unique_ptr<Model> model;
      {
        LoadDeviceScope on(device, dtype);
        model = create_model(c.config, model_class, Weights(store));
      }
      store->check_complete();
      // The model holds what it needs (in place or as its own reordered copies): the rest goes.
      store.reset();
      pool_release_cached();
      ModelInputs in;
      in.pixel_values = features.pixel_values;
      in.pixel_mask = features.pixel_mask;
      if (c.spec.contains("labels")) set_labels(c.spec["labels"], in);
      if (const Tensor* m = c.find("input.bool_masked_pos")) in.bool_masked_pos = *m;
      // case.json's output_attentions is the flag the reference ran with; older cases only show it
      // through the attentions they hold.
      if (c.spec.contains("output_attentions")) {
        if (!c.spec["output_attentions"].is_boolean()) throw Error("case.json output_attentions must be true or false");
        in.output_attentions = c.spec["output_attentions"].get<bool>();
      }
      for (auto& [k, v] : c.expected) {
        if (k.find("hidden_states.") != std::string::npos) in.output_hidden_states = true;
        if (k.find("attentions.") != std::string::npos) in.output_attentions = true;
      }
      ModelOutput out = model->infer(in);
      const int before = report.checked();
      if (dtype == DType::F32) compare_outputs(c, out, report);
      else compare_reduced_precision(c, out, dtype, report);
      outputs_compared = report.checked() - before;
      for (auto& [k, v] : out.items()) outputs[k] = v;
    }
  }
  if (c.spec.contains("post") && dtype != DType::F32 && !postproc_only) {
    // Its thresholds and tolerances are float32's; the post-processing itself runs in float32 and is
    // checked by the float32 run.
    std::printf("  post-processing: not compared in %s\n", dtype_name(dtype));
  } else if (c.spec.contains("post")) {
    const int before = report.checked();
    run_post(c, outputs, report);
    post_compared = report.checked() - before;
  }
  if (!model_class.empty() && outputs_compared == 0)
    report.fail("case", "compares no model output (expected.safetensors holds none of the model's outputs)");
  else if (model_class.empty() && !postproc_only && pixels_compared == 0)
    report.fail("case", "compares no pixels (expected.safetensors has no pixel_values, case.json no pixel_values_shape)");
  else if (postproc_only && post_compared == 0)
    report.fail("case", "compares no post-processing result (case.json has no `post` entries)");

  std::printf("%s: %d compared, %d failed\n", report.ok() ? "PASS" : "FAIL", report.checked(), report.failures());
  return report.ok() ? 0 : 1;
}

}  // namespace vf::check
