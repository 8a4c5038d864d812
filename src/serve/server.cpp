#include "serve/server.h"

#include <httplib.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/errors.h"
#include "serve/results_json.h"
#include "visionformers.h"

namespace vf::serve {

namespace {

using ojson = nlohmann::ordered_json;

// Ends one request with a status and {"error": message}.
struct HttpError : std::runtime_error {
  int status;
  HttpError(int status, const std::string& message) : std::runtime_error(message), status(status) {}
};

enum class Task { None, Classify, Detect, Segment };

// The pipeline a model class answers to, from its architecture name (as transformers' pipelines pick one).
Task task_of(const std::string& architecture) {
  auto has = [&](const char* s) { return architecture.find(s) != std::string::npos; };
  if (has("ForImageClassification")) return Task::Classify;
  if (has("ForObjectDetection")) return Task::Detect;
  if (has("ForSegmentation") || has("ForPanopticSegmentation")) return Task::Segment;
  return Task::None;
}

const char* task_name(Task t) {
  switch (t) {
    case Task::Classify: return "image-classification";
    case Task::Detect: return "object-detection";
    case Task::Segment: return "image-segmentation";
    default: return "none";
  }
}

std::vector<uint8_t> base64_decode(const std::string& s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  size_t n = s.size();
  while (n > 0 && s[n - 1] == '=') --n;
  if (s.size() - n > 2 || n % 4 == 1) throw HttpError(400, "input 'image': invalid base64 string");
  std::vector<uint8_t> out;
  out.reserve(n * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; ++i) {
    int v = value(s[i]);
    if (v < 0) throw HttpError(400, "input 'image': invalid base64 character");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(uint8_t(acc >> bits));
      acc &= (1u << bits) - 1;
    }
  }
  return out;
}

// ---- the per-model queue and its worker ---------------------------------------------------------

struct Job {
  Task task = Task::None;   // post-processing wanted (None: tensors only)
  bool want_tensors = false;
  std::vector<Image> images;
  int top_k = 5;
  float threshold = 0.5f;
  SegmentParams seg;
  ModelInputs inputs;  // pixel_values given directly: the model alone
  bool from_pixels = false;

  std::vector<ojson> results;  // one per image
  ModelOutput output;
  std::promise<void> done;

  // Classification images of several requests can share one forward: the processors resize them to
  // one size and each image's logits depend on that image alone.
  bool batchable() const { return task == Task::Classify && !want_tensors && !from_pixels; }
};

class Batcher {
 public:
  Batcher(const Pretrained& p, const ServerOptions& opt) : p_(p), opt_(opt), worker_([this] { loop(); }) {}
  ~Batcher() { shutdown(); }

  // False when the queue is full.
  bool submit(const std::shared_ptr<Job>& job) {
    std::lock_guard lk(mu_);
    if (stopping_ || static_cast<int>(queue_.size()) + running_ >= opt_.max_queue) return false;
    queue_.push_back(job);
    cv_.notify_all();
    return true;
  }

  // Answers what is queued, then ends the worker.
  void shutdown() {
    {
      std::lock_guard lk(mu_);
      stopping_ = true;
      cv_.notify_all();
    }
    if (worker_.joinable()) worker_.join();
  }

 private:
  size_t batchable_images_at_front() const {
    size_t n = 0;
    for (const auto& j : queue_) {
      if (!j->batchable()) break;
      n += j->images.size();
    }
    return n;
  }

