// COCO `segmentation` values (polygons, uncompressed and compressed RLE) rasterised into binary
// masks exactly as pycocotools does (cocoapi common/maskApi.c: rleFrPoly, rleFrString, rleDecode;
// PythonAPI pycocotools/_mask.pyx: frPyObjects, decode), which is what the DETR processors'
// convert_coco_poly_to_mask calls.
//
// An RLE here is pycocotools' one: run lengths over the mask in column-major order (down each
// column, columns left to right), starting with a run of zeros.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace vf {

// rleFrPoly: one polygon [x0, y0, x1, y1, ...] (pixel coordinates, an odd trailing value ignored)
// as RLE counts of an h x w mask.
std::vector<uint32_t> coco_rle_from_polygon(const std::vector<double>& xy, int64_t height, int64_t width);

// rleFrString: pycocotools' compressed counts string (6 bits a character, ASCII 48..111, the
// counts after the third stored as differences) back to counts.
std::vector<uint32_t> coco_rle_from_string(const std::string& counts);

// rleDecode, OR-ed into a row-major h x w mask (0/1). The counts must cover exactly h * w pixels.
void coco_rle_decode_or(const std::vector<uint32_t>& counts, int64_t height, int64_t width, uint8_t* mask);

// convert_coco_poly_to_mask for one object: frPyObjects(segmentation, h, w), decode, any over the
// parts. `segmentation` is a list of polygons (or, as frPyObjects reads a first entry of exactly four
// numbers, a list of [x, y, w, h] boxes) or an RLE dict {size: [h, w], counts: [...] or "..."}.
// Returns the row-major h x w mask (0/1). Throws vf::Error on a value pycocotools would refuse or misread.
std::vector<uint8_t> coco_segmentation_to_mask(const json& segmentation, int64_t height, int64_t width);

}  // namespace vf
