// The library's front door: load a Hub model folder, run images through it.
//
//   auto p = vf::Pretrained::from_pretrained("facebook-convnext-tiny-224/");
//   auto out = p.run({vf::load_image("cat.jpg")});          // pixel_values -> ModelOutput
//   auto top = vf::classify(p, {vf::load_image("cat.jpg")}, 5);
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "io/image.h"
#include "models/model.h"
#include "processors/image_processor.h"

namespace vf {

struct Pretrained {
  std::string dir;
  json config;        // config.json
  json preprocessor;  // preprocessor_config.json
  std::shared_ptr<Model> model;
  std::shared_ptr<ImageProcessor> processor;

  // Reads config.json, preprocessor_config.json and the weights (model.safetensors, a sharded
  // index, or pytorch_model.bin). `architecture` overrides config.architectures[0].
  static Pretrained from_pretrained(const std::string& dir, const std::string& architecture = "");

  // The processor, then the model.
  ModelOutput run(const std::vector<Image>& images, bool output_hidden_states = false,
                  bool output_attentions = false) const;
};

struct LabelScore {
  std::string label;
  float score;
};

// Softmax over the logits (a DeiT-with-teacher's averaged logits too), the top k per image, as
// transformers' image-classification pipeline.
std::vector<std::vector<LabelScore>> classify(const Pretrained& p, const std::vector<Image>& images, int top_k = 5);

}  // namespace vf
