// JPEG through libjpeg-turbo, set up as Pillow's JpegDecode.c sets it up.
#include <cstdio>  // jpeglib.h needs FILE
#include <cstring>
#include <csetjmp>
#include <vector>

// clang-format off
#include <jpeglib.h>
#include <jerror.h>
// clang-format on

#include "core/errors.h"
#include "io/image_codecs.h"

namespace vf::image_detail {
namespace {

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

// Called by libjpeg before each pass over the input, so once per scan of a progressive file.
void jpeg_count_scans(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number > kMaxJpegScans) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    std::snprintf(err->message, sizeof(err->message),
                  "more than %d scans (a progressive JPEG this fragmented is refused: decoding it would take "
                  "minutes of CPU)",
                  kMaxJpegScans);
    longjmp(err->jump, 1);
  }
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
  jpeg_progress_mgr progress{};
  progress.progress_monitor = jpeg_count_scans;
  cinfo.progress = &progress;
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
  if (want_exif)  // the first Exif APP1 counts, as in Pillow's JpegImagePlugin
    for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
      if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
        result.orientation = exif_orientation(m->data, m->data_length);
        break;
      }
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

}  // namespace

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

}  // namespace vf::image_detail
