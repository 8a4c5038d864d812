// PNG through libpng (reading as Pillow's PngImagePlugin does, writing for masks and drawings).
#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "core/errors.h"
#include "io/file.h"
#include "io/image_codecs.h"

namespace vf {
namespace image_detail {
namespace {

// ---------------------------------------------------------------------------------------------
// PNG. Same longjmp discipline as JPEG: png_error jumps back into decode_png_raw.

struct PngSource {
  const uint8_t* data;
  size_t size;
  size_t pos;
};

void png_read_from_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (n > src->size - src->pos) png_error(png, "the file is truncated (read past the end of the data)");
  std::memcpy(out, src->data + src->pos, n);
  src->pos += n;
}

struct PngErrorState {
  char message[256];
};

void png_on_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngErrorState*>(png_get_error_ptr(png));
  std::snprintf(st->message, sizeof(st->message), "%s", msg);
  png_longjmp(png, 1);
}

void png_on_warning(png_structp, png_const_charp) {}

struct PngInfo {
  png_uint_32 width = 0, height = 0;
  int bit_depth = 0, color_type = 0;
  int orientation = 1;
  bool has_exif = false;
  bool too_large = false;
  png_color palette[256];
  int num_palette = 0;
};

// Reads the rows as stored (gray/palette expanded to one byte per sample for depths < 8, 16-bit
// kept as big-endian pairs).
bool decode_png_raw(const uint8_t* data, size_t size, std::vector<uint8_t>& raw, size_t& row_bytes,
                    PngInfo& info, PngErrorState& st, bool want_exif) {
  PngSource src{data, size, 0};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_on_error, png_on_warning);
  if (!png) {
    std::snprintf(st.message, sizeof(st.message), "out of memory");
    return false;
  }
  png_infop pinfo = png_create_info_struct(png);
  if (!pinfo) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    std::snprintf(st.message, sizeof(st.message), "out of memory");
    return false;
  }
  png_bytep* volatile rows = nullptr;  // read after a longjmp
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &pinfo, nullptr);
    std::free(const_cast<png_bytep*>(rows));
    return false;
  }
  png_set_read_fn(png, &src, png_read_from_memory);
  // Pillow imposes no limit of its own beyond the pixel count; lift libpng's default 1M row/col cap
  // to the pixel-count check below.
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, pinfo);
  info.width = png_get_image_width(png, pinfo);
  info.height = png_get_image_height(png, pinfo);
  info.bit_depth = png_get_bit_depth(png, pinfo);
  info.color_type = png_get_color_type(png, pinfo);
  if (int64_t(info.width) > kMaxImagePixels || int64_t(info.height) > kMaxImagePixels ||
      int64_t(info.width) * int64_t(info.height) > kMaxImagePixels) {
    info.too_large = true;
    png_destroy_read_struct(&png, &pinfo, nullptr);
    return false;
  }
  if (info.color_type == PNG_COLOR_TYPE_PALETTE) {
    png_colorp pal = nullptr;
    int num = 0;
    if (png_get_PLTE(png, pinfo, &pal, &num) & PNG_INFO_PLTE) {
      info.num_palette = std::min(num, 256);
      for (int i = 0; i < info.num_palette; ++i) info.palette[i] = pal[i];
    }
  }
#ifdef PNG_eXIf_SUPPORTED
  if (want_exif) {
    png_bytep exif = nullptr;
    png_uint_32 exif_len = 0;
    if (png_get_eXIf_1(png, pinfo, &exif_len, &exif) & PNG_INFO_eXIf) {
      info.orientation = exif_orientation(exif, exif_len);
      info.has_exif = true;
    }
  }
#endif
  if (info.bit_depth < 8) png_set_packing(png);  // one byte per sample, values unscaled
  png_set_interlace_handling(png);
  png_read_update_info(png, pinfo);
  row_bytes = png_get_rowbytes(png, pinfo);
  raw.resize(row_bytes * info.height);
  rows = static_cast<png_bytep*>(std::malloc(sizeof(png_bytep) * info.height));
  if (!rows) png_error(png, "out of memory");
  for (png_uint_32 y = 0; y < info.height; ++y) rows[y] = raw.data() + row_bytes * y;
  png_read_image(png, const_cast<png_bytep*>(rows));
  // No png_read_end: like Pillow, chunks after the image data (or their absence) do not matter.
  std::free(const_cast<png_bytep*>(rows));
  rows = nullptr;
  png_destroy_read_struct(&png, &pinfo, nullptr);
  return true;
}

}  // namespace

// An eXIf chunk may also follow the image data, where png_read_info does not look; Pillow reads it there
// too (its getexif loads the whole file). The walk stops at IEND or at anything that is not a chunk, so
// trailing padding is never scanned.
int png_exif_orientation_after_idat(const uint8_t* p, size_t n) {
  size_t pos = 8;
  while (pos + 12 <= n) {
    const size_t len = (size_t(p[pos]) << 24) | (size_t(p[pos + 1]) << 16) | (size_t(p[pos + 2]) << 8) | p[pos + 3];
    const uint8_t* type = p + pos + 4;
    for (int i = 0; i < 4; ++i)
      if (!((type[i] >= 'A' && type[i] <= 'Z') || (type[i] >= 'a' && type[i] <= 'z'))) return 1;
    if (std::memcmp(type, "IEND", 4) == 0 || len > n - pos - 12) return 1;
    if (std::memcmp(type, "eXIf", 4) == 0) return exif_orientation(p + pos + 8, len);
    pos += 12 + len;
  }
  return 1;
}

