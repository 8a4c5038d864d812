// Models by Hub id (src/hub): downloads from a stand-in Hub on 127.0.0.1 (tests/fake_hub.h) into
// huggingface_hub's cache layout, a cache laid out by hand as Python writes it, offline use,
// refusals, resumed and concurrent downloads. Never touches ~/.cache or the network.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <filesystem>
#include <string>
#include <vector>

#include "core/errors.h"
#include "exit_codes.h"
#include "fake_hub.h"
#include "hub/hub.h"
#include "hub/sha256.h"
#include "test_util.h"
#include "visionformers.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

const std::string kMain = "1111111111111111111111111111111111111111";
const std::string kV1 = "2222222222222222222222222222222222222222";

std::string tiny_dir() { return std::string(VF_SOURCE_DIR) + "/assets/tiny-convnext"; }

// An empty scratch folder for one test's cache.
std::string fresh_dir(const std::string& name) {
  std::string d = test::temp_dir("hub_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

hub::HubOptions options_for(const test::FakeHub& server, const std::string& cache) {
  hub::HubOptions o;
  o.endpoint = server.endpoint();
  o.cache_dir = cache;
  o.progress = false;
  o.retry_base_ms = 10;
  return o;
}

std::string unavailable_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const UnavailableError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}


std::string quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct VfRun {
  int rc = -1;
  std::string out, err;
};

// `vf ARGS` with only these Hub variables (HF_HOME pointing into the scratch folder).
VfRun run_vf(const std::string& scratch, const std::vector<std::string>& env, const std::vector<std::string>& args,
           const std::string& cwd = "") {
  std::string cmd = (cwd.empty() ? "" : "cd " + quoted(cwd) + " && ") +
                    "env -u HF_TOKEN -u HF_HUB_CACHE -u HUGGINGFACE_HUB_CACHE -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE"
                    " -u HF_ENDPOINT -u HF_TOKEN_PATH -u HUGGING_FACE_HUB_TOKEN HF_HOME=" + quoted(scratch + "/hf-home");
  for (auto& e : env) cmd += " " + quoted(e);
  cmd += " " + quoted(VF_VF_BINARY);
  for (auto& a : args) cmd += " " + quoted(a);
  cmd += " >" + quoted(scratch + "/out.txt") + " 2>" + quoted(scratch + "/err.txt");
  int st = std::system(cmd.c_str());
  VfRun r;
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = test::read_bytes(scratch + "/out.txt");
  r.err = test::read_bytes(scratch + "/err.txt");
  return r;
}

// The names in a folder (not recursive), sorted.
std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> v;
  if (fs::is_directory(dir))
    for (auto& e : fs::directory_iterator(dir)) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

TEST(Sha256, KnownAnswers) {
  // FIPS 180-4 examples (NIST CSRC "SHA256.pdf") and the empty message.
  auto hex = [](const std::string& s) {
    hub::Sha256 h;
    h.update(s.data(), s.size());
    return h.hex_digest();
  };
  EXPECT_EQ(hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // A million 'a's, fed in uneven pieces to exercise the buffering.
  hub::Sha256 h;
  std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left) {
    size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // A file, against coreutils.
  const std::string bytes = test::read_bytes(tiny_dir() + "/model.safetensors");
  EXPECT_EQ(hub::sha256_file(tiny_dir() + "/model.safetensors"), test::sha256sum(bytes));
}

TEST(HubIds, ParsedLikeTransformers) {
  auto id = hub::parse_model_id("facebook/convnext-tiny-224");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->repo_id, "facebook/convnext-tiny-224");
  EXPECT_EQ(id->revision, "main");
  id = hub::parse_model_id("org/name@v1.0");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->repo_id, "org/name");
  EXPECT_EQ(id->revision, "v1.0");
  id = hub::parse_model_id("org/name@refs/pr/1");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->revision, "refs/pr/1");
  // Folder-like strings, and names the Hub refuses, are not ids.
  for (const char* s : {"name", "/abs/path", "./org/name", "a/b/c", "org/..", "../name", "org/na--me", "org/-x",
                        "org/name@", "org/name@../../x", "org/name@/abs", "org/n me", ""})
    EXPECT_FALSE(hub::parse_model_id(s)) << s;
  EXPECT_EQ(hub::repo_folder_name("facebook/detr-resnet-50"), "models--facebook--detr-resnet-50");
  for (const char* s : {"../x", "a/../b", "/etc/passwd", "a//b", "a\\b", ".", "a/./b", ""})
    EXPECT_FALSE(hub::is_safe_relative_path(s)) << s;
  for (const char* s : {"model.safetensors", "sub/model-00001-of-00002.safetensors", "a..b"})
    EXPECT_TRUE(hub::is_safe_relative_path(s)) << s;
}

