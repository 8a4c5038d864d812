#include "models/model.h"

#include "core/backend.h"
#include "core/device_lock.h"
#include "core/errors.h"

#include <algorithm>
#include <map>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "models/registry.h"

namespace vf {

void ModelOutput::set(const std::string& name, Tensor t) {
  for (auto& [k, v] : items_)
    if (k == name) { v = std::move(t); return; }
  items_.emplace_back(name, std::move(t));
}

bool ModelOutput::has(const std::string& name) const {
  for (auto& [k, v] : items_)
    if (k == name) return true;
  return false;
}

const Tensor& ModelOutput::get(const std::string& name) const {
  for (auto& [k, v] : items_)
    if (k == name) return v;
  throw Error("model output has no '" + name + "'");
}

void ModelOutput::set_list(const std::string& name, const std::vector<Tensor>& ts) {
  for (size_t i = 0; i < ts.size(); ++i) set(name + "." + std::to_string(i), ts[i]);
}

namespace {
std::vector<ModelRegistration>& registry() {
  static std::vector<ModelRegistration> r;
  return r;
}
void ensure_registered() {
  static std::once_flag once;
  std::call_once(once, [] { register_all_models(); });
}
// TF classes of the docs are the same models: "TFConvNextForImageClassification" -> PyTorch name.
std::string strip_tf(const std::string& arch) {
  return arch.rfind("TF", 0) == 0 ? arch.substr(2) : arch;
}
const ModelRegistration* find_reg(const std::string& model_type) {
  ensure_registered();
  for (auto& r : registry())
    if (r.model_type == model_type) return &r;
  return nullptr;
}
}  // namespace

void register_model(ModelRegistration reg) { registry().push_back(std::move(reg)); }

bool is_supported_model_type(const std::string& model_type) { return find_reg(model_type) != nullptr; }

bool is_supported_architecture(const std::string& model_type, const std::string& architecture) {
  auto* r = find_reg(model_type);
  if (!r) return false;
  for (auto& a : r->architectures)
    if (a == strip_tf(architecture)) return true;
  return false;
}

std::vector<std::string> supported_model_types() {
  ensure_registered();
  std::vector<std::string> r;
  for (auto& reg : registry()) r.push_back(reg.model_type);
  return r;
}

std::unique_ptr<Model> create_model(const json& config, const std::string& architecture, const Weights& w) {
  std::string model_type = cfg_get<std::string>(config, "model_type", "");
  if (model_type.empty()) throw ModelError("config.json has no model_type");
  auto* r = find_reg(model_type);
  if (!r) {
    std::string known;
    for (auto& t : supported_model_types()) known += (known.empty() ? "" : ", ") + t;
    throw ModelError("unknown model_type '" + model_type + "' (supported: " + known + ")");
  }
  std::string arch = architecture;
  if (arch.empty()) {
    auto archs = cfg_get<std::vector<std::string>>(config, "architectures", {});
    arch = archs.empty() ? r->architectures.front() : archs.front();
  }
  arch = strip_tf(arch);
  if (!is_supported_architecture(model_type, arch))
    throw ModelError("model_type '" + model_type + "' has no architecture '" + arch + "'");
  std::unique_ptr<Model> model;
  try {
    model = r->build(config, arch, w);
  } catch (const nlohmann::json::exception& e) {
    // A family read a config key without cfg_get: still a config problem, reported as one.
    throw ModelError("config.json (" + model_type + "): a value has an unexpected type or is missing: " + e.what());
  }
  model->model_type = model_type;
  model->architecture = arch;
  model->device = load_device();
  model->compute_dtype = load_compute_dtype();
  if (model->id2label.empty()) model->id2label = read_id2label(config);
  return model;
}

bool parse_python_int(const std::string& s, int64_t* out) {
  // int(str): surrounding whitespace, an optional sign, decimal digits with single underscores
  // between them. Not "1.9" (stoll would read 1), "0x4" (0) or "4abc" (4).
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  size_t i = 0, e = s.size();
  while (i < e && space(s[i])) ++i;
  while (e > i && space(s[e - 1])) --e;
  bool negative = false;
  if (i < e && (s[i] == '+' || s[i] == '-')) negative = s[i++] == '-';
  if (i == e) return false;
  uint64_t v = 0;
  bool prev_digit = false;
  for (; i < e; ++i) {
    char c = s[i];
    if (c == '_') {
      if (!prev_digit || i + 1 == e) return false;
      prev_digit = false;
      continue;
    }
    if (c < '0' || c > '9') return false;
    if (v > (uint64_t(INT64_MAX) - uint64_t(c - '0')) / 10) return false;  // out of range
    v = v * 10 + uint64_t(c - '0');
    prev_digit = true;
  }
  if (!prev_digit) return false;
  *out = negative ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
  return true;
}

std::vector<std::string> read_id2label(const json& config) {
  std::vector<std::string> labels;
  auto it = config.find("id2label");
  if (it == config.end() || !it->is_object()) return labels;
  std::map<int64_t, std::string> m;
  for (auto& [k, v] : it->items()) {
    int64_t id;
    if (!parse_python_int(k, &id))
      throw ModelError("config key 'id2label' has a key '" + k.substr(0, 100) +
                       "' that is not an integer (as Python's int() reads it) or is out of range");
    m[id] = v.is_string() ? v.get<std::string>() : v.dump();
  }
  if (m.empty()) return labels;
  if (m.begin()->first < 0 || m.rbegin()->first > 1000000) throw ModelError("config key 'id2label' has out-of-range ids (expected 0 to 1000000)");
  labels.resize(m.rbegin()->first + 1);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = "LABEL_" + std::to_string(i);
  for (auto& [k, v] : m) labels[k] = v;
  return labels;
}

struct Model::Replay {
  int runs = 0;
  bool unrecordable = false;
  Tensor input;  // the recorded work reads pixel_values here
  ModelOutput output;  // and writes its outputs here
  std::shared_ptr<DeviceGraph> graph;
};

namespace {
bool graphs_enabled() {
  const char* e = std::getenv("VF_CUDA_GRAPHS");
  return !(e && std::string(e) == "0");
}
}  // namespace

ModelOutput Model::infer(const ModelInputs& inputs) const { return infer_to(inputs, false); }

ModelOutput Model::infer_on_device(const ModelInputs& inputs) const { return infer_to(inputs, true); }

ModelOutput Model::infer_to(const ModelInputs& inputs, bool keep_on_device) const {
  if (device.is_cpu()) return forward(inputs);
  // One forward at a time per process on a device: its backend's handles and stream serve one
  // caller (a server batches requests instead of running them side by side).
  std::lock_guard<std::mutex> lock(device_work_mutex());
  // A forward's own outputs as they are, or every output on the host; a recording's outputs, which
  // its next replay rewrites, as copies (made on the stream before any later replay, under the lock).
  auto hand_out = [keep_on_device](const ModelOutput& outputs, bool recorded) {
    if (keep_on_device && !recorded) return outputs;
    ModelOutput out;
    for (auto& [name, t] : outputs.items()) out.set(name, keep_on_device ? t.clone() : t.cpu());
    return out;
  };
  // An input uploaded beside the previous forward (upload_beside): the work below comes after its copy.
  if (!inputs.pixel_values.is_cpu()) backend(device).await_upload(inputs.pixel_values);
  ModelInputs in = inputs;
  // An all-ones pixel mask means what no mask means (every pixel real), and keeps the forward
  // recordable.
  if (in.pixel_mask.defined() && in.pixel_mask.is_cpu()) {
    const Tensor m = in.pixel_mask.to(DType::U8);
    const uint8_t* p = m.data<uint8_t>();
    if (std::all_of(p, p + m.numel(), [](uint8_t v) { return v == 1; })) in.pixel_mask = Tensor();
  }
  // Only plain inference is recorded: the other inputs are read on the host, per call.
  const bool recordable = graphs_enabled() && !in.pixel_mask.defined() && !inputs.bool_masked_pos.defined() &&
                          !inputs.head_mask.defined() && !inputs.labels.defined() && inputs.targets.empty() &&
                          inputs.pixel_values.dtype() == DType::F32;
  if (recordable) {
    if (!replays_) replays_ = std::make_shared<std::map<std::string, std::shared_ptr<Replay>>>();
    const std::string key = shape_str(inputs.pixel_values.shape()) + (inputs.output_hidden_states ? "h" : "") +
                            (inputs.output_attentions ? "a" : "") + (inputs.interpolate_pos_encoding ? "i" : "");
    auto& r = (*replays_)[key];
    if (!r) r = std::make_shared<Replay>();
    ++r->runs;
    if (r->graph) {
      r->input.copy_from(inputs.pixel_values);
      r->graph->replay();
      return hand_out(r->output, true);
    }
    // The first run sets everything up (uploads, algorithm searches); the second is recorded.
    if (r->runs == 2 && !r->unrecordable) {
      r->input = Tensor::empty(inputs.pixel_values.shape(), inputs.pixel_values.dtype(), device);
      r->input.copy_from(inputs.pixel_values);  // the recording's own input (never an upload buffer)
      in.pixel_values = r->input;
      r->graph = backend(device).capture([&] { r->output = forward(in); });
      if (std::getenv("VF_CUDA_TRACE") || std::getenv("VF_CUDA_GRAPH_LOG"))
        std::fprintf(stderr, "vf: %s %s: %s\n", architecture.c_str(), key.c_str(),
                     r->graph ? "forward recorded as a CUDA graph"
                              : "forward not recorded (a host round trip, or VF_CUDA_TRACE, which waits for each op)");
      if (r->graph) {
        r->graph->replay();
        return hand_out(r->output, true);
      }
      r->unrecordable = true;
      r->output = ModelOutput();
    }
  }
  in.pixel_values = inputs.pixel_values.to(device);
  return hand_out(forward(in), false);
}

}  // namespace vf
