// TIFF through libtiff (any compression libtiff decodes: none, LZW, Deflate, PackBits, JPEG, ...), first
// image (IFD 0), samples unpacked as Pillow's TiffImagePlugin unpacks them (its OPEN_INFO table):
//  - grey (PhotometricInterpretation 0/1) at 1/2/4/8 bits, scaled to 8 bits, WhiteIsZero inverted;
//    16-bit grey clipped at 255 (Pillow's I;16 -> RGB), signed 16-bit clipped to 0..255;
//  - palette (3) at 1/2/4/8 bits, the colour map's 16-bit entries taken by their high byte;
//  - RGB (2) at 8 or 16 bits (16: high byte), extra samples dropped, associated (premultiplied)
//    alpha divided out first as Pillow's RGBa unpacker does;
//  - CMYK (5) at 8 or 16 bits through Pillow's cmyk2rgb; YCbCr (6) when JPEG-compressed (libjpeg converts
//    it to RGB, as Pillow asks libtiff to).
// Contiguous or planar samples, strips or tiles. Float and 32-bit samples are refused. The Orientation
// tag is applied on decode, as Pillow applies it on load (and once more with EXIF orientation on).
#include <tiffio.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "core/errors.h"
#include "io/image_codecs.h"

namespace vf::image_detail {
namespace {

struct TiffSource {
  const uint8_t* data;
  size_t size;
  uint64_t pos = 0;
  std::string error;  // libtiff's first error message
};

tsize_t tiff_read(thandle_t h, tdata_t out, tsize_t n) {
  auto* s = static_cast<TiffSource*>(h);
  if (n <= 0 || s->pos >= s->size) return 0;
  size_t k = std::min<uint64_t>(uint64_t(n), s->size - s->pos);
  std::memcpy(out, s->data + s->pos, k);
  s->pos += k;
  return tsize_t(k);
}
tsize_t tiff_write(thandle_t, tdata_t, tsize_t) { return 0; }
toff_t tiff_seek(thandle_t h, toff_t off, int whence) {
  auto* s = static_cast<TiffSource*>(h);
  uint64_t base = whence == SEEK_SET ? 0 : whence == SEEK_CUR ? s->pos : s->size;
  s->pos = base + off;
  return s->pos;
}
int tiff_close(thandle_t) { return 0; }
toff_t tiff_size(thandle_t h) { return static_cast<TiffSource*>(h)->size; }
int tiff_map(thandle_t h, tdata_t* base, toff_t* size) {
  auto* s = static_cast<TiffSource*>(h);
  *base = const_cast<uint8_t*>(s->data);
  *size = s->size;
  return 1;
}
void tiff_unmap(thandle_t, tdata_t, toff_t) {}

int tiff_on_error(TIFF*, void* user, const char* module, const char* fmt, va_list ap) {
  auto* s = static_cast<TiffSource*>(user);
  if (s->error.empty()) {
    char buf[512];
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    s->error = buf;
  }
  return 1;
}
int tiff_on_warning(TIFF*, void*, const char*, const char*, va_list) { return 1; }

uint8_t clip8(int64_t v) { return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v); }

// Pillow's cmyk2rgb: channel = clip(nk - nk * c / 255) with nk = 255 - k and its rounded division.
uint8_t cmyk_channel(int c, int k) {
  int nk = 255 - k;
  int tmp = c * nk + 128;
  return clip8(nk - (((tmp >> 8) + tmp) >> 8));
}

}  // namespace

