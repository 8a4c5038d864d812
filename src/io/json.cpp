#include "io/json.h"

#include "core/errors.h"

#include <cerrno>
#include <cstring>

#include "core/tensor.h"
#include "io/file.h"

namespace vf {

namespace {
// Line and column (both 1-based) of byte offset `pos` in `text`.
std::string position_str(const std::string& text, size_t pos) {
  pos = std::min(pos, text.size());
  size_t line = 1, col = 1;
  for (size_t i = 0; i < pos; ++i) {
    if (text[i] == '\n') { ++line; col = 1; } else { ++col; }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}
}  // namespace

json parse_json_text(const std::string& text, const std::string& origin, int max_depth) {
  // Depth-limited: configs nest a few levels; a file of a million '[' is refused early, before it
  // can exhaust memory or the stack of code that walks the parsed value recursively.
  auto limit_depth = [&](int depth, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= max_depth)
      throw InputError(origin + ": invalid JSON: nested deeper than " + std::to_string(max_depth) +
                  " levels (expected a shallow configuration file)");
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::parse_error& e) {
    // e.byte is 1-based: the byte at which parsing stopped.
    size_t pos = e.byte > 0 ? e.byte - 1 : 0;
    std::string what = e.what();
    // nlohmann prefixes "[json.exception.parse_error.101] parse error at line L, column C: ..."
    auto colon = what.find(": ");
    std::string detail = colon == std::string::npos ? what : what.substr(colon + 2);
    detail = detail.substr(0, detail.find("; last read"));  // never quote the file's bytes
    throw InputError(origin + ": invalid JSON at " + position_str(text, pos) + ": " + detail);
  } catch (const json::exception& e) {  // e.g. a number out of range
    throw InputError(origin + ": invalid JSON: " + e.what());
  }
}

json read_json_file(const std::string& path, size_t max_bytes) {
  std::string text = read_regular_file(path, max_bytes);
  return parse_json_text(text, path);
}

}  // namespace vf
