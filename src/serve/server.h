// An HTTP server over the front door: KServe's Open Inference Protocol v2 (with Triton's binary
// data extension) and a plain /v1 endpoint that answers what `vf classify|detect|segment --json`
// prints. Requests are queued per model and the images of concurrent requests are batched
// dynamically (those of one processed size share a forward; each request is post-processed alone).
//
//   vf::serve::Server s({{"tiny", "assets/tiny-convnext"}}, {.port = 0});
//   int port = s.bind();   // then s.listen() blocks until s.stop()
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vf::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;          // 0: any free port
  int max_batch = 8;        // images of concurrent requests batched together (a larger request runs alone)
  int max_queue = 64;       // requests waiting per model; more are answered 503 + Retry-After
  int batch_wait_ms = 5;    // how long the first request of a batch waits for company
  size_t max_body_bytes = 32u << 20;     // larger bodies: 413
  int64_t max_image_pixels = 40'000'000;  // per image, decoded or as pixel_values: larger ones 413
  int http_threads = 32;  // connections served at once (httplib keeps a keep-alive connection on its thread)
};

struct ModelSpec {
  std::string name;  // the URL's {name}
  std::string path;  // what Pretrained::from_pretrained takes
};

// "NAME=MODEL" or "MODEL" (NAME = its last path component, trailing slashes ignored).
ModelSpec parse_model_arg(const std::string& arg);

class Server {
 public:
  // Loads every model (throws what from_pretrained throws; duplicate names are an error).
  Server(const std::vector<ModelSpec>& models, const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port and returns the bound port (throws when it cannot bind).
  int bind();
  // Serves until stop(); returns once in-flight requests are answered and the queues are empty.
  void listen();
  // Stops accepting; safe from any thread (not from a signal handler).
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// `vf serve`: loads the models, binds, prints "listening on http://HOST:PORT" to stdout, serves until
// SIGINT or SIGTERM, then answers what is in flight and returns 0.
int serve_until_signal(const std::vector<ModelSpec>& models, const ServerOptions& options);

}  // namespace vf::serve
