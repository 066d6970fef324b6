// NumPy arrays and palmcore tensors, device names, sampling settings (arrays.h).
#include "bindings/arrays.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "palmcore/build_info.h"

namespace palmcore::bindings {

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

Tensor view_of(const py::array& a, DType dtype) {
  return Tensor::borrow(const_cast<void*>(a.data()), shape_of(a), dtype);
}

SamplingSettings sampling_settings(const py::dict& c) {
  SamplingSettings s;
  s.temperature = c["temperature"].cast<double>();
  s.top_k = c["top_k"].cast<int64_t>();
  s.top_p = c["top_p"].cast<double>();
  s.repetition_penalty = c["repetition_penalty"].cast<double>();
  s.seed = c["seed"].cast<uint64_t>();
  s.validate();
  return s;
}

std::pair<Device, int> parse_device(const std::string& name) {
  if (name == "cpu") return {Device::CPU, 0};
  int index = 0;
  if (name.rfind("cuda:", 0) == 0 && name.size() > 5 &&
      std::all_of(name.begin() + 5, name.end(), [](char ch) { return ch >= '0' && ch <= '9'; }) && name.size() < 12)
    index = std::stoi(name.substr(5));
  else if (name != "cuda")
    throw std::invalid_argument("device must be 'cpu', 'cuda' or 'cuda:N', got '" + name + "'");
  try {
    use_cuda_device(index);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error("device '" + name + "' cannot be used: " + e.what());
  }
  return {Device::CUDA, index};
}

DType dtype_of_array(const py::array& a) {
  if (py::isinstance<py::array_t<float>>(a)) return DType::F32;
  if (py::isinstance<py::array_t<int32_t>>(a)) return DType::I32;
  if (py::isinstance<py::array_t<uint16_t>>(a)) return DType::BF16;
  throw std::invalid_argument("expected a float32, int32 or uint16 (bfloat16 bits) array");
}

py::array to_numpy(const Tensor& t) {
  py::array out;
  switch (t.dtype()) {
    case DType::F32: out = py::array_t<float>(t.shape()); break;
    case DType::I32: out = py::array_t<int32_t>(t.shape()); break;
    case DType::BF16: out = py::array_t<uint16_t>(t.shape()); break;
    case DType::F64: out = py::array_t<double>(t.shape()); break;
    case DType::I8: out = py::array_t<int8_t>(t.shape()); break;
  }
  if (t.device() != Device::CPU) throw std::logic_error("to_numpy: the tensor is not on the host");
  std::memcpy(out.mutable_data(), t.raw_data(), t.nbytes());
  return out;
}

}  // namespace palmcore::bindings