  void loop() {
    for (;;) {
      std::vector<std::shared_ptr<Job>> batch;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty() || stopping_; });
        if (queue_.empty()) return;
        if (queue_.front()->batchable() && opt_.max_batch > 1) {
          auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(opt_.batch_wait_ms);
          cv_.wait_until(lk, deadline, [&] {
            return stopping_ || batchable_images_at_front() >= static_cast<size_t>(opt_.max_batch);
          });
        }
        batch.push_back(queue_.front());
        queue_.pop_front();
        size_t images = batch[0]->images.size();
        while (batch[0]->batchable() && !queue_.empty() && queue_.front()->batchable() &&
               images + queue_.front()->images.size() <= static_cast<size_t>(opt_.max_batch)) {
          images += queue_.front()->images.size();
          batch.push_back(queue_.front());
          queue_.pop_front();
        }
        running_ = static_cast<int>(batch.size());
      }
      execute(batch);
      std::lock_guard lk(mu_);
      running_ = 0;
    }
  }

  void execute(const std::vector<std::shared_ptr<Job>>& batch) {
    if (batch.size() > 1) {
      try {
        run_classify_batch(batch);
        for (auto& j : batch) j->done.set_value();
        return;
      } catch (...) {
        // One bad request must not fail its neighbours: run each alone to tell whose it is.
      }
    }
    for (auto& j : batch) {
      try {
        run_one(*j);
        j->done.set_value();
      } catch (...) {
        j->done.set_exception(std::current_exception());
      }
    }
  }

  void run_classify_batch(const std::vector<std::shared_ptr<Job>>& batch) {
    std::vector<Image> images;
    int top_k = 0;
    for (auto& j : batch) {
      images.insert(images.end(), j->images.begin(), j->images.end());
      top_k = std::max(top_k, j->top_k);
    }
    auto all = classify(p_, images, top_k);
    size_t k = 0;
    for (auto& j : batch) {
      j->results.clear();
      for (size_t i = 0; i < j->images.size(); ++i, ++k) {
        auto r = all[k];
        r.resize(std::min<size_t>(r.size(), std::max(j->top_k, 0)));
        j->results.push_back(classify_json(r));
      }
    }
  }

  void run_one(Job& j) {
    if (j.from_pixels) {
      j.output = p_.model->infer(j.inputs);
      return;
    }
    if (j.want_tensors) j.output = p_.run(j.images);
    switch (j.task) {
      case Task::Classify:
        for (auto& r : classify(p_, j.images, j.top_k)) j.results.push_back(classify_json(r));
        break;
      case Task::Detect:
        for (auto& r : detect(p_, j.images, j.threshold)) j.results.push_back(detect_json(r));
        break;
      case Task::Segment:
        for (auto& img : j.images) j.results.push_back(segment_json(segment(p_, img, j.seg)));
        break;
      case Task::None: break;
    }
  }

  const Pretrained& p_;
  const ServerOptions& opt_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  int running_ = 0;
  bool stopping_ = false;
  std::thread worker_;  // last: starts once the rest is built
};

// ---- models ---------------------------------------------------------------------------------------

struct TensorMeta {
  std::string name, datatype;
  std::vector<int64_t> shape;
};

const char* v2_datatype(DType t) {
  switch (t) {
    case DType::I64: return "INT64";
    case DType::I32: return "INT32";
    default: return "FP32";  // everything else is sent as float32
  }
}

struct ServedModel {
  std::string name;
  Pretrained p;
  Task task = Task::None;
  std::vector<TensorMeta> outputs;  // from two warm-up images of different shapes; -1 where they differ
  std::unique_ptr<Batcher> batcher;

  void describe_outputs() {
    auto probe = [&](int64_t h, int64_t w) {
      Image img;
      img.height = h;
      img.width = w;
      img.rgb.assign(size_t(h * w * 3), 128);
      return p.run({img});
    };
    try {
      ModelOutput a = probe(48, 64), b = probe(80, 40);
      for (const auto& [name, t] : a.items()) {
        TensorMeta m{name, v2_datatype(t.dtype()), t.shape()};
        m.shape[0] = -1;
        if (b.has(name)) {
          const Shape& s = b.get(name).shape();
          for (size_t d = 1; d < m.shape.size(); ++d)
            if (d >= s.size() || s[d] != m.shape[d]) m.shape[d] = -1;
        }
        outputs.push_back(std::move(m));
      }
    } catch (const std::exception&) {
      // No processor, or a model the probe cannot run: pixel_values requests still work.
    }
  }
};

// ---- tensors in and out of v2 requests ------------------------------------------------------------

void flatten_json(const nlohmann::json& j, std::vector<const nlohmann::json*>& out) {
  if (j.is_array()) {
    for (const auto& e : j) flatten_json(e, out);
  } else {
    out.push_back(&j);
  }
}