// The whole download: huggingface_hub's layout, a token sent to the Hub but not to the CDN, and a
// model that loads and answers like the folder it came from.
TEST(Hub, DownloadsIntoHuggingfaceHubLayout) {
  test::FakeHub server;
  server.token = "hf_secret";
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  const std::string cache = fresh_dir("layout");
  hub::HubOptions o = options_for(server, cache);
  o.token = "hf_secret";
  const std::string snap = hub::resolve_model("org/tiny", o);

  const fs::path storage = fs::path(cache) / "models--org--tiny";
  EXPECT_EQ(fs::path(snap), storage / "snapshots" / kMain);
  EXPECT_EQ(test::read_bytes((storage / "refs" / "main").string()), kMain);  // no newline, as Python writes it
  const std::string weights_sha = test::sha256sum(test::read_bytes(tiny_dir() + "/model.safetensors"));
  for (const char* f : {"config.json", "preprocessor_config.json", "model.safetensors"}) {
    const fs::path p = fs::path(snap) / f;
    ASSERT_TRUE(fs::is_symlink(p)) << p;
    const std::string target = fs::read_symlink(p).string();
    EXPECT_EQ(target.rfind("../../blobs/", 0), 0u) << target;
    EXPECT_EQ(test::read_bytes(p.string()), test::read_bytes(tiny_dir() + "/" + f)) << f;
  }
  EXPECT_EQ(fs::read_symlink(fs::path(snap) / "model.safetensors").string(), "../../blobs/" + weights_sha);
  for (auto& name : names_in(storage / "blobs")) EXPECT_EQ(name.find(".incomplete"), std::string::npos) << name;

  EXPECT_EQ(server.count("hub", "GET", "/api/models/org/tiny/revision/main"), 1);
  EXPECT_EQ(server.count("cdn", "GET", "/blobs/" + weights_sha), 1);
  for (auto& h : server.hits()) {
    if (h.server == "hub") {
      EXPECT_EQ(h.authorization, "Bearer hf_secret") << h.path;
    } else {
      EXPECT_EQ(h.authorization, "") << "the token went to another host: " << h.path;
    }
  }

  // Asked again: the commit's files are there, only the revision is looked up.
  EXPECT_EQ(hub::resolve_model("org/tiny", o), snap);
  EXPECT_EQ(server.count("hub", "GET", "/api/models/"), 2);
  EXPECT_EQ(server.count("hub", "HEAD"), 3);
  EXPECT_EQ(server.count("cdn", "GET"), 1);

  // The library's front door takes the id: same model as the folder.
  ::setenv("HF_ENDPOINT", server.endpoint().c_str(), 1);
  ::setenv("HF_HUB_CACHE", cache.c_str(), 1);
  ::setenv("HF_TOKEN", "hf_secret", 1);
  Pretrained from_hub = Pretrained::from_pretrained("org/tiny");
  ::unsetenv("HF_ENDPOINT");
  ::unsetenv("HF_HUB_CACHE");
  ::unsetenv("HF_TOKEN");
  Pretrained from_folder = Pretrained::from_pretrained(tiny_dir());
  Image img = load_image(std::string(VF_SOURCE_DIR) + "/assets/cat.jpg");
  auto a = classify(from_hub, {img}, 3)[0], b = classify(from_folder, {img}, 3)[0];
  ASSERT_EQ(a.size(), 3u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].label, b[i].label);
    EXPECT_EQ(a[i].score, b[i].score);
  }
}

