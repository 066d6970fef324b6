// The product's Python bindings (the module palmcore._core): they convert arrays, check what the
// C++ side cannot know (dtype, contiguity, rank), release the GIL around compute, and call the
// runtime. The test-only ops are bound in kernels.cpp, the shared conversions are arrays.cpp's.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "palmcore/benchmark.h"
#include "palmcore/build_info.h"
#include "palmcore/communicator.h"
#include "palmcore/generator.h"
#include "palmcore/memory.h"
#include "palmcore/model.h"
#include "palmcore/ops.h"
#include "palmcore/optimizer.h"
#include "palmcore/sampler.h"
#include "palmcore/schedule.h"
#include "palmcore/threads.h"

namespace py = pybind11;
using namespace palmcore;
using namespace palmcore::bindings;

namespace {

// A model and the lock that serializes calls on it: compute runs with the GIL released, so two
// Python threads could otherwise enter one model at once.
struct LockedModel {
  LockedModel(Model m, std::string device) : model(std::move(m)), device(std::move(device)) {}
  Model model;
  std::string device;  // "cpu" or "cuda:N"
  std::mutex mutex;
};

// An optimizer and the model whose lock it takes (Python keeps the model alive).
struct LockedOptimizer {
  LockedOptimizer(LockedModel& owner, OptimizerKind kind, const AdafactorSettings& a, const AdamWSettings& w,
                  std::shared_ptr<Communicator> data_comm)
      : owner(owner), optimizer(owner.model, kind, a, w, std::move(data_comm)) {}
  LockedModel& owner;
  Optimizer optimizer;
};

// A key/value cache and the model whose lock it takes (Python keeps the model alive).
struct LockedCache {
  LockedCache(LockedModel& owner, int64_t slots, int64_t capacity)
      : owner(owner), cache(owner.model.make_cache(slots, capacity)) {}
  LockedModel& owner;
  KVCache cache;
};

// A generation in progress and the model whose lock it takes.
struct LockedGenerator {
  LockedGenerator(LockedModel& owner, std::vector<std::vector<int32_t>> prompts, GenerationSettings settings)
      : owner(owner), generator(owner.model, std::move(prompts), std::move(settings)) {}
  LockedModel& owner;
  Generator generator;
};

}  // namespace

// Runs f() with the GIL released and `model`'s lock held, and returns what it returns (which
// must not be a Python object). The lock is taken only after releasing the GIL and dropped
// before taking the GIL back, so the two locks cannot deadlock.
template <typename F>
static auto run_locked(LockedModel& model, F&& f) -> decltype(f()) {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> guard(model.mutex);
  return f();
}

static Tensor borrow_tokens(const IntArray& tokens, const char* what) {
  if (tokens.ndim() != 2)
    throw std::invalid_argument(std::string(what) + " must be 2-D [batch, seq], got " +
                                std::to_string(tokens.ndim()) + "-D");
  return Tensor::borrow(const_cast<int32_t*>(tokens.data()), shape_of(tokens), DType::I32);
}

// Threads of the CPU kernels, and the machine measurements behind the roofline numbers.
static void bind_runtime_info(py::module_& m) {
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  // "fast" or "plain": which CUDA kernels run where both exist (palmcore/ops.h KernelChoice)
  m.def(
      "set_kernels",
      [](const std::string& choice) {
        if (choice != "fast" && choice != "plain")
          throw std::invalid_argument("kernels must be 'fast' or 'plain', got '" + choice + "'");
        set_kernel_choice(choice == "plain" ? KernelChoice::Plain : KernelChoice::Fast);
      },
      py::arg("choice"));
  m.def("set_cuda_graphs", &set_cuda_graphs, py::arg("on"));
  m.def("cuda_graphs", &cuda_graphs);
  m.def("kernel_choice", [] { return kernel_choice() == KernelChoice::Plain ? "plain" : "fast"; });
  m.def("get_num_threads", &get_num_threads);
  m.def("measure_sgemm_gflops", &measure_matmul_gflops, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("repeats") = 5, py::call_guard<py::gil_scoped_release>());
  m.def("measure_copy_gbps", &measure_copy_gbps, py::arg("bytes"), py::arg("repeats") = 5,
        py::call_guard<py::gil_scoped_release>());
  m.def("measure_read_gbps", &measure_read_gbps, py::arg("bytes"), py::arg("repeats") = 5,
        py::call_guard<py::gil_scoped_release>());
}

