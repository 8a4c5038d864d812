// The HTTP server (src/serve): started in-process on 127.0.0.1 port 0 with the vendored tiny models,
// and `vf serve` as a process for SIGTERM. Answers are compared with the `vf` CLI's --json output
// and with the front door's own results for the same images.
#include <gtest/gtest.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <thread>
#include <tuple>

#include "serve/server.h"
#include "test_util.h"
#include "tiny_models.h"
#include "visionformers.h"

namespace {

using nlohmann::json;

std::string tiny_convnext() { return std::string(VF_SOURCE_DIR) + "/assets/tiny-convnext"; }
std::string cat_jpg() { return std::string(VF_SOURCE_DIR) + "/assets/cat.jpg"; }
std::string image(const std::string& name) { return vf::test::images_dir() + "/" + name; }

std::string base64(const std::string& bytes) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = uint8_t(bytes[i]) << 16 | uint8_t(bytes[i + 1]) << 8 | uint8_t(bytes[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += k[(v >> s) & 63];
  }
  if (i + 1 == bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    out += k[(v >> 18) & 63];
    out += k[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16 | uint8_t(bytes[i + 1]) << 8;
    out += k[(v >> 18) & 63];
    out += k[(v >> 12) & 63];
    out += k[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

// `vf ARGS` stdout.
std::string vf_stdout(const std::string& args) {
  // Its own file per test (CTest runs the tests as parallel processes).
  std::string out =
      vf::test::temp_dir(std::string("serve_") + ::testing::UnitTest::GetInstance()->current_test_info()->name()) +
      "/cli.json";
  int rc = std::system((std::string(VF_VF_BINARY) + " " + args + " >" + out).c_str());
  EXPECT_EQ(rc, 0) << args;
  return vf::test::read_bytes(out);
}

// A running in-process server.
struct Running {
  vf::serve::Server server;
  int port;
  std::thread thread;
  Running(const std::vector<vf::serve::ModelSpec>& models, const vf::serve::ServerOptions& opt)
      : server(models, opt), port(server.bind()), thread([this] { server.listen(); }) {}
  ~Running() {
    server.stop();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(120, 0);
    return c;
  }
};

// Triton's statistics counts of one model.
struct Counts {
  uint64_t inferences = 0, executions = 0, pending = 0;
};
Counts counts(httplib::Client& c, const std::string& model) {
  auto r = c.Get(("/v2/models/" + model + "/stats").c_str());
  EXPECT_TRUE(r && r->status == 200);
  if (!r || r->status != 200) return {};
  json s = json::parse(r->body)["model_stats"][0];
  return {s["inference_count"], s["execution_count"], s["pending_request_count"]};
}

// Chelsea mirrored: another image of chelsea's size, as a PNG in `dir`.
std::string mirrored_chelsea(const std::string& dir) {
  vf::Image a = vf::load_image(image("chelsea.png"), true), b = a;
  for (int64_t y = 0; y < a.height; ++y)
    for (int64_t x = 0; x < a.width; ++x)
      for (int64_t c = 0; c < 3; ++c) b.rgb[(y * a.width + x) * 3 + c] = a.rgb[(y * a.width + a.width - 1 - x) * 3 + c];
  vf::save_png(dir + "/mirrored.png", b);
  return dir + "/mirrored.png";
}

class Serve : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    vf::serve::ServerOptions opt;
    opt.port = 0;
    opt.max_batch = 4;
    running_ = new Running({vf::serve::parse_model_arg(tiny_convnext()),
                            {"det", vf::test::golden_case("conditional-detr-tiny-det")},
                            {"backbone", vf::test::golden_case("convnext-tiny-backbone")}},
                           opt);
  }
  static void TearDownTestSuite() {
    delete running_;
    running_ = nullptr;
  }
  static Running* running_;
};
Running* Serve::running_ = nullptr;

TEST(ServeArgs, ModelNames) {
  auto a = vf::serve::parse_model_arg("models/tiny-convnext/");
  EXPECT_EQ(a.name, "tiny-convnext");
  EXPECT_EQ(a.path, "models/tiny-convnext/");
  auto b = vf::serve::parse_model_arg("cls=models/x=y");
  EXPECT_EQ(b.name, "cls");
  EXPECT_EQ(b.path, "models/x=y");
  EXPECT_EQ(vf::serve::parse_model_arg("a/b=c").name, "b=c");
}

TEST_F(Serve, HealthAndMetadata) {
  auto c = running_->client();
  for (const char* path : {"/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/tiny-convnext/ready"}) {
    auto r = c.Get(path);
    ASSERT_TRUE(r) << path;
    EXPECT_EQ(r->status, 200) << path;
  }
  EXPECT_EQ(json::parse(c.Get("/v2/health/live")->body)["live"], true);
  EXPECT_EQ(json::parse(c.Get("/v2")->body)["name"], "visionformers");

  auto r = c.Get("/v2/models/tiny-convnext");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200);
  json meta = json::parse(r->body);
  EXPECT_EQ(meta["name"], "tiny-convnext");
  json logits, results;
  for (auto& o : meta["outputs"]) {
    if (o["name"] == "logits") logits = o;
    if (o["name"] == "results") results = o;
  }
  EXPECT_EQ(logits["datatype"], "FP32");
  EXPECT_EQ(logits["shape"], json::array({-1, 5}));  // num_labels 5 in its config
  EXPECT_EQ(results["datatype"], "BYTES");

  // DETR's processor keeps the aspect ratio: the hidden states' length varies with the image.
  json det = json::parse(c.Get("/v2/models/det")->body);
  for (auto& o : det["outputs"]) {
    if (o["name"] == "pred_boxes") {
      EXPECT_EQ(o["shape"][2], 4);
    }
    if (o["name"] == "encoder_last_hidden_state") {
      EXPECT_EQ(o["shape"][1], -1);
    }
  }
  // A backbone has no pipeline: no results output.
  json bb = json::parse(c.Get("/v2/models/backbone")->body);
  for (auto& o : bb["outputs"]) EXPECT_NE(o["name"], "results");

  auto missing = c.Get("/v2/models/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_TRUE(json::parse(missing->body).contains("error"));
  EXPECT_EQ(c.Get("/v2/models/nope/ready")->status, 404);
}

TEST_F(Serve, V1AnswersWhatTheCliPrints) {
  auto c = running_->client();
  auto r = c.Post("/v1/models/tiny-convnext?top_k=3", vf::test::read_bytes(cat_jpg()), "image/jpeg");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->body, vf_stdout("classify " + tiny_convnext() + " " + cat_jpg() + " --top-k 3 --json"));
  EXPECT_EQ(json::parse(r->body).size(), 3u);
  // Any Content-Type: curl --data-binary sends a 13 KB image as a form.
  auto form = c.Post("/v1/models/tiny-convnext?top_k=3", vf::test::read_bytes(cat_jpg()), "application/x-www-form-urlencoded");
  ASSERT_TRUE(form);
  EXPECT_EQ(form->status, 200);
  EXPECT_EQ(form->body, r->body);

  // Detection at threshold 0 lists every query, so the comparison covers all of them.
  std::string det = vf::test::golden_case("conditional-detr-tiny-det");
  auto d = c.Post("/v1/models/det?threshold=0", vf::test::read_bytes(image("rocket.jpg")), "application/octet-stream");
  ASSERT_TRUE(d);
  ASSERT_EQ(d->status, 200) << d->body;
  EXPECT_EQ(d->body, vf_stdout("detect " + det + " " + image("rocket.jpg") + " --threshold 0 --json"));
  EXPECT_GT(json::parse(d->body).size(), 0u);

  auto backbone = c.Post("/v1/models/backbone", vf::test::read_bytes(cat_jpg()), "image/jpeg");
  EXPECT_EQ(backbone->status, 400);
}

// A segmentation model: /v1 answers what `vf segment --json` prints, for each task.
TEST(ServeSegment, V1AnswersWhatTheCliPrints) {
  const std::string model = vf::test::panoptic_model_dir("serve_detr_panoptic");
  vf::serve::ServerOptions opt;
  opt.port = 0;
  opt.batch_wait_ms = 1000;  // long enough that the concurrent requests below meet in the queue
  Running running({{"seg", model}}, opt);
  auto c = running.client();
  const std::string img = image("chelsea.png");
  const std::vector<std::string> tasks = {"panoptic", "instance", "semantic"};
  // Threshold 0 and a low overlap threshold keep segments, so the comparison is not of empty lists.
  auto path = [](const std::string& task) {
    return "/v1/models/seg?task=" + task + "&threshold=0&overlap_mask_area_threshold=0.05";
  };
  std::vector<std::string> expected;
  for (const auto& task : tasks) {
    expected.push_back(vf_stdout("segment " + model + " " + img + " --task " + task +
                                 " --threshold 0 --overlap-mask-area-threshold 0.05 --json"));
    auto r = c.Post(path(task), vf::test::read_bytes(img), "image/png");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(r->body, expected.back()) << task;
    EXPECT_GT(json::parse(r->body).size(), 0u) << task;
  }
  // The three tasks at once: one forward can serve them all, each post-processed as it asked.
  const Counts before = counts(c, "seg");
  std::vector<std::string> got(tasks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < tasks.size(); ++i)
    threads.emplace_back([&, i] {
      auto cc = running.client();
      auto r = cc.Post(path(tasks[i]), vf::test::read_bytes(img), "image/png");
      got[i] = r && r->status == 200 ? r->body : "failed";
    });
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < tasks.size(); ++i) EXPECT_EQ(got[i], expected[i]) << tasks[i] << " at once";
  const Counts after = counts(c, "seg");
  EXPECT_EQ(after.inferences - before.inferences, tasks.size());
  EXPECT_LT(after.executions - before.executions, tasks.size());
  auto bad = c.Post("/v1/models/seg?task=depth", vf::test::read_bytes(img), "image/png");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
  json v2 = {{"parameters", {{"task", "depth"}}},
             {"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {1}}, {"data", {base64(vf::test::read_bytes(img))}}}}}};
  auto bad_v2 = c.Post("/v2/models/seg/infer", v2.dump(), "application/json");
  ASSERT_TRUE(bad_v2);
  EXPECT_EQ(bad_v2->status, 400) << bad_v2->body;
}

TEST_F(Serve, V2Base64MatchesTheLibrary) {
  auto p = vf::Pretrained::from_pretrained(tiny_convnext());
  vf::Image cat = vf::load_image(cat_jpg(), true), camera = vf::load_image(image("camera.png"), true);
  vf::ModelOutput expected = p.run({cat, camera});
  auto labels = vf::classify(p, {cat, camera}, 2);

  json req = {{"id", "42"},
              {"parameters", {{"top_k", 2}}},
              {"inputs",
               {{{"name", "image"},
                 {"datatype", "BYTES"},
                 {"shape", {2}},
                 {"data", {base64(vf::test::read_bytes(cat_jpg())), base64(vf::test::read_bytes(image("camera.png")))}}}}}};
  auto r = running_->client().Post("/v2/models/tiny-convnext/infer", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json ans = json::parse(r->body);
  EXPECT_EQ(ans["id"], "42");
  EXPECT_EQ(ans["model_name"], "tiny-convnext");
  bool saw_logits = false, saw_results = false;
  for (auto& o : ans["outputs"]) {
    if (o["name"] == "logits") {
      saw_logits = true;
      EXPECT_EQ(o["shape"], json::array({2, 5}));
      const vf::Tensor& l = expected.get("logits");
      ASSERT_EQ(o["data"].size(), size_t(l.numel()));
      for (int64_t i = 0; i < l.numel(); ++i) EXPECT_EQ(o["data"][i].get<float>(), l.f32()[i]) << i;
    }
    if (o["name"] == "results") {
      saw_results = true;
      EXPECT_EQ(o["datatype"], "BYTES");
      ASSERT_EQ(o["data"].size(), 2u);
      for (size_t i = 0; i < 2; ++i) {
        json one = json::parse(o["data"][i].get<std::string>());
        ASSERT_EQ(one.size(), 2u);
        for (size_t k = 0; k < 2; ++k) {
          EXPECT_EQ(one[k]["label"], labels[i][k].label);
          EXPECT_FLOAT_EQ(one[k]["score"].get<float>(), labels[i][k].score);
        }
      }
    }
  }
  EXPECT_TRUE(saw_logits);
  EXPECT_TRUE(saw_results);
}

// Triton's binary data extension, both ways: the image as a length-prefixed BYTES element, logits
// back as raw little-endian float32, results as JSON.
TEST_F(Serve, V2BinaryData) {
  auto p = vf::Pretrained::from_pretrained(tiny_convnext());
  const vf::Tensor logits = p.run({vf::load_image(cat_jpg(), true)}).get("logits");
  std::string file = vf::test::read_bytes(cat_jpg());
  std::string element;
  uint32_t n = uint32_t(file.size());
  element.append(reinterpret_cast<const char*>(&n), 4);  // little-endian on x86-64
  element += file;
  json header = {{"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {1}},
                               {"parameters", {{"binary_data_size", element.size()}}}}}},
                 {"outputs", {{{"name", "logits"}, {"parameters", {{"binary_data", true}}}}, {{"name", "results"}}}}};
  std::string h = header.dump();
  httplib::Headers headers = {{"Inference-Header-Content-Length", std::to_string(h.size())}};
  auto r = running_->client().Post("/v2/models/tiny-convnext/infer", headers, h + element, "application/octet-stream");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  ASSERT_TRUE(r->has_header("Inference-Header-Content-Length"));
  size_t json_len = std::stoul(r->get_header_value("Inference-Header-Content-Length"));
  json ans = json::parse(r->body.substr(0, json_len));
  ASSERT_EQ(ans["outputs"].size(), 2u);
  EXPECT_EQ(ans["outputs"][0]["name"], "logits");
  EXPECT_EQ(ans["outputs"][0]["parameters"]["binary_data_size"], 20);
  ASSERT_EQ(r->body.size(), json_len + 20);
  std::vector<float> got(5);
  std::memcpy(got.data(), r->body.data() + json_len, 20);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(got[i], logits.f32()[i]) << i;
  EXPECT_EQ(ans["outputs"][1]["name"], "results");
  EXPECT_EQ(json::parse(ans["outputs"][1]["data"][0].get<std::string>())[0]["label"],
            json::parse(vf_stdout("classify " + tiny_convnext() + " " + cat_jpg() + " --json"))[0]["label"]);
}

// pixel_values (with pixel_mask as binary INT64) go to the model alone: the same tensors as run().
TEST_F(Serve, V2PixelValues) {
  auto p = vf::Pretrained::from_pretrained(vf::test::golden_case("conditional-detr-tiny-det"));
  vf::Image img = vf::load_image(image("chelsea.png"), true);
  vf::BatchFeature f = p.processor->preprocess({img});
  vf::ModelOutput expected = p.run({img});
  const vf::Tensor& pv = f.pixel_values;
  std::vector<float> values(pv.f32(), pv.f32() + pv.numel());
  json header = {{"inputs",
                  {{{"name", "pixel_values"}, {"datatype", "FP32"}, {"shape", pv.shape()}, {"data", values}},
                   {{"name", "pixel_mask"}, {"datatype", "INT64"}, {"shape", f.pixel_mask.shape()},
                    {"parameters", {{"binary_data_size", f.pixel_mask.nbytes()}}}}}},
                 {"outputs", {{{"name", "pred_boxes"}}, {{"name", "logits"}}}}};
  std::string h = header.dump();
  httplib::Headers headers = {{"Inference-Header-Content-Length", std::to_string(h.size())}};
  std::string body = h + std::string(static_cast<const char*>(f.pixel_mask.raw()), f.pixel_mask.nbytes());
  auto r = running_->client().Post("/v2/models/det/infer", headers, body, "application/octet-stream");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json ans = json::parse(r->body);
  ASSERT_EQ(ans["outputs"].size(), 2u);
  for (auto& o : ans["outputs"]) {
    const vf::Tensor& t = expected.get(o["name"]);
    EXPECT_EQ(o["shape"].get<std::vector<int64_t>>(), t.shape());
    ASSERT_EQ(o["data"].size(), size_t(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(o["data"][i].get<float>(), t.f32()[i]) << o["name"] << i;
  }
  // No original image size, so no post-processed results.
  header["outputs"] = {{{"name", "results"}}};
  h = header.dump();
  headers = {{"Inference-Header-Content-Length", std::to_string(h.size())}};
  body = h + std::string(static_cast<const char*>(f.pixel_mask.raw()), f.pixel_mask.nbytes());
  EXPECT_EQ(running_->client().Post("/v2/models/det/infer", headers, body, "application/octet-stream")->status, 400);
}

TEST_F(Serve, BadRequests) {
  auto c = running_->client();
  auto expect = [](const httplib::Result& r, int status, const std::string& what) {
    ASSERT_TRUE(r) << what;
    EXPECT_EQ(r->status, status) << what << ": " << r->body;
    EXPECT_TRUE(json::parse(r->body).contains("error")) << what;
  };
  std::string cat = vf::test::read_bytes(cat_jpg());
  expect(c.Post("/v1/models/nope", cat, "image/jpeg"), 404, "unknown model");
  expect(c.Post("/v2/models/nope/infer", "{}", "application/json"), 404, "unknown model v2");
  expect(c.Post("/v1/models/tiny-convnext", "not an image", "image/jpeg"), 400, "garbage image");
  expect(c.Post("/v1/models/tiny-convnext", vf::test::read_bytes(image("truncated.jpg")), "image/jpeg"), 400, "truncated");
  expect(c.Post("/v1/models/tiny-convnext", "", "image/jpeg"), 400, "empty body");
  expect(c.Post("/v1/models/tiny-convnext?top_k=abc", cat, "image/jpeg"), 400, "bad top_k");
  expect(c.Post("/v2/models/tiny-convnext/infer", "{not json", "application/json"), 400, "bad JSON");
  json bad64 = {{"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {1}}, {"data", {"***"}}}}}};
  expect(c.Post("/v2/models/tiny-convnext/infer", bad64.dump(), "application/json"), 400, "bad base64");
  json count = {{"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {2}}, {"data", {base64(cat)}}}}}};
  expect(c.Post("/v2/models/tiny-convnext/infer", count.dump(), "application/json"), 400, "shape vs data");
  json pv = {{"inputs", {{{"name", "pixel_values"}, {"datatype", "FP32"}, {"shape", {1, 2, 2, 2}}, {"data", std::vector<float>(8)}}}}};
  expect(c.Post("/v2/models/tiny-convnext/infer", pv.dump(), "application/json"), 400, "two channels");
  json out = {{"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {1}}, {"data", {base64(cat)}}}}},
              {"outputs", {{{"name", "nope"}}}}};
  expect(c.Post("/v2/models/tiny-convnext/infer", out.dump(), "application/json"), 400, "unknown output");
  std::string h = "{\"inputs\": []}";
  expect(c.Post("/v2/models/tiny-convnext/infer", {{"Inference-Header-Content-Length", "999"}}, h, "application/json"), 400,
         "header length");
  // Still serving after all that.
  EXPECT_EQ(c.Post("/v1/models/tiny-convnext", cat, "image/jpeg")->status, 200);
}

TEST(ServeLimits, TooLargeAndBusy) {
  vf::serve::ServerOptions opt;
  opt.port = 0;
  opt.max_body_bytes = 4000;
  opt.max_image_pixels = 100;
  opt.max_queue = 0;  // nothing may wait: every request that reaches the queue is turned away
  Running s({vf::serve::parse_model_arg(tiny_convnext())}, opt);
  auto c = s.client();
  auto big = c.Post("/v1/models/tiny-convnext", vf::test::read_bytes(cat_jpg()), "image/jpeg");  // 13 KB
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  EXPECT_TRUE(json::parse(big->body).contains("error"));

  std::string dir = vf::test::temp_dir("serve_limits");
  vf::Image img;
  img.height = 20;
  img.width = 20;  // 400 pixels > 100
  img.rgb.assign(20 * 20 * 3, 90);
  vf::save_png(dir + "/20.png", img);
  auto many = c.Post("/v1/models/tiny-convnext", vf::test::read_bytes(dir + "/20.png"), "image/png");
  ASSERT_TRUE(many);
  EXPECT_EQ(many->status, 413) << many->body;

  img.height = img.width = 8;
  img.rgb.assign(8 * 8 * 3, 90);
  vf::save_png(dir + "/8.png", img);
  auto busy = c.Post("/v1/models/tiny-convnext", vf::test::read_bytes(dir + "/8.png"), "image/png");
  ASSERT_TRUE(busy);
  EXPECT_EQ(busy->status, 503);
  EXPECT_EQ(busy->get_header_value("Retry-After"), "1");
}

// 8 clients at once, batched by the server, get what one client gets alone.
TEST_F(Serve, ConcurrentClientsGetSerialResults) {
  const std::vector<std::string> files = {cat_jpg(), image("camera.png"), image("chelsea.png"), image("rocket.jpg")};
  std::vector<std::string> bodies, serial;
  auto c = running_->client();
  for (auto& f : files) {
    bodies.push_back(vf::test::read_bytes(f));
    auto r = c.Post("/v1/models/tiny-convnext?top_k=5", bodies.back(), "image/jpeg");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200);
    serial.push_back(r->body);
  }
  constexpr int kClients = 8, kRequests = 6;
  std::vector<std::vector<std::string>> got(kClients);
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t)
    threads.emplace_back([&, t] {
      auto cc = running_->client();
      for (int i = 0; i < kRequests; ++i) {
        auto r = cc.Post("/v1/models/tiny-convnext?top_k=5", bodies[(t + i) % bodies.size()], "image/jpeg");
        got[t].push_back(r && r->status == 200 ? r->body : "failed");
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kClients; ++t)
    for (int i = 0; i < kRequests; ++i) {
      const json a = json::parse(got[t][i], nullptr, false), b = json::parse(serial[(t + i) % bodies.size()]);
      ASSERT_FALSE(a.is_discarded()) << got[t][i];
      ASSERT_EQ(a.size(), b.size());
      // A batch of several images may round its last bits differently from a batch of one.
      for (size_t k = 0; k < a.size(); ++k) {
        EXPECT_EQ(a[k]["label"], b[k]["label"]);
        EXPECT_NEAR(a[k]["score"].get<double>(), b[k]["score"].get<double>(), 1e-6);
      }
    }
}

// Detection requests from several clients at once share forwards (images of one processed size; the
// square camera runs in a forward of its own) and get what `vf detect --json` prints for each image
// alone. The statistics show the forwards were shared.
TEST(ServeBatching, ConcurrentDetectRequestsShareForwards) {
  vf::serve::ServerOptions opt;
  opt.port = 0;
  opt.max_batch = 4;
  opt.batch_wait_ms = 500;  // long enough that the clients' requests meet in the queue
  const std::string det = vf::test::golden_case("conditional-detr-tiny-det");
  Running running({{"det", det}}, opt);
  const std::string dir = vf::test::temp_dir("serve_batching");
  const std::vector<std::string> files = {image("chelsea.png"), mirrored_chelsea(dir), image("camera.png")};
  std::vector<std::string> bodies, expected;
  for (const auto& f : files) {
    bodies.push_back(vf::test::read_bytes(f));
    // Threshold 0: every query is listed, so all of them are compared.
    expected.push_back(vf_stdout("detect " + det + " " + f + " --threshold 0 --json"));
  }
  auto c = running.client();
  const Counts before = counts(c, "det");
  constexpr int kClients = 4, kRequests = 3;
  std::vector<std::vector<std::string>> got(kClients);
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t)
    threads.emplace_back([&, t] {
      auto cc = running.client();
      for (int i = 0; i < kRequests; ++i) {
        auto r = cc.Post("/v1/models/det?threshold=0", bodies[(t + i) % bodies.size()], "application/octet-stream");
        got[t].push_back(r && r->status == 200 ? r->body : "failed: " + (r ? r->body : std::string("no answer")));
      }
    });
  for (auto& th : threads) th.join();
  // A batch of several images may round its last bits differently from a batch of one (the
  // attention's blocking depends on the batch): the same detections, scores within 1e-6, and the
  // order by score only up to ties that close.
  auto detections = [](const std::string& text) {
    std::vector<std::tuple<std::string, int, int, int, int, double>> r;
    const json j = json::parse(text, nullptr, false);
    if (j.is_discarded()) return r;
    for (const auto& d : j)
      r.emplace_back(d["label"].get<std::string>(), d["box"]["xmin"].get<int>(), d["box"]["ymin"].get<int>(),
                     d["box"]["xmax"].get<int>(), d["box"]["ymax"].get<int>(), d["score"].get<double>());
    std::sort(r.begin(), r.end());
    return r;
  };
  for (int t = 0; t < kClients; ++t)
    for (int i = 0; i < kRequests; ++i) {
      const size_t f = (t + i) % bodies.size();
      const auto a = detections(got[t][i]), b = detections(expected[f]);
      ASSERT_EQ(a.size(), b.size()) << "client " << t << " request " << i << ": " << files[f] << "\n" << got[t][i];
      ASSERT_FALSE(a.empty()) << got[t][i];
      for (size_t k = 0; k < a.size(); ++k) {
        EXPECT_EQ(std::get<0>(a[k]), std::get<0>(b[k]));
        EXPECT_EQ(std::get<1>(a[k]), std::get<1>(b[k]));
        EXPECT_EQ(std::get<2>(a[k]), std::get<2>(b[k]));
        EXPECT_EQ(std::get<3>(a[k]), std::get<3>(b[k]));
        EXPECT_EQ(std::get<4>(a[k]), std::get<4>(b[k]));
        EXPECT_NEAR(std::get<5>(a[k]), std::get<5>(b[k]), 1e-6) << files[f];
      }
    }
  EXPECT_GT(json::parse(expected[0]).size(), 2u);
  const Counts after = counts(c, "det");
  EXPECT_EQ(after.inferences - before.inferences, uint64_t(kClients * kRequests));
  EXPECT_LT(after.executions - before.executions, uint64_t(kClients * kRequests));
  std::printf("%d detect requests in %llu forwards\n", kClients * kRequests,
              static_cast<unsigned long long>(after.executions - before.executions));
}

// A v2 request for both the tensors and the results runs the model once: the tensors are run()'s,
// the results what the CLI prints for the image.
TEST_F(Serve, V2TensorsAndResultsFromOneForward) {
  const std::string det = vf::test::golden_case("conditional-detr-tiny-det");
  auto p = vf::Pretrained::from_pretrained(det);
  auto request = [](const std::vector<std::string>& files) {
    json data = json::array();
    for (const auto& f : files) data.push_back(base64(vf::test::read_bytes(f)));
    return json{{"parameters", {{"threshold", 0}}},
                {"inputs", {{{"name", "image"}, {"datatype", "BYTES"}, {"shape", {files.size()}}, {"data", data}}}}};
  };
  auto output = [](const json& ans, const std::string& name) {
    for (auto& o : ans["outputs"])
      if (o["name"] == name) return o;
    ADD_FAILURE() << "no output " << name;
    return json();
  };
  auto expect_tensor = [](const json& o, const vf::Tensor& t) {
    ASSERT_EQ(o["shape"].get<std::vector<int64_t>>(), t.shape());
    for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(o["data"][i].get<float>(), t.f32()[i]) << o["name"] << " " << i;
  };
  auto c = running_->client();

  // One image: one forward.
  const std::string rocket = image("rocket.jpg");
  Counts before = counts(c, "det");
  auto r = c.Post("/v2/models/det/infer", request({rocket}).dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  Counts after = counts(c, "det");
  EXPECT_EQ(after.executions - before.executions, 1u);
  EXPECT_EQ(after.inferences - before.inferences, 1u);
  json ans = json::parse(r->body);
  vf::ModelOutput expected = p.run({vf::load_image(rocket, true)});
  expect_tensor(output(ans, "logits"), expected.get("logits"));
  expect_tensor(output(ans, "pred_boxes"), expected.get("pred_boxes"));
  json results = output(ans, "results");
  ASSERT_EQ(results["data"].size(), 1u);
  json cli = json::parse(vf_stdout("detect " + det + " " + rocket + " --threshold 0 --json"));
  EXPECT_EQ(json::parse(results["data"][0].get<std::string>()), cli);
  EXPECT_GT(cli.size(), 2u);

  // Two images of different processed sizes: each image's results from its own unpadded forward,
  // and the tensors of the processor's padded batch, which take a third.
  const std::string chelsea = image("chelsea.png"), camera = image("camera.png");
  before = counts(c, "det");
  r = c.Post("/v2/models/det/infer", request({chelsea, camera}).dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  after = counts(c, "det");
  EXPECT_EQ(after.executions - before.executions, 3u);
  ans = json::parse(r->body);
  expected = p.run({vf::load_image(chelsea, true), vf::load_image(camera, true)});
  expect_tensor(output(ans, "logits"), expected.get("logits"));
  results = output(ans, "results");
  ASSERT_EQ(results["data"].size(), 2u);
  EXPECT_EQ(json::parse(results["data"][0].get<std::string>()),
            json::parse(vf_stdout("detect " + det + " " + chelsea + " --threshold 0 --json")));
  EXPECT_EQ(json::parse(results["data"][1].get<std::string>()),
            json::parse(vf_stdout("detect " + det + " " + camera + " --threshold 0 --json")));
}

// `vf serve MODEL --port 0` as a process; its port once it prints its address (-1 if it does not
// within five minutes: loading a full-size synthetic model, and the two probe forwards that describe
// its outputs, take a while on a loaded machine or under the sanitizers).
pid_t start_vf_serve(const std::string& model_arg, int* port) {
  *port = -1;
  int out[2];
  if (pipe(out) != 0) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    dup2(out[1], 1);
    close(out[0]);
    execl(VF_VF_BINARY, VF_VF_BINARY, "serve", model_arg.c_str(), "--port", "0", nullptr);
    _exit(127);
  }
  close(out[1]);
  std::string line;
  char ch;
  pollfd pfd{out[0], POLLIN, 0};
  while (line.find('\n') == std::string::npos && poll(&pfd, 1, 300000) > 0 && read(out[0], &ch, 1) == 1) line += ch;
  close(out[0]);
  const std::string prefix = "listening on http://127.0.0.1:";
  EXPECT_EQ(line.rfind(prefix, 0), 0u) << line;
  if (line.rfind(prefix, 0) == 0) *port = std::stoi(line.substr(prefix.size()));
  return pid;
}

// Its exit status, or -1 (after SIGKILL) if it has not exited within `seconds`.
int wait_exit(pid_t pid, int seconds) {
  int status = 0;
  for (int i = 0; i < seconds * 10; ++i) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

// `vf serve` as a process: prints its address, serves, and exits 0 on SIGTERM.
TEST(ServeProcess, SigtermExitsZero) {
  int port = -1;
  pid_t pid = start_vf_serve("tiny=" + tiny_convnext(), &port);
  ASSERT_GT(pid, 0);
  if (port < 0) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    FAIL() << "vf serve printed no address";
  }
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(60, 0);
  auto r = c.Post("/v1/models/tiny", vf::test::read_bytes(cat_jpg()), "image/jpeg");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid, 60), 0) << "-1: vf serve did not exit within 60 s of SIGTERM";
}

// SIGTERM while a request is in flight (a full-size DETR-R50 with synthetic weights takes about a
// second): that request still gets its full answer, new connections are refused or answered 503,
// and the process exits 0.
TEST(ServeProcess, SigtermDrainsInFlightRequests) {
  const std::string model =
      vf::test::synthetic_model_dir(vf::test::golden_case("detr-resnet-50-synth"), "serve_sigterm_drain");
  const std::string img = image("chelsea.png");
  const std::string expected = vf_stdout("detect " + model + " " + img + " --threshold 0 --json");
  int port = -1;
  pid_t pid = start_vf_serve("slow=" + model, &port);
  ASSERT_GT(pid, 0);
  if (port < 0) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    FAIL() << "vf serve printed no address";
  }
  std::atomic<bool> answered{false};
  int status = -1;  // -1: no answer
  std::string body;
  std::thread client([&] {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(300, 0);
    if (auto r = c.Post("/v1/models/slow?threshold=0", vf::test::read_bytes(img), "image/png")) {
      status = r->status;
      body = r->body;
    }
    answered = true;
  });
  // Until the server holds the request (queued or running): bounded, 60 s.
  httplib::Client probe("127.0.0.1", port);
  probe.set_read_timeout(10, 0);
  bool held = false;
  for (int i = 0; i < 1200 && !held && !answered; ++i) {
    held = counts(probe, "slow").pending > 0;
    if (!held) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid, SIGTERM);
  const bool unanswered_at_sigterm = !answered;
  // New connections: refused once the server has taken the signal, or answered 503 if one slips in
  // before it closes its socket. Bounded: 60 s.
  bool turned_away = false;
  for (int i = 0; i < 600 && !turned_away; ++i) {
    httplib::Client late("127.0.0.1", port);
    late.set_connection_timeout(2, 0);
    late.set_read_timeout(10, 0);
    auto r = late.Get("/v2/health/ready");
    turned_away = !r || r->status == 503;
    if (!turned_away) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  client.join();
  EXPECT_TRUE(held) << "the request never showed as pending";
  EXPECT_TRUE(unanswered_at_sigterm) << "the request was answered before SIGTERM: nothing was drained";
  EXPECT_TRUE(turned_away);
  EXPECT_EQ(status, 200) << body << " (-1: the in-flight request got no answer)";
  EXPECT_EQ(body, expected);
  EXPECT_GT(json::parse(expected).size(), 0u);
  EXPECT_EQ(wait_exit(pid, 300), 0);
}

}  // namespace