TEST(Hub, RevisionsAndCommits) {
  test::FakeHub server;
  test::FakeRepo repo = test::FakeRepo::from_folder(tiny_dir(), kMain);
  repo.refs["v1"] = kV1;
  repo.refs["refs/pr/1"] = kV1;
  server.add("org/tiny", repo);
  const std::string cache = fresh_dir("revisions");
  hub::HubOptions o = options_for(server, cache);
  const fs::path storage = fs::path(cache) / "models--org--tiny";

  EXPECT_EQ(fs::path(hub::resolve_model("org/tiny@v1", o)), storage / "snapshots" / kV1);
  EXPECT_EQ(test::read_bytes((storage / "refs" / "v1").string()), kV1);
  EXPECT_FALSE(fs::exists(storage / "refs" / "main"));
  // A commit hash: no ref written; once cached, no request at all.
  EXPECT_EQ(fs::path(hub::resolve_model("org/tiny@" + kMain, o)), storage / "snapshots" / kMain);
  EXPECT_EQ(names_in(storage / "refs"), std::vector<std::string>{"v1"});
  const size_t before = server.hits().size();
  EXPECT_EQ(fs::path(hub::resolve_model("org/tiny@" + kMain, o)), storage / "snapshots" / kMain);
  EXPECT_EQ(server.hits().size(), before);
  // Both snapshots share the blobs (same files): three blobs, not six.
  int blobs = 0;
  for (auto& n : names_in(storage / "blobs")) blobs += n.ends_with(".lock") ? 0 : 1;
  EXPECT_EQ(blobs, 3);

  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/tiny@nope", o); }), "revision not found");
  // A pull request's ref: quoted in the URL (refs%2Fpr%2F1), nested under refs/ as Python does.
  EXPECT_EQ(fs::path(hub::resolve_model("org/tiny@refs/pr/1", o)), storage / "snapshots" / kV1);
  EXPECT_EQ(test::read_bytes((storage / "refs" / "refs" / "pr" / "1").string()), kV1);
  EXPECT_EQ(server.count("hub", "GET", "/revision/refs/pr/1"), 1);  // as the server decoded it
}

TEST(Hub, RefusalsAreOneLine) {
  test::FakeHub server;
  server.token = "hf_right";
  test::FakeRepo gated = test::FakeRepo::from_folder(tiny_dir(), kMain);
  gated.gated = true;
  server.add("org/gated", gated);
  test::FakeRepo missing = test::FakeRepo::from_folder(tiny_dir(), kMain);
  missing.entry_missing.insert("preprocessor_config.json");
  server.add("org/missing", missing);
  test::FakeRepo no_weights = test::FakeRepo::from_folder(tiny_dir(), kMain);
  no_weights.files.erase("model.safetensors");
  no_weights.lfs.clear();
  server.add("org/noweights", no_weights);
  const std::string cache = fresh_dir("refusals");
  hub::HubOptions o = options_for(server, cache);

  std::string m = unavailable_message([&] { hub::resolve_model("org/absent", o); });
  EXPECT_HAS(m, "org/absent: repository not found");
  EXPECT_HAS(m, "HF_TOKEN");
  m = unavailable_message([&] { hub::resolve_model("org/gated", o); });
  EXPECT_HAS(m, "gated");
  EXPECT_HAS(m, "HF_TOKEN");
  o.token = "hf_wrong";
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/gated", o); }), "gated");
  o.token = "hf_right";
  EXPECT_EQ(fs::path(hub::resolve_model("org/gated", o)), fs::path(cache) / "models--org--gated" / "snapshots" / kMain);

  m = unavailable_message([&] { hub::resolve_model("org/missing", o); });
  EXPECT_HAS(m, "preprocessor_config.json not found");
  // Recorded as huggingface_hub does, and no pointer left for it.
  const fs::path storage = fs::path(cache) / "models--org--missing";
  EXPECT_TRUE(fs::is_regular_file(storage / ".no_exist" / kMain / "preprocessor_config.json"));
  EXPECT_FALSE(fs::exists(storage / "snapshots" / kMain / "preprocessor_config.json"));
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/noweights", o); }), "no weights");
  EXPECT_EQ(m.find('\n'), std::string::npos);
}

