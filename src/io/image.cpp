#include "io/image.h"

#include <cstring>
#include <utility>

#include "core/errors.h"
#include "io/file.h"
#include "io/image_codecs.h"

namespace vf {
namespace image_detail {

void check_dimensions(const std::string& name, int64_t width, int64_t height) {
  if (width <= 0 || height <= 0)
    throw InputError("image '" + name + "' has invalid dimensions " + std::to_string(width) + "x" +
                std::to_string(height));
  // Each side is bounded first: a PNG header may claim 2^32-1 x 2^32-1, whose product overflows.
  if (width > kMaxImagePixels || height > kMaxImagePixels || width * height > kMaxImagePixels)
    throw InputError("image '" + name + "' is " + std::to_string(width) + "x" + std::to_string(height) + " = " +
                std::to_string(uint64_t(width) * uint64_t(height)) +  // both < 2^32 here
                " pixels, more than the limit of " +
                std::to_string(kMaxImagePixels) + " (decompression bomb check); refusing to decode it");
}

// ---------------------------------------------------------------------------------------------
// EXIF orientation (tag 0x0112 of IFD0), applied like PIL.ImageOps.exif_transpose.

int exif_orientation(const uint8_t* p, size_t n) {
  if (n >= 6 && std::memcmp(p, "Exif\0\0", 6) == 0) p += 6, n -= 6;
  if (n < 8) return 1;
  bool le;
  if (p[0] == 'I' && p[1] == 'I') le = true;
  else if (p[0] == 'M' && p[1] == 'M') le = false;
  else return 1;
  auto u16 = [&](size_t o) -> uint32_t { return le ? p[o] | (p[o + 1] << 8) : (p[o] << 8) | p[o + 1]; };
  auto u32 = [&](size_t o) -> uint32_t {
    return le ? p[o] | (p[o + 1] << 8) | (p[o + 2] << 16) | (uint32_t(p[o + 3]) << 24)
              : (uint32_t(p[o]) << 24) | (p[o + 1] << 16) | (p[o + 2] << 8) | p[o + 3];
  };
  size_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  uint32_t count = u16(ifd);
  for (uint32_t i = 0; i < count; ++i) {
    size_t e = ifd + 2 + 12 * size_t(i);
    if (e + 12 > n) break;
    if (u16(e) == 0x0112 && u16(e + 2) == 3) {  // SHORT
      uint32_t v = u16(e + 8);
      return v >= 1 && v <= 8 ? int(v) : 1;
    }
  }
  return 1;
}

Image apply_orientation(Image in, int orientation) {
  if (orientation <= 1 || orientation > 8) return in;
  const int64_t H = in.height, W = in.width, C = in.channels;
  bool swap = orientation >= 5;
  Image out;
  out.channels = C;
  out.height = swap ? W : H;
  out.width = swap ? H : W;
  out.rgb.resize(in.rgb.size());
  for (int64_t y = 0; y < out.height; ++y)
    for (int64_t x = 0; x < out.width; ++x) {
      int64_t sy, sx;
      switch (orientation) {
        case 2: sy = y, sx = W - 1 - x; break;              // FLIP_LEFT_RIGHT
        case 3: sy = H - 1 - y, sx = W - 1 - x; break;      // ROTATE_180
        case 4: sy = H - 1 - y, sx = x; break;              // FLIP_TOP_BOTTOM
        case 5: sy = x, sx = y; break;                      // TRANSPOSE
        case 6: sy = H - 1 - x, sx = y; break;              // ROTATE_270 (clockwise)
        case 7: sy = H - 1 - x, sx = W - 1 - y; break;      // TRANSVERSE
        default: sy = x, sx = W - 1 - y; break;             // 8: ROTATE_90 (counter-clockwise)
      }
      std::memcpy(&out.rgb[(y * out.width + x) * C], &in.rgb[(sy * W + sx) * C], C);
    }
  return out;
}
}  // namespace image_detail

namespace {

// Header dimensions, read before any decoder runs (as Pillow's open() does), so that a tiny file
// claiming a huge image is refused whatever follows its header. {0, 0} when not found.
std::pair<int64_t, int64_t> png_header_size(const uint8_t* p, size_t n) {
  // signature (8), IHDR length (4), "IHDR", width (4), height (4)
  if (n < 24 || std::memcmp(p + 12, "IHDR", 4) != 0) return {0, 0};
  auto be32 = [&](size_t o) { return (int64_t(p[o]) << 24) | (int64_t(p[o + 1]) << 16) | (int64_t(p[o + 2]) << 8) | p[o + 3]; };
  return {be32(16), be32(20)};
}

std::pair<int64_t, int64_t> jpeg_header_size(const uint8_t* p, size_t n) {
  size_t i = 2;  // after SOI
  while (i + 4 <= n) {
    if (p[i] != 0xFF) return {0, 0};
    uint8_t m = p[i + 1];
    if (m == 0xFF) {  // fill byte
      ++i;
      continue;
    }
    if (m == 0xD8 || (m >= 0xD0 && m <= 0xD7) || m == 0x01) {  // markers without a length
      i += 2;
      continue;
    }
    if (m == 0xDA || m == 0xD9) return {0, 0};  // start of scan / end of image before any frame
    size_t len = (size_t(p[i + 2]) << 8) | p[i + 3];
    const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
    if (sof) {
      if (i + 9 > n) return {0, 0};
      int64_t h = (int64_t(p[i + 5]) << 8) | p[i + 6], w = (int64_t(p[i + 7]) << 8) | p[i + 8];
      return {w, h};
    }
    i += 2 + len;
  }
  return {0, 0};
}

}  // namespace

namespace {

bool starts_with(const uint8_t* data, size_t size, const char* magic, size_t n) {
  return size >= n && std::memcmp(data, magic, n) == 0;
}

// Formats Pillow (or users) may expect that vf does not decode, named so the error says what the file is.
const char* unsupported_format(const uint8_t* p, size_t n) {
  if (n >= 12 && std::memcmp(p + 4, "ftyp", 4) == 0) {
    if (std::memcmp(p + 8, "avif", 4) == 0 || std::memcmp(p + 8, "avis", 4) == 0) return "AVIF";
    if (std::memcmp(p + 8, "heic", 4) == 0 || std::memcmp(p + 8, "heix", 4) == 0 ||
        std::memcmp(p + 8, "mif1", 4) == 0 || std::memcmp(p + 8, "msf1", 4) == 0)
      return "HEIF/HEIC";
    if (std::memcmp(p + 8, "jp2 ", 4) == 0) return "JPEG 2000";
    return "an ISO media (MP4/QuickTime) file";
  }
  if (starts_with(p, n, "\0\0\0\x0cjP  \r\n\x87\n", 12) || starts_with(p, n, "\xff\x4f\xff\x51", 4)) return "JPEG 2000";
  if (starts_with(p, n, "\xff\x0a", 2) || starts_with(p, n, "\0\0\0\x0cJXL \r\n\x87\n", 12)) return "JPEG XL";
  if (starts_with(p, n, "\0\0\1\0", 4)) return "ICO";
  if (starts_with(p, n, "8BPS", 4)) return "Photoshop PSD";
  if (starts_with(p, n, "%PDF", 4)) return "PDF";
  if (starts_with(p, n, "DDS ", 4)) return "DDS";
  if (starts_with(p, n, "qoif", 4)) return "QOI";
  if (n >= 2 && p[0] == 'P' && p[1] >= '1' && p[1] <= '7') return "PNM (PBM/PGM/PPM/PAM)";
  if (starts_with(p, n, "<?xml", 5) || starts_with(p, n, "<svg", 4)) return "SVG/XML";
  if (starts_with(p, n, "RIFF", 4)) return "a RIFF file that is not WebP";
  return nullptr;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const std::string& name, bool apply_exif_orientation) {
  using namespace image_detail;
  const bool exif = apply_exif_orientation;
  if (starts_with(data, size, "\x89PNG\r\n\x1a\n", 8)) {
    auto [w, h] = png_header_size(data, size);
    if (w && h) check_dimensions(name, w, h);
    return decode_png(data, size, name, exif);
  }
  if (starts_with(data, size, "\xff\xd8\xff", 3)) {
    auto [w, h] = jpeg_header_size(data, size);
    if (w && h) check_dimensions(name, w, h);
    return decode_jpeg(data, size, name, exif);
  }
  if (starts_with(data, size, "RIFF", 4) && size >= 12 && std::memcmp(data + 8, "WEBP", 4) == 0)
    return decode_webp(data, size, name, exif);
  if (starts_with(data, size, "GIF87a", 6) || starts_with(data, size, "GIF89a", 6))
    return decode_gif(data, size, name, exif);
  if (starts_with(data, size, "BM", 2)) return decode_bmp(data, size, name, exif);
  if (starts_with(data, size, "II*\0", 4) || starts_with(data, size, "MM\0*", 4) ||
      starts_with(data, size, "II+\0", 4) || starts_with(data, size, "MM\0+", 4))
    return decode_tiff(data, size, name, exif);
  const char* known = unsupported_format(data, size);
  if (known)
    throw InputError("image '" + name + "' looks like " + known +
                     ", a format vf cannot read (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)");
  throw InputError("image '" + name + "' is not in a format vf can read (unrecognised magic bytes, " +
                   std::to_string(size) + " bytes; supported: JPEG, PNG, WebP, BMP, GIF, TIFF)");
}

Image load_image(const std::string& path, bool apply_exif_orientation) {
  // Mapped, not read: the decoders touch only the bytes the image needs, so trailing padding of any size
  // costs nothing, and a FIFO, device or directory is refused before anything is read.
  FileView file = map_regular_file(path, "image file");
  return decode_image(file.data, file.size, path, apply_exif_orientation);
}

}  // namespace vf
