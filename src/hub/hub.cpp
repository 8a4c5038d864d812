// Hub downloads with huggingface_hub's semantics (file_download.py, constants.py, utils/_http.py):
// the same environment variables, URLs, headers and cache layout, so a cache written by Python is
// read as it is and the other way round.
#include "hub/hub.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "core/errors.h"
#include "hub/sha256.h"
#include "io/file.h"
#include "io/json.h"

namespace vf::hub {

namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// Environment (huggingface_hub constants.py)

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string expand_user(const std::string& p) {
  if (p.size() >= 1 && p[0] == '~' && (p.size() == 1 || p[1] == '/')) return env("HOME") + p.substr(1);
  return p;
}

bool truthy(const std::string& v) {
  std::string u;
  for (char c : v) u += char(std::toupper(static_cast<unsigned char>(c)));
  return u == "1" || u == "ON" || u == "YES" || u == "TRUE";
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

std::string hf_home() {
  std::string home = env("HF_HOME");
  if (!home.empty()) return expand_user(home);
  std::string xdg = env("XDG_CACHE_HOME");
  return (fs::path(xdg.empty() ? expand_user("~/.cache") : expand_user(xdg)) / "huggingface").string();
}

// ---------------------------------------------------------------------------------------------
// Names that end up in paths and URLs

bool is_hex(const std::string& s, size_t n) {
  return s.size() == n && std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}

bool is_commit_hash(const std::string& s) {
  return s.size() == 40 && std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// A blob name: the Hub's etags are git sha1s or sha256s; anything outside a plain file-name alphabet
// could leave blobs/.
bool is_safe_etag(const std::string& s) {
  if (s.empty() || s.size() > 128 || s[0] == '.') return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'; });
}

bool is_name_part(const std::string& s) {
  if (s.empty() || s.front() == '-' || s.front() == '.' || s.back() == '-' || s.back() == '.') return false;
  if (s.find("--") != std::string::npos || s.find("..") != std::string::npos) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'; });
}

// Percent-encoding as urllib.parse.quote: unreserved characters stay, '/' too when `keep_slash`.
std::string quote(const std::string& s, bool keep_slash) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || (keep_slash && c == '/'))
      out += char(c);
    else
      out += '%', out += kHex[c >> 4], out += kHex[c & 15];
  }
  return out;
}