// The memory guard: the memory the machine can still give, and an optional cap on palmcore's
// own live bytes (an allocation beyond either raises ValueError).
// What was compiled in and which CUDA devices the process sees (palmcore info, cuda_available).
static void bind_build_info(py::module_& m) {
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["compiler"] = b.compiler;
    d["cpu_features"] = b.cpu_features;
    d["blas"] = b.blas;
    d["blas_config"] = b.blas_config;
    d["mpi"] = b.mpi;
    d["cuda_option"] = b.cuda_option;
    d["cuda"] = b.cuda;
    d["cuda_emulated"] = b.cuda_emulated;
    d["cuda_version"] = b.cuda_version;
    d["cuda_runtime_version"] = b.cuda_runtime_version;
    d["cuda_architectures"] = b.cuda_architectures;
    d["cuda_architectures_default"] = b.cuda_architectures_default;
    d["nccl"] = b.nccl;
    return d;
  });
  m.def("cuda_devices", [] {
    py::list devices;
    for (const CudaDeviceInfo& c : cuda_devices()) {
      py::dict d;
      d["index"] = c.index;
      d["name"] = c.name;
      d["compute_capability"] = std::to_string(c.major) + "." + std::to_string(c.minor);
      d["multiprocessors"] = c.multiprocessors;
      d["total_memory"] = c.total_bytes;
      d["free_memory"] = c.free_bytes;
      devices.append(d);
    }
    return devices;
  });
  m.def("cuda_driver_version", &cuda_driver_version);
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason);
}

static void bind_memory(py::module_& m) {
  m.def("device_allocated_bytes", &device_allocated_bytes, py::arg("device") = 0);
  m.def("available_memory", &available_memory_bytes);
  m.def("set_memory_limit", &set_memory_limit, py::arg("bytes"));
  m.def("get_memory_limit", &memory_limit);
  m.def("allocated_bytes", &allocated_bytes);
}

// The model: construction, parameters by name, and the training-time forward / backward.
static std::unique_ptr<LockedModel> make_model(const py::dict& c, uint64_t seed, int64_t shard_rank,
                                               int64_t shard_size, std::shared_ptr<Communicator> model_comm,
                                               const std::string& device, std::shared_ptr<Communicator> data_comm) {
  const auto [d, index] = parse_device(device);
  const std::string device_label = d == Device::CPU ? "cpu" : "cuda:" + std::to_string(index);
  ModelConfig config{c["vocab_size"].cast<int64_t>(), c["d_model"].cast<int64_t>(),
                     c["n_layers"].cast<int64_t>(),   c["n_heads"].cast<int64_t>(),
                     c["n_kv_heads"].cast<int64_t>(), c["head_dim"].cast<int64_t>(),
                     c["ffn_dim"].cast<int64_t>(),    c["max_seq_len"].cast<int64_t>(),
                     c["rope_base"].cast<double>(),   c["norm_eps"].cast<double>(),
                     c["z_loss"].cast<double>()};
  if (c.contains("n_experts")) {  // PALM_SPEC "Sparse activation" (a config from before it is dense)
    config.n_experts = c["n_experts"].cast<int64_t>();
    config.expert_top_k = c["expert_top_k"].cast<int64_t>();
    config.expert_ffn_dim = c["expert_ffn_dim"].cast<int64_t>();
    config.moe_every = c["moe_every"].cast<int64_t>();
    config.router_aux_loss = c["router_aux_loss"].cast<double>();
    config.router_z_loss = c["router_z_loss"].cast<double>();
  }
  py::gil_scoped_release release;
  return std::make_unique<LockedModel>(Model(config, seed, d,
                                             ModelShard{shard_rank, shard_size, std::move(model_comm), std::move(data_comm)}),
                                       device_label);
}

