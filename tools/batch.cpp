#include "batch.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/errors.h"

namespace vf::cli {

namespace fs = std::filesystem;

bool has_image_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::set<std::string> known = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"};
  return known.count(ext) > 0;
}

std::vector<std::string> expand_image_paths(const std::vector<std::string>& args) {
  std::vector<std::string> paths;
  for (const std::string& arg : args) {
    std::error_code ec;
    if (!fs::is_directory(arg, ec)) {
      paths.push_back(arg);
      continue;
    }
    // Links to folders are not followed (no cycles); links to files are (is_regular_file follows).
    std::vector<fs::path> found;
    fs::recursive_directory_iterator it(arg, ec), end;
    for (; !ec && it != end; it.increment(ec)) {
      std::error_code type_ec;
      if (it->is_regular_file(type_ec) && has_image_extension(it->path().string())) found.push_back(it->path());
    }
    if (ec) throw InputError(arg + ": cannot list the folder: " + ec.message());
    // fs::path orders element by element (as Python's sorted(pathlib.Path(...).rglob(...)) does).
    std::sort(found.begin(), found.end());
    for (const fs::path& p : found) paths.push_back(p.string());
  }
  return paths;
}

std::vector<int64_t> coco_image_ids(const std::vector<std::string>& paths) {
  std::vector<int64_t> ids;
  std::set<int64_t> seen;
  for (const std::string& path : paths) {
    const std::string stem = fs::path(path).stem().string();
    // At most 18 digits: every such number fits an int64.
    const bool numeric = !stem.empty() && stem.size() <= 18 &&
                         std::all_of(stem.begin(), stem.end(), [](unsigned char c) { return c >= '0' && c <= '9'; });
    if (!numeric || !seen.insert(std::stoll(stem)).second) {
      ids.clear();
      for (size_t i = 0; i < paths.size(); ++i) ids.push_back(static_cast<int64_t>(i) + 1);
      return ids;
    }
    ids.push_back(std::stoll(stem));
  }
  return ids;
}

nlohmann::ordered_json coco_result(int64_t image_id, const DetectedObject& o) {
  // Differences of two floats are exact in double, so x + w gives back x1 exactly.
  const double x = o.x0, y = o.y0, w = double(o.x1) - double(o.x0), h = double(o.y1) - double(o.y0);
  return {{"image_id", image_id}, {"category_id", o.label_id}, {"bbox", {x, y, w, h}}, {"score", o.score}};
}

std::string BatchSummary::line() const {
  char buf[160];
  const double rate = seconds > 0 ? double(done) / seconds : 0.0;
  std::snprintf(buf, sizeof buf, "vf: %zu images in %.2f s (%.2f images/s)", done, seconds, rate);
  std::string s = buf;
  if (failed) s += ", " + std::to_string(failed) + " unreadable skipped";
  return s;
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "[=====>    ]  37/120  4.21 images/s  ETA 0:20" on one stderr line, redrawn in place.
class ProgressBar {
 public:
  ProgressBar(size_t total, bool enabled, Clock::time_point t0) : total_(total), enabled_(enabled), t0_(t0) {}

  void draw(size_t processed) {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    const int filled = total_ ? static_cast<int>(kWidth * processed / total_) : kWidth;
    std::string bar(static_cast<size_t>(filled), '=');
    if (filled < kWidth) bar += '>' + std::string(static_cast<size_t>(kWidth - filled - 1), ' ');
    const double elapsed = seconds_since(t0_);
    const double rate = elapsed > 0 ? double(processed) / elapsed : 0.0;
    std::string eta = "?";
    if (rate > 0) {
      const long s = std::lround(double(total_ - processed) / rate);
      char buf[32];
      std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
      eta = buf;
    }
    std::fprintf(stderr, "\r[%s] %zu/%zu  %.2f images/s  ETA %s\033[K", bar.c_str(), processed, total_, rate,
                 eta.c_str());
    std::fflush(stderr);
    shown_ = true;
  }

  // Before anything else is written to the terminal.
  void clear() {
    if (!shown_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  size_t total_;
  bool enabled_;
  Clock::time_point t0_;
  bool shown_ = false;
};

std::string naming(const std::string& path, const std::string& message) {
  return message.find(path) != std::string::npos ? message : path + ": " + message;
}

}  // namespace

BatchSummary run_in_batches(const std::vector<std::string>& paths, const BatchOptions& options,
                            const BatchFn& process) {
  const auto t0 = Clock::now();
  BatchSummary summary;
  ProgressBar bar(paths.size(), options.progress, t0);
  auto skip = [&](const std::string& path, const std::string& message) {
    if (!options.keep_going) throw InputError(naming(path, message));
    bar.clear();
    std::fprintf(stderr, "vf: skipped: %s\n", naming(path, message).c_str());
    ++summary.failed;
  };
  auto run = [&](const std::vector<size_t>& indices, const std::vector<Image>& images) {
    bar.clear();  // `process` may print results
    process(indices, images);
    summary.done += indices.size();
  };

  const size_t step = static_cast<size_t>(std::max(options.batch_size, 1));
  // A batch's images, decoded; an unreadable one as its error message, reported in order below.
  struct Decoded {
    std::vector<size_t> indices;
    std::vector<Image> images;
    std::vector<std::pair<size_t, std::string>> unreadable;
  };
  auto decode = [&paths, step](size_t begin) {
    Decoded d;
    for (size_t i = begin; i < std::min(paths.size(), begin + step); ++i) {
      try {
        d.images.push_back(load_image(paths[i], /*apply_exif_orientation=*/true));
        d.indices.push_back(i);
      } catch (const InputError& e) {
        d.unreadable.emplace_back(i, e.what());
      }
    }
    return d;
  };
  std::future<Decoded> next;
  try {
    bar.draw(0);
    if (options.prefetch && !paths.empty()) next = std::async(std::launch::async, decode, size_t(0));
    for (size_t begin = 0; begin < paths.size(); begin += step) {
      const size_t end = std::min(paths.size(), begin + step);
      Decoded d = options.prefetch ? next.get() : decode(begin);
      if (options.prefetch && end < paths.size()) next = std::async(std::launch::async, decode, end);
      for (auto& [i, message] : d.unreadable) skip(paths[i], message);
      std::vector<size_t>& indices = d.indices;
      std::vector<Image>& images = d.images;
      if (images.empty()) {
        bar.draw(end);
        continue;
      }
      try {
        run(indices, images);
      } catch (const InputError& e) {
        if (images.size() == 1) {
          skip(paths[indices[0]], e.what());
        } else {
          // Which image? Each alone: the good ones give their results, the bad one is named.
          for (size_t k = 0; k < images.size(); ++k) {
            try {
              run({indices[k]}, {images[k]});
            } catch (const InputError& e1) {
              skip(paths[indices[k]], e1.what());
            }
          }
        }
      }
      bar.draw(end);
    }
  } catch (...) {
    bar.clear();  // before the error message
    if (next.valid()) next.wait();  // the decoding in flight reads `paths`
    throw;
  }
  bar.clear();
  summary.seconds = seconds_since(t0);
  return summary;
}

}  // namespace vf::cli