// "scheme://host:port" of a URL, to tell whether a redirect leaves the Hub's host.
std::string origin_of(const std::string& url) {
  size_t p = url.find("://");
  if (p == std::string::npos) return "";
  size_t end = url.find_first_of("/?#", p + 3);
  std::string o = url.substr(0, end);
  std::transform(o.begin(), o.end(), o.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return o;
}

std::string one_line(std::string s, size_t max = 200) {
  for (char& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  s = trim(s);
  if (s.size() > max) s = s.substr(0, max) + "...";
  return s;
}

// ---------------------------------------------------------------------------------------------
// HTTP (libcurl)

struct Response {
  CURLcode curl = CURLE_OK;
  std::string curl_error;
  long status = 0;
  std::map<std::string, std::string> headers;  // lowercase names, last value wins
  std::string body;                            // small bodies only (API JSON, error messages)
  std::string effective_url;

  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
};

// Where a GET's body goes when the answer is 200/206: a file descriptor, bounded to `limit` bytes.
struct FileSink {
  int fd = -1;
  int64_t offset = 0;  // bytes already in the file (the Range we asked for)
  int64_t limit = 0;   // the expected full size
  int64_t written = 0;
  bool started = false;
  bool overflow = false;
  bool io_error = false;
};

struct Progress {
  std::string name;
  int64_t offset = 0, total = 0;
  std::chrono::steady_clock::time_point last{};
  bool shown = false, finished = false;
};

struct Transfer {
  CURL* curl = nullptr;
  Response* response = nullptr;
  FileSink* sink = nullptr;
  size_t max_body = 16 << 20;  // a revision's file list can be long
};

size_t on_header(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  std::string line(data, size * n);
  if (line.rfind("HTTP/", 0) == 0) {
    t->response->headers.clear();  // a new response (after a 100 Continue or a followed redirect)
  } else if (size_t colon = line.find(':'); colon != std::string::npos) {
    std::string name = line.substr(0, colon);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    t->response->headers[trim(name)] = trim(line.substr(colon + 1));
  }
  return size * n;
}

size_t on_body(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t bytes = size * n;
  long status = 0;
  curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &status);
  FileSink* s = t->sink;
  if (s && (status == 200 || status == 206)) {
    if (!s->started) {
      s->started = true;
      if (status == 200 && s->offset > 0) {  // the server ignored our Range: start over
        if (ftruncate(s->fd, 0) != 0 || lseek(s->fd, 0, SEEK_SET) != 0) return s->io_error = true, 0;
        s->offset = 0;
      }
    }
    if (s->offset + s->written + int64_t(bytes) > s->limit) return s->overflow = true, 0;
    for (size_t done = 0; done < bytes;) {
      ssize_t w = ::write(s->fd, data + done, bytes - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return s->io_error = true, 0;
      done += size_t(w);
    }
    s->written += int64_t(bytes);
    return bytes;
  }
  if (t->response->body.size() + bytes > t->max_body) return 0;
  t->response->body.append(data, bytes);
  return bytes;
}

std::string human_size(int64_t bytes) {
  char buf[32];
  if (bytes < 1000000)
    std::snprintf(buf, sizeof buf, "%.1f kB", double(bytes) / 1e3);
  else if (bytes < 1000000000)
    std::snprintf(buf, sizeof buf, "%.1f MB", double(bytes) / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.2f GB", double(bytes) / 1e9);
  return buf;
}

int on_progress(void* user, curl_off_t total, curl_off_t now, curl_off_t, curl_off_t) {
  auto* p = static_cast<Progress*>(user);
  auto t = std::chrono::steady_clock::now();
  const int64_t full = p->total > 0 ? p->total : p->offset + int64_t(total);
  const int64_t have = p->offset + int64_t(now);
  const bool done = full > 0 && have >= full;
  if (p->finished || (!done && p->shown && t - p->last < std::chrono::milliseconds(200))) return 0;
  p->last = t;
  p->shown = true;
  p->finished = done;
  const int width = 30;
  const double frac = full > 0 ? std::min(1.0, double(have) / double(full)) : 0.0;
  std::string bar(size_t(frac * width), '#');
  bar.resize(width, '.');
  std::fprintf(stderr, "\r%-32.32s [%s] %3d%% %10s / %s", p->name.c_str(), bar.c_str(), int(frac * 100),
               human_size(have).c_str(), human_size(full).c_str());
  std::fflush(stderr);
  return 0;
}

void curl_init_once() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// One request, no retries. Redirects are followed only when `follow` (and then by curl, which never
// forwards a custom Authorization header to another host).
Response perform(const std::string& method, const std::string& url, const std::vector<std::string>& headers,
                 bool follow, FileSink* sink = nullptr, Progress* progress = nullptr) {
  curl_init_once();
  Response r;
  CURL* curl = curl_easy_init();
  if (!curl) {
    r.curl = CURLE_FAILED_INIT;
    r.curl_error = "libcurl could not start";
    return r;
  }
  Transfer t{curl, &r, sink};
  curl_slist* list = nullptr;
  for (auto& h : headers) list = curl_slist_append(list, h.c_str());
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, list);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(curl, CURLOPT_USERAGENT, "visionformers/0.1");
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, 10L);
  // A stalled connection fails instead of hanging: under 1 byte/s for 30 s.
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, 30L);
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#endif
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, follow ? 1L : 0L);
  curl_easy_setopt(curl, CURLOPT_MAXREDIRS, 10L);
  if (method == "HEAD") curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &t);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &t);
  if (progress) {
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, progress);
  }
  r.curl = curl_easy_perform(curl);
  if (r.curl != CURLE_OK) r.curl_error = errbuf[0] ? errbuf : curl_easy_strerror(r.curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &r.status);
  char* eff = nullptr;
  if (curl_easy_getinfo(curl, CURLINFO_EFFECTIVE_URL, &eff) == CURLE_OK && eff) r.effective_url = eff;
  curl_slist_free_all(list);
  curl_easy_cleanup(curl);
  return r;
}

bool retryable_status(long status) { return status == 429 || status >= 500; }