// The weights picked as from_pretrained picks them: a shard index and its shards, not the
// pytorch_model.bin next to them; file names from the index never leave the cache.
TEST(Hub, ShardedWeightsAndHostileNames) {
  test::FakeHub server;
  test::FakeRepo repo = test::FakeRepo::from_folder(tiny_dir(), kMain);
  const std::string weights = repo.files.at("model.safetensors");
  repo.files.erase("model.safetensors");
  repo.lfs.clear();
  // Every tensor of the safetensors header mapped to one shard holding the same bytes.
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | uint8_t(weights[i]);
  nlohmann::json header = nlohmann::json::parse(weights.substr(8, header_len));
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  for (auto& [name, v] : header.items())
    if (name != "__metadata__") index["weight_map"][name] = "model-00001-of-00001.safetensors";
  repo.files["model.safetensors.index.json"] = index.dump();
  repo.files["model-00001-of-00001.safetensors"] = weights;
  repo.lfs.insert("model-00001-of-00001.safetensors");
  repo.files["pytorch_model.bin"] = "not to be fetched";
  server.add("org/sharded", repo);

  test::FakeRepo evil = repo;
  nlohmann::json evil_index = index;
  evil_index["weight_map"].begin().value() = "../../../../evil.safetensors";
  evil.files["model.safetensors.index.json"] = evil_index.dump();
  server.add("org/evil", evil);
  test::FakeRepo evil_etag = test::FakeRepo::from_folder(tiny_dir(), kMain);
  evil_etag.etags["config.json"] = "\"../../../escaped\"";
  server.add("org/eviletag", evil_etag);

  const std::string root = fresh_dir("sharded");
  const std::string cache = root + "/cache";
  hub::HubOptions o = options_for(server, cache);
  const std::string snap = hub::resolve_model("org/sharded", o);
  EXPECT_TRUE(fs::is_symlink(fs::path(snap) / "model-00001-of-00001.safetensors"));
  EXPECT_FALSE(fs::exists(fs::path(snap) / "pytorch_model.bin"));
  EXPECT_EQ(server.count("hub", "HEAD", "pytorch_model.bin"), 0);
  Pretrained p = Pretrained::from_pretrained(snap);
  EXPECT_EQ(p.model->model_type, "convnext");

  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/evil", o); }), "refusing file name");
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/eviletag", o); }), "ETag");
  EXPECT_EQ(names_in(root), std::vector<std::string>{"cache"});
  EXPECT_FALSE(fs::exists(fs::path(cache) / "escaped"));
}

