// Every image format and layout vf reads, decoded byte for byte as Pillow decodes it (tests/data/formats,
// written by scripts/make-format-fixtures.py with Pillow's `Image.open(f).convert("RGB")`, after
// `ImageOps.exif_transpose` for the files with an EXIF orientation), and hostile image files: FIFOs,
// devices, directories, gigabytes of padding, progressive JPEGs with endless scans.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/errors.h"
#include "io/file.h"
#include "io/image.h"
#include "test_util.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

std::string formats_dir() { return std::string(VF_SOURCE_DIR) + "/tests/data/formats"; }

struct Fixture {
  std::string file;
  int64_t width, height;
  bool exif;
};

std::vector<Fixture> fixtures() {
  std::vector<Fixture> out;
  std::ifstream f(formats_dir() + "/manifest.txt");
  Fixture x;
  int exif = 0;
  while (f >> x.file >> x.width >> x.height >> exif) {
    x.exif = exif != 0;
    out.push_back(x);
  }
  return out;
}

using test::error_of;

Image decode_bytes(const std::string& bytes, const std::string& name) {
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name);
}

}  // namespace

TEST(ImageFormats, EveryFixtureDecodesExactlyAsPillow) {
  const auto all = fixtures();
  ASSERT_GE(all.size(), 60u) << "tests/data/formats/manifest.txt is missing or short";
  std::set<std::string> extensions;
  for (const auto& fx : all) {
    SCOPED_TRACE(fx.file);
    extensions.insert(fs::path(fx.file).extension().string());
    const std::string path = formats_dir() + "/" + fx.file;
    const std::string expected = test::read_bytes(path + ".rgb");
    ASSERT_EQ(expected.size(), size_t(fx.width * fx.height * 3));
    Image img;
    try {
      img = load_image(path, fx.exif);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      continue;
    }
    ASSERT_EQ(img.width, fx.width);
    ASSERT_EQ(img.height, fx.height);
    ASSERT_EQ(img.channels, 3);
    ASSERT_EQ(img.rgb.size(), expected.size());
    size_t differing = 0, first = 0;
    for (size_t i = 0; i < expected.size(); ++i)
      if (img.rgb[i] != uint8_t(expected[i]) && differing++ == 0) first = i;
    EXPECT_EQ(differing, 0u) << "first at pixel " << first / 3 << " channel " << first % 3 << ": vf "
                             << int(img.rgb[first]) << ", Pillow " << int(uint8_t(expected[first]));
  }
  for (const char* ext : {".png", ".jpg", ".webp", ".bmp", ".gif", ".tif"}) EXPECT_TRUE(extensions.count(ext)) << ext;
}

TEST(ImageFormats, OrientationIsOnlyAppliedWhenAsked) {
  // Stored 23 wide, 17 high; orientation 6 turns them on their side. Pillow applies a TIFF's Orientation
  // tag on load already (and exif_transpose applies it a second time).
  const std::string path = formats_dir() + "/rgb-exif6.tif";
  EXPECT_EQ(load_image(path, false).width, 17);
  EXPECT_EQ(load_image(path, true).width, 23);
  const std::string webp = formats_dir() + "/lossy-exif6.webp";
  EXPECT_EQ(load_image(webp, false).width, 23);
  EXPECT_EQ(load_image(webp, true).width, 17);
}

TEST(ImageFormats, EveryPrefixOfEachNewFormatIsOneInputError) {
  for (const char* name : {"rgb24.bmp", "palette8-rle.bmp", "palette.gif", "offset-frame.gif", "rgb-lzw.tif",
                           "rgb-tiled.tif", "lossy.webp", "lossless-alpha.webp"}) {
    SCOPED_TRACE(name);
    const std::string bytes = test::read_bytes(formats_dir() + "/" + name);
    ASSERT_GT(bytes.size(), 100u);
    EXPECT_NO_THROW(decode_bytes(bytes, name));
    // Half the file or less never holds the whole image; a little more than that may (a GIF's trailer,
    // a BMP's last row padding), so only the first half must fail.
    for (size_t n = 0; n <= bytes.size() / 2; n += std::max<size_t>(1, bytes.size() / 97))
      error_of<InputError>([&] { decode_bytes(bytes.substr(0, n), name); });
    for (size_t n = bytes.size() / 2; n < bytes.size(); n += 7) {
      try {
        decode_bytes(bytes.substr(0, n), name);
      } catch (const InputError&) {
      }
    }
  }
}