// A float32 copy of one of the model's tensors, taken under the model's lock (a step in
// another thread holds that lock for long).
template <typename Get>
static py::array_t<float> copy_out(LockedModel& self, const std::vector<int64_t>& shape, Get get) {
  py::array_t<float> out(shape);
  float* dst = out.mutable_data();
  run_locked(self, [&] {
    const Tensor t = get(self.model).to(Device::CPU);
    std::memcpy(dst, t.host_data<float>(), t.numel() * sizeof(float));
  });
  return out;
}

static void bind_model(py::module_& m) {
  py::class_<LockedModel>(m, "Model")
      .def(py::init(&make_model), py::arg("config"), py::arg("seed"), py::arg("shard_rank") = 0,
           py::arg("shard_size") = 1, py::arg("model_comm") = nullptr, py::arg("device") = "cpu",
           py::arg("data_comm") = nullptr)
      .def_property_readonly("device", [](const LockedModel& self) { return self.device; })
      .def("param_names",
           [](const LockedModel& self) {
             std::vector<std::string> names;
             for (const ParamInfo& p : self.model.params_info()) names.push_back(p.name);
             return names;
           })
      .def("param_shape", [](const LockedModel& self, const std::string& name) { return self.model.info(name).shape; })
      .def("param_layout",
           [](const LockedModel& self, const std::string& name) {
             const ParamInfo& p = self.model.info(name);
             return py::make_tuple(p.full_shape, p.split_axis, p.split_offset, p.offset);
           })
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
             run_locked(self, [&] {
               Tensor dst = self.model.param(name);
               for (int64_t i = 0; i < dst.numel(); ++i)
                 if (!std::isfinite(src[i]))
                   throw std::invalid_argument("parameter '" + name + "' holds a non-finite value (NaN or Inf)");
               copy(Tensor::borrow(const_cast<float*>(src), shape, DType::F32), dst);
               self.model.param_changed(name);
             });
           })
      // storage: "bfloat16" or "float32", the bf16 mode's storage (palmcore/model.h); None: the
      // device's own (bfloat16 on CUDA, float32 on the CPU)
      .def(
          "set_precision",
          [](LockedModel& self, const std::string& precision, const std::optional<std::string>& storage) {
            if (precision != "fp32" && precision != "bf16")
              throw std::invalid_argument("precision must be 'fp32' or 'bf16', got '" + precision + "'");
            if (storage && *storage != "float32" && *storage != "bfloat16")
              throw std::invalid_argument("storage must be 'float32' or 'bfloat16', got '" + *storage + "'");
            const Precision p = precision == "bf16" ? Precision::BF16 : Precision::FP32;
            run_locked(self, [&] {
              if (storage)
                self.model.set_precision(p, *storage == "bfloat16" ? DType::BF16 : DType::F32);
              else
                self.model.set_precision(p);
            });
          },
          py::arg("precision"), py::arg("storage") = py::none())
      .def("precision",
           [](LockedModel& self) { return self.model.precision() == Precision::BF16 ? "bf16" : "fp32"; })
      // "fp32", "bf16" or "int8": the GEMM weights' form for decoding (palmcore/compact_weights.h)
      .def("set_weight_format",
           [](LockedModel& self, const std::string& name) {
             WeightFormat format = WeightFormat::F32;
             if (name == "bf16")
               format = WeightFormat::BF16;
             else if (name == "int8")
               format = WeightFormat::Q8;
             else if (name != "fp32")
               throw std::invalid_argument("weights must be 'fp32', 'bf16' or 'int8', got '" + name + "'");
             run_locked(self, [&] { self.model.set_weight_format(format); });
           })
      .def("weight_format", [](LockedModel& self) { return std::string(weight_format_name(self.model.weight_format())); })
      .def("activation_dtype", [](LockedModel& self) { return std::string(dtype_name(self.model.activation_dtype())); })
      .def("forward",
           [](LockedModel& self, const IntArray& tokens) {
             Tensor t = borrow_tokens(tokens, "tokens");
             self.model.check_shape(t, "tokens");  // before allocating [B, T, V]
             const int64_t V = self.model.config().vocab_size;
             py::array_t<float> logits({t.dim(0), t.dim(1), V});
             Tensor out = Tensor::borrow(logits.mutable_data(), {t.dim(0) * t.dim(1), V}, DType::F32);
             run_locked(self, [&] { self.model.forward(t, out); });
             return logits;
           })
      .def("forward_backward",
           [](LockedModel& self, const IntArray& tokens, const IntArray& targets, int64_t total_tokens) {
             Tensor t = borrow_tokens(tokens, "tokens"), y = borrow_tokens(targets, "targets");
             const LossStats s = run_locked(self, [&] { return self.model.forward_backward(t, y, total_tokens); });
             py::dict out;
             out["loss"] = s.loss;
             out["ce"] = s.ce;
             out["tokens"] = s.tokens;
             if (!s.expert_load.empty()) {
               out["balance"] = s.balance;
               out["router_z"] = s.router_z;
               out["expert_load"] = s.expert_load;
             }
             return out;
           },
           py::arg("tokens"), py::arg("targets"), py::arg("total_tokens") = 0)
      .def("zero_grad", [](LockedModel& self) { run_locked(self, [&] { self.model.zero_grad(); }); });
}