int64_t shape_count(const nlohmann::json& shape, const std::string& input, std::vector<int64_t>* dims) {
  if (!shape.is_array()) throw HttpError(400, "input '" + input + "': 'shape' must be an array");
  int64_t n = 1;
  for (const auto& d : shape) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (int64_t(1) << 31))
      throw HttpError(400, "input '" + input + "': bad shape " + shape.dump());
    n *= d.get<int64_t>();
    if (n > (int64_t(1) << 40)) throw HttpError(413, "input '" + input + "' is too large");
    if (dims) dims->push_back(d.get<int64_t>());
  }
  return n;
}

uint32_t read_u32le(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }

struct RawInput {
  const nlohmann::json* meta = nullptr;
  const uint8_t* binary = nullptr;  // Triton binary data, or null for JSON data
  size_t binary_size = 0;
};

std::vector<std::string> read_bytes_input(const RawInput& in, const std::string& name, int64_t count) {
  std::vector<std::string> out;
  if (in.binary) {
    size_t pos = 0;
    while (pos < in.binary_size) {
      if (in.binary_size - pos < 4) throw HttpError(400, "input '" + name + "': truncated BYTES element");
      uint32_t len = read_u32le(in.binary + pos);
      pos += 4;
      if (len > in.binary_size - pos) throw HttpError(400, "input '" + name + "': truncated BYTES element");
      out.emplace_back(reinterpret_cast<const char*>(in.binary + pos), len);
      pos += len;
    }
  } else {
    if (!in.meta->contains("data")) throw HttpError(400, "input '" + name + "' has no data");
    std::vector<const nlohmann::json*> flat;
    flatten_json((*in.meta)["data"], flat);
    for (auto* e : flat) {
      if (!e->is_string()) throw HttpError(400, "input '" + name + "': BYTES data must be base64 strings");
      auto bytes = base64_decode(e->get_ref<const std::string&>());
      out.emplace_back(bytes.begin(), bytes.end());
    }
  }
  if (static_cast<int64_t>(out.size()) != count)
    throw HttpError(400, "input '" + name + "': " + std::to_string(out.size()) + " elements for its shape of " +
                             std::to_string(count));
  return out;
}

template <class T>
T json_number(const nlohmann::json& e, const std::string& name) {
  if (e.is_boolean()) return static_cast<T>(e.get<bool>());
  if (!e.is_number()) throw HttpError(400, "input '" + name + "': data must be numbers");
  return e.get<T>();
}

// A numeric input as a tensor of `want` (FP32 or INT64), from JSON data or binary data of its datatype.
Tensor read_numeric_input(const RawInput& in, const std::string& name, DType want) {
  std::vector<int64_t> dims;
  int64_t count = shape_count(in.meta->value("shape", nlohmann::json()), name, &dims);
  std::string datatype = in.meta->value("datatype", "");
  Tensor t = Tensor::empty(dims, want);
  if (in.binary) {
    size_t elem = datatype == "FP32" || datatype == "INT32" ? 4 : datatype == "INT64" || datatype == "FP64" ? 8
                  : datatype == "BOOL" || datatype == "UINT8"                   ? 1
                                                                                 : 0;
    if (elem == 0) throw HttpError(400, "input '" + name + "': unsupported datatype '" + datatype + "'");
    if (in.binary_size != size_t(count) * elem)
      throw HttpError(400, "input '" + name + "': " + std::to_string(in.binary_size) + " bytes of binary data for " +
                               std::to_string(count) + " " + datatype + " elements");
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* p = in.binary + size_t(i) * elem;
      double v;
      if (datatype == "FP32") { float f; std::memcpy(&f, p, 4); v = f; }
      else if (datatype == "FP64") { std::memcpy(&v, p, 8); }
      else if (datatype == "INT32") { int32_t x; std::memcpy(&x, p, 4); v = x; }
      else if (datatype == "INT64") { int64_t x; std::memcpy(&x, p, 8); v = double(x); }
      else v = *p;
      if (want == DType::F32) t.f32()[i] = float(v); else t.data<int64_t>()[i] = int64_t(v);
    }
    return t;
  }
  if (!in.meta->contains("data")) throw HttpError(400, "input '" + name + "' has no data");
  std::vector<const nlohmann::json*> flat;
  flatten_json((*in.meta)["data"], flat);
  if (static_cast<int64_t>(flat.size()) != count)
    throw HttpError(400, "input '" + name + "': " + std::to_string(flat.size()) + " values for its shape of " +
                             std::to_string(count));
  for (int64_t i = 0; i < count; ++i) {
    if (want == DType::F32) t.f32()[i] = json_number<float>(*flat[i], name);
    else t.data<int64_t>()[i] = json_number<int64_t>(*flat[i], name);
  }
  return t;
}