Image decode_tiff(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  TiffSource src{data, size, 0, {}};
  auto fail = [&](const std::string& why) -> void {
    throw InputError("cannot decode TIFF image '" + name + "': " + why + (src.error.empty() ? "" : " (" + src.error + ")"));
  };
  std::unique_ptr<TIFFOpenOptions, void (*)(TIFFOpenOptions*)> opts(TIFFOpenOptionsAlloc(), TIFFOpenOptionsFree);
  TIFFOpenOptionsSetErrorHandlerExtR(opts.get(), tiff_on_error, &src);
  TIFFOpenOptionsSetWarningHandlerExtR(opts.get(), tiff_on_warning, &src);
  // No single allocation beyond what the largest allowed image needs (libtiff's own default is 256 MiB).
  TIFFOpenOptionsSetMaxSingleMemAlloc(opts.get(), tmsize_t(kMaxImagePixels) * 8);
  std::unique_ptr<TIFF, void (*)(TIFF*)> tif(
      TIFFClientOpenExt(name.c_str(), "r", &src, tiff_read, tiff_write, tiff_seek, tiff_close, tiff_size, tiff_map,
                        tiff_unmap, opts.get()),
      TIFFClose);
  if (!tif) fail("not a readable TIFF file");
  TIFF* t = tif.get();

  uint32_t w32 = 0, h32 = 0;
  if (!TIFFGetField(t, TIFFTAG_IMAGEWIDTH, &w32) || !TIFFGetField(t, TIFFTAG_IMAGELENGTH, &h32))
    fail("the image has no width or height");
  check_dimensions(name, w32, h32);
  const size_t W = w32, H = h32;
  uint16_t spp = 1, bps = 1, photometric = 0, planar = 1, sample_format = 1, compression = 1;
  TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLESPERPIXEL, &spp);
  TIFFGetFieldDefaulted(t, TIFFTAG_BITSPERSAMPLE, &bps);
  TIFFGetFieldDefaulted(t, TIFFTAG_PLANARCONFIG, &planar);
  TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLEFORMAT, &sample_format);
  TIFFGetFieldDefaulted(t, TIFFTAG_COMPRESSION, &compression);
  if (!TIFFGetField(t, TIFFTAG_PHOTOMETRIC, &photometric)) photometric = 0;  // Pillow's default
  uint16_t extra_count = 0;
  uint16_t* extra = nullptr;
  TIFFGetField(t, TIFFTAG_EXTRASAMPLES, &extra_count, &extra);
  const bool associated_alpha = extra_count > 0 && extra && extra[0] == EXTRASAMPLE_ASSOCALPHA;
  uint16_t orientation = 1;
  TIFFGetField(t, TIFFTAG_ORIENTATION, &orientation);

  auto layout = [&] {
    return "photometric " + std::to_string(photometric) + ", " + std::to_string(spp) + " samples of " +
           std::to_string(bps) + " bits, sample format " + std::to_string(sample_format);
  };
  if (sample_format != SAMPLEFORMAT_UINT && !(sample_format == SAMPLEFORMAT_INT && bps == 16 && photometric == 1))
    fail("unsupported sample layout (" + layout() + ")");
  int colour_samples;
  switch (photometric) {
    case PHOTOMETRIC_MINISWHITE:
    case PHOTOMETRIC_MINISBLACK:
      colour_samples = 1;
      if (bps != 1 && bps != 2 && bps != 4 && bps != 8 && bps != 16) fail("unsupported grey depth (" + layout() + ")");
      break;
    case PHOTOMETRIC_PALETTE:
      colour_samples = 1;
      if (bps != 1 && bps != 2 && bps != 4 && bps != 8) fail("unsupported palette depth (" + layout() + ")");
      break;
    case PHOTOMETRIC_RGB: colour_samples = 3; break;
    case PHOTOMETRIC_SEPARATED: colour_samples = 4; break;
    case PHOTOMETRIC_YCBCR:
      if (compression != COMPRESSION_JPEG || planar != PLANARCONFIG_CONTIG)
        fail("YCbCr samples are only read JPEG-compressed (" + layout() + ")");
      // libjpeg upsamples and converts to RGB; libtiff then reports 3 samples per pixel.
      TIFFSetField(t, TIFFTAG_JPEGCOLORMODE, JPEGCOLORMODE_RGB);
      colour_samples = 3;
      break;
    default:
      fail("unsupported photometric interpretation (" + layout() + ")");
  }
  if (spp < colour_samples || spp > 6) fail("unsupported number of samples (" + layout() + ")");
  if (colour_samples > 1 && bps != 8 && bps != 16) fail("unsupported sample depth (" + layout() + ")");

  // Samples are read into one buffer per plane (one plane when contiguous), `row_bytes[p]` per row.
  const int planes = planar == PLANARCONFIG_SEPARATE ? spp : 1;
  const int per_plane = planar == PLANARCONFIG_SEPARATE ? 1 : spp;
  const size_t row_bytes = (W * bps * per_plane + 7) / 8;
  // Uncompressed samples must all be in the file: checked before allocating, since a few corrupt header
  // bytes can claim a hundred million pixels.
  if (compression == COMPRESSION_NONE && row_bytes * H * size_t(planes) > size)
    fail("the file is truncated (" + std::to_string(size) + " bytes cannot hold " + std::to_string(W) + "x" +
         std::to_string(H) + " uncompressed pixels)");
  std::vector<std::vector<uint8_t>> plane(planes, std::vector<uint8_t>(row_bytes * H));
  if (TIFFIsTiled(t)) {
    uint32_t tw = 0, th = 0;
    TIFFGetField(t, TIFFTAG_TILEWIDTH, &tw);
    TIFFGetField(t, TIFFTAG_TILELENGTH, &th);
    if (tw == 0 || th == 0 || (uint64_t(tw) * bps * per_plane) % 8 != 0) fail("invalid tile size");
    const tmsize_t tile_size = TIFFTileSize(t);
    const size_t tile_row = size_t(tw) * bps * per_plane / 8;
    if (tile_size <= 0 || size_t(tile_size) < tile_row * th) fail("invalid tile size");
    std::vector<uint8_t> buf(static_cast<size_t>(tile_size));
    for (int p = 0; p < planes; ++p)
      for (uint32_t ty = 0; ty < H; ty += th)
        for (uint32_t tx = 0; tx < W; tx += tw) {
          if (TIFFReadEncodedTile(t, TIFFComputeTile(t, tx, ty, 0, uint16_t(p)), buf.data(), tile_size) < 0)
            fail("cannot read tile at " + std::to_string(tx) + "," + std::to_string(ty));
          const size_t x_bytes = size_t(tx) * bps * per_plane / 8;
          const size_t n = std::min(tile_row, row_bytes - x_bytes);
          for (uint32_t y = 0; y < th && ty + y < H; ++y)
            std::memcpy(&plane[p][(ty + y) * row_bytes + x_bytes], &buf[y * tile_row], n);
        }
  } else {
    uint32_t rps = 0;
    TIFFGetFieldDefaulted(t, TIFFTAG_ROWSPERSTRIP, &rps);
    if (rps == 0 || rps > H) rps = uint32_t(H);
    const uint32_t strips = uint32_t((H + rps - 1) / rps);
    if (TIFFNumberOfStrips(t) < strips * uint32_t(planes)) fail("fewer strips than the image needs");
    for (int p = 0; p < planes; ++p)
      for (uint32_t s = 0; s < strips; ++s) {
        const size_t y = size_t(s) * rps, rows = std::min<size_t>(rps, H - y);
        const tmsize_t want = tmsize_t(rows * row_bytes);
        tmsize_t got = TIFFReadEncodedStrip(t, uint32_t(p) * strips + s, &plane[p][y * row_bytes], want);
        if (got < want) fail("cannot read strip " + std::to_string(s) + (got >= 0 ? " (the file is truncated)" : ""));
      }
  }

  // Sample `c` of pixel `x` in row `y`, as stored (16-bit values in host order, as libtiff returns them).
  auto sample = [&](size_t y, size_t x, int c) -> unsigned {
    const int p = planes > 1 ? c : 0;
    const size_t idx = planes > 1 ? x : x * spp + size_t(c);
    const uint8_t* row = &plane[p][y * row_bytes];
    switch (bps) {
      case 8: return row[idx];
      case 16: {
        uint16_t v;
        std::memcpy(&v, row + 2 * idx, 2);
        return v;
      }
      default: {
        const size_t bit = idx * bps;
        return (row[bit / 8] >> (8 - bps - bit % 8)) & ((1u << bps) - 1);
      }
    }
  };
  uint16_t *red = nullptr, *green = nullptr, *blue = nullptr;
  if (photometric == PHOTOMETRIC_PALETTE && !TIFFGetField(t, TIFFTAG_COLORMAP, &red, &green, &blue))
    fail("a palette image without a colour map");

  Image img;
  img.width = int64_t(W), img.height = int64_t(H);
  img.rgb.resize(img.pixels() * 3);
  const bool sixteen = bps == 16;
  for (size_t y = 0; y < H; ++y)
    for (size_t x = 0; x < W; ++x) {
      uint8_t* o = &img.rgb[3 * (y * W + x)];
      switch (photometric) {
        case PHOTOMETRIC_MINISWHITE:
        case PHOTOMETRIC_MINISBLACK: {
          const unsigned v = sample(y, x, 0);
          uint8_t g;
          if (sixteen) {
            // Pillow reads 16-bit grey as I;16 (or I;16S) and converts to RGB by clipping, not scaling,
            // and does not invert WhiteIsZero at this depth.
            g = sample_format == SAMPLEFORMAT_INT ? clip8(int16_t(v)) : clip8(v);
          } else {
            static const unsigned scale[9] = {0, 255, 0x55, 0, 0x11, 0, 0, 0, 1};
            g = uint8_t(v * scale[bps]);
            if (photometric == PHOTOMETRIC_MINISWHITE) g = uint8_t(255 - g);
          }
          o[0] = o[1] = o[2] = g;
          break;
        }
        case PHOTOMETRIC_PALETTE: {
          const unsigned i = sample(y, x, 0);
          o[0] = uint8_t(red[i] >> 8), o[1] = uint8_t(green[i] >> 8), o[2] = uint8_t(blue[i] >> 8);
          break;
        }
        case PHOTOMETRIC_SEPARATED: {
          unsigned s[4];
          for (int c = 0; c < 4; ++c) s[c] = sixteen ? sample(y, x, c) >> 8 : sample(y, x, c);
          for (int c = 0; c < 3; ++c) o[c] = cmyk_channel(int(s[c]), int(s[3]));
          break;
        }
        default: {  // RGB, and YCbCr converted to RGB by the JPEG codec
          for (int c = 0; c < 3; ++c) o[c] = uint8_t(sixteen ? sample(y, x, c) >> 8 : sample(y, x, c));
          if (associated_alpha && spp >= 4 && photometric == PHOTOMETRIC_RGB) {
            const unsigned a = sixteen ? sample(y, x, 3) >> 8 : sample(y, x, 3);
            for (int c = 0; c < 3; ++c) o[c] = a == 0 ? 0 : a == 255 ? o[c] : clip8(o[c] * 255 / a);
          }
          break;
        }
      }
    }
  // Pillow's TiffImageFile.load_end transposes by the Orientation tag whenever the pixels are loaded, and
  // keeps the tag: ImageOps.exif_transpose (transformers' load_image) then transposes by it once more.
  img = apply_orientation(std::move(img), orientation);
  return want_exif ? apply_orientation(std::move(img), orientation) : img;
}

}  // namespace vf::image_detail