void backoff(const HubOptions& o, int attempt) {
  const int ms = std::min(o.retry_base_ms << std::min(attempt, 3), o.retry_base_ms * 8);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

// A request that is retried (bounded, with backoff) while the Hub answers 429 or 5xx. Connection
// failures are not retried: the caller falls back to the cache, as transformers does.
Response perform_retrying(const HubOptions& o, const std::string& method, const std::string& url,
                          const std::vector<std::string>& headers) {
  Response r;
  for (int attempt = 0;; ++attempt) {
    r = perform(method, url, headers, /*follow=*/false);
    if (r.curl != CURLE_OK || !retryable_status(r.status) || attempt + 1 >= o.max_attempts) return r;
    backoff(o, attempt);
  }
}

// The Hub cannot be reached (no connection, or it keeps failing): the cache may still serve.
struct Unreachable {
  std::string why;
};

std::vector<std::string> auth_headers(const HubOptions& o) {
  if (o.token.empty()) return {};
  return {"Authorization: Bearer " + o.token};
}

std::string what_failed(const Response& r) {
  if (r.curl != CURLE_OK) return r.curl_error;
  return "HTTP " + std::to_string(r.status);
}

// A refusal from the Hub as one line, by its X-Error-Code (huggingface_hub utils/_errors.py).
[[noreturn]] void throw_refusal(const Response& r, const HubOptions& o, const ModelId& id, const std::string& file) {
  const std::string code = r.header("x-error-code");
  const std::string msg = one_line(r.header("x-error-message"));
  const std::string repo = id.repo_id;
  const std::string at = repo + "@" + id.revision;
  if (code == "RepoNotFound" || (code.empty() && r.status == 401))
    throw UnavailableError(repo + ": repository not found on " + o.endpoint +
                           (o.token.empty() ? " (if it is private or gated, set HF_TOKEN)" : " (or your token has no access to it)"));
  if (code == "GatedRepo")
    throw UnavailableError(repo + ": gated repository: accept its conditions at " + o.endpoint + "/" + repo +
                           (o.token.empty() ? " and set HF_TOKEN" : " (your token is not granted access yet)"));
  if (code == "RevisionNotFound") throw UnavailableError(at + ": revision not found on " + o.endpoint);
  if (code == "EntryNotFound" || (!file.empty() && r.status == 404))
    throw UnavailableError(at + ": file " + file + " not found in the repository");
  if (r.status == 403) throw UnavailableError(repo + ": access refused by " + o.endpoint + (msg.empty() ? "" : ": " + msg));
  if (r.status == 404) throw UnavailableError(at + ": not found on " + o.endpoint + (msg.empty() ? "" : ": " + msg));
  throw UnavailableError(at + (file.empty() ? "" : ": " + file) + ": " + o.endpoint + " answered HTTP " +
                         std::to_string(r.status) + (msg.empty() ? "" : ": " + msg));
}

// ---------------------------------------------------------------------------------------------
// Cache files

// An exclusive flock held for the object's lifetime: the lock file huggingface_hub's FileLock takes
// (<cache>/.locks/models--org--name/<etag>.lock), so vf and Python processes exclude each other too.
class BlobLock {
 public:
  explicit BlobLock(const fs::path& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw UnavailableError(path.string() + ": cannot create the lock file: " + std::strerror(errno));
    while (::flock(fd_, LOCK_EX) != 0) {
      if (errno != EINTR) {
        ::close(fd_);
        throw UnavailableError(path.string() + ": cannot lock: " + std::strerror(errno));
      }
    }
  }
  ~BlobLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  BlobLock(const BlobLock&) = delete;
  BlobLock& operator=(const BlobLock&) = delete;

 private:
  int fd_ = -1;
};

std::string unique_suffix() {
  static std::atomic<unsigned> counter{0};
  std::random_device rd;
  return ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++) + "." + std::to_string(rd());
}

// Writes `text` to `path` so that readers see the old or the new content, never a part (io/file's
// exclusive temporary + rename); a cache that cannot be written is a Hub-side failure (exit 69).
void write_atomically(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  try {
    write_file_atomically(path.string(), text);
  } catch (const Error& e) {
    throw UnavailableError(e.what());
  }
}

std::string read_small_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::string s;
  char buf[256];
  f.read(buf, sizeof buf);
  s.assign(buf, size_t(f.gcount()));
  return s;
}

