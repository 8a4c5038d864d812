#!/usr/bin/python3
"""Writes tests/data/formats: small images in every format and layout vf reads, each beside Pillow's decode.

Run with Debian's Python (python3-pil):  /usr/bin/python3 scripts/make-format-fixtures.py

For every image NAME.EXT it writes NAME.EXT.rgb, the raw bytes of `Image.open(f).convert("RGB")` (what the
reference processors start from), and a line "FILE WIDTH HEIGHT EXIF" in manifest.txt. EXIF = 1 marks the
files that carry an EXIF orientation: their .rgb is `ImageOps.exif_transpose(Image.open(f)).convert("RGB")`,
as transformers' load_image does, and the test decodes them with apply_exif_orientation.
Layouts Pillow cannot write (16-bit RGB PNG, BMP bitfields and RLE, GIF frame offsets, planar / tiled TIFF,
...) are assembled byte by byte here; Pillow still decodes all of them.
"""
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "formats")
W, H = 23, 17  # odd sizes: row padding, odd chroma, partial tiles and strips
rng = np.random.default_rng(20261201)
manifest = []


def base_rgb():
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 11, y * 15, (x * y) % 256], axis=-1).astype(np.int32)
    img += rng.integers(-20, 21, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


RGB = base_rgb()
ALPHA = ((np.arange(W)[None, :] * 12 + np.arange(H)[:, None] * 7) % 256).astype(np.uint8)
GRAY = RGB[..., 1].copy()


def record(name, data, exif=False):
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(data)
    im = Image.open(path)
    if exif:
        im = ImageOps.exif_transpose(im)
    rgb = im.convert("RGB")
    with open(path + ".rgb", "wb") as f:
        f.write(rgb.tobytes())
    manifest.append(f"{name} {rgb.width} {rgb.height} {int(exif)}")


def pil_bytes(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def exif_with_orientation(o):
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


# ---- PNG -------------------------------------------------------------------------------------

def png(width, height, depth, ctype, rows, extra_chunks=(), interlace=0, chunks_after=()):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"".join(b"\0" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, interlace)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    for t, d in extra_chunks:
        out += chunk(t, d)
    out += chunk(b"IDAT", zlib.compress(raw))
    for t, d in chunks_after:
        out += chunk(t, d)
    return out + chunk(b"IEND", b"")


def pack_bits(values, bits):  # MSB-first packing of one row
    out, acc, n = bytearray(), 0, 0
    for v in values:
        acc = (acc << bits) | int(v)
        n += bits
        if n == 8:
            out.append(acc)
            acc, n = 0, 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


def make_png():
    rgb = Image.fromarray(RGB)
    record("rgb8.png", pil_bytes(rgb, "PNG"))
    record("rgb8-interlaced.png", pil_bytes(rgb, "PNG", interlace=1))
    record("rgba8.png", pil_bytes(Image.fromarray(np.dstack([RGB, ALPHA])), "PNG"))
    record("gray8.png", pil_bytes(Image.fromarray(GRAY), "PNG"))
    record("gray-alpha8.png", pil_bytes(Image.fromarray(np.dstack([GRAY, ALPHA])), "PNG"))
    for bits in (1, 2, 4):
        rows = [pack_bits(GRAY[y] >> (8 - bits), bits) for y in range(H)]
        record(f"gray{bits}.png", png(W, H, bits, 0, rows))
    g16 = (GRAY.astype(np.uint16) * 3 + 100)  # values above and below 255: clipped, not scaled
    record("gray16.png", png(W, H, 16, 0, [g16[y].astype(">u2").tobytes() for y in range(H)]))
    rgb16 = RGB.astype(np.uint16) * 257 + rng.integers(0, 200, size=RGB.shape).astype(np.uint16)
    record("rgb16.png", png(W, H, 16, 2, [rgb16[y].astype(">u2").tobytes() for y in range(H)]))
    rgba16 = np.dstack([rgb16, ALPHA.astype(np.uint16) * 257])
    record("rgba16.png", png(W, H, 16, 6, [rgba16[y].astype(">u2").tobytes() for y in range(H)]))
    ga16 = np.dstack([g16, ALPHA.astype(np.uint16) * 257])
    record("gray-alpha16.png", png(W, H, 16, 4, [ga16[y].astype(">u2").tobytes() for y in range(H)]))
    pal = rgb.quantize(colors=40)
    record("palette8.png", pil_bytes(pal, "PNG"))
    record("palette8-trns.png", pil_bytes(pal, "PNG", transparency=bytes(range(0, 200, 5))))
    idx4 = (GRAY >> 4)
    plte = bytes(np.array([[i * 16, 255 - i * 16, (i * 37) % 256] for i in range(16)], np.uint8).tobytes())
    record("palette4.png", png(W, H, 4, 3, [pack_bits(idx4[y], 4) for y in range(H)], [(b"PLTE", plte)]))
    record("rgb8-exif6.png", pil_bytes(rgb, "PNG", exif=exif_with_orientation(6)), exif=True)
    record("rgb8-exif3.png", pil_bytes(rgb, "PNG", exif=exif_with_orientation(3)), exif=True)
    # eXIf after the image data (allowed by the PNG spec; Pillow finds it there too).
    record("rgb8-exif8-after-idat.png", png(W, H, 8, 2, [RGB[y].tobytes() for y in range(H)],
                                            chunks_after=[(b"eXIf", exif_with_orientation(8)[6:])]), exif=True)


# ---- JPEG ------------------------------------------------------------------------------------

def make_jpeg():
    rgb = Image.fromarray(RGB)
    record("baseline.jpg", pil_bytes(rgb, "JPEG", quality=90))
    record("baseline-444.jpg", pil_bytes(rgb, "JPEG", quality=90, subsampling=0))
    record("progressive.jpg", pil_bytes(rgb, "JPEG", quality=85, progressive=True))
    record("gray.jpg", pil_bytes(Image.fromarray(GRAY), "JPEG", quality=90))
    record("cmyk.jpg", pil_bytes(rgb.convert("CMYK"), "JPEG", quality=90))
    record("exif8.jpg", pil_bytes(rgb, "JPEG", quality=90, exif=exif_with_orientation(8)), exif=True)


# ---- WebP ------------------------------------------------------------------------------------

def make_webp():
    rgb = Image.fromarray(RGB)
    rgba = Image.fromarray(np.dstack([RGB, ALPHA]))
    record("lossy.webp", pil_bytes(rgb, "WEBP", quality=80))
    record("lossless.webp", pil_bytes(rgb, "WEBP", lossless=True))
    record("lossy-alpha.webp", pil_bytes(rgba, "WEBP", quality=80))
    record("lossless-alpha.webp", pil_bytes(rgba, "WEBP", lossless=True, exact=True))
    record("lossy-exif6.webp", pil_bytes(rgb, "WEBP", quality=80, exif=exif_with_orientation(6)), exif=True)
    record("lossless-exif5.webp", pil_bytes(rgb, "WEBP", lossless=True, exif=exif_with_orientation(5)),
           exif=True)


# ---- BMP -------------------------------------------------------------------------------------

def bmp(bits, rows_bottom_up, header_size=40, compression=0, palette=b"", masks=b"", top_down=False,
        width=W, height=H, colors=0):
    """rows_bottom_up: the pixel data rows in file order, already padded."""
    pixels = b"".join(rows_bottom_up)
    if header_size == 12:
        info = struct.pack("<IHHHH", 12, width, height, 1, bits)
    else:
        h = -height if top_down else height
        info = struct.pack("<IiiHHIIiiII", header_size, width, h, 1, bits, compression, len(pixels), 2835, 2835,
                           colors, 0)
        if header_size > 40:
            info += masks.ljust(header_size - 40, b"\0")
            masks = b""
    off = 14 + len(info) + len(masks) + len(palette)
    head = b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off)
    return head + info + masks + palette + pixels


def pad4(b):
    return b + b"\0" * (-len(b) % 4)


def make_bmp():
    rgb = Image.fromarray(RGB)
    record("rgb24.bmp", pil_bytes(rgb, "BMP"))
    record("gray8.bmp", pil_bytes(Image.fromarray(GRAY), "BMP"))
    record("palette8.bmp", pil_bytes(rgb.quantize(colors=50), "BMP"))
    record("bilevel1.bmp", pil_bytes(Image.fromarray(GRAY).convert("1"), "BMP"))
    flipped = RGB[::-1]
    bgrx = [np.concatenate([r[:, ::-1], np.full((W, 1), 7, np.uint8)], axis=1).tobytes() for r in flipped]
    record("bgrx32.bmp", bmp(32, bgrx))
    bgra = [np.concatenate([r[:, ::-1], a[:, None]], axis=1).tobytes() for r, a in zip(flipped, ALPHA[::-1])]
    record("bgra32-v4.bmp", bmp(32, bgra, header_size=108, compression=3,
                                masks=struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000)))
    rgba = [np.concatenate([r, a[:, None]], axis=1).tobytes() for r, a in zip(flipped, ALPHA[::-1])]
    record("rgba32-v5.bmp", bmp(32, rgba, header_size=124, compression=3,
                                masks=struct.pack("<IIII", 0xFF, 0xFF00, 0xFF0000, 0xFF000000)))
    r5, g5, b5 = (flipped[..., 0] >> 3).astype(np.uint16), (flipped[..., 1] >> 3).astype(np.uint16), \
        (flipped[..., 2] >> 3).astype(np.uint16)
    p555 = (r5 << 10) | (g5 << 5) | b5
    record("rgb555.bmp", bmp(16, [pad4(row.astype("<u2").tobytes()) for row in p555]))
    g6 = (flipped[..., 1] >> 2).astype(np.uint16)
    p565 = (r5 << 11) | (g6 << 5) | b5
    record("rgb565-bitfields.bmp", bmp(16, [pad4(row.astype("<u2").tobytes()) for row in p565], compression=3,
                                       masks=struct.pack("<III", 0xF800, 0x7E0, 0x1F)))
    record("rgb24-topdown.bmp", bmp(24, [pad4(r[..., ::-1].tobytes()) for r in RGB], top_down=True))
    record("rgb24-os2.bmp", bmp(24, [pad4(r[..., ::-1].tobytes()) for r in flipped], header_size=12))
    pal16 = np.array([[(i * 16) % 256, (255 - i * 13) % 256, (i * 41) % 256, 0] for i in range(16)], np.uint8)
    idx4 = (GRAY[::-1] >> 4)
    record("palette4.bmp", bmp(4, [pad4(pack_bits(r, 4)) for r in idx4], palette=pal16.tobytes(), colors=16))
    # RLE8: each row as runs of equal indices (encoded mode) plus one absolute run, end-of-line, end.
    idx8 = (GRAY[::-1] >> 3)
    pal32 = np.array([[(i * 8) % 256, (i * 29) % 256, 255 - i * 8, 0] for i in range(32)], np.uint8)
    rle = bytearray()
    for r in idx8:
        x = 0
        while x < W:
            if x + 6 <= W and x % 7 == 3:  # absolute run of 5 pixels (odd: padded to a word)
                rle += bytes([0, 5]) + bytes(r[x:x + 5].tolist()) + b"\0"
                x += 5
                continue
            n = 1
            while x + n < W and r[x + n] == r[x] and n < 255:
                n += 1
            rle += bytes([n, r[x]])
            x += n
        rle += b"\0\0"
    rle += b"\0\1"
    record("palette8-rle.bmp", bmp(8, [bytes(rle)], compression=1, palette=pal32.tobytes(), colors=32))
    rle4 = bytearray()
    for r in idx4:
        for x in range(0, W - 1, 2):
            rle4 += bytes([2, (r[x] << 4) | r[x + 1]])
        rle4 += bytes([1, r[W - 1] << 4]) + b"\0\0"
    rle4 += b"\0\1"
    record("palette4-rle.bmp", bmp(4, [bytes(rle4)], compression=2, palette=pal16.tobytes(), colors=16))