// A tensor where `comm` works holding `host`'s elements: `host` itself (MPI, one rank) or a
// copy on the GPU (NCCL).
static Tensor where_comm_works(const Communicator& comm, const Tensor& host) {
  return comm.serves(Device::CPU) ? host : host.to(Device::CUDA);
}

// `there`'s elements back in `host` when it is a device copy.
static void back_to_host(const Tensor& there, Tensor& host) {
  if (there.raw_data() != host.raw_data()) copy(there, host);
}

// The collectives on C-contiguous arrays of one element type T (float32, float64, or uint16
// holding bfloat16 bits): reduced in place where the name says so, new arrays otherwise; the
// GIL is released while ranks exchange data. Bound once per T (pybind11 overloads).
template <typename T>
static void bind_collectives(py::class_<Communicator, std::shared_ptr<Communicator>>& c, DType dtype) {
  using Array = py::array_t<T, py::array::c_style>;
  auto reduce = [dtype](Communicator& comm, Array data, bool sum) {
    Tensor host = Tensor::borrow(data.mutable_data(), {static_cast<int64_t>(data.size())}, dtype);
    py::gil_scoped_release release;
    Tensor there = where_comm_works(comm, host);
    sum ? comm.all_reduce_sum(there) : comm.all_reduce_max(there);
    back_to_host(there, host);
  };
  c.def("all_reduce_sum", [reduce](Communicator& comm, Array data) { reduce(comm, data, true); });
  c.def("all_reduce_max", [reduce](Communicator& comm, Array data) { reduce(comm, data, false); });
  // a new array of `size` elements = collective(in, out), run where the communicator works
  auto into_new = [dtype](Communicator& comm, const Array& in, py::ssize_t size, auto collective) {
    Array out(size);
    Tensor host_in = Tensor::borrow(const_cast<T*>(in.data()), {static_cast<int64_t>(in.size())}, dtype);
    Tensor host_out = Tensor::borrow(out.mutable_data(), {static_cast<int64_t>(size)}, dtype);
    py::gil_scoped_release release;
    Tensor there_in = where_comm_works(comm, host_in), there_out = where_comm_works(comm, host_out);
    collective(there_in, there_out);
    back_to_host(there_out, host_out);
    return out;
  };
  c.def("reduce_scatter_sum", [into_new](Communicator& comm, const Array& in) {
    if (in.size() % comm.size())
      throw std::invalid_argument("reduce_scatter_sum: " + std::to_string(in.size()) +
                                  " elements do not split into " + std::to_string(comm.size()) + " blocks");
    return into_new(comm, in, in.size() / comm.size(),
                    [&](const Tensor& from, Tensor& to) { comm.reduce_scatter_sum(from, to); });
  });
  c.def("all_gather", [into_new](Communicator& comm, const Array& in) {
    return into_new(comm, in, in.size() * comm.size(),
                    [&](const Tensor& from, Tensor& to) { comm.all_gather(from, to); });
  });
}

