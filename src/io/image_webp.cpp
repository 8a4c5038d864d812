// WebP (lossy, lossless, with alpha, animated: first frame) through libwebp's animation decoder, which
// is what Pillow's WebPImagePlugin uses: RGBA output, alpha then dropped (no compositing).
#include <webp/decode.h>
#include <webp/demux.h>

#include <cstring>
#include <memory>

#include "core/errors.h"
#include "io/image_codecs.h"

namespace vf::image_detail {
namespace {

uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// The payload of the RIFF chunk named `fourcc` (e.g. "EXIF"), or {nullptr, 0}.
std::pair<const uint8_t*, size_t> find_chunk(const uint8_t* data, size_t size, const char* fourcc) {
  size_t pos = 12;
  while (pos + 8 <= size) {
    const size_t len = le32(data + pos + 4);
    if (len > size - pos - 8) break;
    if (std::memcmp(data + pos, fourcc, 4) == 0) return {data + pos + 8, len};
    pos += 8 + len + (len & 1);
  }
  return {nullptr, 0};
}

}  // namespace

Image decode_webp(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  auto fail = [&](const std::string& why) -> void { throw InputError("cannot decode WebP image '" + name + "': " + why); };
  // Bytes after the RIFF chunk are not part of the image (and are never touched).
  const uint64_t riff_end = uint64_t(le32(data + 4)) + 8;
  if (riff_end > size) fail("the file is truncated (" + std::to_string(size) + " of " + std::to_string(riff_end) + " bytes)");
  size = size_t(riff_end);
  WebPBitstreamFeatures features;
  if (WebPGetFeatures(data, size, &features) != VP8_STATUS_OK) fail("invalid or unsupported WebP header");
  check_dimensions(name, features.width, features.height);

  WebPAnimDecoderOptions options;
  if (!WebPAnimDecoderOptionsInit(&options)) fail("libwebp version mismatch");
  options.color_mode = MODE_RGBA;
  options.use_threads = 0;
  WebPData webp{data, size};
  std::unique_ptr<WebPAnimDecoder, void (*)(WebPAnimDecoder*)> dec(WebPAnimDecoderNew(&webp, &options),
                                                                   WebPAnimDecoderDelete);
  if (!dec) fail("invalid WebP data");
  WebPAnimInfo info;
  if (!WebPAnimDecoderGetInfo(dec.get(), &info)) fail("invalid WebP data");
  check_dimensions(name, info.canvas_width, info.canvas_height);
  uint8_t* rgba = nullptr;
  int timestamp = 0;
  if (!WebPAnimDecoderGetNext(dec.get(), &rgba, &timestamp) || !rgba) fail("corrupt or truncated image data");

  Image img;
  img.width = info.canvas_width, img.height = info.canvas_height;
  img.rgb.resize(img.pixels() * 3);
  const size_t n = img.pixels();
  for (size_t i = 0; i < n; ++i) std::memcpy(&img.rgb[3 * i], rgba + 4 * i, 3);
  if (!want_exif) return img;
  auto [exif, exif_size] = find_chunk(data, size, "EXIF");
  return exif ? apply_orientation(std::move(img), exif_orientation(exif, exif_size)) : img;
}

}  // namespace vf::image_detail