void append_u32le(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(char((v >> (8 * i)) & 0xff));
}

// ---- the server -----------------------------------------------------------------------------------

int parse_int(const std::string& s, const char* what) {
  try {
    size_t used = 0;
    long v = std::stol(s, &used);
    if (used == s.size() && v >= -1000000 && v <= 1000000) return int(v);
  } catch (...) {
  }
  throw HttpError(400, std::string("bad ") + what + " '" + s + "'");
}

double parse_double(const std::string& s, const char* what) {
  try {
    size_t used = 0;
    double v = std::stod(s, &used);
    if (used == s.size() && std::isfinite(v)) return v;
  } catch (...) {
  }
  throw HttpError(400, std::string("bad ") + what + " '" + s + "'");
}

void send_error(httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  res.set_content(ojson{{"error", message}}.dump(), "application/json");
}

void send_json(httplib::Response& res, const ojson& j) { res.set_content(j.dump(), "application/json"); }

}  // namespace

ModelSpec parse_model_arg(const std::string& arg) {
  auto eq = arg.find('=');
  if (eq != std::string::npos && eq > 0 && arg.find('/') > eq) return {arg.substr(0, eq), arg.substr(eq + 1)};
  std::string path = arg;
  std::string trimmed = path;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  auto slash = trimmed.rfind('/');
  return {slash == std::string::npos ? trimmed : trimmed.substr(slash + 1), path};
}

struct Server::Impl {
  ServerOptions opt;
  std::map<std::string, std::unique_ptr<ServedModel>> models;
  httplib::Server http;
  std::atomic<bool> stop_requested{false}, listening{false}, listen_done{false};

  ServedModel& model(const std::string& name) {
    auto it = models.find(name);
    if (it == models.end()) throw HttpError(404, "unknown model '" + name + "'");
    return *it->second;
  }

