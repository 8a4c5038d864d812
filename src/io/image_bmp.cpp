// BMP, read as Pillow's BmpImagePlugin reads it (no library: the format is a header and rows).
//  - headers: OS/2 v1 (12 bytes), Windows v3 (40), OS/2 v2 (64), v4 (108), v5 (124); a negative height
//    (high byte 0xFF) is a top-down image, otherwise rows are stored bottom-up, each padded to 4 bytes;
//  - 1/4/8-bit palettes (BGRX, or BGR for OS/2 v1), raw or RLE8/RLE4 compressed;
//  - 16-bit 5-5-5, 24-bit BGR, 32-bit BGRX; BITFIELDS only with the masks Pillow knows (565/555,
//    BGRX/XBGR/ABGR/RGBA/BGRA); alpha is dropped.
#include <cstring>
#include <vector>

#include "core/errors.h"
#include "io/image_codecs.h"

namespace vf::image_detail {
namespace {

uint32_t le16(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }
uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

[[noreturn]] void fail(const std::string& name, const std::string& why) {
  throw InputError("cannot decode BMP image '" + name + "': " + why);
}

enum class Layout { Palette, Bgr15, Bgr16, Bgr24, Bytes32 };

// Pillow's BmpRleDecoder, step for step: it produces one index per pixel in file order (bottom row
// first), stopping at end-of-bitmap, at the end of the data, or once the image is full.
std::vector<uint8_t> decode_rle(const uint8_t* data, size_t size, size_t pos, int64_t width, int64_t height,
                                bool rle4) {
  const size_t total = size_t(width) * size_t(height);
  std::vector<uint8_t> out;
  int64_t x = 0;
  while (out.size() < total) {
    if (pos + 2 > size) break;
    const uint8_t count = data[pos], byte = data[pos + 1];
    pos += 2;
    if (count) {  // encoded run
      int64_t n = count;
      if (x + n > width) n = std::max<int64_t>(0, width - x);
      for (int64_t i = 0; i < n; ++i) out.push_back(rle4 ? (i % 2 == 0 ? byte >> 4 : byte & 15) : byte);
      x += n;
    } else if (byte == 0) {  // end of line
      while (out.size() % size_t(width) != 0) out.push_back(0);
      x = 0;
    } else if (byte == 1) {  // end of bitmap
      break;
    } else if (byte == 2) {  // delta
      if (pos + 2 > size) break;
      const size_t right = data[pos], up = data[pos + 1];
      pos += 2;
      out.insert(out.end(), right + up * size_t(width), 0);
      x = int64_t(out.size() % size_t(width));
    } else {  // absolute run of `byte` pixels
      const size_t want = rle4 ? byte / 2 : byte;
      const size_t got = std::min(want, size - pos);
      for (size_t i = 0; i < got; ++i) {
        if (rle4) {
          out.push_back(data[pos + i] >> 4);
          out.push_back(data[pos + i] & 15);
        } else {
          out.push_back(data[pos + i]);
        }
      }
      pos += got;
      if (got < want) break;
      x += byte;
      if (pos % 2 != 0) ++pos;  // runs are word-aligned (in file offsets, as Pillow counts them)
    }
  }
  return out;
}

}  // namespace

Image decode_bmp(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  if (size < 18) fail(name, "the file is truncated (ends inside the file header)");
  size_t offset = le32(data + 10);
  const uint32_t header_size = le32(data + 14);
  if (header_size < 4 || 14 + size_t(header_size) > size) fail(name, "the file is truncated (ends inside the bitmap header)");
  const uint8_t* h = data + 18;  // the header after its size field
  int64_t width, height;
  uint32_t bits, compression = 0, colors = 0;
  bool top_down = false;
  size_t palette_padding;
  uint32_t masks[4] = {0, 0, 0, 0};
  size_t pos = 14 + header_size;  // where the palette (or 40-byte header's bitfield masks) starts
  if (header_size == 12) {
    width = le16(h), height = le16(h + 2), bits = le16(h + 6);
    palette_padding = 3;
  } else if (header_size == 40 || header_size == 64 || header_size == 108 || header_size == 124) {
    top_down = h[7] == 0xFF;
    width = le32(h);
    height = top_down ? int64_t(1ll << 32) - int64_t(le32(h + 4)) : int64_t(le32(h + 4));
    bits = le16(h + 10);
    compression = le32(h + 12);
    colors = le32(h + 28);
    palette_padding = 4;
    if (compression == 3) {  // BITFIELDS
      if (header_size - 4 >= 52) {
        for (int i = 0; i < 4; ++i) masks[i] = le32(h + 36 + 4 * i);
      } else {  // a 40-byte header's masks follow it (three of them: the fourth is reserved, not alpha)
        if (pos + 12 > size) fail(name, "the file is truncated (ends inside the bitfield masks)");
        for (int i = 0; i < 3; ++i) masks[i] = le32(data + pos + 4 * i);
        pos += 12;
      }
    }
  } else {
    fail(name, "unsupported BMP header size " + std::to_string(header_size) + " (Pillow reads 12, 40, 64, 108, 124)");
  }
  check_dimensions(name, width, height);
  if (colors == 0) colors = bits < 32 ? (1u << bits) : 0;
  if (offset == 14 + size_t(header_size) && bits <= 8) offset += 4 * size_t(colors);

  Layout layout;
  int byte_of[3] = {2, 1, 0};  // R, G, B byte positions within a 32-bit pixel (BGRX)
  switch (bits) {
    case 1: case 4: case 8: layout = Layout::Palette; break;
    case 16: layout = Layout::Bgr15; break;
    case 24: layout = Layout::Bgr24; break;
    case 32: layout = Layout::Bytes32; break;
    default: fail(name, "unsupported BMP pixel depth " + std::to_string(bits));
  }
  if (compression == 3) {
    auto is = [&](uint32_t r, uint32_t g, uint32_t b, uint32_t a) {
      return masks[0] == r && masks[1] == g && masks[2] == b && masks[3] == a;
    };
    auto rgb_is = [&](uint32_t r, uint32_t g, uint32_t b) { return masks[0] == r && masks[1] == g && masks[2] == b; };
    auto set = [&](int r, int g, int b) { byte_of[0] = r, byte_of[1] = g, byte_of[2] = b; };
    if (bits == 32 && (is(0xFF0000, 0xFF00, 0xFF, 0) || is(0xFF0000, 0xFF00, 0xFF, 0xFF000000) || is(0, 0, 0, 0)))
      set(2, 1, 0);  // BGRX / BGRA
    else if (bits == 32 && (is(0xFF000000, 0xFF0000, 0xFF00, 0) || is(0xFF000000, 0xFF0000, 0xFF00, 0xFF)))
      set(3, 2, 1);  // XBGR / ABGR
    else if (bits == 32 && is(0xFF, 0xFF00, 0xFF0000, 0xFF000000))
      set(0, 1, 2);  // RGBA
    else if (bits == 24 && rgb_is(0xFF0000, 0xFF00, 0xFF))
      ;
    else if (bits == 16 && rgb_is(0xF800, 0x7E0, 0x1F))
      layout = Layout::Bgr16;
    else if (bits == 16 && rgb_is(0x7C00, 0x3E0, 0x1F))
      ;
    else
      fail(name, "unsupported BMP bitfields layout");
  } else if (compression == 1 || compression == 2) {
    if (bits != (compression == 1 ? 8u : 4u))
      fail(name, std::string(compression == 1 ? "RLE8" : "RLE4") + " compression with " + std::to_string(bits) + "-bit pixels");
  } else if (compression != 0) {
    fail(name, "unsupported BMP compression " + std::to_string(compression) + (compression == 4 ? " (embedded JPEG)" : compression == 5 ? " (embedded PNG)" : ""));
  }

  uint8_t palette[256][3] = {};
  if (layout == Layout::Palette) {
    if (colors == 0 || colors > 65536) fail(name, "unsupported BMP palette size " + std::to_string(colors));
    const size_t n = std::min<size_t>(colors, 256);
    for (size_t i = 0; i < n; ++i) {
      const size_t at = pos + i * palette_padding;
      if (at + 3 > size) break;  // a short palette: missing entries stay black
      palette[i][0] = data[at + 2], palette[i][1] = data[at + 1], palette[i][2] = data[at];
    }
  }

  const size_t W = size_t(width), H = size_t(height);
  const size_t stride = ((W * bits + 31) >> 3) & ~size_t(3);
  const bool rle = compression == 1 || compression == 2;
  if (offset > size) fail(name, "the pixel data offset is past the end of the file");
  // Checked before allocating: a few corrupt header bytes can claim a hundred million pixels.
  if (!rle && (size - offset) / stride < H) fail(name, "the file is truncated (pixel data ends before the last row)");
  std::vector<uint8_t> rle_indices;
  if (rle) {
    rle_indices = decode_rle(data, size, offset, width, height, compression == 2);
    if (rle_indices.size() < W * H) fail(name, "not enough image data (the RLE stream ends before the last row)");
  }
  Image img;
  img.width = width, img.height = height;
  img.rgb.assign(img.pixels() * 3, 0);
  auto out_row = [&](size_t file_row) {  // rows in the file run bottom-up unless the height was negative
    return img.rgb.data() + 3 * W * (top_down ? file_row : H - 1 - file_row);
  };
  auto put_index = [&](uint8_t* o, unsigned idx) {
    if (idx < 256) o[0] = palette[idx][0], o[1] = palette[idx][1], o[2] = palette[idx][2];
  };
  if (rle) {
    const std::vector<uint8_t>& idx = rle_indices;
    for (size_t r = 0; r < H; ++r) {
      uint8_t* o = out_row(r);
      for (size_t x = 0; x < W; ++x) put_index(o + 3 * x, idx[r * W + x]);
    }
  } else {
    for (size_t r = 0; r < H; ++r) {
      const uint8_t* in = data + offset + r * stride;
      uint8_t* o = out_row(r);
      for (size_t x = 0; x < W; ++x, o += 3) {
        switch (layout) {
          case Layout::Palette: {
            unsigned v = bits == 8 ? in[x] : bits == 4 ? (in[x / 2] >> (x % 2 ? 0 : 4)) & 15 : (in[x / 8] >> (7 - x % 8)) & 1;
            put_index(o, v);
            break;
          }
          case Layout::Bgr15:
          case Layout::Bgr16: {
            // Pillow's BGR;15 / BGR;16 unpackers: each field scaled by 255 / max with integer division.
            const unsigned p = le16(in + 2 * x);
            if (layout == Layout::Bgr15) {
              o[0] = uint8_t(((p >> 10) & 31) * 255 / 31), o[1] = uint8_t(((p >> 5) & 31) * 255 / 31);
            } else {
              o[0] = uint8_t(((p >> 11) & 31) * 255 / 31), o[1] = uint8_t(((p >> 5) & 63) * 255 / 63);
            }
            o[2] = uint8_t((p & 31) * 255 / 31);
            break;
          }
          case Layout::Bgr24:
            o[0] = in[3 * x + 2], o[1] = in[3 * x + 1], o[2] = in[3 * x];
            break;
          case Layout::Bytes32:
            for (int c = 0; c < 3; ++c) o[c] = in[4 * x + byte_of[c]];
            break;
        }
      }
    }
  }
  (void)want_exif;  // BMP carries no EXIF
  return img;
}

}  // namespace vf::image_detail
