// MPI collectives. The extension does not link the MPI library: `pip install palmcore` works
// without one. With the `mpi` extra, mpi4py loads and initializes MPICH's libmpi.so.12; this
// file finds its functions there (dlsym) and uses the types and constants of MPICH's mpi.h,
// which the build found (PALMCORE_MPI). A failed MPI call raises std::runtime_error with
// MPI's own message. Host tensors only; MPI has no bfloat16 sum, so bfloat16 is reduced in
// float32 and rounded once (gathered as it is).
#include "palmcore/communicator.h"

#include <stdexcept>

#ifdef PALMCORE_MPI
#include <dlfcn.h>
#include <mpi.h>

#include <algorithm>
#include <climits>

#include "palmcore/ops.h"
#endif

namespace palmcore {

#ifndef PALMCORE_MPI

bool built_with_mpi() { return false; }

std::unique_ptr<Communicator> make_mpi_communicator(int64_t) {
  throw std::runtime_error("this palmcore was built without MPI (mpi.h was not found at build time); "
                           "reinstall it with pip install '.[mpi]'");
}

#else

namespace {

// The MPI functions used, looked up once in the loaded libmpi.
struct MpiApi {
  decltype(&MPI_Initialized) initialized;
  decltype(&MPI_Comm_rank) comm_rank;
  decltype(&MPI_Comm_size) comm_size;
  decltype(&MPI_Allreduce) allreduce;
  decltype(&MPI_Reduce_scatter_block) reduce_scatter_block;
  decltype(&MPI_Allgather) allgather;
  decltype(&MPI_Barrier) barrier;
  decltype(&MPI_Error_string) error_string;

  static const MpiApi& get() {
    static const MpiApi api = load();
    return api;
  }

 private:
  static MpiApi load() {
    void* lib = dlopen("libmpi.so.12", RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
    if (!lib)
      throw std::runtime_error("the MPI library (MPICH's libmpi.so.12) is not loaded: import mpi4py.MPI first "
                               "(pip install '.[mpi]')");
    auto find = [lib](const char* symbol) {
      void* f = dlsym(lib, symbol);
      if (!f) throw std::runtime_error(std::string("the MPI library has no ") + symbol);
      return f;
    };
    MpiApi api;
    api.initialized = reinterpret_cast<decltype(api.initialized)>(find("MPI_Initialized"));
    api.comm_rank = reinterpret_cast<decltype(api.comm_rank)>(find("MPI_Comm_rank"));
    api.comm_size = reinterpret_cast<decltype(api.comm_size)>(find("MPI_Comm_size"));
    api.allreduce = reinterpret_cast<decltype(api.allreduce)>(find("MPI_Allreduce"));
    api.reduce_scatter_block = reinterpret_cast<decltype(api.reduce_scatter_block)>(find("MPI_Reduce_scatter_block"));
    api.allgather = reinterpret_cast<decltype(api.allgather)>(find("MPI_Allgather"));
    api.barrier = reinterpret_cast<decltype(api.barrier)>(find("MPI_Barrier"));
    api.error_string = reinterpret_cast<decltype(api.error_string)>(find("MPI_Error_string"));
    return api;
  }
};

// MPI counts are int: larger all-reduces go in pieces of this many elements.
constexpr int64_t kMaxPiece = int64_t{1} << 30;

class Mpi final : public Communicator {
 public:
  explicit Mpi(MPI_Comm comm) : api_(MpiApi::get()), comm_(comm) {
    int initialized = 0;
    check(api_.initialized(&initialized), "MPI_Initialized");
    if (!initialized) throw std::runtime_error("MPI is not initialized: import mpi4py.MPI first");
    check(api_.comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(api_.comm_size(comm_, &size_), "MPI_Comm_size");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "MPI, " + std::to_string(size_) + " ranks"; }

  bool serves(Device device) const override { return device == Device::CPU; }
  void barrier() override { check(api_.barrier(comm_), "MPI_Barrier"); }

 private:
  static MPI_Datatype type_of(DType dtype) {
    switch (dtype) {
      case DType::F64: return MPI_DOUBLE;
      case DType::BF16: return MPI_UINT16_T;  // bits, for gathers only
      default: return MPI_FLOAT;
    }
  }

  void do_all_reduce(Tensor& t, Reduction op) override {
    if (t.dtype() == DType::BF16) {  // in float32, rounded once
      Tensor wide = Tensor::zeros(t.shape(), DType::F32);
      copy(t, wide);
      do_all_reduce(wide, op);
      copy(wide, t);
      return;
    }
    const int64_t count = t.numel(), size = static_cast<int64_t>(dtype_size(t.dtype()));
    char* data = static_cast<char*>(t.raw_data());
    for (int64_t begin = 0; begin < count; begin += kMaxPiece) {
      const int piece = static_cast<int>(std::min(kMaxPiece, count - begin));
      check(api_.allreduce(MPI_IN_PLACE, data + begin * size, piece, type_of(t.dtype()),
                           op == Reduction::Sum ? MPI_SUM : MPI_MAX, comm_),
            "MPI_Allreduce");
    }
  }

  void do_reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    if (in.dtype() == DType::BF16) {  // in float32, rounded once
      Tensor wide_in = Tensor::zeros(in.shape(), DType::F32), wide_out = Tensor::zeros(out.shape(), DType::F32);
      copy(in, wide_in);
      do_reduce_scatter_sum(wide_in, wide_out);
      copy(wide_out, out);
      return;
    }
    const int count = checked_count(out.numel(), "reduce_scatter_sum");
    check(api_.reduce_scatter_block(in.raw_data(), out.raw_data(), count, type_of(in.dtype()), MPI_SUM, comm_),
          "MPI_Reduce_scatter_block");
  }

  void do_all_gather(const Tensor& in, Tensor& out) override {
    const int count = checked_count(in.numel(), "all_gather");
    const MPI_Datatype type = type_of(in.dtype());
    check(api_.allgather(in.raw_data(), count, type, out.raw_data(), count, type, comm_), "MPI_Allgather");
  }

  static int checked_count(int64_t count, const char* what) {
    if (count > INT_MAX)
      throw std::invalid_argument(std::string(what) + ": " + std::to_string(count) +
                                  " elements per rank is more than one MPI call takes");
    return static_cast<int>(count);
  }

  void check(int code, const char* what) const {
    if (code == MPI_SUCCESS) return;
    char message[MPI_MAX_ERROR_STRING];
    int length = 0;
    api_.error_string(code, message, &length);
    throw std::runtime_error(std::string(what) + " failed: " + std::string(message, length));
  }

  const MpiApi& api_;
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool built_with_mpi() { return true; }

std::unique_ptr<Communicator> make_mpi_communicator(int64_t comm_handle) {
  return std::make_unique<Mpi>(static_cast<MPI_Comm>(comm_handle));
}

#endif

}  // namespace palmcore
