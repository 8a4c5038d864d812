#include "io/image.h"

#include "io/file.h"

#include "core/errors.h"

// clang-format off
#include <cstdio>      // jpeglib.h needs FILE
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
// clang-format on

#include <algorithm>
#include <csetjmp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/tensor.h"

namespace vf {
namespace {

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError("cannot open image file '" + path + "'");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw InputError("cannot read image file '" + path + "'");
  return bytes;
}

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

Image apply_orientation(const Image& in, int orientation) {
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

// ---------------------------------------------------------------------------------------------
// JPEG. libjpeg's default error_exit calls exit(): ours longjmps back to decode_jpeg, which
// holds no C++ objects with destructors between setjmp and the libjpeg calls.

struct JpegError {
  jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool hit_eof;  // the data ended early (libjpeg then inserts a fake EOI and carries on)
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void jpeg_emit_message(j_common_ptr cinfo, int msg_level) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  // Warnings about corrupt data are tolerated as Pillow does; running out of data is not.
  if (msg_level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) err->hit_eof = true;
}

struct JpegResult {
  int width = 0, height = 0, components = 0;
  J_COLOR_SPACE out_space = JCS_UNKNOWN;
  int orientation = 1;
  const char* failure = nullptr;  // static text, or err.message
};

// Decodes into `pixels`; returns false with result.failure set (or components == -1 for
// dimensions over the limit) on error.
bool decode_jpeg_raw(const uint8_t* data, size_t size, std::vector<uint8_t>& pixels,
                     JpegResult& result, JpegError& err, bool want_exif) {
  jpeg_decompress_struct cinfo;
  std::memset(&cinfo, 0, sizeof(cinfo));
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jpeg_error_exit;
  err.pub.emit_message = jpeg_emit_message;
  err.hit_eof = false;
  err.message[0] = 0;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    result.failure = err.message;
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  if (want_exif) jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  if (err.hit_eof) {
    jpeg_destroy_decompress(&cinfo);
    result.failure = "the file is truncated (it ends inside the header)";
    return false;
  }
  result.width = static_cast<int>(cinfo.image_width);
  result.height = static_cast<int>(cinfo.image_height);
  int64_t w = cinfo.image_width, h = cinfo.image_height;
  if (w <= 0 || h <= 0 || w * h > kMaxImagePixels) {
    jpeg_destroy_decompress(&cinfo);
    result.failure = nullptr;
    result.components = -1;  // the caller reports the dimensions
    return false;
  }
  if (want_exif)
    for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
      if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0)
        result.orientation = exif_orientation(m->data, m->data_length);
  // Pillow asks libjpeg for L (grayscale), RGB (3 components, any colour transform libjpeg
  // detects) or CMYK (4 components, converted afterwards); islow DCT and fancy upsampling are
  // libjpeg's defaults and Pillow keeps them outside draft mode.
  switch (cinfo.num_components) {
    case 1: cinfo.out_color_space = JCS_GRAYSCALE; break;
    case 3: cinfo.out_color_space = JCS_RGB; break;
    case 4: cinfo.out_color_space = JCS_CMYK; break;
    default:
      jpeg_destroy_decompress(&cinfo);
      result.failure = "unsupported number of components (Pillow handles 1, 3 or 4)";
      return false;
  }
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  result.components = cinfo.output_components;
  result.out_space = cinfo.out_color_space;
  const size_t stride = size_t(cinfo.output_width) * cinfo.output_components;
  pixels.resize(stride * cinfo.output_height);
  // Stop at the first sign of missing data: the result is an error either way, and a few hundred
  // bytes can claim tens of millions of pixels that libjpeg would otherwise fill in one by one.
  while (cinfo.output_scanline < cinfo.output_height && !err.hit_eof) {
    JSAMPROW row = pixels.data() + stride * cinfo.output_scanline;
    if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) break;
  }
  if (err.hit_eof) {
    jpeg_destroy_decompress(&cinfo);
    result.failure = "the file is truncated (image data ends before the last scanline)";
    return false;
  }
  // A missing EOI after the last scanline is accepted, as Pillow does.
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  std::vector<uint8_t> pixels;
  JpegResult r;
  JpegError err;
  if (!decode_jpeg_raw(data, size, pixels, r, err, want_exif)) {
    if (r.components == -1) check_dimensions(name, r.width, r.height);
    throw InputError("cannot decode JPEG image '" + name + "': " + (r.failure ? r.failure : "unknown error"));
  }
  Image img;
  img.height = r.height;
  img.width = r.width;
  img.rgb.resize(img.pixels() * 3);
  const size_t n = img.pixels();
  uint8_t* out = img.rgb.data();
  if (r.components == 3) {
    img.rgb = std::move(pixels);
  } else if (r.components == 1) {
    for (size_t i = 0; i < n; ++i) out[3 * i] = out[3 * i + 1] = out[3 * i + 2] = pixels[i];
  } else if (r.components == 4) {
    // Pillow reads CMYK JPEGs as "CMYK;I" (Adobe's inverted polarity), then converts with
    // cmyk2rgb: channel = clip(nk - nk * c / 255) with nk = 255 - k and its rounded division.
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* p = &pixels[4 * i];
      int k = 255 - p[3];
      int nk = 255 - k;
      for (int c = 0; c < 3; ++c) {
        int v = 255 - p[c];
        int tmp = v * nk + 128;
        int muldiv = ((tmp >> 8) + tmp) >> 8;
        int o = nk - muldiv;
        out[3 * i + c] = static_cast<uint8_t>(o <= 0 ? 0 : o < 256 ? o : 255);
      }
    }
  } else {
    throw InputError("cannot decode JPEG image '" + name + "': unexpected output components");
  }
  return want_exif ? apply_orientation(img, r.orientation) : img;
}

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
    if (png_get_eXIf_1(png, pinfo, &exif_len, &exif) & PNG_INFO_eXIf) info.orientation = exif_orientation(exif, exif_len);
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
  return want_exif ? apply_orientation(img, info.orientation) : img;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const std::string& name, bool apply_exif_orientation) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) {
    auto [w, h] = png_header_size(data, size);
    if (w && h) check_dimensions(name, w, h);
    return decode_png(data, size, name, apply_exif_orientation);
  }
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) {
    auto [w, h] = jpeg_header_size(data, size);
    if (w && h) check_dimensions(name, w, h);
    return decode_jpeg(data, size, name, apply_exif_orientation);
  }
  throw InputError("image '" + name + "' is neither a JPEG nor a PNG file (unrecognised magic bytes; " +
              std::to_string(size) + " bytes)");
}

Image load_image(const std::string& path, bool apply_exif_orientation) {
  std::vector<uint8_t> bytes = read_file_bytes(path);
  return decode_image(bytes.data(), bytes.size(), path, apply_exif_orientation);
}

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