TEST(ImageFormats, UnreadableFormatsAreNamed) {
  EXPECT_HAS(error_of<InputError>([] { decode_bytes("8BPS\0\1\0\0\0\0\0\0", "x.psd"); }), "Photoshop PSD");
  EXPECT_HAS(error_of<InputError>([] { decode_bytes(std::string("\0\0\0\x1c" "ftypheic", 12), "x.heic"); }),
             "HEIF");
  EXPECT_HAS(error_of<InputError>([] { decode_bytes("P6\n1 1\n255\n\0\0\0", "x.ppm"); }), "PNM");
  std::string msg = error_of<InputError>([] { decode_bytes("hello, world", "notes.txt"); });
  EXPECT_HAS(msg, "notes.txt");
  EXPECT_HAS(msg, "not in a format vf can read");
  EXPECT_HAS(error_of<InputError>([] { decode_bytes("", "empty.png"); }), "empty.png");
}

// ---- hostile files -----------------------------------------------------------------------------

TEST(HostileImageFile, FifoDeviceAndDirectoryAreRefusedWithoutReading) {
  const std::string dir = test::temp_dir("image_special");
  const std::string fifo = dir + "/pipe.png";
  fs::remove(fifo);
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // With no writer a blocking open would wait forever; the error must come at once.
  std::string msg = error_of<InputError>([&] { load_image(fifo); });
  EXPECT_HAS(msg, fifo);
  EXPECT_HAS(msg, "FIFO");
  const std::string zero = dir + "/zero.jpg";
  fs::remove(zero);
  fs::create_symlink("/dev/zero", zero);
  msg = error_of<InputError>([&] { load_image(zero); });
  EXPECT_HAS(msg, "character device");
  msg = error_of<InputError>([&] { load_image(dir); });
  EXPECT_HAS(msg, "directory");
  EXPECT_HAS(error_of<InputError>([&] { open_regular_file(dir, "config file"); }), "config file");
  EXPECT_EQ(open_regular_file(formats_dir() + "/rgb8.png", "image file").size(),
            fs::file_size(formats_dir() + "/rgb8.png"));
}

// The CLI takes a folder as a folder of images (recursed): one without any image file is exit 65
// saying so; a directory given to load_image itself is refused as a directory.
TEST(HostileImageFile, DirectoryGivenToTheCliExitsWith65) {
  const std::string dir = test::temp_dir("image_dir_cli");
  const std::string cmd = std::string(VF_VF_BINARY) + " detect " + test::golden_case("detr-tiny-model") + " " +
                          dir + " > " + dir + "/out.txt 2>&1";
  int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 65) << test::read_bytes(dir + "/out.txt");
  EXPECT_HAS(test::read_bytes(dir + "/out.txt"), "no image files");
  try {
    load_image(dir);
    ADD_FAILURE() << "a directory decoded as an image";
  } catch (const InputError& e) {
    EXPECT_HAS(std::string(e.what()), "is a directory");
  }
}

namespace {
// Peak resident memory (kB), after resetting it with /proc/self/clear_refs so earlier tests do not count.
long peak_rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}
long read_chars() {
  std::ifstream f("/proc/self/io");
  std::string key;
  long v;
  while (f >> key >> v)
    if (key == "rchar:") return v;
  return -1;
}
}  // namespace