// Collectives over one mesh axis: single rank, MPI (from an mpi4py handle) or NCCL (from a
// unique id its rank 0 made, on the CUDA device `device` names).
static void bind_communicators(py::module_& m) {
  m.def("built_with_mpi", &built_with_mpi);
  m.def("nccl_unique_id", [] { return py::bytes(nccl_unique_id()); });
  m.def("nccl_library_info", &nccl_library_info);
  py::class_<Communicator, std::shared_ptr<Communicator>> c(m, "Communicator");
  c.def_static("single_rank", []() { return std::shared_ptr<Communicator>(make_single_rank_communicator()); })
      .def_static("mpi", [](int64_t handle) { return std::shared_ptr<Communicator>(make_mpi_communicator(handle)); },
                  py::arg("handle"))
      .def_static("nccl",
                  [](const py::bytes& unique_id, int rank, int size, const std::string& device) {
                    if (parse_device(device).first != Device::CUDA)
                      throw std::invalid_argument("a NCCL communicator works on a CUDA device, not '" + device + "'");
                    const std::string id = unique_id;
                    py::gil_scoped_release release;  // until every rank of the group has joined
                    return std::shared_ptr<Communicator>(make_nccl_communicator(id, rank, size));
                  },
                  py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"))
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("name", &Communicator::name)
      .def_property_readonly("bytes_sent", &Communicator::bytes_sent)
      .def("barrier", [](Communicator& comm) {
        py::gil_scoped_release release;
        comm.barrier();
      });
  bind_collectives<float>(c, DType::F32);
  bind_collectives<double>(c, DType::F64);
  bind_collectives<uint16_t>(c, DType::BF16);
}

// Inference: a key/value cache fed by hand, and whole generations stepped from Python.
static std::unique_ptr<LockedGenerator> make_generator(LockedModel& model, std::vector<std::vector<int32_t>> prompts,
                                                       const py::dict& c) {
  GenerationSettings settings{sampling_settings(c), c["max_new_tokens"].cast<int64_t>(),
                              c["stop_tokens"].cast<std::vector<int32_t>>()};
  return run_locked(model, [&] { return std::make_unique<LockedGenerator>(model, std::move(prompts), std::move(settings)); });
}

static void bind_cache_and_generator(py::module_& m) {
  py::class_<LockedCache>(m, "KVCache")
      .def(py::init([](LockedModel& model, int64_t slots, int64_t capacity) {
             return run_locked(model, [&] { return std::make_unique<LockedCache>(model, slots, capacity); });
           }),
           py::arg("model"), py::arg("slots"), py::arg("capacity"), py::keep_alive<1, 2>())
      .def_property_readonly("lengths", [](const LockedCache& self) { return self.cache.lengths; })
      .def_property_readonly("nbytes",
                             [](const LockedCache& self) {
                               int64_t bytes = 0;
                               for (const Tensor& t : self.cache.keys) bytes += 2 * t.nbytes();  // keys and values
                               return bytes;
                             })
      .def("reset",
           [](LockedCache& self, int64_t slot) {
             run_locked(self.owner, [&] {
               if (slot < 0 || slot >= self.cache.slots)
                 throw std::invalid_argument("slot " + std::to_string(slot) + " is outside the cache's " +
                                             std::to_string(self.cache.slots) + " slots");
               self.cache.lengths[slot] = 0;  // its keys and values are overwritten as it is fed again
             });
           },
           py::arg("slot"))
      .def("feed", [](LockedCache& self, const IntArray& tokens, const IntArray& slots) {
        if (tokens.ndim() != 1 || slots.ndim() != 1)
          throw std::invalid_argument("tokens and slots must be 1-D arrays");
        const Tensor t = Tensor::borrow(const_cast<int32_t*>(tokens.data()), shape_of(tokens), DType::I32);
        const Tensor sl = Tensor::borrow(const_cast<int32_t*>(slots.data()), shape_of(slots), DType::I32);
        std::vector<float> values;  // copied under the lock: the model's next call reuses its logits
        int64_t rows = 0;
        run_locked(self.owner, [&] {
          const Tensor logits = self.owner.model.forward_cached(self.cache, t, sl).to(Device::CPU);
          rows = logits.dim(0);
          values.assign(logits.host_data<float>(), logits.host_data<float>() + logits.numel());
        });
        py::array_t<float> out({rows, self.owner.model.config().vocab_size});
        std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(float));
        return out;
      });

  py::class_<LockedGenerator>(m, "Generator")
      .def(py::init(&make_generator), py::arg("model"), py::arg("prompts"), py::arg("settings"),
           py::keep_alive<1, 2>())
      .def_property_readonly("done", [](const LockedGenerator& self) { return self.generator.done(); })
      .def("step", [](LockedGenerator& self) {
        const std::vector<Generator::Token> made = run_locked(self.owner, [&] { return self.generator.step(); });
        std::vector<std::pair<int64_t, int32_t>> out;
        for (const Generator::Token& t : made) out.emplace_back(t.row, t.token);
        return out;
      });
}

