// The only file that knows Python: converts arrays, checks what the C++ side cannot know
// (dtype, contiguity, rank), releases the GIL around compute, and calls the runtime.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "palmcore/benchmark.h"
#include "palmcore/model.h"
#include "palmcore/threads.h"

namespace py = pybind11;
using namespace palmcore;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style>;

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

Tensor borrow_tokens(const IntArray& tokens, const char* what) {
  if (tokens.ndim() != 2)
    throw std::invalid_argument(std::string(what) + " must be 2-D [batch, seq], got " +
                                std::to_string(tokens.ndim()) + "-D");
  return Tensor::borrow(const_cast<int32_t*>(tokens.data()), shape_of(tokens), DType::I32);
}

// A model and the lock that serializes calls on it: compute runs with the GIL released, so two
// Python threads could otherwise enter one model at once. Compute takes the lock only after
// releasing the GIL and drops it before taking the GIL back, so the two locks cannot deadlock.
struct LockedModel {
  explicit LockedModel(Model m) : model(std::move(m)) {}
  Model model;
  std::mutex mutex;
};

// A float32 copy of one of the model's tensors, taken under the model's lock with the GIL
// released (a step in another thread holds that lock for long).
template <typename Get>
py::array_t<float> copy_out(LockedModel& self, const std::vector<int64_t>& shape, Get get) {
  py::array_t<float> out(shape);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> guard(self.mutex);
    const Tensor t = get(self.model);
    std::memcpy(dst, t.data<float>(), t.numel() * sizeof(float));
  }
  return out;
}

std::unique_ptr<LockedModel> make_model(const py::dict& c, uint64_t seed) {
  ModelConfig config{c["vocab_size"].cast<int64_t>(), c["d_model"].cast<int64_t>(),
                     c["n_layers"].cast<int64_t>(),   c["n_heads"].cast<int64_t>(),
                     c["n_kv_heads"].cast<int64_t>(), c["head_dim"].cast<int64_t>(),
                     c["ffn_dim"].cast<int64_t>(),    c["max_seq_len"].cast<int64_t>(),
                     c["rope_base"].cast<double>(),   c["norm_eps"].cast<double>(),
                     c["z_loss"].cast<double>()};
  py::gil_scoped_release release;
  return std::make_unique<LockedModel>(Model(config, seed));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "palmcore's C++ runtime (use the palmcore package, not this module)";
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("measure_sgemm_gflops", &measure_matmul_gflops, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("repeats") = 5, py::call_guard<py::gil_scoped_release>());
  m.def("measure_copy_gbps", &measure_copy_gbps, py::arg("bytes"), py::arg("repeats") = 5,
        py::call_guard<py::gil_scoped_release>());

  py::class_<LockedModel>(m, "Model")
      .def(py::init(&make_model), py::arg("config"), py::arg("seed"))
      .def("param_names",
           [](const LockedModel& self) {
             std::vector<std::string> names;
             for (const ParamInfo& p : self.model.params_info()) names.push_back(p.name);
             return names;
           })
      .def("param_shape", [](const LockedModel& self, const std::string& name) { return self.model.info(name).shape; })
      .def("num_params", [](LockedModel& self) { return self.model.flat_params().numel(); })
      .def("get_param",
           [](LockedModel& self, const std::string& name) {
             return copy_out(self, self.model.info(name).shape, [&](const Model& m) { return m.param(name); });
           })
      .def("get_grad",
           [](LockedModel& self, const std::string& name) {
             return copy_out(self, self.model.info(name).shape, [&](const Model& m) { return m.grad(name); });
           })
      .def("set_param",
           [](LockedModel& self, const std::string& name, const FloatArray& value) {
             const std::vector<int64_t>& shape = self.model.info(name).shape;
             if (shape_of(value) != shape)
               throw std::invalid_argument("parameter '" + name + "' must have shape " +
                                           self.model.param(name).shape_string());
             const float* src = value.data();
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> guard(self.mutex);
             Tensor dst = self.model.param(name);
             for (int64_t i = 0; i < dst.numel(); ++i)
               if (!std::isfinite(src[i]))
                 throw std::invalid_argument("parameter '" + name + "' holds a non-finite value (NaN or Inf)");
             std::memcpy(dst.data<float>(), src, dst.numel() * sizeof(float));
           })
      .def("forward",
           [](LockedModel& self, const IntArray& tokens) {
             Tensor t = borrow_tokens(tokens, "tokens");
             self.model.check_shape(t, "tokens");  // before allocating [B, T, V]
             const int64_t V = self.model.config().vocab_size;
             py::array_t<float> logits({t.dim(0), t.dim(1), V});
             Tensor out = Tensor::borrow(logits.mutable_data(), {t.dim(0) * t.dim(1), V}, DType::F32);
             {
               py::gil_scoped_release release;
               std::lock_guard<std::mutex> guard(self.mutex);
               self.model.forward(t, out);
             }
             return logits;
           })
      .def("forward_backward",
           [](LockedModel& self, const IntArray& tokens, const IntArray& targets) {
             Tensor t = borrow_tokens(tokens, "tokens"), y = borrow_tokens(targets, "targets");
             LossStats s;
             {
               py::gil_scoped_release release;
               std::lock_guard<std::mutex> guard(self.mutex);
               s = self.model.forward_backward(t, y);
             }
             py::dict out;
             out["loss"] = s.loss;
             out["ce"] = s.ce;
             out["tokens"] = s.tokens;
             return out;
           })
      .def("zero_grad", [](LockedModel& self) {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> guard(self.mutex);
        self.model.zero_grad();
      });
}