  Image decode(const std::string& bytes, const std::string& what) {
    Image img;
    try {
      img = decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), what,
                         /*apply_exif_orientation=*/true);
    } catch (const InputError& e) {
      // The decoder's own pixel limit (Pillow's decompression-bomb check) is a size problem too.
      bool too_large = std::string(e.what()).find("decompression bomb") != std::string::npos;
      throw HttpError(too_large ? 413 : 400, e.what());
    }
    if (static_cast<int64_t>(img.pixels()) > opt.max_image_pixels)
      throw HttpError(413, what + " is " + std::to_string(img.width) + "x" + std::to_string(img.height) +
                               " pixels, more than the server's limit of " + std::to_string(opt.max_image_pixels));
    return img;
  }

  void run(ServedModel& m, const std::shared_ptr<Job>& job) {
    auto done = job->done.get_future();
    if (!m.batcher->submit(job)) throw HttpError(503, "model '" + m.name + "' has too many requests waiting");
    done.get();  // rethrows the job's error
  }

  // Wraps a handler: every error becomes {"error": ...} with its status; nothing escapes.
  template <class F>
  httplib::Server::Handler guarded(F f) {
    return [f](const httplib::Request& req, httplib::Response& res) { answer(res, [&] { f(req, res); }); };
  }

  // A POST handler that reads the body itself: httplib would otherwise parse (and cap at 8 KB) any
  // body sent as application/x-www-form-urlencoded, which is what `curl --data-binary` says.
  template <class F>
  httplib::Server::HandlerWithContentReader guarded_post(F f) {
    return [this, f](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader) {
      answer(res, [&] {
        std::string body;
        bool too_large = false;
        bool ok = reader([&](const char* data, size_t n) {
          if (body.size() + n > opt.max_body_bytes) return !(too_large = true);
          body.append(data, n);
          return true;
        });
        if (too_large || res.status == 413) throw HttpError(413, "request body too large");
        if (!ok) throw HttpError(400, "cannot read the request body");
        f(req, body, res);
      });
    };
  }

  template <class F>
  static void answer(httplib::Response& res, F&& f) {
    {
      try {
        f();
      } catch (const HttpError& e) {
        if (e.status == 503) res.set_header("Retry-After", "1");
        send_error(res, e.status, e.what());
      } catch (const InputError& e) {
        send_error(res, 400, e.what());
      } catch (const ModelError& e) {
        send_error(res, 500, e.what());
      } catch (const Error& e) {
        send_error(res, 400, e.what());
      } catch (const std::bad_alloc&) {
        send_error(res, 507, "out of memory");
      } catch (const std::exception& e) {
        send_error(res, 500, e.what());
      } catch (...) {
        send_error(res, 500, "internal error");
      }
    }
  }

  ojson model_metadata(const ServedModel& m) const {
    ojson inputs = ojson::array();
    inputs.push_back({{"name", "image"}, {"datatype", "BYTES"}, {"shape", {-1}}});
    inputs.push_back({{"name", "pixel_values"}, {"datatype", "FP32"}, {"shape", {-1, 3, -1, -1}}});
    inputs.push_back({{"name", "pixel_mask"}, {"datatype", "INT64"}, {"shape", {-1, -1, -1}}});
    ojson outputs = ojson::array();
    for (const auto& o : m.outputs) outputs.push_back({{"name", o.name}, {"datatype", o.datatype}, {"shape", o.shape}});
    if (m.task != Task::None) outputs.push_back({{"name", "results"}, {"datatype", "BYTES"}, {"shape", {-1}}});
    return {{"name", m.name},
            {"versions", {"1"}},
            {"platform", "visionformers"},
            {"inputs", inputs},
            {"outputs", outputs},
            {"parameters",
             {{"architecture", m.p.model->architecture}, {"model_type", m.p.model->model_type}, {"task", task_name(m.task)}}}};
  }

  // POST /v1/models/{name}: the body is one image file; the answer is `vf <task> --json`'s text.
  void v1_predict(const httplib::Request& req, const std::string& body_bytes, httplib::Response& res) {
    ServedModel& m = model(req.matches[1]);
    if (m.task == Task::None) throw HttpError(400, "model '" + m.name + "' (" + m.p.model->architecture + ") has no pipeline task");
    auto job = std::make_shared<Job>();
    job->task = m.task;
    if (req.has_param("top_k")) job->top_k = parse_int(req.get_param_value("top_k"), "top_k");
    if (req.has_param("threshold"))
      job->threshold = float(job->seg.threshold = parse_double(req.get_param_value("threshold"), "threshold"));
    if (req.has_param("task")) job->seg.task = req.get_param_value("task");
    if (req.has_param("mask_threshold"))
      job->seg.mask_threshold = parse_double(req.get_param_value("mask_threshold"), "mask_threshold");
    if (req.has_param("overlap_mask_area_threshold"))
      job->seg.overlap_mask_area_threshold =
          parse_double(req.get_param_value("overlap_mask_area_threshold"), "overlap_mask_area_threshold");
    if (m.task == Task::Segment && job->seg.task != "panoptic" && job->seg.task != "instance" && job->seg.task != "semantic")
      throw HttpError(400, "task '" + job->seg.task + "': expected panoptic, instance or semantic");
    if (body_bytes.empty()) throw HttpError(400, "empty body: send an image file");
    job->images.push_back(decode(body_bytes, "request body"));
    run(m, job);
    // Segmentation prints one image's segment list; classify/detect unwrap the one-image list.
    res.set_content(m.task == Task::Segment ? job->results[0].dump(2) + "\n" : cli_json_text(ojson(job->results)),
                    "application/json");
  }

  void v2_infer(const httplib::Request& req, const std::string& raw, httplib::Response& res) {
    ServedModel& m = model(req.matches[1]);
    // Triton's binary data extension: a JSON header of the given length, then the raw tensors.
    size_t json_len = raw.size();
    if (req.has_header("Inference-Header-Content-Length")) {
      int64_t n = -1;
      try {
        n = std::stoll(req.get_header_value("Inference-Header-Content-Length"));
      } catch (...) {
      }
      if (n < 0 || size_t(n) > raw.size()) throw HttpError(400, "bad Inference-Header-Content-Length");
      json_len = size_t(n);
    }
    nlohmann::json body;
    try {
      body = nlohmann::json::parse(raw.begin(), raw.begin() + json_len);
    } catch (const nlohmann::json::exception& e) {
      throw HttpError(400, std::string("request is not JSON: ") + e.what());
    }
    if (!body.is_object() || !body.contains("inputs") || !body["inputs"].is_array())
      throw HttpError(400, "request needs an 'inputs' array");
    const uint8_t* bin = reinterpret_cast<const uint8_t*>(raw.data()) + json_len;
    size_t bin_left = raw.size() - json_len;
    std::map<std::string, RawInput> inputs;
    for (const auto& in : body["inputs"]) {
      if (!in.is_object() || !in.contains("name") || !in["name"].is_string())
        throw HttpError(400, "every input needs a 'name'");
      std::string name = in["name"];
      if (name != "image" && name != "pixel_values" && name != "pixel_mask")
        throw HttpError(400, "unknown input '" + name + "' (expected image, or pixel_values and pixel_mask)");
      RawInput r{&in, nullptr, 0};
      if (in.contains("parameters") && in["parameters"].is_object() && in["parameters"].contains("binary_data_size")) {
        const auto& n = in["parameters"]["binary_data_size"];
        if (!n.is_number_unsigned() || n.get<uint64_t>() > bin_left)
          throw HttpError(400, "input '" + name + "': binary_data_size past the end of the body");
        r.binary = bin;
        r.binary_size = n.get<size_t>();
        bin += r.binary_size;
        bin_left -= r.binary_size;
      }
      inputs[name] = r;
    }
    const nlohmann::json params = body.value("parameters", nlohmann::json::object());
    auto job = std::make_shared<Job>();
    if (params.is_object()) {
      if (params.contains("top_k") && params["top_k"].is_number()) job->top_k = params["top_k"].get<int>();
      if (params.contains("threshold") && params["threshold"].is_number())
        job->threshold = float(job->seg.threshold = params["threshold"].get<double>());
      if (params.contains("task") && params["task"].is_string()) job->seg.task = params["task"];
      if (params.contains("mask_threshold") && params["mask_threshold"].is_number())
        job->seg.mask_threshold = params["mask_threshold"].get<double>();
      if (params.contains("overlap_mask_area_threshold") && params["overlap_mask_area_threshold"].is_number())
        job->seg.overlap_mask_area_threshold = params["overlap_mask_area_threshold"].get<double>();
    }

    // Which outputs, and which of them as binary data.
    bool binary_default = params.is_object() && params.value("binary_data_output", false);
    std::vector<std::pair<std::string, bool>> wanted;
    if (body.contains("outputs")) {
      if (!body["outputs"].is_array()) throw HttpError(400, "'outputs' must be an array");
      for (const auto& o : body["outputs"]) {
        if (!o.is_object() || !o.contains("name") || !o["name"].is_string())
          throw HttpError(400, "every requested output needs a 'name'");
        bool binary = binary_default;
        if (o.contains("parameters") && o["parameters"].is_object() && o["parameters"].contains("binary_data"))
          binary = o["parameters"]["binary_data"].is_boolean() && o["parameters"]["binary_data"].get<bool>();
        wanted.push_back({o["name"], binary});
      }
    }
    bool all_outputs = wanted.empty();
    bool want_results = all_outputs, want_tensors = all_outputs;
    for (auto& [name, b] : wanted) {
      if (name == "results") want_results = true;
      else want_tensors = true;
    }

    if (inputs.count("image")) {
      if (inputs.count("pixel_values")) throw HttpError(400, "send either 'image' or 'pixel_values', not both");
      const RawInput& r = inputs["image"];
      if (r.meta->value("datatype", "") != "BYTES") throw HttpError(400, "input 'image' must be BYTES");
      int64_t count = shape_count(r.meta->value("shape", nlohmann::json()), "image", nullptr);
      if (count < 1) throw HttpError(400, "input 'image' holds no image");
      auto files = read_bytes_input(r, "image", count);
      for (size_t i = 0; i < files.size(); ++i) job->images.push_back(decode(files[i], "image " + std::to_string(i)));
      job->want_tensors = want_tensors;
      if (want_results) {
        if (m.task == Task::None && !all_outputs)
          throw HttpError(400, "model '" + m.name + "' has no pipeline task: no 'results' output");
        job->task = m.task;
      }
    } else if (inputs.count("pixel_values")) {
      const RawInput& r = inputs["pixel_values"];
      if (r.meta->value("datatype", "") != "FP32") throw HttpError(400, "input 'pixel_values' must be FP32");
      job->inputs.pixel_values = read_numeric_input(r, "pixel_values", DType::F32);
      const Shape& s = job->inputs.pixel_values.shape();
      if (s.size() != 4 || s[0] < 1 || s[1] != 3 || s[2] < 1 || s[3] < 1)
        throw HttpError(400, "input 'pixel_values' must be [N, 3, H, W], got " + shape_str(s));
      if (s[2] * s[3] > opt.max_image_pixels) throw HttpError(413, "input 'pixel_values' is larger than the server's pixel limit");
      if (inputs.count("pixel_mask")) {
        job->inputs.pixel_mask = read_numeric_input(inputs["pixel_mask"], "pixel_mask", DType::I64);
        if (job->inputs.pixel_mask.shape() != Shape{s[0], s[2], s[3]})
          throw HttpError(400, "input 'pixel_mask' must be [N, H, W] = " + shape_str({s[0], s[2], s[3]}));
      }
      for (auto& [name, b] : wanted)
        if (name == "results") throw HttpError(400, "'results' needs 'image' input (the original image sizes)");
      job->from_pixels = true;
    } else {
      throw HttpError(400, "no 'image' or 'pixel_values' input");
    }
    run(m, job);

    // Every tensor the model gave unless some were asked for; then the results.
    if (all_outputs) {
      if (job->from_pixels || job->want_tensors)
        for (const auto& [name, t] : job->output.items()) wanted.push_back({name, binary_default});
      if (job->task != Task::None) wanted.push_back({"results", binary_default});
    }
    ojson outputs = ojson::array();
    std::string binary;
    for (auto& [name, as_binary] : wanted) {
      ojson o;
      if (name == "results") {
        std::vector<std::string> texts;
        for (auto& r : job->results) texts.push_back(r.dump());
        o = {{"name", name}, {"datatype", "BYTES"}, {"shape", {int64_t(texts.size())}}};
        if (as_binary) {
          size_t before = binary.size();
          for (auto& t : texts) {
            append_u32le(binary, uint32_t(t.size()));
            binary += t;
          }
          o["parameters"] = {{"binary_data_size", binary.size() - before}};
        } else {
          o["data"] = texts;
        }
      } else {
        if (!job->output.has(name)) throw HttpError(400, "model '" + m.name + "' has no output '" + name + "'");
        Tensor t = job->output.get(name);
        std::string dt = v2_datatype(t.dtype());
        if (dt == "FP32" && t.dtype() != DType::F32) t = t.to(DType::F32);
        o = {{"name", name}, {"datatype", dt}, {"shape", t.shape()}};
        if (as_binary) {
          binary.append(static_cast<const char*>(t.raw()), t.nbytes());
          o["parameters"] = {{"binary_data_size", t.nbytes()}};
        } else {
          ojson data = ojson::array();
          const int64_t n = t.numel();
          if (t.dtype() == DType::F32)
            for (int64_t i = 0; i < n; ++i) data.push_back(t.f32()[i]);
          else if (t.dtype() == DType::I64)
            for (int64_t i = 0; i < n; ++i) data.push_back(t.data<int64_t>()[i]);
          else
            for (int64_t i = 0; i < n; ++i) data.push_back(t.data<int32_t>()[i]);
          o["data"] = std::move(data);
        }
      }
      outputs.push_back(std::move(o));
    }
    ojson answer = {{"model_name", m.name}, {"model_version", "1"}};
    if (body.contains("id") && body["id"].is_string()) answer["id"] = body["id"];
    answer["outputs"] = std::move(outputs);
    std::string header = answer.dump();
    if (binary.empty()) {
      res.set_content(header, "application/json");
    } else {
      res.set_header("Inference-Header-Content-Length", std::to_string(header.size()));
      res.set_content(header + binary, "application/octet-stream");
    }
  }

  void routes() {
    http.set_payload_max_length(opt.max_body_bytes);
    // httplib writes headers and body separately: with Nagle on, a client's delayed ACK holds every
    // answer back ~40 ms.
    http.set_tcp_nodelay(true);
    const int threads = std::max(1, opt.http_threads);
    http.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
    // httplib's own errors (413 past the payload limit, 404 for unknown paths) in our JSON shape.
    http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (res.body.empty())
        send_error(res, res.status, res.status == 413 ? "request body too large" : res.status == 404 ? "not found" : "error");
    });
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
      send_error(res, 500, "internal error");
    });
    http.Get("/v2/health/live", guarded([](const auto&, auto& res) { send_json(res, ojson{{"live", true}}); }));
    http.Get("/v2/health/ready", guarded([](const auto&, auto& res) { send_json(res, ojson{{"ready", true}}); }));
    http.Get("/v2", guarded([](const auto&, auto& res) {
               send_json(res, ojson{{"name", "visionformers"}, {"version", "0.1.0"}, {"extensions", {"binary_tensor_data"}}});
             }));
    http.Get(R"(/v2/models/([^/]+))", guarded([this](const auto& req, auto& res) {
               send_json(res, model_metadata(model(req.matches[1])));
             }));
    http.Get(R"(/v2/models/([^/]+)/versions/1)", guarded([this](const auto& req, auto& res) {
               send_json(res, model_metadata(model(req.matches[1])));
             }));
    http.Get(R"(/v2/models/([^/]+)/ready)", guarded([this](const auto& req, auto& res) {
               model(req.matches[1]);
               send_json(res, ojson{{"name", std::string(req.matches[1])}, {"ready", true}});
             }));
    auto infer = [this](const auto& req, const std::string& body, auto& res) { v2_infer(req, body, res); };
    http.Post(R"(/v2/models/([^/]+)/infer)", guarded_post(infer));
    http.Post(R"(/v2/models/([^/]+)/versions/1/infer)", guarded_post(infer));
    http.Post(R"(/v1/models/([^/]+))",
              guarded_post([this](const auto& req, const std::string& body, auto& res) { v1_predict(req, body, res); }));
  }
};

