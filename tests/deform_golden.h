// Runs a Deformable DETR / DETA golden case through the model (tests only).
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>

#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "models/model.h"
#include "test_util.h"

namespace vf::test {

// Runs a golden case's model on its own pixel_values / pixel_mask and compares every listed output
// within the goldens' tolerance, 1e-4 * max(1, max |ref|), and the losses within 1e-4 relative.
// Returns how many outputs were compared.
// VF_VERBOSE=1 prints each error.
inline int run_golden_case(const std::string& name) {
  std::string dir = test::golden_case(name);
  json spec = read_json_file(dir + "/case.json");
  json config = read_json_file(dir + "/config.json");
  std::map<std::string, Tensor> expected;
  for (auto& [n, t] : read_safetensors(dir + "/expected.safetensors")) expected[n] = t;
  auto store = load_checkpoint(dir);
  auto model = create_model(config, spec["model_class"].get<std::string>(), Weights(store));
  store->check_complete();
  EXPECT_TRUE(store->unused().empty()) << "unused tensor " << store->unused().front();

  ModelInputs in;
  in.pixel_values = expected.at("pixel_values");
  in.pixel_mask = expected.at("pixel_mask");
  in.output_hidden_states = true;
  if (spec.contains("labels")) {
    for (auto& l : spec["labels"]) {
      DetectionTarget t;
      auto cls = l["class_labels"].get<std::vector<int64_t>>();
      auto boxes = l["boxes"].get<std::vector<std::vector<float>>>();
      std::vector<float> flat;
      for (auto& b : boxes) flat.insert(flat.end(), b.begin(), b.end());
      t.class_labels = Tensor::from_vector<int64_t>({static_cast<int64_t>(cls.size())}, cls);
      t.boxes = Tensor::from_vector<float>({static_cast<int64_t>(boxes.size()), 4}, flat);
      in.targets.push_back(t);
    }
  }
  ModelOutput out = model->forward(in);
  int compared = 0;
  for (auto& o : spec["outputs"]) {
    std::string n = o.get<std::string>();
    if (n == "pixel_values" || n == "pixel_mask") continue;
    if (!expected.count(n)) continue;  // the vendored copies leave out per-layer hidden states
    EXPECT_TRUE(out.has(n)) << name << ": no output " << n;
    if (!out.has(n)) continue;
    const Tensor& ours = out.get(n);
    const Tensor& ref = expected.at(n);
    EXPECT_EQ(shape_str(ours.shape()), shape_str(ref.shape())) << name << ": " << n;
    if (ours.shape() != ref.shape()) continue;
    double tol = 1e-4 * std::max(1.0, max_abs(ref));
    EXPECT_LE(max_abs_diff(ours, ref), tol) << name << ": " << n;
    if (getenv("VF_VERBOSE")) printf("  %-32s err %.3g tol %.3g\n", n.c_str(), max_abs_diff(ours, ref), tol);
    ++compared;
  }
  // Losses: relative error <= 1e-4.
  for (auto& [n, ref] : expected) {
    if (n != "loss" && n.rfind("loss_dict.", 0) != 0) continue;
    EXPECT_TRUE(out.has(n)) << name << ": no output " << n;
    if (!out.has(n)) continue;
    double r = ref.at(0), o = out.get(n).at(0);
    EXPECT_LE(std::abs(o - r), 1e-4 * std::abs(r)) << name << ": " << n << " = " << o << ", reference " << r;
    if (getenv("VF_VERBOSE")) printf("  %-32s %.7g ref %.7g\n", n.c_str(), o, r);
    ++compared;
  }
  return compared;
}

}  // namespace vf::test
