// The model interface every family implements, and the auto-factory keyed by model_type.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/detection_target.h"
#include "core/tensor.h"
#include "core/weights.h"

namespace vf {

// An ordered name -> tensor map, like transformers' ModelOutput. Nested outputs are flattened the
// way the goldens name them: "hidden_states.0", "feature_maps.2", "loss_dict.loss_ce".
class ModelOutput {
 public:
  void set(const std::string& name, Tensor t);
  bool has(const std::string& name) const;
  const Tensor& get(const std::string& name) const;  // throws if absent
  const std::vector<std::pair<std::string, Tensor>>& items() const { return items_; }
  // Appends name.0, name.1, ... for a tuple output.
  void set_list(const std::string& name, const std::vector<Tensor>& ts);

 private:
  std::vector<std::pair<std::string, Tensor>> items_;
};

struct ModelInputs {
  Tensor pixel_values;     // float32 [B, 3, H, W]
  Tensor pixel_mask;       // int64 [B, H, W], 1 on real pixels (DETR family; all ones if absent)
  Tensor bool_masked_pos;  // bool [B, num_patches] (masked image modeling)
  Tensor head_mask;        // float32 [num_layers, num_heads] or [num_heads]
  Tensor labels;           // int64 [B] class indices, or float32 for regression / multi-label
  std::vector<DetectionTarget> targets;  // DETR family labels
  bool output_hidden_states = false;
  bool output_attentions = false;
  bool interpolate_pos_encoding = false;  // DeiT: bicubic position embeddings for other image sizes
};

class Model {
 public:
  virtual ~Model() = default;
  // The reference's forward. pixel_values may be on `device` or on the CPU; outputs are on `device`.
  virtual ModelOutput forward(const ModelInputs& inputs) const = 0;
  // forward() with pixel_values copied to `device` first and every output copied back to the host
  // after (masks, labels and head masks stay on the host: the models read them there).
  ModelOutput infer(const ModelInputs& inputs) const;
  // infer() with the outputs left on `device` (post-processing that runs there, e.g. segmentation
  // masks): each output is the caller's own tensor; a replayed recording's buffers, which the next
  // replay overwrites, are handed out as copies on the device. On the CPU, forward().
  ModelOutput infer_on_device(const ModelInputs& inputs) const;
  // Where the weighted layers were prepared (the LoadDeviceScope the model was built in).
  Device device;
  // What its convolutions and linear layers compute in (the LoadDeviceScope's): F32, BF16 or F16.
  DType compute_dtype = DType::F32;

  // Label names of classification / detection heads (config id2label), empty if none.
  std::vector<std::string> id2label;
  std::string model_type;
  std::string architecture;

 private:
  // On a GPU, the forward of an input shape seen before is replayed from a recorded graph when its
  // work can be recorded (no host round trip inside): one launch instead of hundreds.
  struct Replay;
  ModelOutput infer_to(const ModelInputs& inputs, bool keep_on_device) const;
  mutable std::shared_ptr<std::map<std::string, std::shared_ptr<Replay>>> replays_;
};

using ModelBuilder =
    std::function<std::unique_ptr<Model>(const json& config, const std::string& architecture, const Weights& w)>;

struct ModelRegistration {
  std::string model_type;
  std::vector<std::string> architectures;  // class names; TF aliases ("TFConvNextModel") map to these
  ModelBuilder build;
};

void register_model(ModelRegistration reg);
// Builds `architecture` (or config.architectures[0] when empty) for config["model_type"].
std::unique_ptr<Model> create_model(const json& config, const std::string& architecture, const Weights& w);
bool is_supported_model_type(const std::string& model_type);
bool is_supported_architecture(const std::string& model_type, const std::string& architecture);
std::vector<std::string> supported_model_types();

// Reads config["id2label"] into a dense vector (missing ids get "LABEL_i").
std::vector<std::string> read_id2label(const json& config);
// A string as Python's int() reads it (decimal, optional sign and surrounding whitespace,
// underscores between digits); false for anything else or a value no int64 holds.
bool parse_python_int(const std::string& s, int64_t* out);

}  // namespace vf
