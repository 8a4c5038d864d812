// Image files: JPEG, PNG, WebP, BMP, GIF and TIFF, decoded to 8-bit RGB exactly as Pillow's
// `Image.open(path).convert("RGB")` does, since the reference processors start from that.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vf {

class AtomicOutputs;

// An 8-bit image, rows of interleaved channels (HWC). `channels` is 3 (RGB) for decoded files.
struct Image {
  int64_t height = 0, width = 0;
  int64_t channels = 3;
  std::vector<uint8_t> rgb;  // height * width * channels bytes

  size_t pixels() const { return static_cast<size_t>(height) * static_cast<size_t>(width); }
};

// Pillow's decompression-bomb limit: an image of more than 2 * Image.MAX_IMAGE_PIXELS pixels is
// refused (checked on the header's dimensions, before anything is decoded).
constexpr int64_t kMaxImagePixels = 2 * 89478485LL;

// Decodes an image file (format from its magic bytes, decoders in src/io/image_*.cpp) to RGB exactly as
// Pillow's `Image.open(f).convert("RGB")` does:
//  - JPEG: islow DCT, fancy upsampling; grayscale -> replicated, CMYK/YCCK -> Pillow's cmyk2rgb
//    (Adobe inverted polarity). A file that ends before the last scanline, or has more than 1000
//    scans, is an error.
//  - PNG: 1/2/4/8-bit gray (scaled like Pillow), 16-bit gray (clipped to 255 like Pillow's I;16 ->
//    RGB), palette (tRNS ignored, indices past the palette are black), RGB/RGBA/gray+alpha at 8 or
//    16 bits (16-bit keeps the high byte, alpha dropped, no compositing).
//  - WebP (libwebp), BMP, GIF (first frame), TIFF (libtiff, first image): see the notes atop each
//    decoder's file.
// Throws vf::InputError naming the file for unreadable, truncated, corrupt, unsupported or too large
// images, and for formats vf does not read (naming the format when it is recognised). When
// `apply_exif_orientation` is set, the EXIF orientation (JPEG APP1, PNG eXIf, WebP EXIF, TIFF
// Orientation tag) is applied first (what transformers' `load_image` does through
// `ImageOps.exif_transpose`). load_image opens `path` with open_regular_file (io/file.h) and maps it,
// so FIFOs, devices and directories are refused and bytes the image does not need are never read.
Image load_image(const std::string& path, bool apply_exif_orientation = false);
Image decode_image(const uint8_t* data, size_t size, const std::string& name,
                   bool apply_exif_orientation = false);

// Writes an 8-bit PNG (channels 1 = gray, 3 = RGB, 4 = RGBA) to a temporary file created
// exclusively next to `path` and renames it into place (io/file.h, AtomicOutputs).
void save_png(const std::string& path, const Image& img);
// The same as one of several outputs that appear together when `out` commits.
void save_png(AtomicOutputs& out, const std::string& path, const Image& img);

}  // namespace vf
