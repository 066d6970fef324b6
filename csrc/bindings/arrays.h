// What the bindings share: NumPy arrays as palmcore tensors and back, device names, sampling
// settings from a Python dict. Used by module.cpp (the product) and kernels.cpp (the test-only ops).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "palmcore/sampler.h"
#include "palmcore/tensor.h"

namespace palmcore::bindings {

namespace py = pybind11;

using IntArray = py::array_t<int32_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style>;

std::vector<int64_t> shape_of(const py::array& a);
// A host tensor over the array's own buffer (no copy): the array must outlive it.
Tensor view_of(const py::array& a, DType dtype);
// The dtype a NumPy array stands for: float32, int32, or uint16 holding bfloat16 bits.
DType dtype_of_array(const py::array& a);
// A NumPy copy of a host tensor (bfloat16 as uint16 bits).
py::array to_numpy(const Tensor& t);
// "cpu", "cuda" (= "cuda:0") or "cuda:N"; a CUDA device is checked to be usable and made the
// one this process works on (std::runtime_error saying why not).
std::pair<Device, int> parse_device(const std::string& name);
// {temperature, top_k, top_p, repetition_penalty, seed}, validated.
SamplingSettings sampling_settings(const py::dict& c);

// The test-only ops one by one on NumPy arrays: the submodule _core.kernels (kernels.cpp).
void bind_kernels(py::module_& m);

}  // namespace palmcore::bindings