// snapshots/<commit>/<file> -> ../../blobs/<etag> (one more ../ per folder in `file`), replacing
// whatever was there in one rename.
void link_pointer(const fs::path& storage, const std::string& commit, const std::string& file, const std::string& etag) {
  fs::path pointer = storage / "snapshots" / commit / file;
  fs::create_directories(pointer.parent_path());
  std::string target;
  for (size_t i = 0, depth = size_t(std::count(file.begin(), file.end(), '/')) + 2; i < depth; ++i) target += "../";
  target += "blobs/" + etag;
  fs::path tmp = pointer;
  tmp += unique_suffix();
  fs::create_symlink(target, tmp);
  fs::rename(tmp, pointer);
}

// ---------------------------------------------------------------------------------------------
// Choosing and fetching files

struct FileMeta {
  std::string commit, etag, location;
  int64_t size = -1;
};

class Downloader {
 public:
  Downloader(const ModelId& id, const HubOptions& o) : id_(id), o_(o) {
    storage_ = fs::path(o.cache_dir) / repo_folder_name(id.repo_id);
  }

  // The commit and file list of the revision (GET /api/models/{id}/revision/{rev}).
  void fetch_revision_info() {
    const std::string url = o_.endpoint + "/api/models/" + id_.repo_id + "/revision/" + quote(id_.revision, false);
    Response r = perform_retrying(o_, "GET", url, auth_headers(o_));
    if (r.curl != CURLE_OK || retryable_status(r.status)) throw Unreachable{what_failed(r)};
    if (r.status != 200) throw_refusal(r, o_, id_, "");
    json info;
    try {
      info = parse_json_text(r.body, url);
    } catch (const Error& e) {
      throw UnavailableError(id_.repo_id + ": the Hub's answer is not valid JSON (" + one_line(e.what()) + ")");
    }
    if (!info.is_object() || !info.contains("sha") || !info["sha"].is_string() ||
        !is_commit_hash(info["sha"].get<std::string>()))
      throw UnavailableError(id_.repo_id + "@" + id_.revision + ": the Hub's answer names no commit (sha)");
    commit_ = info["sha"].get<std::string>();
    if (info.contains("siblings") && info["siblings"].is_array())
      for (auto& s : info["siblings"])
        if (s.is_object() && s.contains("rfilename") && s["rfilename"].is_string())
          siblings_.insert(s["rfilename"].get<std::string>());
  }

  // The files from_pretrained reads, in transformers' order of preference; downloads each.
  fs::path download_model() {
    auto need = [&](const std::string& f) {
      if (!is_safe_relative_path(f)) throw UnavailableError(id_.repo_id + ": refusing file name '" + one_line(f) + "'");
      fetch(f);
    };
    if (!siblings_.count("config.json"))
      throw UnavailableError(id_.repo_id + "@" + id_.revision + ": file config.json not found in the repository");
    need("config.json");
    if (siblings_.count("preprocessor_config.json")) need("preprocessor_config.json");
    bool found = false;
    for (const char* w : {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"}) {
      if (!siblings_.count(w)) continue;
      need(w);
      if (std::string(w).ends_with(".index.json"))
        for (const std::string& shard : shards_of(storage_ / "snapshots" / commit_ / w)) need(shard);
      found = true;
      break;
    }
    if (!found)
      throw UnavailableError(id_.repo_id + "@" + id_.revision +
                             ": no weights in the repository (expected model.safetensors, model.safetensors.index.json, "
                             "pytorch_model.bin or pytorch_model.bin.index.json)");
    if (id_.revision != commit_) {  // refs/<branch or tag> -> commit, as huggingface_hub records it
      fs::path ref = storage_ / "refs" / id_.revision;
      if (!fs::exists(ref) || read_small_file(ref) != commit_) write_atomically(ref, commit_);
    }
    return storage_ / "snapshots" / commit_;
  }

 private:
  std::set<std::string> shards_of(const fs::path& index_path) {
    json index = read_json_file(index_path.string());
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw UnavailableError(index_path.string() + ": no weight_map");
    std::set<std::string> shards;
    for (auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) throw UnavailableError(index_path.string() + ": weight_map['" + one_line(name) + "'] is not a file name");
      shards.insert(file.get<std::string>());
    }
    return shards;
  }

