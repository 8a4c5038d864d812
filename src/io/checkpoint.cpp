#include "io/checkpoint.h"

#include "core/errors.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <unistd.h>
#include <vector>

#include "io/file.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/torch_checkpoint.h"

namespace vf {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// torch.save files start with a zip local header ("PK\3\4"; "PK\5\6" for an empty archive) or,
// in the legacy format, with a pickle PROTO opcode (0x80). A safetensors file starts with its
// header length (whose low byte may well be 0x80) followed by '{': that is checked first.
bool looks_like_torch(const std::string& path) {
  unsigned char b[9] = {};
  RegularFile file = open_regular_file(path, "weights file");
  ssize_t got = ::read(file.fd(), b, sizeof b);
  size_t n = got < 0 ? 0 : static_cast<size_t>(got);
  if (n >= 4 && b[0] == 'P' && b[1] == 'K' && ((b[2] == 3 && b[3] == 4) || (b[2] == 5 && b[3] == 6))) return true;
  if (n == 9 && b[8] == '{') return false;
  return n >= 1 && b[0] == 0x80;
}

void load_one_file(const std::string& path, WeightStore& store) {
  // The name decides where it can: a safetensors header length may well start with byte 0x80.
  if (ends_with(path, ".safetensors")) return load_safetensors(path, store);
  if (ends_with(path, ".bin") || ends_with(path, ".pt") || ends_with(path, ".pth"))
    return load_torch_checkpoint(path, store);
  if (looks_like_torch(path))
    load_torch_checkpoint(path, store);
  else
    load_safetensors(path, store);
}

// A sharded checkpoint: {"metadata": ..., "weight_map": {tensor name: shard file}}. Every shard is
// loaded, and the names found in the shards must be exactly those the map assigns to them.
void load_sharded(const std::string& index_path, WeightStore& store) {
  json index = read_json_file(index_path);
  auto wm = index.find("weight_map");
  if (!index.is_object() || wm == index.end() || !wm->is_object())
    throw InputError(index_path + ": shard index has no 'weight_map' object");
  const fs::path dir = fs::path(index_path).parent_path();
  std::vector<std::string> files;  // in order of first appearance
  std::set<std::string> known_files;
  std::map<std::string, std::string> file_of;
  for (auto& [name, file] : wm->items()) {
    if (!file.is_string()) throw InputError(index_path + ": weight_map entry '" + name + "' is not a file name");
    std::string f = file.get<std::string>();
    fs::path fp(f);
    bool bad = f.empty() || fp.is_absolute();
    for (auto& part : fp) bad = bad || part == "..";
    if (bad) throw InputError(index_path + ": shard file name '" + f + "' must be a relative path inside the model folder");
    if (known_files.insert(f).second) files.push_back(f);
    file_of.emplace_hint(file_of.end(), name, f);  // items() are sorted by name
  }
  if (files.empty()) throw InputError(index_path + ": weight_map is empty");
  for (auto& f : files) {
    std::string shard_path = (dir / f).string();
    if (!fs::exists(shard_path)) throw InputError(index_path + ": shard '" + f + "' is missing (" + shard_path + ")");
    resolve_inside_model_folder(dir.empty() ? "." : dir.string(), f, index_path);
    WeightStore shard;
    load_one_file(shard_path, shard);
    for (auto& name : shard.names()) {
      auto it = file_of.find(name);
      if (it == file_of.end())
        throw InputError(shard_path + ": tensor '" + name + "' is not in the weight_map of " + index_path);
      if (it->second != f)
        throw InputError(shard_path + ": tensor '" + name + "' is mapped to '" + it->second + "' by " + index_path);
      if (store.has(name)) throw InputError(shard_path + ": tensor '" + name + "' is already loaded");
      store.add_from(shard, name);
    }
  }
  std::vector<std::string> missing;
  for (auto& [name, f] : file_of)
    if (!store.has(name)) missing.push_back(name + " (" + f + ")");
  if (!missing.empty()) {
    std::string msg = index_path + ": " + std::to_string(missing.size()) + " tensor(s) of the weight_map are not in their shard:";
    for (size_t i = 0; i < missing.size() && i < 10; ++i) msg += " " + missing[i];
    if (missing.size() > 10) msg += " ...";
    throw InputError(msg);
  }
}

}  // namespace

std::shared_ptr<WeightStore> load_weights_file(const std::string& path) {
  if (!fs::exists(path)) throw InputError(path + ": weights file not found");
  auto store = std::make_shared<WeightStore>();
  if (ends_with(path, ".json"))
    load_sharded(path, *store);
  else
    load_one_file(path, *store);
  return store;
}

std::shared_ptr<WeightStore> load_checkpoint(const std::string& model_dir) {
  if (!fs::is_directory(model_dir)) throw InputError(model_dir + ": model folder not found");
  for (const char* name : {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json"}) {
    fs::path p = fs::path(model_dir) / name;
    if (!fs::exists(fs::symlink_status(p))) continue;
    if (!path_inside_model_folder(model_dir, p.string()))
      throw InputError(p.string() + ": leads outside the model folder through a symbolic link (only links into "
                       "the folder, or into the blobs/ of a Hugging Face cache repository, are followed)");
    return load_weights_file(p.string());
  }
  throw InputError(model_dir + ": no weights found (expected model.safetensors, model.safetensors.index.json, "
              "pytorch_model.bin or pytorch_model.bin.index.json)");
}

}  // namespace vf