// Training: the optimizers over the model's flat parameters, and the learning-rate schedules.
static std::unique_ptr<LockedOptimizer> make_optimizer(LockedModel& model, const std::string& kind,
                                                       const py::dict& c, std::shared_ptr<Communicator> data_comm) {
  if (kind == "adafactor")
    return std::make_unique<LockedOptimizer>(
        model, OptimizerKind::Adafactor,
        AdafactorSettings{c["beta1"].cast<double>(), c["decay"].cast<double>(), c["clip"].cast<double>(),
                          c["eps"].cast<double>(), c["min_scale"].cast<double>()},
        AdamWSettings{}, std::move(data_comm));
  if (kind == "adamw")
    return std::make_unique<LockedOptimizer>(
        model, OptimizerKind::AdamW, AdafactorSettings{},
        AdamWSettings{c["beta1"].cast<double>(), c["beta2"].cast<double>(), c["eps"].cast<double>(),
                      c["weight_decay"].cast<double>()},
        std::move(data_comm));
  throw std::invalid_argument("unknown optimizer '" + kind + "'; known: adafactor, adamw");
}

static void bind_optimizer(py::module_& m) {
  py::register_exception<NonFiniteStep>(m, "NonFiniteStep", PyExc_RuntimeError);
  py::class_<LockedOptimizer>(m, "Optimizer")
      .def(py::init(&make_optimizer), py::arg("model"), py::arg("kind"), py::arg("settings"),
           py::arg("data_comm") = nullptr,
           py::keep_alive<1, 2>())
      .def("step",
           [](LockedOptimizer& self, double lr, double max_grad_norm, double grad_scale) {
             return run_locked(self.owner, [&] { return self.optimizer.step(lr, max_grad_norm, grad_scale); });
           })
      .def_property(
          "steps_taken", [](const LockedOptimizer& self) { return self.optimizer.steps_taken(); },
          [](LockedOptimizer& self, int64_t steps) {
            if (steps < 0) throw std::invalid_argument("steps_taken must be >= 0");
            self.optimizer.set_steps_taken(steps);
          })
      .def_property_readonly("state_share", [](const LockedOptimizer& self) { return self.optimizer.state_share(); })
      .def("moments",
           [](LockedOptimizer& self, int which) {
             if (which != 1 && which != 2) throw std::invalid_argument("moment must be 1 or 2");
             py::array_t<float> out(self.owner.model.flat_params().numel());
             float* dst = out.mutable_data();
             run_locked(self.owner, [&] { self.optimizer.gather_moment(which, dst); });
             return out;
           })
      .def("set_moments", [](LockedOptimizer& self, int which, const FloatArray& flat) {
        if (which != 1 && which != 2) throw std::invalid_argument("moment must be 1 or 2");
        if (flat.ndim() != 1 || flat.shape(0) != self.owner.model.flat_params().numel())
          throw std::invalid_argument("optimizer state must be one flat array laid out like the parameters");
        const float* src = flat.data();
        run_locked(self.owner, [&] { self.optimizer.scatter_moment(which, src); });
      });

  py::class_<Schedule>(m, "Schedule")
      .def(py::init([](const std::string& kind, double peak, int64_t constant_steps, int64_t warmup_steps,
                       int64_t total_steps, double floor) {
             Schedule s;
             if (kind == "palm") s.kind = Schedule::Kind::PaLM;
             else if (kind == "cosine") s.kind = Schedule::Kind::Cosine;
             else throw std::invalid_argument("unknown schedule '" + kind + "'; known: palm, cosine");
             s.peak = peak;
             s.constant_steps = constant_steps;
             s.warmup_steps = warmup_steps;
             s.total_steps = total_steps;
             s.floor = floor;
             s.validate();
             return s;
           }),
           py::arg("kind"), py::arg("peak"), py::arg("constant_steps"), py::arg("warmup_steps"),
           py::arg("total_steps"), py::arg("floor"))
      .def("__call__", &Schedule::at, py::arg("step"));
}

