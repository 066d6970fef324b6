// The test-only bindings: palmcore's ops and kernels one by one on NumPy arrays, on any device,
// for the kernel tests against palmcore.reference (the submodule _core.kernels). Nothing of the
// product calls them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "cuda/shared_math_check.h"
#include "palmcore/math/activations.h"
#include "palmcore/math/philox.h"
#include "palmcore/math/rope.h"
#include "palmcore/model.h"
#include "palmcore/ops.h"
#include "palmcore/sampler.h"
#include "palmcore/threads.h"

namespace palmcore::bindings {

namespace {

// The ops one by one on NumPy arrays, for the kernel tests against palmcore.reference.
// Inputs are float32 / int32 C-contiguous arrays; outputs are fresh arrays.
py::array_t<float> zeros_like_shape(std::vector<int64_t> shape) {
  py::array_t<float> out(shape);
  std::memset(out.mutable_data(), 0, out.size() * sizeof(float));
  return out;
}

// A copy of a C-contiguous array on `device`, in a buffer of its own.
Tensor on_device(const py::array& a, Device device) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("expected a C-contiguous array");
  const Tensor host = view_of(a, dtype_of_array(a));
  Tensor t = Tensor::zeros(host.shape(), host.dtype(), device);
  copy(host, t);
  return t;
}

}  // namespace