  FileMeta head(const std::string& file) {
    std::string url = o_.endpoint + "/" + id_.repo_id + "/resolve/" + commit_ + "/" + quote(file, true);
    const std::string hub_origin = origin_of(url);
    for (int hop = 0;; ++hop) {
      Response r = perform_retrying(o_, "HEAD", url, auth_headers(o_));
      if (r.curl != CURLE_OK || retryable_status(r.status))
        throw UnavailableError(id_.repo_id + ": " + file + ": cannot reach " + o_.endpoint + " (" + what_failed(r) + ")");
      const std::string location = r.header("location");
      const bool redirect = r.status >= 300 && r.status < 400 && !location.empty();
      // Relative redirects stay on the Hub (a renamed repository): follow them, with the token.
      if (redirect && location[0] == '/' && (location.size() < 2 || location[1] != '/')) {
        if (hop >= 10) throw UnavailableError(id_.repo_id + ": " + file + ": too many redirects");
        url = hub_origin + location;
        continue;
      }
      if (r.status == 404 && r.header("x-error-code") == "EntryNotFound") {
        // Recorded as huggingface_hub does, so that Python skips asking again.
        std::string c = r.header("x-repo-commit");
        if (is_commit_hash(c)) write_atomically(storage_ / ".no_exist" / c / file, "");
      }
      if (!redirect && r.status != 200) throw_refusal(r, o_, id_, file);
      FileMeta m;
      m.commit = r.header("x-repo-commit");
      m.etag = r.header("x-linked-etag");
      if (m.etag.empty()) m.etag = r.header("etag");
      if (m.etag.rfind("W/", 0) == 0) m.etag = m.etag.substr(2);
      if (m.etag.size() >= 2 && m.etag.front() == '"' && m.etag.back() == '"') m.etag = m.etag.substr(1, m.etag.size() - 2);
      std::string size = r.header("x-linked-size");
      if (size.empty()) size = r.header("content-length");
      m.location = redirect ? location : url;
      char* end = nullptr;
      if (!size.empty()) m.size = std::strtoll(size.c_str(), &end, 10);
      const std::string where = id_.repo_id + ": " + file + ": ";
      if (m.commit.empty()) throw UnavailableError(where + o_.endpoint + " sent no X-Repo-Commit (is it a Hub?)");
      if (m.commit != commit_) throw UnavailableError(where + "the Hub answered for commit " + one_line(m.commit, 64) + ", not " + commit_);
      if (!is_safe_etag(m.etag)) throw UnavailableError(where + "missing or unusable ETag '" + one_line(m.etag, 64) + "'");
      if (size.empty() || !end || *end || m.size < 0) throw UnavailableError(where + "the Hub sent no file size");
      if (origin_of(m.location).empty() || (origin_of(m.location).rfind("http://", 0) != 0 && origin_of(m.location).rfind("https://", 0) != 0))
        throw UnavailableError(where + "unusable download location '" + one_line(m.location, 100) + "'");
      return m;
    }
  }

  void fetch(const std::string& file) {
    const fs::path pointer = storage_ / "snapshots" / commit_ / file;
    if (fs::exists(pointer)) return;  // a commit's files never change
    FileMeta m = head(file);
    const fs::path blobs = storage_ / "blobs";
    fs::create_directories(blobs);
    const fs::path blob = blobs / m.etag;
    if (!fs::exists(blob)) {
      const fs::path locks = storage_.parent_path() / ".locks" / storage_.filename();
      fs::create_directories(locks);
      BlobLock lock(locks / (m.etag + ".lock"));
      if (!fs::exists(blob)) download_blob(file, m, blob);  // another process may have finished it meanwhile
    }
    link_pointer(storage_, commit_, file, m.etag);
  }

