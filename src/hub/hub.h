// Models by Hub id ("org/name", "org/name@revision"), downloaded into huggingface_hub's own cache so
// that Python and vf share it: <cache>/models--org--name/{refs/<revision>, blobs/<etag>,
// snapshots/<commit>/<file> -> ../../blobs/<etag>, .no_exist/<commit>/<file>}.
// Errors (unknown repository, revision or file, gated repository, Hub unreachable with nothing cached,
// a failed download) are vf::UnavailableError, one line each.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace vf::hub {

// Where and how to reach the Hub; from_env() reads huggingface_hub's environment variables.
struct HubOptions {
  std::string endpoint = "https://huggingface.co";  // HF_ENDPOINT
  std::string cache_dir;                            // HF_HUB_CACHE, else $HF_HOME/hub
  std::string token;                                // HF_TOKEN, else the file $HF_HOME/token; empty: none
  bool offline = false;                             // HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)
  bool progress = true;                             // a progress bar on stderr when it is a terminal
  int max_attempts = 5;                             // per request, on 429 / 5xx / a broken transfer
  int retry_base_ms = 1000;                         // first backoff, doubled each time (capped at 8x)

  static HubOptions from_env();
};

// "org/name[@revision]" split; nullopt when `s` is not shaped like a Hub model id (a single name is
// taken for a folder: vf asks the Hub only for namespaced ids).
struct ModelId {
  std::string repo_id;
  std::string revision = "main";
};
std::optional<ModelId> parse_model_id(const std::string& s);

// The folder to load a model from: `dir_or_id` itself when it exists on disk (a folder path wins),
// else the snapshot folder of the Hub model it names, downloaded if needed. Anything else is
// returned unchanged, for the loader to report.
std::string resolve_model(const std::string& dir_or_id);
std::string resolve_model(const std::string& dir_or_id, const HubOptions& options);

// The snapshot folder of `id` holding config.json, preprocessor_config.json (when the repository
// has one) and the weights (model.safetensors, else its shard index and shards, else
// pytorch_model.bin or its index), as transformers' from_pretrained picks them.
std::string snapshot_download(const ModelId& id, const HubOptions& options);

// huggingface_hub's folder name for a model repository: "models--org--name".
std::string repo_folder_name(const std::string& repo_id);

// A repository file name that stays inside the folder it is joined to: relative, no "." / ".."
// components, no empty components, backslashes or control characters.
bool is_safe_relative_path(const std::string& name);

}  // namespace vf::hub
