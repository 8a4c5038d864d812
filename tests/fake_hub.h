// A stand-in for the Hugging Face Hub on 127.0.0.1 (two servers on ports the OS picks: the Hub and a
// "CDN" that LFS files redirect to), answering with the Hub's headers: /api/models/{id}/revision/{rev},
// /{id}/resolve/{rev}/{file} (X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size, Location), and its
// refusals (X-Error-Code RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound). It logs every
// request, and can cut downloads midway, slow them down, corrupt them, or answer 503.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace vf::test {

// The sha256 of `bytes` by coreutils' sha256sum: independent of the code under test.
inline std::string sha256sum(const std::string& bytes) {
  namespace fs = std::filesystem;
  static std::atomic<int> n{0};
  const std::string path = temp_dir("sha256sum") + "/" + std::to_string(::getpid()) + "-" + std::to_string(n++);
  write_bytes(path, bytes);
  std::string out;
  if (FILE* p = ::popen(("sha256sum '" + path + "'").c_str(), "r")) {
    char buf[128];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    ::pclose(p);
  }
  fs::remove(path);
  return out.substr(0, 64);
}

struct FakeRepo {
  std::map<std::string, std::string> files;    // name -> bytes
  std::map<std::string, std::string> refs;     // branch/tag -> commit (40 hex)
  std::set<std::string> lfs;                   // served through the CDN, named by their sha256
  std::set<std::string> entry_missing;         // listed in siblings, but resolve answers EntryNotFound
  std::map<std::string, std::string> etags;    // ETag sent instead of the usual one
  bool gated = false;

  // The top-level files of a folder, model.safetensors as an LFS file.
  static FakeRepo from_folder(const std::string& dir, const std::string& main_commit) {
    FakeRepo r;
    for (auto& e : std::filesystem::directory_iterator(dir))
      if (e.is_regular_file()) r.files[e.path().filename().string()] = read_bytes(e.path().string());
    if (r.files.count("model.safetensors")) r.lfs.insert("model.safetensors");
    r.refs["main"] = main_commit;
    return r;
  }
};

class FakeHub {
 public:
  struct Hit {
    std::string server, method, path, authorization, range;
  };

  std::string token;                  // the token a gated repository accepts
  std::atomic<int> cut_downloads{0};  // the next N CDN downloads send half of what was asked, then drop
  std::atomic<int> api_503{0};        // the next N API calls answer 503
  std::atomic<int> slow_ms{0};        // CDN downloads come in 8 parts, this long apart
  std::atomic<bool> corrupt{false};   // CDN downloads have their first byte flipped