  // GET into blobs/<etag>.incomplete (resumed with Range when a part is there), checked against the
  // size and, for LFS files named by their sha256, the digest; renamed into place only when whole.
  void download_blob(const std::string& file, const FileMeta& m, const fs::path& blob) {
    fs::path incomplete = blob;
    incomplete += ".incomplete";
    const std::string where = id_.repo_id + ": " + file + ": ";
    std::vector<std::string> headers;
    if (origin_of(m.location) == origin_of(o_.endpoint)) headers = auth_headers(o_);  // never to a CDN
    const bool show = o_.progress && ::isatty(STDERR_FILENO);
    std::string failure;
    for (int attempt = 0; attempt < o_.max_attempts; ++attempt) {
      if (attempt > 0) backoff(o_, attempt - 1);
      int fd = ::open(incomplete.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0) throw UnavailableError(incomplete.string() + ": cannot be written: " + std::strerror(errno));
      int64_t have = ::lseek(fd, 0, SEEK_END);
      if (have > m.size) {  // not a prefix of this blob: start over
        if (::ftruncate(fd, 0) != 0) have = -1;
        have = ::lseek(fd, 0, SEEK_SET);
      }
      if (have < 0) {
        ::close(fd);
        throw UnavailableError(incomplete.string() + ": cannot be written");
      }
      if (have == m.size) {
        ::close(fd);
        break;
      }
      FileSink sink{fd, have, m.size};
      std::vector<std::string> h = headers;
      if (have > 0) h.push_back("Range: bytes=" + std::to_string(have) + "-");
      Progress progress{file, have, m.size};
      Response r = perform("GET", m.location, h, /*follow=*/true, &sink, show ? &progress : nullptr);
      ::close(fd);
      if (progress.shown) std::fputc('\n', stderr);
      if (sink.io_error) throw UnavailableError(incomplete.string() + ": write error: " + std::strerror(errno));
      if (sink.overflow) {
        fs::remove(incomplete);
        throw UnavailableError(where + "the download is larger than the " + std::to_string(m.size) + " bytes announced");
      }
      if (r.curl == CURLE_OK && r.status == 416) {  // our part is not a prefix the server knows: start over
        fs::resize_file(incomplete, 0);
        failure = "HTTP 416";
        continue;
      }
      if (r.curl == CURLE_OK && r.status != 200 && r.status != 206 && !retryable_status(r.status)) {
        if (r.status >= 400) throw_refusal(r, o_, id_, file);
        throw UnavailableError(where + "download answered HTTP " + std::to_string(r.status));
      }
      failure = what_failed(r);
      if (r.curl == CURLE_OK && !retryable_status(r.status) && int64_t(fs::file_size(incomplete)) == m.size) break;
      if (r.curl == CURLE_OK && !retryable_status(r.status)) failure = "the transfer ended early";
    }
    const int64_t got = fs::exists(incomplete) ? int64_t(fs::file_size(incomplete)) : -1;
    if (got != m.size)
      throw UnavailableError(where + "download failed after " + std::to_string(o_.max_attempts) + " attempts (" + failure +
                             "); " + std::to_string(std::max<int64_t>(got, 0)) + " of " + std::to_string(m.size) +
                             " bytes kept in " + incomplete.filename().string() + " to resume");
    if (is_hex(m.etag, 64)) {
      std::string digest = sha256_file(incomplete.string());
      std::string want = m.etag;
      std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return char(std::tolower(c)); });
      if (digest != want) {
        fs::remove(incomplete);
        throw UnavailableError(where + "downloaded file has sha256 " + digest + ", expected " + want);
      }
    }
    fs::rename(incomplete, blob);
  }

  ModelId id_;
  const HubOptions& o_;
  fs::path storage_;
  std::string commit_;
  std::set<std::string> siblings_;
};

