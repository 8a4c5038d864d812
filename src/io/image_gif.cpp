// GIF through giflib, first frame only, composed as Pillow's GifImagePlugin composes frame 0:
//  - the canvas is the logical screen, grown to hold the frame when the frame reaches past it;
//  - it starts filled with the transparent index (from the graphic control extension) when there is
//    one, else with index 0, and the frame's pixels are placed at its offset;
//  - the frame's local palette, else the global one, maps indices to RGB; with no palette (or one that
//    is the identity grey ramp, which Pillow reads as mode "L") an index is its own grey level;
//  - the transparent index keeps its palette colour: convert("RGB") drops transparency.
#include <gif_lib.h>

#include <cstring>
#include <vector>

#include "core/errors.h"
#include "io/image_codecs.h"

namespace vf::image_detail {
namespace {

struct GifSource {
  const uint8_t* data;
  size_t size;
  size_t pos;
};

int gif_read(GifFileType* gif, GifByteType* out, int n) {
  auto* src = static_cast<GifSource*>(gif->UserData);
  size_t k = std::min(size_t(n < 0 ? 0 : n), src->size - src->pos);
  std::memcpy(out, src->data + src->pos, k);
  src->pos += k;
  return int(k);
}

struct GifCloser {
  GifFileType* gif;
  ~GifCloser() {
    int err = 0;
    if (gif) DGifCloseFile(gif, &err);
  }
};

// Pillow's _is_palette_needed: a palette that maps every index to its own grey level is dropped.
bool is_grey_ramp(const ColorMapObject* map) {
  for (int i = 0; i < map->ColorCount; ++i) {
    const GifColorType& c = map->Colors[i];
    if (c.Red != i || c.Green != i || c.Blue != i) return false;
  }
  return true;
}

}  // namespace

Image decode_gif(const uint8_t* data, size_t size, const std::string& name, bool want_exif) {
  auto fail = [&](const std::string& why) -> void { throw InputError("cannot decode GIF image '" + name + "': " + why); };
  auto gif_fail = [&](GifFileType* gif, int code) {
    const char* msg = GifErrorString(gif ? gif->Error : code);
    fail(code == D_GIF_ERR_READ_FAILED || (gif && gif->Error == D_GIF_ERR_READ_FAILED)
             ? std::string("the file is truncated")
             : std::string(msg ? msg : "unknown giflib error"));
  };
  GifSource src{data, size, 0};
  int err = 0;
  GifFileType* gif = DGifOpen(&src, gif_read, &err);
  if (!gif) gif_fail(nullptr, err);
  GifCloser closer{gif};
  int64_t width = gif->SWidth, height = gif->SHeight;

  int transparency = -1;
  for (;;) {
    GifRecordType type;
    if (DGifGetRecordType(gif, &type) == GIF_ERROR) gif_fail(gif, 0);
    if (type == TERMINATE_RECORD_TYPE) fail("the file holds no image");
    if (type == EXTENSION_RECORD_TYPE) {
      int code = 0;
      GifByteType* block = nullptr;
      if (DGifGetExtension(gif, &code, &block) == GIF_ERROR) gif_fail(gif, 0);
      if (code == GRAPHICS_EXT_FUNC_CODE && block && block[0] >= 4 && (block[1] & 1)) transparency = block[4];
      while (block) {
        if (DGifGetExtensionNext(gif, &block) == GIF_ERROR) gif_fail(gif, 0);
      }
      continue;
    }
    if (type != IMAGE_DESC_RECORD_TYPE) continue;
    if (DGifGetImageDesc(gif) == GIF_ERROR) gif_fail(gif, 0);
    const GifImageDesc& d = gif->Image;
    const int64_t x0 = d.Left, y0 = d.Top, fw = d.Width, fh = d.Height;
    width = std::max(width, x0 + fw), height = std::max(height, y0 + fh);
    check_dimensions(name, width, height);
    const ColorMapObject* map = d.ColorMap ? d.ColorMap : gif->SColorMap;
    if (map && is_grey_ramp(map)) map = nullptr;

    std::vector<uint8_t> index(size_t(width) * size_t(height), uint8_t(transparency >= 0 ? transparency : 0));
    std::vector<GifPixelType> line(size_t(std::max<int64_t>(fw, 1)));
    // Interlaced frames store rows in four passes: every 8th from 0, every 8th from 4, every 4th from 2,
    // every 2nd from 1.
    static const int kStart[4] = {0, 4, 2, 1}, kStep[4] = {8, 8, 4, 2};
    const int passes = d.Interlace ? 4 : 1;
    for (int pass = 0; pass < passes; ++pass) {
      const int64_t start = d.Interlace ? kStart[pass] : 0, step = d.Interlace ? kStep[pass] : 1;
      for (int64_t y = start; y < fh; y += step) {
        if (fw > 0 && DGifGetLine(gif, line.data(), int(fw)) == GIF_ERROR) gif_fail(gif, 0);
        std::memcpy(&index[size_t(y0 + y) * size_t(width) + size_t(x0)], line.data(), size_t(fw));
      }
    }
    Image img;
    img.width = width, img.height = height;
    img.rgb.resize(img.pixels() * 3);
    for (size_t i = 0; i < index.size(); ++i) {
      uint8_t* o = &img.rgb[3 * i];
      const unsigned v = index[i];
      if (!map) {
        o[0] = o[1] = o[2] = uint8_t(v);
      } else if (int(v) < map->ColorCount) {
        o[0] = map->Colors[v].Red, o[1] = map->Colors[v].Green, o[2] = map->Colors[v].Blue;
      } else {
        o[0] = o[1] = o[2] = 0;  // past the palette
      }
    }
    (void)want_exif;  // GIF carries no EXIF
    return img;
  }
}

}  // namespace vf::image_detail