void bind_kernels(py::module_& m) {
  py::module_ k = m.def_submodule("kernels", "the ops one by one, for tests (no argument checks)");
  const auto F = DType::F32;
  const auto I = DType::I32;
  // On any device: the arrays go there, the op runs there, the result comes back. C sits
  // `guard` elements into a NaN-filled buffer; with guard > 0 the result is (C, the 2·guard
  // guard elements after the op), which must still be NaN: a kernel writing outside C shows.
  k.def(
      "matmul",
      [=](const py::array& a, bool ta, const py::array& b, bool tb, FloatArray c, float alpha, float beta,
          const std::string& device, int64_t guard) -> py::object {
        const Device d = parse_device(device).first;
        const Tensor A = on_device(a, d), B = on_device(b, d);
        const int64_t n = static_cast<int64_t>(c.size());
        std::vector<float> host(n + 2 * guard, std::nanf(""));
        std::memcpy(host.data() + guard, c.data(), n * sizeof(float));
        Tensor whole = Tensor::zeros({n + 2 * guard}, F, d);
        copy(Tensor::borrow(host.data(), {n + 2 * guard}, F), whole);
        Tensor out = whole.view(guard, shape_of(c));
        {
          py::gil_scoped_release release;
          matmul(A, ta, B, tb, out, alpha, beta);
        }
        Tensor back = Tensor::borrow(host.data(), {n + 2 * guard}, F);
        copy(whole, back);
        std::memcpy(c.mutable_data(), host.data() + guard, n * sizeof(float));
        if (guard == 0) return std::move(c);
        py::array_t<float> guards(2 * guard);
        std::memcpy(guards.mutable_data(), host.data(), guard * sizeof(float));
        std::memcpy(guards.mutable_data() + guard, host.data() + guard + n, guard * sizeof(float));
        return py::make_tuple(c, guards);
      },
      py::arg("a"), py::arg("transpose_a"), py::arg("b"), py::arg("transpose_b"), py::arg("c"),
      py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f, py::arg("device") = "cpu", py::arg("guard") = 0);
  // Seconds per C[m, n] = A[m, k] @ B[k, n] on `device`, A and B of `dtype` ("float32" or
  // "bfloat16"), operands resident there, the mean of `repeats` calls after one warm-up (for
  // bench/gpu/gemm.py; copying one element back waits for the device).
  k.def(
      "time_matmul",
      [=](int64_t m, int64_t n, int64_t kk, const std::string& dtype, const std::string& device, int repeats) {
        const Device d = parse_device(device).first;
        const DType in = dtype == "bfloat16" ? DType::BF16 : DType::F32;
        auto operand = [&](int64_t rows, int64_t cols) {
          std::vector<float> host(rows * cols);
          for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
          Tensor t = Tensor::zeros({rows, cols}, in, d);
          copy(Tensor::borrow(host.data(), {rows, cols}, F), t);
          return t;
        };
        const Tensor A = operand(m, kk), B = operand(kk, n);
        Tensor C = Tensor::zeros({m, n}, F, d);
        py::gil_scoped_release release;
        auto wait = [&] { (void)C.view(0, {1}).to(Device::CPU); };
        matmul(A, false, B, false, C);
        wait();
        const auto start = std::chrono::steady_clock::now();
        for (int r = 0; r < repeats; ++r) matmul(A, false, B, false, C);
        wait();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dtype") = "float32", py::arg("device") = "cpu",
      py::arg("repeats") = 10);
  // Seconds per device-to-device copy of `bytes` (float32) on `device`, the mean of `repeats`
  // after one warm-up (bench/gpu/decode.py's bandwidth: (read + written bytes) / seconds).
  k.def(
      "time_copy",
      [=](int64_t bytes, const std::string& device, int repeats) {
        const Device d = parse_device(device).first;
        const int64_t n = std::max<int64_t>(1, bytes / 4);
        Tensor src = Tensor::zeros({n}, F, d), dst = Tensor::zeros({n}, F, d);
        py::gil_scoped_release release;
        auto wait = [&] { (void)dst.view(0, {1}).to(Device::CPU); };
        copy(src, dst);
        wait();
        const auto start = std::chrono::steady_clock::now();
        for (int r = 0; r < repeats; ++r) copy(src, dst);
        wait();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
      },
      py::arg("bytes"), py::arg("device") = "cpu", py::arg("repeats") = 5);
  // src (float32, or uint16 holding bfloat16 bits) copied to `dtype` ("float32" / "bfloat16")
  // on `device`, converting where `route` says: "device" (both ends there), "upload" (on the
  // way from the host), "download" (on the way back).
  k.def(
      "copy",
      [](const py::array& src, const std::string& dtype, const std::string& device, const std::string& route) {
        const Device d = parse_device(device).first;
        const DType to = dtype == "bfloat16" ? DType::BF16 : dtype == "float32" ? DType::F32 : DType::I32;
        if (to == DType::I32) throw std::invalid_argument("copy: dtype must be float32 or bfloat16");
        const Tensor host_src = view_of(src, dtype_of_array(src));
        Tensor result;
        if (route == "device") {
          const Tensor there = on_device(src, d);
          Tensor converted = Tensor::zeros(there.shape(), to, d);
          copy(there, converted);
          result = converted.to(Device::CPU);
        } else if (route == "upload") {
          Tensor converted = Tensor::zeros(host_src.shape(), to, d);
          copy(host_src, converted);
          result = converted.to(Device::CPU);
        } else if (route == "download") {
          const Tensor there = on_device(src, d);
          result = Tensor::zeros(host_src.shape(), to, Device::CPU);
          copy(there, result);
        } else {
          throw std::invalid_argument("copy: route must be device, upload or download");
        }
        return to_numpy(result);
      },
      py::arg("src"), py::arg("dtype"), py::arg("device") = "cpu", py::arg("route") = "device");
  // x (float32, int32, or uint16 holding bfloat16 bits) taken to `device`, zeroed there, brought back
  k.def(
      "fill_zero",
      [](const py::array& x, const std::string& device) {
        Tensor there = on_device(x, parse_device(device).first);
        fill_zero(there);
        return to_numpy(there.to(Device::CPU));
      },
      py::arg("x"), py::arg("device") = "cpu");
  k.def("round_bf16", [=](const FloatArray& x) {
    auto out = zeros_like_shape(shape_of(x));
    std::memcpy(out.mutable_data(), x.data(), x.size() * sizeof(float));
    Tensor o = view_of(out, F);
    round_bf16(o);
    return out;
  });
  k.def("embedding_forward", [=](const FloatArray& table, const IntArray& tokens, int64_t first) {
    auto out = zeros_like_shape({tokens.shape(0), table.shape(1)});
    Tensor o = view_of(out, F);
    embedding_forward(view_of(table, F), view_of(tokens, I), o, first);
    return out;
  }, py::arg("table"), py::arg("tokens"), py::arg("first") = 0);
  k.def("embedding_backward", [=](const FloatArray& dout, const IntArray& tokens, int64_t rows, int64_t first) {
    auto dtable = zeros_like_shape({rows, dout.shape(1)});
    Tensor d = view_of(dtable, F);
    embedding_backward(view_of(dout, F), view_of(tokens, I), d, first);
    return dtable;
  }, py::arg("dout"), py::arg("tokens"), py::arg("rows"), py::arg("first") = 0);
  k.def("layernorm_forward", [=](const FloatArray& x, const FloatArray& scale, float eps) {
    auto out = zeros_like_shape(shape_of(x)), xhat = zeros_like_shape(shape_of(x));
    auto rstd = zeros_like_shape({x.shape(0)});
    Tensor o = view_of(out, F), xh = view_of(xhat, F), rs = view_of(rstd, F);
    layernorm_forward(view_of(x, F), view_of(scale, F), eps, o, xh, rs);
    return py::make_tuple(out, xhat, rstd);
  });
  k.def("layernorm_backward", [=](const FloatArray& dout, const FloatArray& xhat, const FloatArray& rstd,
                                  const FloatArray& scale) {
    auto dx = zeros_like_shape(shape_of(dout)), dscale = zeros_like_shape({dout.shape(1)});
    Tensor d = view_of(dx, F), ds = view_of(dscale, F);
    layernorm_backward(view_of(dout, F), view_of(xhat, F), view_of(rstd, F), view_of(scale, F), d, ds);
    return py::make_tuple(dx, dscale);
  });
  k.def("rope_apply", [=](FloatArray x, const IntArray& positions, int64_t heads, double base, bool inverse) {
    const int64_t head_dim = x.shape(1) / heads;
    int32_t max_pos = 0;
    for (py::ssize_t i = 0; i < positions.size(); ++i) max_pos = std::max(max_pos, positions.data()[i]);
    Tensor cos_table, sin_table;
    make_rope_tables(max_pos + 1, head_dim, base, cos_table, sin_table);
    Tensor t = view_of(x, F);
    rope_apply(t, view_of(positions, I), cos_table, sin_table, heads, inverse);
    return x;
  });
  k.def("attention_forward", [=](const FloatArray& q, const FloatArray& kk, const FloatArray& v, int64_t batch,
                                 int64_t heads, int64_t kv_heads) {
    const AttentionShape s{batch, q.shape(0) / batch, heads, kv_heads, q.shape(1) / heads};
    auto out = zeros_like_shape(shape_of(q)), lse = zeros_like_shape({batch * heads * s.seq});
    AttentionWorkspace ws = AttentionWorkspace::create(s, Device::CPU, true);
    Tensor o = view_of(out, F), l = view_of(lse, F);
    apply_num_threads();
    attention_forward(view_of(q, F), view_of(kk, F), view_of(v, F), o, l, s, ws);
    return py::make_tuple(out, lse);
  });
  k.def("attention_backward", [=](const FloatArray& q, const FloatArray& kk, const FloatArray& v,
                                  const FloatArray& out, const FloatArray& lse, const FloatArray& dout,
                                  int64_t batch, int64_t heads, int64_t kv_heads) {
    const AttentionShape s{batch, q.shape(0) / batch, heads, kv_heads, q.shape(1) / heads};
    auto dq = zeros_like_shape(shape_of(q)), dk = zeros_like_shape(shape_of(kk)), dv = zeros_like_shape(shape_of(v));
    AttentionWorkspace ws = AttentionWorkspace::create(s, Device::CPU, true);
    Tensor a = view_of(dq, F), b = view_of(dk, F), c = view_of(dv, F);
    apply_num_threads();
    attention_backward(view_of(q, F), view_of(kk, F), view_of(v, F), view_of(out, F), view_of(lse, F),
                       view_of(dout, F), a, b, c, s, ws);
    return py::make_tuple(dq, dk, dv);
  });
  k.def("attention_cached", [=](const FloatArray& q, const IntArray& slots, const IntArray& positions,
                                const FloatArray& k_cache, const FloatArray& v_cache, int64_t n_slots,
                                int64_t heads, int64_t kv_heads) {
    const AttentionShape s{n_slots, k_cache.shape(0) / n_slots, heads, kv_heads, q.shape(1) / heads};
    auto out = zeros_like_shape(shape_of(q));
    AttentionWorkspace ws = AttentionWorkspace::create(s, Device::CPU, false);
    Tensor o = view_of(out, F);
    apply_num_threads();
    attention_cached(view_of(q, F), view_of(slots, I), view_of(positions, I), view_of(k_cache, F),
                     view_of(v_cache, F), o, s, ws);
    return out;
  });
  k.def("uniform01", &uniform01, py::arg("key"), py::arg("stream"), py::arg("index"));
  // `seen` may repeat tokens here; the sampler takes each distinct token once.
  auto distinct = [](std::vector<int32_t> tokens, const FloatArray& logits) {
    if (logits.ndim() != 1 || logits.shape(0) < 1) throw std::invalid_argument("logits must be 1-D and non-empty");
    for (int32_t t : tokens)
      if (t < 0 || t >= logits.shape(0)) throw std::invalid_argument("seen token " + std::to_string(t) + " is outside the logits");
    std::sort(tokens.begin(), tokens.end());
    tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
    return tokens;
  };
  k.def("filtered_distribution", [=](const FloatArray& logits, const std::vector<int32_t>& seen, const py::dict& c) {
    SamplerScratch scratch;
    std::vector<TokenProbability> kept;
    filtered_distribution(logits.data(), logits.shape(0), distinct(seen, logits), sampling_settings(c), scratch, kept);
    std::vector<int32_t> tokens;
    std::vector<double> probabilities;
    for (const TokenProbability& t : kept) {
      tokens.push_back(t.token);
      probabilities.push_back(t.probability);
    }
    return py::make_tuple(tokens, probabilities);
  });
  k.def("sample_token", [=](const FloatArray& logits, const std::vector<int32_t>& seen, const py::dict& c,
                           int64_t row, int64_t step) {
    SamplerScratch scratch;
    return sample_token(logits.data(), logits.shape(0), distinct(seen, logits), sampling_settings(c), row, step, scratch);
  });
  // sample_tokens on `device`: logits [n, V], rows, steps [n], seen: one list per row; the
  // tokens come back (-1 - t for a row whose first NaN is at t)
  k.def(
      "sample_tokens_on",
      [=](const FloatArray& logits, const IntArray& rows, const IntArray& steps,
          const std::vector<std::vector<int32_t>>& seen, const py::dict& c, const std::string& device) {
        const Device d = parse_device(device).first;
        if (logits.ndim() != 2) throw std::invalid_argument("logits must be [n, V]");
        std::vector<int32_t> flat, offsets{0};
        for (const auto& row : seen) {
          flat.insert(flat.end(), row.begin(), row.end());
          offsets.push_back(static_cast<int32_t>(flat.size()));
        }
        const int64_t n = logits.shape(0);
        auto ints = [&](const std::vector<int32_t>& v) {
          Tensor t = Tensor::zeros({static_cast<int64_t>(v.size())}, DType::I32, d);
          if (!v.empty()) copy(Tensor::borrow(const_cast<int32_t*>(v.data()), {static_cast<int64_t>(v.size())}, DType::I32), t);
          return t;
        };
        const Tensor Z = on_device(logits, d), R = on_device(rows, d), S = on_device(steps, d);
        const Tensor seen_t = ints(flat), offsets_t = ints(offsets);
        Tensor tokens = Tensor::zeros({n}, DType::I32, d);
        const SamplingSettings settings = sampling_settings(c);
        Tensor host;
        {
          py::gil_scoped_release release;
          sample_tokens(Z, R, S, seen_t, offsets_t, settings, tokens);
          host = tokens.to(Device::CPU);
        }
        return to_numpy(host);
      },
      py::arg("logits"), py::arg("rows"), py::arg("steps"), py::arg("seen"), py::arg("settings"),
      py::arg("device") = "cpu");
  k.def("swiglu_forward", [=](const FloatArray& gate, const FloatArray& up) {
    auto out = zeros_like_shape(shape_of(gate));
    Tensor o = view_of(out, F);
    swiglu_forward(view_of(gate, F), view_of(up, F), o);
    return out;
  });
  k.def("swiglu_backward", [=](const FloatArray& gate, const FloatArray& up, const FloatArray& dout) {
    auto dgate = zeros_like_shape(shape_of(gate)), dup = zeros_like_shape(shape_of(up));
    Tensor a = view_of(dgate, F), b = view_of(dup, F);
    swiglu_backward(view_of(gate, F), view_of(up, F), view_of(dout, F), a, b);
    return py::make_tuple(dgate, dup);
  });
  k.def("cross_entropy_stats", [=](const FloatArray& logits, const IntArray& targets, int64_t first) {
    auto lse = zeros_like_shape({logits.shape(0)}), picked = zeros_like_shape({logits.shape(0)});
    Tensor l = view_of(lse, F), p = view_of(picked, F);
    cross_entropy_stats(view_of(logits, F), view_of(targets, I), first, l, p);
    return py::make_tuple(lse, picked);
  });
  k.def("cross_entropy_backward", [=](FloatArray logits, const IntArray& targets, int64_t first,
                                      const FloatArray& lse, float z_loss, float grad_scale) {
    Tensor z = view_of(logits, F);
    cross_entropy_backward(z, view_of(targets, I), first, view_of(lse, F), z_loss, grad_scale);
    return logits;
  });
  // The shared per-element math (palmcore/math/*.h) itself, element by element, for
  // tests/test_shared_math.py (this file is compiled without -march=native: no contraction).
  k.def("exp_approx", py::vectorize([](float x) { return exp_approx(x); }));
  k.def("silu", py::vectorize([](float x) { return silu(x); }));
  k.def("silu_grad", py::vectorize([](float x) { return silu_grad(x); }));
  // (out, dgate, dup) of SwiGLU per element
  k.def("swiglu_elementwise", [](const FloatArray& g, const FloatArray& u, const FloatArray& dout) {
    auto out = zeros_like_shape(shape_of(g)), dgate = zeros_like_shape(shape_of(g)), dup = zeros_like_shape(shape_of(g));
    for (py::ssize_t i = 0; i < g.size(); ++i) {
      out.mutable_data()[i] = swiglu(g.data()[i], u.data()[i]);
      swiglu_backward(g.data()[i], u.data()[i], dout.data()[i], dgate.mutable_data()[i], dup.mutable_data()[i]);
    }
    return py::make_tuple(out, dgate, dup);
  });
  // θ[p, i] = rope_angle(positions[p], i, head_dim, base), float64 [len(positions), head_dim / 2]
  k.def("rope_angles", [](const std::vector<int64_t>& positions, int64_t head_dim, double base) {
    const int64_t half = head_dim / 2;
    py::array_t<double> theta({static_cast<int64_t>(positions.size()), half});
    for (size_t p = 0; p < positions.size(); ++p)
      for (int64_t i = 0; i < half; ++i) theta.mutable_data()[p * half + i] = rope_angle(positions[p], i, head_dim, base);
    return theta;
  });
  // (x1', x2') = rotate_pair(x1, x2, cos, sin) per element
  k.def("rotate_pair", [](FloatArray x1, FloatArray x2, const FloatArray& c, const FloatArray& s) {
    for (py::ssize_t i = 0; i < x1.size(); ++i) rotate_pair(x1.mutable_data()[i], x2.mutable_data()[i], c.data()[i], s.data()[i]);
    return py::make_tuple(x1, x2);
  });
  k.def("philox", [](uint64_t key, std::array<uint32_t, 4> counter) {
    const PhiloxBlock r = philox4x32(key, {{counter[0], counter[1], counter[2], counter[3]}});
    return py::make_tuple(r[0], r[1], r[2], r[3]);
  });
  // shared_math_row (cuda/shared_math_check.h) for every (x[i], y[i]) on `device`: [n, 9]
  k.def(
      "shared_math_rows",
      [](const FloatArray& x, const FloatArray& y, const std::string& device) {
        const int64_t n = x.size();
        py::array_t<float> rows({n, static_cast<int64_t>(kSharedMathColumns)});
        if (parse_device(device).first == Device::CPU) {
          for (int64_t i = 0; i < n; ++i) shared_math_row(x.data()[i], y.data()[i], rows.mutable_data() + i * kSharedMathColumns);
        } else {
#ifdef PALMCORE_CUDA
          const std::vector<float> back = cuda::shared_math_rows({x.data(), x.data() + n}, {y.data(), y.data() + n});
          std::memcpy(rows.mutable_data(), back.data(), back.size() * sizeof(float));
#endif
        }
        return rows;
      },
      py::arg("x"), py::arg("y"), py::arg("device") = "cpu");
  // ---- The element-wise and row-wise ops on any device (CUDA kernels of csrc/cuda/{embedding,
  // add,layernorm,rope,swiglu,kv_cache}.cu), for tests/test_backend_ops_elementwise.py ----
  // <op>_on(..., device): every array goes to `device` as a view `kGuard` elements into a
  // buffer of its own (data at an odd offset, as the model's views are), whose other bytes are
  // all 0xFF (NaN as float32); an output that the op overwrites starts all 0xFF too, so an
  // element it misses stays NaN. The op runs there; the tensors come back as new arrays, and a
  // kernel that wrote outside its tensors raises RuntimeError.
  struct Placed {
    Tensor whole, view;
  };
  constexpr int64_t kGuard = 7;
  auto place_bytes = [](const void* data, std::vector<int64_t> shape, DType dtype, Device d) {
    int64_t n = 1;
    for (int64_t e : shape) n *= e;
    const size_t size = dtype_size(dtype);
    std::vector<unsigned char> host((n + 2 * kGuard) * size, 0xFF);
    if (data) std::memcpy(host.data() + kGuard * size, data, n * size);
    Placed p;
    p.whole = Tensor::zeros({n + 2 * kGuard}, dtype, d);
    copy(Tensor::borrow(host.data(), {n + 2 * kGuard}, dtype), p.whole);
    p.view = p.whole.view(kGuard, shape);
    return p;
  };
  auto place = [=](const py::array& a, Device d) {
    if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("expected a C-contiguous array");
    return place_bytes(a.data(), shape_of(a), dtype_of_array(a), d);
  };
  auto fresh = [=](std::vector<int64_t> shape, Device d) { return place_bytes(nullptr, std::move(shape), F, d); };
  auto back = [](const Placed& p, const char* op) -> py::array {
    const Tensor host = p.whole.to(Device::CPU);
    const size_t size = dtype_size(host.dtype()), n = static_cast<size_t>(p.view.numel());
    const auto* bytes = static_cast<const unsigned char*>(host.raw_data());
    const bool intact = std::all_of(bytes, bytes + kGuard * size, [](unsigned char b) { return b == 0xFF; }) &&
                        std::all_of(bytes + (kGuard + n) * size, bytes + (2 * kGuard + n) * size,
                                    [](unsigned char b) { return b == 0xFF; });
    if (!intact) throw std::runtime_error(std::string(op) + ": the kernel wrote outside its tensors");
    return to_numpy(host.view(kGuard, p.view.shape()));
  };
  k.def(
      "embedding_forward_on",
      [=](const py::array& table, const py::array& tokens, int64_t first, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed t = place(table, d), ids = place(tokens, d);
        Placed out = fresh({ids.view.numel(), t.view.dim(1)}, d);
        {
          py::gil_scoped_release release;
          embedding_forward(t.view, ids.view, out.view, first);
        }
        return back(out, "embedding_forward");
      },
      py::arg("table"), py::arg("tokens"), py::arg("first"), py::arg("device"));
  k.def(
      "embedding_backward_on",
      [=](const py::array& dout, const py::array& tokens, const py::array& dtable, int64_t first,
          const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed dy = place(dout, d), ids = place(tokens, d);
        Placed dt = place(dtable, d);
        {
          py::gil_scoped_release release;
          embedding_backward(dy.view, ids.view, dt.view, first);
        }
        return back(dt, "embedding_backward");
      },
      py::arg("dout"), py::arg("tokens"), py::arg("dtable"), py::arg("first"), py::arg("device"));
  k.def(
      "add_to_on",
      [=](const py::array& x, const py::array& y, const std::string& device) {
        const Device d = parse_device(device).first;
        Placed xs = place(x, d);
        const Placed ys = place(y, d);
        {
          py::gil_scoped_release release;
          add_to(xs.view, ys.view);
        }
        return back(xs, "add_to");
      },
      py::arg("x"), py::arg("y"), py::arg("device"));
  // (out, xhat, rstd)
  k.def(
      "layernorm_forward_on",
      [=](const py::array& x, const py::array& scale, float eps, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed xs = place(x, d), g = place(scale, d);
        Placed out = fresh(xs.view.shape(), d), xhat = fresh(xs.view.shape(), d), rstd = fresh({xs.view.dim(0)}, d);
        {
          py::gil_scoped_release release;
          layernorm_forward(xs.view, g.view, eps, out.view, xhat.view, rstd.view);
        }
        return py::make_tuple(back(out, "layernorm_forward"), back(xhat, "layernorm_forward"),
                              back(rstd, "layernorm_forward"));
      },
      py::arg("x"), py::arg("scale"), py::arg("eps"), py::arg("device"));
  // (dx, dscale), both accumulated into the arrays given
  k.def(
      "layernorm_backward_on",
      [=](const py::array& dout, const py::array& xhat, const py::array& rstd, const py::array& scale,
          const py::array& dx, const py::array& dscale, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed dy = place(dout, d), xh = place(xhat, d), rs = place(rstd, d), g = place(scale, d);
        Placed ddx = place(dx, d), dg = place(dscale, d);
        {
          py::gil_scoped_release release;
          layernorm_backward(dy.view, xh.view, rs.view, g.view, ddx.view, dg.view);
        }
        return py::make_tuple(back(ddx, "layernorm_backward"), back(dg, "layernorm_backward"));
      },
      py::arg("dout"), py::arg("xhat"), py::arg("rstd"), py::arg("scale"), py::arg("dx"), py::arg("dscale"),
      py::arg("device"));
  // x rotated in place at `positions`, with the model's tables (make_rope_tables, built on the
  // host for max(positions) + 1 positions) placed on `device`
  k.def(
      "rope_apply_on",
      [=](const py::array& x, const IntArray& positions, int64_t heads, double base, bool inverse,
          const std::string& device) {
        const Device d = parse_device(device).first;
        int32_t max_pos = 0;
        for (py::ssize_t i = 0; i < positions.size(); ++i) max_pos = std::max(max_pos, positions.data()[i]);
        if (heads < 1 || x.ndim() != 2 || x.shape(1) % heads)
          throw std::invalid_argument("rope_apply_on: x must be [rows, heads * dh]");
        Tensor cos_table, sin_table;
        make_rope_tables(max_pos + 1, x.shape(1) / heads, base, cos_table, sin_table);
        const Placed c = place_bytes(cos_table.host_data<float>(), cos_table.shape(), F, d);
        const Placed s = place_bytes(sin_table.host_data<float>(), sin_table.shape(), F, d);
        Placed xs = place(x, d);
        const Placed pos = place(positions, d);
        {
          py::gil_scoped_release release;
          rope_apply(xs.view, pos.view, c.view, s.view, heads, inverse);
        }
        return back(xs, "rope_apply");
      },
      py::arg("x"), py::arg("positions"), py::arg("heads"), py::arg("base"), py::arg("inverse"), py::arg("device"));
  k.def(
      "swiglu_forward_on",
      [=](const py::array& gate, const py::array& up, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed g = place(gate, d), u = place(up, d);
        Placed out = fresh(g.view.shape(), d);
        {
          py::gil_scoped_release release;
          swiglu_forward(g.view, u.view, out.view);
        }
        return back(out, "swiglu_forward");
      },
      py::arg("gate"), py::arg("up"), py::arg("device"));
  // (dgate, dup)
  k.def(
      "swiglu_backward_on",
      [=](const py::array& gate, const py::array& up, const py::array& dout, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed g = place(gate, d), u = place(up, d), dy = place(dout, d);
        Placed dg = fresh(g.view.shape(), d), du = fresh(g.view.shape(), d);
        {
          py::gil_scoped_release release;
          swiglu_backward(g.view, u.view, dy.view, dg.view, du.view);
        }
        return py::make_tuple(back(dg, "swiglu_backward"), back(du, "swiglu_backward"));
      },
      py::arg("gate"), py::arg("up"), py::arg("dout"), py::arg("device"));
  // (k_cache, v_cache) after writing k, v into the caches given
  k.def(
      "kv_cache_write_on",
      [=](const py::array& kk, const py::array& v, const py::array& slots, const py::array& positions,
          const py::array& k_cache, const py::array& v_cache, int64_t capacity, const std::string& device) {
        const Device d = parse_device(device).first;
        const Placed ks = place(kk, d), vs = place(v, d), sl = place(slots, d), pos = place(positions, d);
        Placed kc = place(k_cache, d), vc = place(v_cache, d);
        {
          py::gil_scoped_release release;
          kv_cache_write(ks.view, vs.view, sl.view, pos.view, kc.view, vc.view, capacity);
        }
        return py::make_tuple(back(kc, "kv_cache_write"), back(vc, "kv_cache_write"));
      },
      py::arg("k"), py::arg("v"), py::arg("slots"), py::arg("positions"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("capacity"), py::arg("device"));
  // ---- end of the element-wise and row-wise ops on any device ----
  // ---- Loss and optimizer ops on any device (tests/test_backend_ops_loss_optim.py): the
  // arrays go to `device`, the op runs there, the results come back as new arrays (the inputs
  // are not changed). float64 arrays (the sums) travel through `f64_on`.
  {
    auto f64_on = [](const py::array_t<double, py::array::c_style>& a, Device d) {
      Tensor t = Tensor::zeros(shape_of(a), DType::F64, d);
      copy(Tensor::borrow(const_cast<double*>(a.data()), shape_of(a), DType::F64), t);
      return t;
    };
    auto back = [](const Tensor& t) { return to_numpy(t.to(Device::CPU)); };
    using F64Array = py::array_t<double, py::array::c_style>;
    // The optimizers' rounded copy of x (`rounded`: "float32" or "bfloat16"; "" for none), NaN-filled
    // so that a missed element shows.
    auto rounded_copy = [](const std::string& rounded, const Tensor& x) -> std::optional<Tensor> {
      if (rounded.empty()) return std::nullopt;
      if (rounded != "float32" && rounded != "bfloat16")
        throw std::invalid_argument("rounded must be '', 'float32' or 'bfloat16'");
      Tensor nan = Tensor::zeros(x.shape(), DType::F32);
      std::fill(nan.host_data<float>(), nan.host_data<float>() + nan.numel(), std::nanf(""));
      Tensor copy = Tensor::zeros(x.shape(), rounded == "bfloat16" ? DType::BF16 : DType::F32, x.device());
      palmcore::copy(nan, copy);  // (a NaN stays a NaN in bf16)
      return copy;
    };
    k.def(
        "cross_entropy_stats_on",
        [=](const FloatArray& logits, const IntArray& targets, int64_t first, const std::string& device) {
          const Device d = parse_device(device).first;
          const Tensor z = on_device(logits, d), y = on_device(targets, d);
          Tensor lse = Tensor::zeros({z.dim(0)}, F, d), picked = Tensor::zeros({z.dim(0)}, F, d);
          cross_entropy_stats(z, y, first, lse, picked);
          return py::make_tuple(back(lse), back(picked));
        },
        py::arg("logits"), py::arg("targets"), py::arg("first"), py::arg("device") = "cpu");
    k.def(
        "cross_entropy_backward_on",
        [=](const FloatArray& logits, const IntArray& targets, int64_t first, const FloatArray& lse, float z_loss,
            float grad_scale, const std::string& device) {
          const Device d = parse_device(device).first;
          Tensor z = on_device(logits, d);
          cross_entropy_backward(z, on_device(targets, d), first, on_device(lse, d), z_loss, grad_scale);
          return back(z);
        },
        py::arg("logits"), py::arg("targets"), py::arg("first"), py::arg("lse"), py::arg("z_loss"),
        py::arg("grad_scale"), py::arg("device") = "cpu");
    k.def(
        "lse_combine_on",
        [=](const FloatArray& lse, const FloatArray& top, bool to_back, const std::string& device) {
          const Device d = parse_device(device).first;
          Tensor l = on_device(lse, d);
          lse_combine(l, on_device(top, d), to_back);
          return back(l);
        },
        py::arg("lse"), py::arg("top"), py::arg("back"), py::arg("device") = "cpu");
    k.def(
        "cross_entropy_sums_on",
        [=](const FloatArray& lse, const FloatArray& picked, const IntArray& targets, double z_loss, const F64Array& sums,
            const std::string& device) {
          const Device d = parse_device(device).first;
          Tensor s = f64_on(sums, d);
          cross_entropy_sums(on_device(lse, d), on_device(picked, d), on_device(targets, d), z_loss, s);
          return back(s);
        },
        py::arg("lse"), py::arg("picked"), py::arg("targets"), py::arg("z_loss"), py::arg("sums"),
        py::arg("device") = "cpu");
    k.def(
        "sum_squares_on",
        [=](const FloatArray& x, const F64Array& sums, int64_t index, const std::string& device) {
          const Device d = parse_device(device).first;
          Tensor s = f64_on(sums, d);
          sum_squares(on_device(x, d), s, index);
          return back(s);
        },
        py::arg("x"), py::arg("sums"), py::arg("index"), py::arg("device") = "cpu");
    // Adafactor settings as keywords (the defaults of palmcore/ops.h)
    auto adafactor_settings = [](double beta1, double decay, double clip, double eps, double min_scale) {
      return AdafactorSettings{beta1, decay, clip, eps, min_scale};
    };
    k.def(
        "adafactor_second_moment_on",
        [=](const FloatArray& x, const FloatArray& g, const FloatArray& v, int64_t step, double grad_scale,
            const F64Array& sums, int64_t index, const std::string& device, double beta1, double decay, double clip,
            double eps, double min_scale) {
          const Device d = parse_device(device).first;
          Tensor vv = on_device(v, d), s = f64_on(sums, d);
          adafactor_second_moment(on_device(x, d), on_device(g, d), vv, step, grad_scale,
                                  adafactor_settings(beta1, decay, clip, eps, min_scale), s, index);
          return py::make_tuple(back(vv), back(s));
        },
        py::arg("x"), py::arg("g"), py::arg("v"), py::arg("step"), py::arg("grad_scale"), py::arg("sums"),
        py::arg("index"), py::arg("device") = "cpu", py::arg("beta1") = 0.9, py::arg("decay") = 0.8,
        py::arg("clip") = 1.0, py::arg("eps") = 1e-30, py::arg("min_scale") = 1e-3);
    k.def(
        "adafactor_apply_on",
        [=](const FloatArray& x, const FloatArray& g, const FloatArray& m, const FloatArray& v, double lr,
            double grad_scale, double rms_u, double rms_x, const std::string& device, double beta1, double decay,
            double clip, double eps, double min_scale, const std::string& rounded) {
          const Device d = parse_device(device).first;
          Tensor xx = on_device(x, d), mm = on_device(m, d);
          std::optional<Tensor> copy = rounded_copy(rounded, xx);
          adafactor_apply(xx, on_device(g, d), mm, on_device(v, d), lr, grad_scale, rms_u, rms_x,
                          adafactor_settings(beta1, decay, clip, eps, min_scale), copy ? &*copy : nullptr);
          py::tuple out = py::make_tuple(back(xx), back(mm));
          return copy ? py::tuple(out + py::make_tuple(back(*copy))) : out;
        },
        py::arg("x"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("lr"), py::arg("grad_scale"),
        py::arg("rms_u"), py::arg("rms_x"), py::arg("device") = "cpu", py::arg("beta1") = 0.9,
        py::arg("decay") = 0.8, py::arg("clip") = 1.0, py::arg("eps") = 1e-30, py::arg("min_scale") = 1e-3,
        py::arg("rounded") = "");
    k.def(
        "adamw_update_on",
        [=](const FloatArray& x, const FloatArray& g, const FloatArray& m, const FloatArray& v, int64_t step, double lr,
            double grad_scale, const std::string& device, double beta1, double beta2, double eps, double weight_decay,
            const std::string& rounded) {
          const Device d = parse_device(device).first;
          Tensor xx = on_device(x, d), mm = on_device(m, d), vv = on_device(v, d);
          std::optional<Tensor> copy = rounded_copy(rounded, xx);
          adamw_update(xx, on_device(g, d), mm, vv, step, lr, grad_scale,
                       AdamWSettings{beta1, beta2, eps, weight_decay}, copy ? &*copy : nullptr);
          py::tuple out = py::make_tuple(back(xx), back(mm), back(vv));
          return copy ? py::tuple(out + py::make_tuple(back(*copy))) : out;
        },
        py::arg("x"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("step"), py::arg("lr"),
        py::arg("grad_scale"), py::arg("device") = "cpu", py::arg("beta1") = 0.9, py::arg("beta2") = 0.95,
        py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("rounded") = "");
  }
  // ---- end of the loss and optimizer ops on any device
  // ---- attention on any device (tests/test_backend_ops_attention.py) ----
  // The three attention ops with the whole AttentionShape (a shard's first_head / group, the
  // bf16 flag): the arrays go to `device`, the op runs there, the results come back as fresh
  // float32 arrays. heads = this shard's query heads, kv_heads = all key/value heads.
  auto attention_shape = [](int64_t batch, int64_t seq_rows, int64_t heads, int64_t kv_heads, int64_t width,
                            int64_t first_head, int64_t group, bool bf16) {
    if (batch <= 0 || heads <= 0 || kv_heads <= 0 || seq_rows % batch != 0 || width % heads != 0)
      throw std::invalid_argument("attention: batch, heads and kv_heads must be positive and divide the arrays");
    AttentionShape s{batch, seq_rows / batch, heads, kv_heads, width / heads};
    s.first_head = first_head;
    s.group = group;
    s.bf16 = bf16;
    return s;
  };
  // storage "bfloat16": q, k, v, out (and dout, dq, dk, dv) are bfloat16 tensors on the device
  // (the arrays given are converted, rounding; results come back widened to float32 arrays).
  auto storage_dtype = [](const std::string& storage) {
    if (storage != "float32" && storage != "bfloat16")
      throw std::invalid_argument("storage must be 'float32' or 'bfloat16', got '" + storage + "'");
    return storage == "bfloat16" ? DType::BF16 : DType::F32;
  };
  auto stored = [](const Tensor& t, DType dtype) {
    if (dtype == t.dtype()) return t;
    Tensor out = Tensor::zeros(t.shape(), dtype, t.device());
    copy(t, out);
    return out;
  };
  auto to_host_f32 = [=](const Tensor& t) { return stored(t, F).to(Device::CPU); };
  k.def(
      "attention_forward_on",
      [=](const FloatArray& q, const FloatArray& kk, const FloatArray& v, int64_t batch, int64_t heads,
          int64_t kv_heads, int64_t first_head, int64_t group, bool bf16, const std::string& device,
          const std::string& storage) {
        const Device d = parse_device(device).first;
        const DType st = storage_dtype(storage);
        const AttentionShape s = attention_shape(batch, q.shape(0), heads, kv_heads, q.shape(1), first_head, group, bf16);
        const Tensor Q = stored(on_device(q, d), st), Kt = stored(on_device(kk, d), st), V = stored(on_device(v, d), st);
        Tensor out = Tensor::zeros(Q.shape(), st, d), lse = Tensor::zeros({batch * heads * s.seq}, F, d);
        AttentionWorkspace ws = AttentionWorkspace::create(s, d, false);
        Tensor out_host, lse_host;
        {
          py::gil_scoped_release release;
          attention_forward(Q, Kt, V, out, lse, s, ws);
          out_host = to_host_f32(out);
          lse_host = lse.to(Device::CPU);
        }
        return py::make_tuple(to_numpy(out_host), to_numpy(lse_host));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("batch"), py::arg("heads"), py::arg("kv_heads"),
      py::arg("first_head") = 0, py::arg("group") = 0, py::arg("bf16") = false, py::arg("device") = "cpu",
      py::arg("storage") = "float32");
  k.def(
      "attention_backward_on",
      [=](const FloatArray& q, const FloatArray& kk, const FloatArray& v, const FloatArray& out, const FloatArray& lse,
          const FloatArray& dout, int64_t batch, int64_t heads, int64_t kv_heads, int64_t first_head, int64_t group,
          bool bf16, const std::string& device, const std::string& storage) {
        const Device d = parse_device(device).first;
        const DType st = storage_dtype(storage);
        const AttentionShape s = attention_shape(batch, q.shape(0), heads, kv_heads, q.shape(1), first_head, group, bf16);
        const Tensor Q = stored(on_device(q, d), st), Kt = stored(on_device(kk, d), st), V = stored(on_device(v, d), st),
                     O = stored(on_device(out, d), st), L = on_device(lse, d), dO = stored(on_device(dout, d), st);
        Tensor dq = Tensor::zeros(Q.shape(), st, d), dk = Tensor::zeros(Kt.shape(), st, d),
               dv = Tensor::zeros(V.shape(), st, d);
        AttentionWorkspace ws = AttentionWorkspace::create(s, d, true);
        Tensor dq_host, dk_host, dv_host;
        {
          py::gil_scoped_release release;
          attention_backward(Q, Kt, V, O, L, dO, dq, dk, dv, s, ws);
          dq_host = to_host_f32(dq);
          dk_host = to_host_f32(dk);
          dv_host = to_host_f32(dv);
        }
        return py::make_tuple(to_numpy(dq_host), to_numpy(dk_host), to_numpy(dv_host));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("batch"),
      py::arg("heads"), py::arg("kv_heads"), py::arg("first_head") = 0, py::arg("group") = 0, py::arg("bf16") = false,
      py::arg("device") = "cpu", py::arg("storage") = "float32");
  k.def(
      "attention_cached_on",
      [=](const FloatArray& q, const IntArray& slots, const IntArray& positions, const FloatArray& k_cache,
          const FloatArray& v_cache, int64_t n_slots, int64_t heads, int64_t kv_heads, bool bf16,
          const std::string& device) {
        const Device d = parse_device(device).first;
        const AttentionShape s = attention_shape(n_slots, k_cache.shape(0), heads, kv_heads, q.shape(1), 0, 0, bf16);
        const Tensor Q = on_device(q, d), S = on_device(slots, d), P = on_device(positions, d),
                     Kc = on_device(k_cache, d), Vc = on_device(v_cache, d);
        Tensor out = Tensor::zeros(Q.shape(), F, d);
        AttentionWorkspace ws = AttentionWorkspace::create(s, d, false);
        Tensor out_host;
        {
          py::gil_scoped_release release;
          attention_cached(Q, S, P, Kc, Vc, out, s, ws);
          out_host = out.to(Device::CPU);
        }
        return to_numpy(out_host);
      },
      py::arg("q"), py::arg("slots"), py::arg("positions"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("n_slots"), py::arg("heads"), py::arg("kv_heads"), py::arg("bf16") = false, py::arg("device") = "cpu");
  // ---- end of attention on any device ----
}

}  // namespace palmcore::bindings
