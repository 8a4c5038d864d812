// visionformers for Python: the front door (Pretrained, classify, detect, segment, run) with the
// results in the shapes transformers' pipelines return. Inference runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <mutex>

#include "core/errors.h"
#include "visionformers.h"

namespace py = pybind11;

namespace {

// A path (str / os.PathLike), the bytes of an image file, an HxWx3 (or HxW) uint8 array, or a PIL
// image (converted to RGB first, as the pipelines' load_image does).
vf::Image to_image(py::handle obj) {
  if (py::isinstance<py::bytes>(obj) || py::isinstance<py::bytearray>(obj)) {
    std::string bytes = py::isinstance<py::bytes>(obj) ? std::string(obj.cast<py::bytes>())
                                                       : std::string(obj.cast<py::bytearray>());
    return vf::decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "bytes",
                            /*apply_exif_orientation=*/true);
  }
  if (py::isinstance<py::str>(obj) || py::hasattr(obj, "__fspath__")) {
    std::string path = py::str(py::module_::import("os").attr("fspath")(obj));
    return vf::load_image(path, /*apply_exif_orientation=*/true);
  }
  py::object arr_obj = py::reinterpret_borrow<py::object>(obj);
  if (!py::isinstance<py::array>(obj) && py::hasattr(obj, "convert") && py::hasattr(obj, "mode"))
    arr_obj = py::module_::import("numpy").attr("asarray")(obj.attr("convert")("RGB"));
  if (!py::isinstance<py::array>(arr_obj))
    throw py::type_error("an image is a path, bytes, a numpy HxWx3 uint8 array or a PIL image, not " +
                         std::string(py::str(py::type::of(obj))));
  py::array arr = arr_obj.cast<py::array>();
  if (!arr.dtype().is(py::dtype::of<uint8_t>())) throw py::value_error("image arrays must be uint8");
  if (!(arr.ndim() == 3 && arr.shape(2) == 3) && arr.ndim() != 2)
    throw py::value_error("image arrays must be HxWx3 (RGB) or HxW (gray)");
  auto c = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  vf::Image img;
  img.height = c.shape(0);
  img.width = c.shape(1);
  if (img.height < 1 || img.width < 1) throw py::value_error("empty image array");
  img.rgb.resize(img.pixels() * 3);
  const uint8_t* src = c.data();
  if (c.ndim() == 3) {
    std::memcpy(img.rgb.data(), src, img.rgb.size());
  } else {
    for (size_t i = 0; i < img.pixels(); ++i) img.rgb[3 * i] = img.rgb[3 * i + 1] = img.rgb[3 * i + 2] = src[i];
  }
  return img;
}

// One image or a list of them; `single` says which, so results come back unwrapped as the pipelines do.
std::vector<vf::Image> to_images(py::handle obj, bool& single) {
  std::vector<vf::Image> out;
  single = !(py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj));
  if (single) {
    out.push_back(to_image(obj));
  } else {
    for (auto item : obj) out.push_back(to_image(item));
  }
  return out;
}

py::object unwrap(py::list all, bool single) { return single ? all[0] : py::object(all); }

py::array_t<float> to_numpy(const vf::Tensor& t) {
  vf::Tensor f = t.dtype() == vf::DType::F32 ? t : t.to(vf::DType::F32);
  std::vector<py::ssize_t> shape(f.shape().begin(), f.shape().end());
  py::array_t<float> a(shape);
  if (f.numel() > 0) std::memcpy(a.mutable_data(), f.f32(), f.nbytes());
  return a;
}

class PyPretrained {
 public:
  PyPretrained(const std::string& model, const std::string& device, const std::string& dtype) {
    vf::LoadOptions options;
    try {
      options.device = vf::Device::parse(device);
      options.dtype = vf::parse_compute_dtype(dtype);
    } catch (const vf::Error& e) {
      throw py::value_error(e.what());
    }
    py::gil_scoped_release release;
    p_ = std::make_shared<vf::Pretrained>(vf::Pretrained::from_pretrained(model, options));
  }

  py::object classify(py::handle images, int top_k) {
    bool single;
    auto imgs = to_images(images, single);
    std::vector<std::vector<vf::LabelScore>> r = infer([&] { return vf::classify(*p_, imgs, top_k); });
    py::list all;
    for (auto& one : r) {
      py::list l;
      for (auto& ls : one) l.append(py::dict(py::arg("label") = ls.label, py::arg("score") = ls.score));
      all.append(l);
    }
    return unwrap(all, single);
  }