TEST(HostileImageFile, GigabytesOfPaddingAreNeverRead) {
  const std::string dir = test::temp_dir("image_padding");
  const std::string path = dir + "/padded.png";
  fs::copy_file(formats_dir() + "/gray1.png", path, fs::copy_options::overwrite_existing);
  const std::string expected = test::read_bytes(formats_dir() + "/gray1.png.rgb");
  constexpr off_t kSize = 3LL << 30;  // sparse: costs no disk
  ASSERT_EQ(::truncate(path.c_str(), kSize), 0);
  {
    std::ofstream reset("/proc/self/clear_refs");
    reset << "5";
  }
  const long peak_before = peak_rss_kb(), read_before = read_chars();
  ASSERT_GT(peak_before, 0);
  Image img = load_image(path);
  const long peak_after = peak_rss_kb(), read_after = read_chars();
  fs::remove(path);
  EXPECT_EQ(std::string(img.rgb.begin(), img.rgb.end()), expected);
  // Reading the file whole would take 3 GB of memory and 3 GB of read(); decoding touches a few pages.
  EXPECT_LT(peak_after - peak_before, 64 * 1024) << "peak RSS grew by " << peak_after - peak_before << " kB";
  if (read_before >= 0) {
    EXPECT_LT(read_after - read_before, 64L << 20);
  }
}

namespace {
// An 8x8 greyscale progressive JPEG whose only scan (DC, all zero) is repeated `scans` times: valid,
// every scan legal, and each costs a pass over the image.
std::string jpeg_with_scans(int scans) {
  std::string j = "\xFF\xD8";
  j += std::string("\xFF\xDB\x00\x43\x00", 5) + std::string(64, '\x01');       // DQT 0: all ones
  j += std::string("\xFF\xC2\x00\x0B\x08\x00\x08\x00\x08\x01\x01\x11\x00", 13);  // SOF2 8x8, 1 component
  j += std::string("\xFF\xC4\x00\x14\x00\x01", 6) + std::string(15, '\0') + std::string(1, '\0');  // DC: '0' -> 0
  const std::string scan = std::string("\xFF\xDA\x00\x08\x01\x01\x00\x00\x00\x00", 10) + "\x7F";
  for (int i = 0; i < scans; ++i) j += scan;
  return j + "\xFF\xD9";
}
}  // namespace

TEST(HostileImageFile, ProgressiveJpegWithEndlessScansIsRefused) {
  // The same construction with a few scans is a valid image: DC 0 everywhere is mid grey.
  Image ok = decode_bytes(jpeg_with_scans(5), "five.jpg");
  ASSERT_EQ(ok.width, 8);
  for (uint8_t v : ok.rgb) ASSERT_EQ(v, 128);
  const std::string many = jpeg_with_scans(50000);
  EXPECT_LT(many.size(), 1u << 20);
  std::string msg = error_of<InputError>([&] { decode_bytes(many, "scans.jpg"); });
  EXPECT_HAS(msg, "scans.jpg");
  EXPECT_HAS(msg, "more than 1000 scans");
}

TEST(ImageFormats, CorruptedFilesDecodeOrFailCleanly) {
  // Seeded byte corruption of every fixture: each result is an image of consistent size or one InputError
  // (a crash, a hang or another exception type fails the test run).
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&] {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
  };
  size_t decoded = 0, refused = 0;
  for (const auto& fx : fixtures()) {
    const std::string bytes = test::read_bytes(formats_dir() + "/" + fx.file);
    for (int round = 0; round < 60; ++round) {
      std::string bad = bytes;
      const int flips = 1 + int(next() % 4);
      for (int i = 0; i < flips; ++i) {
        // Mostly headers: the first 64 bytes hold most of what a decoder trusts.
        const size_t at = (next() % 2 ? next() % std::min<size_t>(64, bad.size()) : next() % bad.size());
        bad[at] = char(next() % 3 == 0 ? 0xFF : next() & 0xFF);
      }
      try {
        Image img = decode_image(reinterpret_cast<const uint8_t*>(bad.data()), bad.size(), fx.file, true);
        ASSERT_EQ(img.rgb.size(), img.pixels() * 3) << fx.file;
        ++decoded;
      } catch (const InputError&) {
        ++refused;
      }
    }
  }
  EXPECT_GT(decoded, 0u);
  EXPECT_GT(refused, 0u);
}