# ---- GIF -------------------------------------------------------------------------------------

def lzw_uncompressed(indices, min_code=8):
    """An LZW stream that never builds a table entry it uses: a clear code every 254 literals keeps the code
    width at min_code + 1 bits. Valid GIF data any decoder must read."""
    clear, end, width = 1 << min_code, (1 << min_code) + 1, min_code + 1
    codes = [clear]
    for i, v in enumerate(indices):
        if i and i % 254 == 0:
            codes.append(clear)
        codes.append(int(v))
    codes.append(end)
    acc = nbits = 0
    out = bytearray()
    for c in codes:
        acc |= c << nbits
        nbits += width
        while nbits >= 8:
            out.append(acc & 255)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 255)
    blocks = bytearray([min_code])
    for i in range(0, len(out), 255):
        blocks += bytes([len(out[i:i + 255])]) + out[i:i + 255]
    return bytes(blocks) + b"\0"


def make_gif():
    rgb = Image.fromarray(RGB)
    pal = rgb.quantize(colors=64)
    record("palette.gif", pil_bytes(pal, "GIF"))
    record("palette-interlaced.gif", pil_bytes(pal, "GIF", interlace=True))
    record("transparent.gif", pil_bytes(pal, "GIF", transparency=3))
    record("gray.gif", pil_bytes(Image.fromarray(GRAY), "GIF"))
    # A frame smaller than the screen, at an offset, with a transparent index: the rest of the canvas is
    # that index; plus a second frame that must be ignored.
    fw, fh = 15, 9
    palette = np.array([[(i * 5) % 256, (i * 11) % 256, (255 - i * 3) % 256] for i in range(256)], np.uint8)
    idx = (GRAY[:fh, :fw] // 2).astype(np.uint8)
    screen = b"GIF89a" + struct.pack("<HHBBB", W, H, 0xF7, 0, 0) + palette.tobytes()
    gce = b"!\xf9\x04" + bytes([1, 0, 0, 200]) + b"\0"
    frame = b"," + struct.pack("<HHHHB", 5, 4, fw, fh, 0) + lzw_uncompressed(idx.ravel())
    frame2 = b"," + struct.pack("<HHHHB", 0, 0, W, H, 0) + lzw_uncompressed(np.zeros(W * H, np.uint8))
    record("offset-frame.gif", screen + gce + frame + frame2 + b";")
    # A local palette (overriding the global one) on a frame that reaches past the screen: the canvas grows.
    local = palette[::-1].copy()
    screen_small = b"GIF89a" + struct.pack("<HHBBB", 20, 10, 0xF7, 0, 0) + palette.tobytes()
    frame = b"," + struct.pack("<HHHHB", 2, 3, 20, 14, 0x87) + local.tobytes() + \
        lzw_uncompressed((GRAY[:14, :20] // 3).astype(np.uint8).ravel())
    record("local-palette-grown.gif", screen_small + frame + b";")


# ---- TIFF ------------------------------------------------------------------------------------

def tiff(width, height, entries, data_blocks, big_endian=False):
    """A one-IFD TIFF. entries: {tag: (type, values)}; values given as 'DATA<i>' offsets are resolved to
    the i-th data block's position. Types: 3 SHORT, 4 LONG."""
    e = "<" if not big_endian else ">"
    out = bytearray(b"II*\0" if not big_endian else b"MM\0*") + struct.pack(e + "I", 0)
    offsets = []
    for blk in data_blocks:
        offsets.append(len(out))
        out += blk
        if len(out) % 2:
            out += b"\0"
    extra = bytearray()
    ifd_pos = len(out)
    n = len(entries)
    extra_base = ifd_pos + 2 + 12 * n + 4
    ifd = bytearray(struct.pack(e + "H", n))
    for tag in sorted(entries):
        typ, vals = entries[tag]
        vals = [offsets[int(v[4:])] if isinstance(v, str) else v for v in vals]
        size = {3: 2, 4: 4}[typ]
        payload = b"".join(struct.pack(e + ("H" if typ == 3 else "I"), v) for v in vals)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\0")
        else:
            field = struct.pack(e + "I", extra_base + len(extra))
            extra += payload
        ifd += struct.pack(e + "HHI", tag, typ, len(vals)) + field
    ifd += struct.pack(e + "I", 0)
    out += ifd + extra
    out[4:8] = struct.pack(e + "I", ifd_pos)
    return bytes(out)


def strips(rows, rps):
    return [b"".join(rows[i:i + rps]) for i in range(0, len(rows), rps)]


def tiff_strips(width, height, photometric, bps, spp, rows, rps=5, extra=None, colormap=None, planar=1,
                big_endian=False):
    blocks = strips(rows, rps)
    entries = {256: (4, [width]), 257: (4, [height]), 258: (3, [bps] * spp), 259: (3, [1]),
               262: (3, [photometric]), 273: (4, [f"DATA{i}" for i in range(len(blocks))]), 277: (3, [spp]),
               278: (4, [rps]), 279: (4, [len(b) for b in blocks]), 284: (3, [planar])}
    if extra is not None:
        entries[338] = (3, extra)
    if colormap is not None:
        entries[320] = (3, colormap)
    return tiff(width, height, entries, blocks, big_endian)


def make_tiff():
    rgb = Image.fromarray(RGB)
    record("rgb-raw.tif", pil_bytes(rgb, "TIFF"))
    record("rgb-lzw.tif", pil_bytes(rgb, "TIFF", compression="tiff_lzw"))
    record("rgb-deflate.tif", pil_bytes(rgb, "TIFF", compression="tiff_adobe_deflate"))
    record("rgb-packbits.tif", pil_bytes(rgb, "TIFF", compression="packbits"))
    record("rgb-jpeg.tif", pil_bytes(rgb, "TIFF", compression="jpeg"))
    record("rgba-lzw.tif", pil_bytes(Image.fromarray(np.dstack([RGB, ALPHA])), "TIFF", compression="tiff_lzw"))
    record("gray8-lzw.tif", pil_bytes(Image.fromarray(GRAY), "TIFF", compression="tiff_lzw"))
    record("bilevel.tif", pil_bytes(Image.fromarray(GRAY).convert("1"), "TIFF"))
    record("bilevel-g4.tif", pil_bytes(Image.fromarray(GRAY).convert("1"), "TIFF", compression="group4"))
    record("palette8.tif", pil_bytes(rgb.quantize(colors=30), "TIFF"))
    record("cmyk.tif", pil_bytes(rgb.convert("CMYK"), "TIFF"))
    g16 = GRAY.astype(np.uint16) * 3 + 100
    record("gray16.tif", pil_bytes(Image.fromarray(g16.astype("<u2"), "I;16"), "TIFF"))
    # Pillow transposes a TIFF by its Orientation tag on load, and exif_transpose then does it again.
    record("rgb-exif6.tif", pil_bytes(rgb, "TIFF", tiffinfo={274: 6}), exif=True)
    record("rgb-orientation6.tif", pil_bytes(rgb, "TIFF", tiffinfo={274: 6}))
    record("rgb-exif7-lzw.tif", pil_bytes(rgb, "TIFF", compression="tiff_lzw", tiffinfo={274: 7}), exif=True)
    # Layouts Pillow does not write.
    rows = [GRAY[y].tobytes() for y in range(H)]
    record("gray8-miniswhite.tif", tiff_strips(W, H, 0, 8, 1, rows))
    rows4 = [pack_bits(GRAY[y] >> 4, 4) for y in range(H)]
    record("gray4.tif", tiff_strips(W, H, 1, 4, 1, rows4))
    record("gray4-miniswhite.tif", tiff_strips(W, H, 0, 4, 1, rows4))
    cmap = [(i * 4000) % 65536 for i in range(4)] + [(i * 9000 + 300) % 65536 for i in range(4)] + \
        [(65535 - i * 12345) % 65536 for i in range(4)]
    rows2 = [pack_bits(GRAY[y] >> 6, 2) for y in range(H)]
    record("palette2.tif", tiff_strips(W, H, 3, 2, 1, rows2, colormap=cmap))
    rgb16 = RGB.astype(np.uint16) * 257 + rng.integers(0, 200, size=RGB.shape).astype(np.uint16)
    record("rgb16.tif", tiff_strips(W, H, 2, 16, 3, [rgb16[y].astype("<u2").tobytes() for y in range(H)]))
    record("rgb16-be.tif", tiff_strips(W, H, 2, 16, 3, [rgb16[y].astype(">u2").tobytes() for y in range(H)],
                                       big_endian=True))
    a = ALPHA.astype(np.uint16)
    premul = (RGB.astype(np.uint16) * a[..., None] // 255).astype(np.uint8)
    rgba_p = np.dstack([premul, ALPHA])
    record("rgba-associated.tif", tiff_strips(W, H, 2, 8, 4, [rgba_p[y].tobytes() for y in range(H)], extra=[1]))
    record("rgba-unassociated.tif", tiff_strips(W, H, 2, 8, 4, [np.dstack([RGB, ALPHA])[y].tobytes()
                                                                 for y in range(H)], extra=[2]))
    planes = [RGB[..., c][y].tobytes() for c in range(3) for y in range(H)]  # R rows, then G, then B
    blocks = strips(planes, H)
    entries = {256: (4, [W]), 257: (4, [H]), 258: (3, [8] * 3), 259: (3, [1]), 262: (3, [2]),
               273: (4, [f"DATA{i}" for i in range(3)]), 277: (3, [3]), 278: (4, [H]),
               279: (4, [len(b) for b in blocks]), 284: (3, [2])}
    record("rgb-planar.tif", tiff(W, H, entries, blocks))
    tw = th = 16
    tiles = []
    for ty in range(0, H, th):
        for tx in range(0, W, tw):
            t = np.zeros((th, tw, 3), np.uint8)
            part = RGB[ty:ty + th, tx:tx + tw]
            t[:part.shape[0], :part.shape[1]] = part
            tiles.append(t.tobytes())
    entries = {256: (4, [W]), 257: (4, [H]), 258: (3, [8] * 3), 259: (3, [1]), 262: (3, [2]), 277: (3, [3]),
               284: (3, [1]), 322: (3, [tw]), 323: (3, [th]),
               324: (4, [f"DATA{i}" for i in range(len(tiles))]), 325: (4, [len(t) for t in tiles])}
    record("rgb-tiled.tif", tiff(W, H, entries, tiles))


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    make_png()
    make_jpeg()
    make_webp()
    make_bmp()
    make_gif()
    make_tiff()
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("\n".join(manifest) + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(manifest)} images, {total} bytes in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