// A dropped connection resumes with Range, in the same run and in the next one; a download that
// keeps failing leaves only blobs/<etag>.incomplete, nothing that looks complete.
TEST(Hub, InterruptedDownloadsResume) {
  test::FakeHub server;
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  const std::string weights = test::read_bytes(tiny_dir() + "/model.safetensors");
  const std::string sha = test::sha256sum(weights);
  const std::string cache = fresh_dir("resume");
  hub::HubOptions o = options_for(server, cache);
  const fs::path storage = fs::path(cache) / "models--org--tiny";

  // Every attempt cut: fails, with half the bytes kept.
  server.cut_downloads = 3;
  o.max_attempts = 3;
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/tiny", o); }), "download failed after 3 attempts");
  EXPECT_FALSE(fs::exists(storage / "blobs" / sha));
  EXPECT_FALSE(fs::exists(storage / "snapshots" / kMain / "model.safetensors"));
  EXPECT_FALSE(fs::exists(storage / "refs" / "main"));
  const fs::path incomplete = storage / "blobs" / (sha + ".incomplete");
  ASSERT_TRUE(fs::exists(incomplete));
  const size_t kept = fs::file_size(incomplete);
  EXPECT_GT(kept, 0u);
  EXPECT_LT(kept, weights.size());
  std::vector<std::string> ranges;
  for (auto& h : server.hits())
    if (h.server == "cdn") ranges.push_back(h.range);
  ASSERT_EQ(ranges.size(), 3u);
  EXPECT_EQ(ranges[0], "");
  const size_t first = weights.size() / 2;  // the server sends half of what is asked
  EXPECT_EQ(ranges[1], "bytes=" + std::to_string(first) + "-");
  EXPECT_EQ(ranges[2], "bytes=" + std::to_string(first + (weights.size() - first) / 2) + "-");

  // The next run: one cut, then resumed within the run.
  server.cut_downloads = 1;
  const std::string snap = hub::resolve_model("org/tiny", o);
  EXPECT_EQ(test::read_bytes(snap + "/model.safetensors"), weights);
  EXPECT_FALSE(fs::exists(incomplete));
  ranges.clear();
  for (auto& h : server.hits())
    if (h.server == "cdn") ranges.push_back(h.range);
  ASSERT_EQ(ranges.size(), 5u);
  EXPECT_EQ(ranges[3], "bytes=" + std::to_string(kept) + "-");
  EXPECT_EQ(ranges[4], "bytes=" + std::to_string(kept + (weights.size() - kept) / 2) + "-");
}