Server::Server(const std::vector<ModelSpec>& models, const ServerOptions& options) : impl_(std::make_unique<Impl>()) {
  impl_->opt = options;
  if (impl_->opt.max_batch < 1) throw Error("--max-batch must be at least 1");
  if (impl_->opt.max_queue < 0) throw Error("--max-queue must not be negative");
  for (const auto& spec : models) {
    if (spec.name.empty()) throw Error("model '" + spec.path + "': empty name");
    if (impl_->models.count(spec.name)) throw Error("two models named '" + spec.name + "'");
    auto m = std::make_unique<ServedModel>();
    m->name = spec.name;
    m->p = Pretrained::from_pretrained(spec.path);
    m->task = task_of(m->p.model->architecture);
    m->describe_outputs();
    impl_->models[spec.name] = std::move(m);
  }
  for (auto& [name, m] : impl_->models) m->batcher = std::make_unique<Batcher>(m->p, impl_->opt);
  impl_->routes();
}

Server::~Server() {
  stop();
  for (auto& [name, m] : impl_->models) m->batcher.reset();
}

int Server::bind() {
  int port = impl_->opt.port == 0 ? impl_->http.bind_to_any_port(impl_->opt.host)
                                  : (impl_->http.bind_to_port(impl_->opt.host, impl_->opt.port) ? impl_->opt.port : -1);
  if (port < 0) throw Error("cannot listen on " + impl_->opt.host + ":" + std::to_string(impl_->opt.port));
  return port;
}

void Server::listen() {
  impl_->listening = true;
  if (!impl_->stop_requested) impl_->http.listen_after_bind();
  impl_->listen_done = true;
  // httplib has answered its connections; now the queues.
  for (auto& [name, m] : impl_->models) m->batcher->shutdown();
}

void Server::stop() {
  impl_->stop_requested = true;
  // httplib ignores stop() until listen has started: wait for it if listen() is on its way.
  while (impl_->listening && !impl_->listen_done && !impl_->http.is_running())
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  impl_->http.stop();
}

int serve_until_signal(const std::vector<ModelSpec>& models, const ServerOptions& options) {
  // Blocked before any thread starts, so that every thread inherits the mask and only the waiter
  // below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  Server server(models, options);
  int port = server.bind();
  std::printf("listening on http://%s:%d\n", options.host.c_str(), port);
  std::fflush(stdout);
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    server.stop();
  });
  server.listen();
  waiter.join();
  return 0;
}

}  // namespace vf::serve
