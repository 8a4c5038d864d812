// Inside the image front door (image.cpp): one decoder per format family, each turning a whole file held in
// memory into 8-bit RGB exactly as Pillow's `Image.open(f).convert("RGB")` does, and the helpers they share.
// Not part of the public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "io/image.h"

namespace vf::image_detail {

// Refuses non-positive dimensions and Pillow's decompression-bomb sizes (throws InputError naming `name`).
void check_dimensions(const std::string& name, int64_t width, int64_t height);

// The Orientation tag (0x0112) of an EXIF block's IFD0 (a TIFF structure, with or without the
// "Exif\0\0" prefix); 1 when absent or invalid.
int exif_orientation(const uint8_t* data, size_t size);

// PIL.ImageOps.exif_transpose's transposition for an orientation of 2..8 (1 or anything else: unchanged).
Image apply_orientation(Image img, int orientation);

// Each decoder applies the file's EXIF orientation when `want_exif` is set, and throws InputError naming
// the file (`name`) and its format for anything it cannot decode.
Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name, bool want_exif);
Image decode_png(const uint8_t* data, size_t size, const std::string& name, bool want_exif);
Image decode_bmp(const uint8_t* data, size_t size, const std::string& name, bool want_exif);
Image decode_gif(const uint8_t* data, size_t size, const std::string& name, bool want_exif);
Image decode_tiff(const uint8_t* data, size_t size, const std::string& name, bool want_exif);
Image decode_webp(const uint8_t* data, size_t size, const std::string& name, bool want_exif);

// A JPEG with more scans than this is refused (what libjpeg-turbo's tools do with -maxscans): a few
// kilobytes of repeated progressive scans would otherwise cost minutes of CPU. Real files have < 20.
constexpr int kMaxJpegScans = 1000;

}  // namespace vf::image_detail