// The snapshot folder already in the cache for `id`, when it holds config.json and weights (the
// revision resolved through refs/ unless it is a commit hash); empty when there is none.
std::string cached_snapshot(const ModelId& id, const HubOptions& o) {
  const fs::path storage = fs::path(o.cache_dir) / repo_folder_name(id.repo_id);
  std::string commit = id.revision;
  if (!is_commit_hash(commit)) {
    fs::path ref = storage / "refs" / id.revision;
    if (!fs::is_regular_file(ref)) return "";
    commit = trim(read_small_file(ref));
    if (!is_commit_hash(commit)) return "";
  }
  const fs::path snap = storage / "snapshots" / commit;
  if (!fs::is_regular_file(snap / "config.json")) return "";
  for (const char* w : {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"})
    if (fs::is_regular_file(snap / w)) return snap.string();
  return "";
}

}  // namespace

HubOptions HubOptions::from_env() {
  HubOptions o;
  std::string endpoint = env("HF_ENDPOINT");
  if (!endpoint.empty()) o.endpoint = endpoint;
  while (o.endpoint.size() > 1 && o.endpoint.back() == '/') o.endpoint.pop_back();
  const std::string home = hf_home();
  std::string cache = env("HF_HUB_CACHE");
  if (cache.empty()) cache = env("HUGGINGFACE_HUB_CACHE");
  o.cache_dir = cache.empty() ? (fs::path(home) / "hub").string() : expand_user(cache);
  o.token = trim(env("HF_TOKEN"));
  if (o.token.empty()) o.token = trim(env("HUGGING_FACE_HUB_TOKEN"));
  if (o.token.empty()) {
    std::string path = env("HF_TOKEN_PATH");
    path = path.empty() ? (fs::path(home) / "token").string() : expand_user(path);
    std::ifstream f(path);
    std::string line;
    if (f && std::getline(f, line)) o.token = trim(line);
  }
  o.offline = truthy(env("HF_HUB_OFFLINE")) || truthy(env("TRANSFORMERS_OFFLINE"));
  return o;
}

std::string repo_folder_name(const std::string& repo_id) {
  std::string name = "models--" + repo_id;
  for (size_t p; (p = name.find('/')) != std::string::npos;) name.replace(p, 1, "--");
  return name;
}

bool is_safe_relative_path(const std::string& name) {
  if (name.empty() || name.size() > 1024 || name[0] == '/') return false;
  size_t start = 0;
  while (true) {
    size_t end = name.find('/', start);
    std::string part = name.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return std::none_of(name.begin(), name.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f || c == '\\'; });
}

std::optional<ModelId> parse_model_id(const std::string& s) {
  ModelId id;
  size_t at = s.find('@');
  id.repo_id = s.substr(0, at);
  if (at != std::string::npos) {
    id.revision = s.substr(at + 1);
    if (id.revision.size() > 255 || !is_safe_relative_path(id.revision)) return std::nullopt;
  }
  size_t slash = id.repo_id.find('/');
  if (slash == std::string::npos || id.repo_id.size() > 96) return std::nullopt;
  if (!is_name_part(id.repo_id.substr(0, slash)) || !is_name_part(id.repo_id.substr(slash + 1))) return std::nullopt;
  return id;
}

std::string snapshot_download(const ModelId& id, const HubOptions& o) {
  const std::string in_cache = "not in the cache " + o.cache_dir;
  if (o.offline) {
    std::string snap = cached_snapshot(id, o);
    if (snap.empty())
      throw UnavailableError(id.repo_id + "@" + id.revision + ": " + in_cache + " and HF_HUB_OFFLINE is set " +
                             "(run once online to download it)");
    return snap;
  }
  // A commit's snapshot never changes: no need to ask the Hub (huggingface_hub skips it too).
  if (is_commit_hash(id.revision))
    if (std::string snap = cached_snapshot(id, o); !snap.empty()) return snap;
  Downloader d(id, o);
  try {
    d.fetch_revision_info();
  } catch (const Unreachable& u) {
    std::string snap = cached_snapshot(id, o);
    if (snap.empty())
      throw UnavailableError(id.repo_id + "@" + id.revision + ": cannot reach " + o.endpoint + " (" + one_line(u.why) +
                             ") and the model is " + in_cache);
    return snap;
  }
  try {
    return d.download_model().string();
  } catch (const fs::filesystem_error& e) {
    throw UnavailableError(id.repo_id + ": cache " + o.cache_dir + ": " + one_line(e.what()));
  }
}

std::string resolve_model(const std::string& dir_or_id, const HubOptions& options) {
  std::error_code ec;
  if (fs::exists(dir_or_id, ec)) return dir_or_id;
  auto id = parse_model_id(dir_or_id);
  if (!id) return dir_or_id;
  return snapshot_download(*id, options);
}

std::string resolve_model(const std::string& dir_or_id) {
  std::error_code ec;
  if (fs::exists(dir_or_id, ec) || !parse_model_id(dir_or_id)) return dir_or_id;
  return resolve_model(dir_or_id, HubOptions::from_env());
}

}  // namespace vf::hub
