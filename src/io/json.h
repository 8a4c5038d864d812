// Reading JSON files (configs, weights.json, shard indexes) with errors that say which file and where.
#pragma once

#include <nlohmann/json.hpp>
#include <cstdint>
#include <functional>
#include <string>

namespace vf {

using json = nlohmann::json;

// Parses the file at `path`. Throws vf::Error for a missing/unreadable file, a file larger than
// `max_bytes`, or invalid JSON (with the line and column of the problem).
json read_json_file(const std::string& path, size_t max_bytes = 64 << 20);

// JSON nested deeper than this is refused (configs and shard indexes nest a few levels).
constexpr int kMaxJsonDepth = 64;

// Parses `text` (read from `origin`, used in error messages) the same way; a value nested more than
// `max_depth` levels is an error.
json parse_json_text(const std::string& text, const std::string& origin, int max_depth = kMaxJsonDepth);

// Checks the JSON in [begin, end) in one linear pass, before it is parsed into a value (nlohmann's
// parser callbacks rescan an object each time one of its members ends: quadratic in the members):
// valid syntax, nested at most `max_depth` levels. `on_top_key` (optional) sees the keys of the
// top-level object in order. On failure returns false with *error (no bytes of the text quoted)
// and *error_byte (1-based byte of the problem).
bool scan_json(const uint8_t* begin, const uint8_t* end, int max_depth,
               const std::function<void(const std::string&)>& on_top_key, std::string* error,
               size_t* error_byte);

}  // namespace vf