TEST(Hub, CorruptDownloadIsRefused) {
  test::FakeHub server;
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  server.corrupt = true;
  const std::string cache = fresh_dir("corrupt");
  hub::HubOptions o = options_for(server, cache);
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/tiny", o); }), "sha256");
  const fs::path blobs = fs::path(cache) / "models--org--tiny" / "blobs";
  const std::string sha = test::sha256sum(test::read_bytes(tiny_dir() + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(blobs / sha));
  EXPECT_FALSE(fs::exists(blobs / (sha + ".incomplete")));
}

TEST(Hub, BusyHubIsRetried) {
  test::FakeHub server;
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  server.api_503 = 2;
  hub::HubOptions o = options_for(server, fresh_dir("busy"));
  EXPECT_NO_THROW(hub::resolve_model("org/tiny", o));
  EXPECT_EQ(server.count("hub", "GET", "/api/models/"), 3);
  // Still busy after the last attempt: treated as unreachable, and nothing is cached.
  server.api_503 = 100;
  o.max_attempts = 2;
  o.cache_dir = fresh_dir("busy2");
  EXPECT_HAS(unavailable_message([&] { hub::resolve_model("org/tiny", o); }), "HTTP 503");
}

// A cache laid out by hand exactly as huggingface_hub writes it, read offline.
TEST(Hub, ReadsPythonCacheOffline) {
  const std::string root = fresh_dir("python");
  const fs::path storage = fs::path(root) / "hf-home" / "hub" / "models--facebook--tiny-convnext";
  const std::string commit = "0123456789abcdef0123456789abcdef01234567";
  fs::create_directories(storage / "refs");
  fs::create_directories(storage / "blobs");
  fs::create_directories(storage / "snapshots" / commit);
  test::write_bytes((storage / "refs" / "main").string(), commit);
  const std::vector<std::pair<std::string, std::string>> files = {
      {"config.json", "3f1e0c2b7a6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"},
      {"preprocessor_config.json", "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"},
      {"model.safetensors", test::sha256sum(test::read_bytes(tiny_dir() + "/model.safetensors"))}};
  for (auto& [name, etag] : files) {
    fs::copy_file(tiny_dir() + "/" + name, storage / "blobs" / etag);
    fs::create_symlink("../../blobs/" + etag, storage / "snapshots" / commit / name);
  }
  VfRun r = run_vf(root, {"HF_HUB_OFFLINE=1"}, {"info", "facebook/tiny-convnext"});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_HAS(r.out, "model_type:   convnext");
  r = run_vf(root, {"HF_HUB_OFFLINE=1"}, {"info", "facebook/tiny-convnext@" + commit});
  EXPECT_EQ(r.rc, 0) << r.err;
  // HF_HUB_CACHE instead of HF_HOME.
  r = run_vf(root, {"HF_HUB_OFFLINE=1", "HF_HOME=" + root + "/elsewhere", "HF_HUB_CACHE=" + root + "/hf-home/hub"},
             {"info", "facebook/tiny-convnext"});
  EXPECT_EQ(r.rc, 0) << r.err;

  // Not in the cache, offline: the documented exit code and one line.
  r = run_vf(root, {"HF_HUB_OFFLINE=1"}, {"info", "facebook/tiny-convnext@v2"});
  EXPECT_EQ(r.rc, exit_code::kUnavailable);
  r = run_vf(root, {"HF_HUB_OFFLINE=1"}, {"classify", "facebook/other", std::string(VF_SOURCE_DIR) + "/assets/cat.jpg"});
  EXPECT_EQ(r.rc, exit_code::kUnavailable);
  EXPECT_HAS(r.err, "vf: error: facebook/other@main: not in the cache");
  EXPECT_HAS(r.err, "HF_HUB_OFFLINE");
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Hub, UnreachableHubFallsBackToTheCache) {
  const std::string root = fresh_dir("unreachable");
  {
    test::FakeHub server;
    server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
    VfRun r = run_vf(root, {"HF_ENDPOINT=" + server.endpoint()}, {"info", "org/tiny"});
    ASSERT_EQ(r.rc, 0) << r.err;
  }
  // The server is gone: its port refuses connections.
  const std::string dead = "HF_ENDPOINT=http://127.0.0.1:1";
  VfRun r = run_vf(root, {dead}, {"info", "org/tiny"});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_HAS(r.out, "convnext");
  r = run_vf(root, {dead}, {"info", "org/other"});
  EXPECT_EQ(r.rc, exit_code::kUnavailable);
  EXPECT_HAS(r.err, "cannot reach http://127.0.0.1:1");
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Hub, CliTokenErrorsAndLocalFolders) {
  test::FakeHub server;
  server.token = "hf_cli";
  test::FakeRepo gated = test::FakeRepo::from_folder(tiny_dir(), kMain);
  gated.gated = true;
  server.add("org/gated", gated);
  const std::string root = fresh_dir("cli");
  const std::string endpoint = "HF_ENDPOINT=" + server.endpoint();

  VfRun r = run_vf(root, {endpoint}, {"info", "org/gated"});
  EXPECT_EQ(r.rc, exit_code::kUnavailable);
  EXPECT_HAS(r.err, "gated");
  r = run_vf(root, {endpoint, "HF_TOKEN=hf_cli"}, {"info", "org/gated"});
  EXPECT_EQ(r.rc, 0) << r.err;
  // The token file under HF_HOME, as `huggingface-cli login` leaves it.
  fs::remove_all(root + "/hf-home/hub");
  test::write_bytes(root + "/hf-home/token", "hf_cli\n");
  r = run_vf(root, {endpoint}, {"info", "org/gated"});
  EXPECT_EQ(r.rc, 0) << r.err;
  for (auto& h : server.hits()) {
    if (h.server != "cdn") continue;
    EXPECT_EQ(h.authorization, "") << h.path;
  }
  r = run_vf(root, {endpoint}, {"info", "org/absent"});
  EXPECT_EQ(r.rc, exit_code::kUnavailable);
  EXPECT_HAS(r.err, "repository not found");

  // A folder named like an id wins, and the Hub is not asked.
  fs::create_directories(root + "/work/org");
  fs::copy(tiny_dir(), root + "/work/org/absent");
  const size_t before = server.hits().size();
  r = run_vf(root, {endpoint}, {"info", "org/absent"}, root + "/work");
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(server.hits().size(), before);
}

// Two processes fetching the same model at once: both succeed, the blob is downloaded once.
TEST(Hub, ConcurrentProcessesShareOneDownload) {
  test::FakeHub server;
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  server.slow_ms = 50;
  const std::string root = fresh_dir("concurrent");
  const std::string env = "env -u HF_TOKEN -u HF_HUB_CACHE -u HF_HUB_OFFLINE HF_HOME=" + quoted(root + "/hf-home") +
                          " HF_ENDPOINT=" + server.endpoint() + " " + quoted(VF_VF_BINARY) + " info org/tiny";
  const std::string cmd = "(" + env + " >" + quoted(root + "/a.out") + " 2>&1; echo $? >" + quoted(root + "/a.rc") +
                          ") & (" + env + " >" + quoted(root + "/b.out") + " 2>&1; echo $? >" + quoted(root + "/b.rc") +
                          ") & wait";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(test::read_bytes(root + "/a.rc"), "0\n") << test::read_bytes(root + "/a.out");
  EXPECT_EQ(test::read_bytes(root + "/b.rc"), "0\n") << test::read_bytes(root + "/b.out");
  EXPECT_HAS(test::read_bytes(root + "/a.out"), "convnext");
  EXPECT_HAS(test::read_bytes(root + "/b.out"), "convnext");
  EXPECT_EQ(server.count("hub", "GET", "/api/models/"), 2);
  EXPECT_EQ(server.count("cdn", "GET"), 1);
  std::vector<std::string> blobs;
  for (auto& n : names_in(fs::path(root) / "hf-home" / "hub" / "models--org--tiny" / "blobs"))
    if (!n.ends_with(".lock")) blobs.push_back(n);
  EXPECT_EQ(blobs.size(), 3u);
  for (auto& n : blobs) EXPECT_EQ(n.find(".incomplete"), std::string::npos);
}

bool pseudo_terminal_available() {
  const int master = ::posix_openpt(O_RDWR | O_NOCTTY);
  if (master < 0) return false;
  bool ok = ::grantpt(master) == 0 && ::unlockpt(master) == 0;
  if (ok) {
    const char* name = ::ptsname(master);
    const int slave = name ? ::open(name, O_RDWR | O_NOCTTY) : -1;
    ok = slave >= 0;
    if (slave >= 0) ::close(slave);
  }
  ::close(master);
  return ok;
}

// A progress bar per downloaded file on a terminal (a pseudo-terminal from util-linux's `script`),
// nothing when stderr is a file.
TEST(Hub, ProgressBarOnlyOnATerminal) {
  test::FakeHub server;
  server.add("org/tiny", test::FakeRepo::from_folder(tiny_dir(), kMain));
  const std::string root = fresh_dir("progress");
  VfRun r = run_vf(root, {"HF_ENDPOINT=" + server.endpoint()}, {"info", "org/tiny"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.err, "");
  fs::remove_all(root + "/hf-home");
  // A chroot without /dev/pts (CI's fresh Debian root) has no terminal to give: the file half above ran.
  if (!pseudo_terminal_available()) GTEST_SKIP() << "no pseudo-terminal can be opened here (/dev/pts not mounted)";
  const std::string vf = "env -u HF_TOKEN -u HF_HUB_CACHE -u HF_HUB_OFFLINE HF_HOME=" + quoted(root + "/hf-home") +
                         " HF_ENDPOINT=" + server.endpoint() + " " + quoted(VF_VF_BINARY) + " info org/tiny";
  const std::string cmd = "script -qec " + quoted(vf) + " /dev/null >" + quoted(root + "/tty.txt") + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_bytes(root + "/tty.txt");
  const std::string tty = test::read_bytes(root + "/tty.txt");
  EXPECT_HAS(tty, "model.safetensors");
  EXPECT_HAS(tty, "100%");
  EXPECT_HAS(tty, "296.6 kB / 296.6 kB");  // 296604 bytes
  EXPECT_HAS(tty, "model_type:   convnext");
}
