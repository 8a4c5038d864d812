// Reading JSON files (configs, weights.json, shard indexes) with errors that say which file and where.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace vf {

using json = nlohmann::json;

// Parses the file at `path`. Throws vf::Error for a missing/unreadable file, a file larger than
// `max_bytes`, or invalid JSON (with the line and column of the problem).
json read_json_file(const std::string& path, size_t max_bytes = 64 << 20);

// Parses `text` (read from `origin`, used in error messages) the same way.
json parse_json_text(const std::string& text, const std::string& origin);

}  // namespace vf
