// `vf classify|detect|segment` over many images: folders expanded to their image files, images
// decoded one batch at a time (a big folder never sits in memory), a progress bar, COCO results and
// output files written atomically.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/image.h"
#include "visionformers.h"

namespace vf::cli {

// jpg jpeg png webp bmp gif tif tiff, in any case.
bool has_image_extension(const std::string& path);

// Each argument in order: a folder becomes its image files (by extension), recursively, sorted by
// path; anything else is kept as given (a missing file fails later, when it is read). Throws
// vf::InputError for a folder that cannot be listed.
std::vector<std::string> expand_image_paths(const std::vector<std::string>& args);

// COCO image ids: the file names' numbers (COCO style, 000000039769.jpg -> 39769) when every name
// is a decimal number and no two are equal, else each image's position in `paths`, counted from 1.
std::vector<int64_t> coco_image_ids(const std::vector<std::string>& paths);

// One detection as a COCO results entry: image_id, category_id (the id2label id), bbox [x, y, w, h]
// from the exact corners in pixels of the original image, score.
nlohmann::ordered_json coco_result(int64_t image_id, const DetectedObject& o);

struct BatchOptions {
  int batch_size = 1;
  bool keep_going = false;  // report an unreadable image on stderr and skip it, instead of stopping
  bool progress = false;    // a progress bar on stderr
  // Decode the next batch on a thread of its own while the current one is processed (a model on a
  // GPU leaves the CPU free for it).
  bool prefetch = false;
};

struct BatchSummary {
  size_t done = 0;    // images with results
  size_t failed = 0;  // images skipped (keep_going)
  double seconds = 0;
  std::string line() const;  // "vf: N images in S s (R images/s)[, F skipped]"
};

// Decodes `paths` batch by batch (EXIF orientation applied, as the pipelines' load_image) and hands
// each batch to `process` with the images' indices into `paths`. An image that cannot be read stops
// the run with its vf::InputError (which names it); with keep_going it is reported and left out, and
// a batch whose processing fails with a vf::InputError is run again image by image to leave out only
// the culprit.
using BatchFn = std::function<void(const std::vector<size_t>& indices, const std::vector<Image>& images)>;
BatchSummary run_in_batches(const std::vector<std::string>& paths, const BatchOptions& options,
                            const BatchFn& process);

}  // namespace vf::cli
