// MPI collectives. The extension does not link the MPI library: `pip install palmcore` works
// without one. With the `mpi` extra, mpi4py loads and initializes MPICH's libmpi.so.12; this
// file finds its functions there (dlsym) and uses the types and constants of MPICH's mpi.h,
// which the build found (PALMCORE_MPI). A failed MPI call raises std::runtime_error with
// MPI's own message.
#include "palmcore/communicator.h"

#include <stdexcept>

#ifdef PALMCORE_MPI
#include <dlfcn.h>
#include <mpi.h>

#include <algorithm>
#include <climits>
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

// MPI counts are int: larger collectives go in pieces of this many floats.
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

  void all_reduce_sum(float* data, int64_t count) override { all_reduce(data, count, MPI_FLOAT, MPI_SUM); }
  void all_reduce_sum(double* data, int64_t count) override { all_reduce(data, count, MPI_DOUBLE, MPI_SUM); }
  void all_reduce_max(float* data, int64_t count) override { all_reduce(data, count, MPI_FLOAT, MPI_MAX); }

  void reduce_scatter_sum(const float* in, float* out, int64_t count) override {
    check_count(count, "reduce_scatter_sum");
    check(api_.reduce_scatter_block(in, out, static_cast<int>(count), MPI_FLOAT, MPI_SUM, comm_),
          "MPI_Reduce_scatter_block");
    count_scatter_or_gather(count * size_ * static_cast<int64_t>(sizeof(float)));
  }

  void all_gather(const float* in, float* out, int64_t count) override {
    check_count(count, "all_gather");
    check(api_.allgather(in, static_cast<int>(count), MPI_FLOAT, out, static_cast<int>(count), MPI_FLOAT, comm_),
          "MPI_Allgather");
    count_scatter_or_gather(count * size_ * static_cast<int64_t>(sizeof(float)));
  }

  void barrier() override { check(api_.barrier(comm_), "MPI_Barrier"); }

 private:
  template <typename T>
  void all_reduce(T* data, int64_t count, MPI_Datatype type, MPI_Op op) {
    for (int64_t begin = 0; begin < count; begin += kMaxPiece) {
      const int piece = static_cast<int>(std::min(kMaxPiece, count - begin));
      check(api_.allreduce(MPI_IN_PLACE, data + begin, piece, type, op, comm_), "MPI_Allreduce");
    }
    count_all_reduce(count * static_cast<int64_t>(sizeof(T)));
  }

  void check_count(int64_t count, const char* what) const {
    if (count < 0 || count > INT_MAX)
      throw std::invalid_argument(std::string(what) + ": " + std::to_string(count) +
                                  " floats per rank is more than one MPI call takes");
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