Image decode_png(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  std::vector<uint8_t> raw;
  size_t row_bytes = 0;
  PngInfo info;
  PngErrorState st;
  st.message[0] = 0;
  if (!decode_png_raw(data, size, raw, row_bytes, info, st, want_exif)) {
    if (info.too_large) check_dimensions(name, info.width, info.height);
    throw InputError("cannot decode PNG image '" + name + "': " + (st.message[0] ? st.message : "unknown error"));
  }
  Image img;
  img.height = info.height;
  img.width = info.width;
  img.rgb.resize(img.pixels() * 3);
  const int depth = info.bit_depth;
  const bool b16 = depth == 16;
  for (int64_t y = 0; y < img.height; ++y) {
    const uint8_t* in = raw.data() + row_bytes * y;
    uint8_t* out = img.rgb.data() + y * img.width * 3;
    for (int64_t x = 0; x < img.width; ++x, out += 3) {
      switch (info.color_type) {
        case PNG_COLOR_TYPE_GRAY: {
          uint8_t v;
          if (b16) {
            // Pillow: mode I;16, and I;16 -> RGB clips at 255.
            unsigned s = (unsigned(in[2 * x]) << 8) | in[2 * x + 1];
            v = s < 256 ? uint8_t(s) : 255;
          } else if (depth == 8) {
            v = in[x];
          } else {
            // 1-bit: mode "1" (0/255); 2- and 4-bit: Pillow's unpackers scale by 0x55 / 0x11.
            static const int scale[5] = {0, 255, 0x55, 0, 0x11};
            v = uint8_t(in[x] * scale[depth]);
          }
          out[0] = out[1] = out[2] = v;
          break;
        }
        case PNG_COLOR_TYPE_GRAY_ALPHA: {  // LA (8-bit) / RGBA from "LA;16B": gray (high byte)
          uint8_t v = b16 ? in[4 * x] : in[2 * x];
          out[0] = out[1] = out[2] = v;
          break;
        }
        case PNG_COLOR_TYPE_PALETTE: {
          unsigned idx = in[x];
          if (int(idx) < info.num_palette) {
            out[0] = info.palette[idx].red, out[1] = info.palette[idx].green, out[2] = info.palette[idx].blue;
          } else {
            out[0] = out[1] = out[2] = 0;  // Pillow's palette entries past PLTE are zero
          }
          break;
        }
        case PNG_COLOR_TYPE_RGB:
          for (int c = 0; c < 3; ++c) out[c] = b16 ? in[6 * x + 2 * c] : in[3 * x + c];
          break;
        case PNG_COLOR_TYPE_RGB_ALPHA:
          for (int c = 0; c < 3; ++c) out[c] = b16 ? in[8 * x + 2 * c] : in[4 * x + c];
          break;
        default:
          throw InputError("cannot decode PNG image '" + name + "': unsupported colour type " +
                      std::to_string(info.color_type));
      }
    }
  }
  if (!want_exif) return img;
  return apply_orientation(std::move(img), info.has_exif ? info.orientation : png_exif_orientation_after_idat(data, size));
}

}  // namespace image_detail

using image_detail::png_on_warning;
// ---------------------------------------------------------------------------------------------

namespace {

struct PngWriteState {
  FILE* file;
  char message[256];
};

void png_write_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngWriteState*>(png_get_error_ptr(png));
  std::snprintf(st->message, sizeof(st->message), "%s", msg);
  png_longjmp(png, 1);
}

bool write_png_raw(PngWriteState& st, const Image& img) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &st, png_write_error, png_on_warning);
  if (!png) return false;
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_write_struct(&png, nullptr);
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_init_io(png, st.file);
  int type = img.channels == 1 ? PNG_COLOR_TYPE_GRAY
             : img.channels == 3 ? PNG_COLOR_TYPE_RGB
                                 : PNG_COLOR_TYPE_RGB_ALPHA;
  png_set_IHDR(png, info, png_uint_32(img.width), png_uint_32(img.height), 8, type, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const size_t stride = size_t(img.width) * size_t(img.channels);
  for (int64_t y = 0; y < img.height; ++y)
    png_write_row(png, const_cast<png_bytep>(img.rgb.data() + stride * size_t(y)));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

}  // namespace

void save_png(AtomicOutputs& out, const std::string& path, const Image& img) {
  if (img.channels != 1 && img.channels != 3 && img.channels != 4)
    throw Error("save_png('" + path + "'): " + std::to_string(img.channels) + " channels (expected 1, 3 or 4)");
  if (img.height <= 0 || img.width <= 0 || img.rgb.size() != img.pixels() * size_t(img.channels))
    throw Error("save_png('" + path + "'): image buffer does not match " + std::to_string(img.height) + "x" +
                std::to_string(img.width) + "x" + std::to_string(img.channels));
  PngWriteState st{out.add(path), {0}};
  if (!write_png_raw(st, img))
    throw Error("save_png: cannot write '" + path + "': " + (st.message[0] ? st.message : "I/O error"));
}

void save_png(const std::string& path, const Image& img) {
  AtomicOutputs out;
  save_png(out, path, img);
  out.commit();
}

}  // namespace vf