  py::object detect(py::handle images, float threshold) {
    bool single;
    auto imgs = to_images(images, single);
    std::vector<std::vector<vf::DetectedObject>> r = infer([&] { return vf::detect(*p_, imgs, threshold); });
    py::list all;
    for (auto& one : r) {
      py::list l;
      for (auto& o : one) {
        py::dict box(py::arg("xmin") = o.box.xmin, py::arg("ymin") = o.box.ymin, py::arg("xmax") = o.box.xmax,
                     py::arg("ymax") = o.box.ymax);
        l.append(py::dict(py::arg("score") = o.score, py::arg("label") = o.label, py::arg("box") = box));
      }
      all.append(l);
    }
    return unwrap(all, single);
  }

  // Segments with their masks as HxW uint8 arrays (255 inside, as the pipeline's mode "L" masks).
  py::object segment(py::handle images, const std::string& task, double threshold, double mask_threshold,
                     double overlap_mask_area_threshold) {
    bool single;
    auto imgs = to_images(images, single);
    vf::SegmentParams params;
    params.task = task;
    params.threshold = threshold;
    params.mask_threshold = mask_threshold;
    params.overlap_mask_area_threshold = overlap_mask_area_threshold;
    std::vector<vf::SegmentedImage> r = infer([&] {
      std::vector<vf::SegmentedImage> all;
      for (auto& img : imgs) all.push_back(vf::segment(*p_, img, params));
      return all;
    });
    py::list all;
    for (auto& seg : r) {
      py::list l;
      const int64_t h = seg.map.size(0), w = seg.map.size(1);
      const int32_t* ids = seg.map.data<int32_t>();
      for (auto& s : seg.segments) {
        py::array_t<uint8_t> mask({h, w});
        uint8_t* m = mask.mutable_data();
        for (int64_t i = 0; i < h * w; ++i) m[i] = ids[i] == s.id ? 255 : 0;
        l.append(py::dict(py::arg("score") = s.score ? py::object(py::float_(*s.score)) : py::object(py::none()),
                          py::arg("label") = s.label, py::arg("mask") = mask));
      }
      all.append(l);
    }
    return unwrap(all, single);
  }

  py::dict run(py::handle images) {
    bool single;
    auto imgs = to_images(images, single);
    vf::ModelOutput out = infer([&] { return p_->run(imgs); });
    py::dict d;
    for (const auto& [name, t] : out.items()) d[py::str(name)] = to_numpy(t);
    return d;
  }

  std::string architecture() const { return p_->model->architecture; }
  std::string model_type() const { return p_->model->model_type; }
  std::vector<std::string> labels() const { return p_->model->id2label; }

 private:
  std::shared_ptr<vf::Pretrained> p_;
  // Runs `f` with the GIL released (other Python threads go on) and the model to itself.
  template <class F>
  auto infer(F&& f) -> decltype(f()) {
    py::gil_scoped_release release;
    std::lock_guard lk(mu_);
    return f();
  }
  std::mutex mu_;  // one forward at a time per model; other Python threads keep running meanwhile
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "visionformers: Hugging Face vision models without Python (C++ engine)";
  auto error = py::register_exception<vf::Error>(m, "Error", PyExc_ValueError);
  py::register_exception<vf::InputError>(m, "InputError", error.ptr());
  py::register_exception<vf::ModelError>(m, "ModelError", error.ptr());

  py::class_<PyPretrained>(m, "Pretrained")
      .def(py::init<const std::string&, const std::string&, const std::string&>(), py::arg("model"),
           py::arg("device") = "cpu", py::arg("dtype") = "float32",
           "Loads a model folder (config.json, preprocessor_config.json, weights) or a Hub id.")
      .def("classify", &PyPretrained::classify, py::arg("images"), py::arg("top_k") = 5,
           "[{'label', 'score'}, ...] per image, as the image-classification pipeline.")
      .def("detect", &PyPretrained::detect, py::arg("images"), py::arg("threshold") = 0.5f,
           "[{'score', 'label', 'box': {xmin, ymin, xmax, ymax}}, ...] per image, as the object-detection pipeline.")
      .def("segment", &PyPretrained::segment, py::arg("images"), py::arg("task") = "panoptic",
           py::arg("threshold") = 0.9, py::arg("mask_threshold") = 0.5, py::arg("overlap_mask_area_threshold") = 0.5,
           "[{'score', 'label', 'mask'}, ...] per image, as the image-segmentation pipeline (masks: uint8 HxW, 255 inside).")
      .def("run", &PyPretrained::run, py::arg("images"),
           "The processor then the model: {output name: float32 numpy array}.")
      .def_property_readonly("architecture", &PyPretrained::architecture)
      .def_property_readonly("model_type", &PyPretrained::model_type)
      .def_property_readonly("labels", &PyPretrained::labels);
}