  FakeHub() {
    hub_.Get(R"(/api/models/([^/]+/[^/]+)/revision/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      log("hub", req);
      if (api_503 > 0) {
        --api_503;
        res.status = 503;
        return;
      }
      const FakeRepo* repo;
      std::string commit;
      if (!admit(req, res, req.matches[1], req.matches[2], repo, commit)) return;
      nlohmann::json info = {{"id", std::string(req.matches[1])}, {"sha", commit}, {"siblings", nlohmann::json::array()}};
      for (auto& [name, bytes] : repo->files) info["siblings"].push_back({{"rfilename", name}});
      res.set_content(info.dump(), "application/json");
    });
    hub_.Get(R"(/([^/]+/[^/]+)/resolve/([^/]+)/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      log("hub", req);
      const FakeRepo* repo;
      std::string commit;
      if (!admit(req, res, req.matches[1], req.matches[2], repo, commit)) return;
      const std::string file = req.matches[3];
      res.set_header("X-Repo-Commit", commit);
      if (!repo->files.count(file) || repo->entry_missing.count(file)) {
        refuse(res, 404, "EntryNotFound");
        return;
      }
      const std::string& bytes = repo->files.at(file);
      if (repo->lfs.count(file)) {
        const std::string sha = sha256sum(bytes);
        res.status = 302;
        res.set_header("Location", cdn_url() + "/blobs/" + sha);
        res.set_header("X-Linked-Etag", "\"" + sha + "\"");
        res.set_header("X-Linked-Size", std::to_string(bytes.size()));
        return;
      }
      auto e = repo->etags.find(file);
      // The Hub's ETag of a regular file is its git blob sha1; any 40-hex name will do here.
      res.set_header("ETag", e != repo->etags.end() ? e->second : "\"" + sha256sum(bytes).substr(0, 40) + "\"");
      res.set_content(bytes, "application/octet-stream");
    });
    cdn_.Get(R"(/blobs/([0-9a-f]{64}))", [this](const httplib::Request& req, httplib::Response& res) {
      log("cdn", req);
      std::string bytes;
      {
        std::lock_guard<std::mutex> g(mu_);
        for (auto& [id, repo] : repos_)
          for (auto& name : repo.lfs)
            if (repo.files.count(name) && sha256sum(repo.files.at(name)) == req.matches[1].str()) bytes = repo.files.at(name);
      }
      if (bytes.empty()) {
        res.status = 404;
        return;
      }
      if (corrupt) bytes[0] = char(bytes[0] ^ 1);
      const bool cut = cut_downloads > 0 ? (--cut_downloads, true) : false;
      const int pause = slow_ms;
      res.set_content_provider(bytes.size(), "application/octet-stream",
                               [bytes, cut, pause](size_t offset, size_t length, httplib::DataSink& sink) {
                                 if (cut) {
                                   sink.write(bytes.data() + offset, std::max<size_t>(1, length / 2));
                                   return false;  // drops the connection
                                 }
                                 const size_t part = (length + 7) / 8;
                                 for (size_t done = 0; done < length; done += part) {
                                   if (pause) std::this_thread::sleep_for(std::chrono::milliseconds(pause));
                                   sink.write(bytes.data() + offset + done, std::min(part, length - done));
                                 }
                                 return true;
                               });
    });
    // Bound and listening from here on: requests queue until the threads accept them.
    hub_port_ = hub_.bind_to_any_port("127.0.0.1");
    cdn_port_ = cdn_.bind_to_any_port("127.0.0.1");
    hub_thread_ = std::thread([this] { hub_.listen_after_bind(); });
    cdn_thread_ = std::thread([this] { cdn_.listen_after_bind(); });
  }

  ~FakeHub() {
    hub_.stop();
    cdn_.stop();
    hub_thread_.join();
    cdn_thread_.join();
  }

  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(hub_port_); }
  std::string cdn_url() const { return "http://127.0.0.1:" + std::to_string(cdn_port_); }

  void add(const std::string& repo_id, FakeRepo repo) {
    std::lock_guard<std::mutex> g(mu_);
    repos_[repo_id] = std::move(repo);
  }

  std::vector<Hit> hits() const {
    std::lock_guard<std::mutex> g(mu_);
    return hits_;
  }

  // Requests to `server` ("hub" or "cdn") whose method is `method` and whose path contains `part`.
  int count(const std::string& server, const std::string& method, const std::string& part = "") const {
    int n = 0;
    for (auto& h : hits())
      if (h.server == server && h.method == method && h.path.find(part) != std::string::npos) ++n;
    return n;
  }

 private:
  void log(const std::string& server, const httplib::Request& req) {
    std::lock_guard<std::mutex> g(mu_);
    hits_.push_back({server, req.method, req.path, req.get_header_value("Authorization"), req.get_header_value("Range")});
  }

  static void refuse(httplib::Response& res, int status, const std::string& code) {
    res.status = status;
    res.set_header("X-Error-Code", code);
    res.set_header("X-Error-Message", code);
  }

  // The repository and commit a request names, or its refusal written into `res`.
  bool admit(const httplib::Request& req, httplib::Response& res, const std::string& id, const std::string& revision,
             const FakeRepo*& repo, std::string& commit) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = repos_.find(id);
    if (it == repos_.end()) {
      refuse(res, 404, "RepoNotFound");
      return false;
    }
    repo = &it->second;
    if (repo->gated && req.get_header_value("Authorization") != "Bearer " + token) {
      refuse(res, 401, "GatedRepo");
      return false;
    }
    if (repo->refs.count(revision)) {
      commit = repo->refs.at(revision);
      return true;
    }
    for (auto& [name, c] : repo->refs)
      if (c == revision) {
        commit = c;
        return true;
      }
    refuse(res, 404, "RevisionNotFound");
    return false;
  }

  httplib::Server hub_, cdn_;
  int hub_port_ = 0, cdn_port_ = 0;
  std::thread hub_thread_, cdn_thread_;
  mutable std::mutex mu_;
  std::map<std::string, FakeRepo> repos_;
  std::vector<Hit> hits_;
};

}  // namespace vf::test
