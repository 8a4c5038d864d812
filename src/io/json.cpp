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

namespace {

// A SAX handler that builds nothing: it counts nesting and reports the top-level keys.
class ScanSax : public json::json_sax_t {
 public:
  ScanSax(int max_depth, const std::function<void(const std::string&)>& on_top_key)
      : max_depth_(max_depth), on_top_key_(on_top_key) {}
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return open(); }
  bool start_array(std::size_t) override { return open(); }
  bool end_object() override { return --depth_, true; }
  bool end_array() override { return --depth_, true; }
  bool key(string_t& k) override {
    if (depth_ == 1 && on_top_key_) on_top_key_(k);
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) override {
    std::string what = ex.what();
    // "[json.exception.parse_error.101] parse error at line L, column C: <detail>; last read: '<text>'"
    auto colon = what.find(": ");
    what = colon == std::string::npos ? what : what.substr(colon + 2);
    error = what.substr(0, what.find("; last read"));  // never quote the text
    error_byte = position;
    return false;
  }

  std::string error;
  size_t error_byte = 0;
  bool too_deep = false;

 private:
  bool open() {
    if (++depth_ <= max_depth_) return true;
    too_deep = true;
    error = "nested deeper than " + std::to_string(max_depth_) + " levels";
    return false;
  }
  int depth_ = 0;
  const int max_depth_;
  const std::function<void(const std::string&)>& on_top_key_;
};

}  // namespace

bool scan_json(const uint8_t* begin, const uint8_t* end, int max_depth,
               const std::function<void(const std::string&)>& on_top_key, std::string* error,
               size_t* error_byte) {
  ScanSax sax(max_depth, on_top_key);
  bool ok;
  try {
    ok = json::sax_parse(begin, end, &sax);
  } catch (const json::exception& e) {  // e.g. a number out of range
    sax.error = e.what();
    ok = false;
  }
  if (ok) return true;
  *error = sax.error.empty() ? "invalid JSON" : sax.error;
  *error_byte = sax.error_byte;
  return false;
}

json parse_json_text(const std::string& text, const std::string& origin, int max_depth) {
  // Depth-limited: configs nest a few levels; a file of a million '[' is refused early, before it
  // can exhaust memory or the stack of code that walks the parsed value recursively.
  std::string error;
  size_t byte = 0;
  const auto* b = reinterpret_cast<const uint8_t*>(text.data());
  if (!scan_json(b, b + text.size(), max_depth, nullptr, &error, &byte)) {
    if (error.rfind("nested deeper", 0) == 0)
      throw InputError(origin + ": invalid JSON: " + error + " (expected a shallow configuration file)");
    throw InputError(origin + ": invalid JSON at " + position_str(text, byte > 0 ? byte - 1 : 0) + ": " + error);
  }
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw InputError(origin + ": invalid JSON: " + e.what());
  }
}

json read_json_file(const std::string& path, size_t max_bytes) {
  std::string text = read_regular_file(path, "JSON file", max_bytes);
  return parse_json_text(text, path);
}

}  // namespace vf