// The order matters to the docstrings: a signature names the Python type of a class bound before it.
// The server's sampler: sample_token for n rows of logits [n, V] at once, each with its own
// settings (the rows belong to different requests), in parallel with the GIL released; the
// tokens come back (-1 - t for a row whose first NaN is at t).
static void bind_sampling(py::module_& m) {
  m.def(
      "sample_rows",
      [](const FloatArray& logits, const std::vector<int64_t>& rows, const std::vector<int64_t>& steps,
          const std::vector<std::vector<int32_t>>& seen, const py::list& settings) {
        if (logits.ndim() != 2) throw std::invalid_argument("logits must be [n, V]");
        const int64_t n = logits.shape(0), V = logits.shape(1);
        if (static_cast<int64_t>(rows.size()) != n || static_cast<int64_t>(steps.size()) != n ||
            static_cast<int64_t>(seen.size()) != n || static_cast<int64_t>(settings.size()) != n)
          throw std::invalid_argument("rows, steps, seen and settings need one entry per logits row");
        std::vector<SamplingSettings> each;
        std::vector<std::vector<int32_t>> seen_each;
        for (int64_t i = 0; i < n; ++i) {
          each.push_back(sampling_settings(settings[i].cast<py::dict>()));
          std::vector<int32_t> ids = seen[i];  // each distinct token once, as `distinct` gives
          for (int32_t t : ids)
            if (t < 0 || t >= V) throw std::invalid_argument("seen token " + std::to_string(t) + " is outside the logits");
          std::sort(ids.begin(), ids.end());
          ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
          seen_each.push_back(std::move(ids));
        }
        py::array_t<int32_t> out(n);
        int32_t* tokens = out.mutable_data();
        const float* z = logits.data();
        {
          py::gil_scoped_release release;
          apply_num_threads();
          std::vector<SamplerScratch> scratch(omp_get_max_threads());
#pragma omp parallel for schedule(dynamic) if (n > 1)
          for (int64_t i = 0; i < n; ++i) {
            tokens[i] = sample_token_or_nan(z + i * V, V, seen_each[i], each[i], rows[i], steps[i],
                                            scratch[omp_get_thread_num()]);
          }
        }
        return out;
      },
      py::arg("logits"), py::arg("rows"), py::arg("steps"), py::arg("seen"), py::arg("settings"));
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "palmcore's C++ runtime (use the palmcore package, not this module)";
  bind_kernels(m);
  bind_runtime_info(m);
  bind_build_info(m);
  bind_memory(m);
  bind_model(m);
  bind_communicators(m);
  bind_cache_and_generator(m);
  bind_optimizer(m);
  bind_sampling(m);
}
