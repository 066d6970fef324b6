// NCCL collectives on GPU tensors, for a mesh whose model lives on CUDA devices (one GPU per
// rank). Each collective is enqueued on the compute stream of the device the communicator was
// made on (cuda/context.h), after the kernels that wrote its input and before those that read
// its output, and the host does not wait for it. The library is opened at run time
// (comm/nccl_library.h). Built with the CUDA backend only; without it the factory says so.
#include <stdexcept>

#include "palmcore/communicator.h"

#ifdef PALMCORE_CUDA
#include <cstring>

#include "comm/nccl_library.h"
#include "cuda/context.h"
#endif

namespace palmcore {

#ifndef PALMCORE_CUDA

std::unique_ptr<Communicator> make_nccl_communicator(const std::string&, int, int) {
  throw std::runtime_error("this palmcore was built without the CUDA backend, so it has no NCCL communicators "
                           "(reinstall it where nvcc is found: see the README's CUDA section)");
}

#else

namespace {

class Nccl final : public Communicator {
 public:
  Nccl(const nccl::UniqueId& id, int rank, int size)
      : lib_(nccl::library()), device_(cuda::context().device), rank_(rank), size_(size),
        token_(Tensor::zeros({1}, DType::F32, Device::CUDA)) {
    nccl::check(lib_.comm_init_rank(&comm_, size, id, rank), "ncclCommInitRank");
  }
  ~Nccl() override { lib_.comm_destroy(comm_); }
  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override {
    return "NCCL, " + std::to_string(size_) + " ranks, on cuda:" + std::to_string(device_);
  }
  bool serves(Device device) const override { return device == Device::CUDA; }

  // A one-element all-reduce, waited for: every rank has enqueued it, and this rank's stream
  // has run everything before it.
  void barrier() override {
    cudaStream_t s = stream();
    check(lib_.all_reduce(token_.raw_data(), token_.raw_data(), 1, nccl::kFloat32, nccl::kSum, comm_, s),
          "ncclAllReduce (barrier)");
    cuda::check_cuda(cudaStreamSynchronize(s), "barrier (cudaStreamSynchronize)");
  }

 private:
  static nccl::DataType type_of(DType dtype) {
    switch (dtype) {
      case DType::F64: return nccl::kFloat64;
      case DType::BF16: return nccl::kBfloat16;
      default: return nccl::kFloat32;
    }
  }

  // The compute stream of this communicator's device, which must be the one the process works
  // on (its tensors are there).
  cudaStream_t stream() const {
    const cuda::Context& ctx = cuda::context();
    if (ctx.device != device_)
      throw std::runtime_error("the NCCL communicator works on cuda:" + std::to_string(device_) +
                               ", but this process now works on cuda:" + std::to_string(ctx.device));
    return ctx.stream();
  }

  void do_all_reduce(Tensor& t, Reduction op) override {
    check(lib_.all_reduce(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), type_of(t.dtype()),
                          op == Reduction::Sum ? nccl::kSum : nccl::kMax, comm_, stream()),
          "ncclAllReduce");
  }

  void do_reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    check(lib_.reduce_scatter(in.raw_data(), out.raw_data(), static_cast<size_t>(out.numel()), type_of(in.dtype()),
                              nccl::kSum, comm_, stream()),
          "ncclReduceScatter");
  }

  void do_all_gather(const Tensor& in, Tensor& out) override {
    check(lib_.all_gather(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()), type_of(in.dtype()), comm_,
                          stream()),
          "ncclAllGather");
  }

  void check(nccl::Result result, const char* what) const { nccl::check(result, what, comm_); }

  const nccl::Library& lib_;
  int device_;
  int rank_, size_;
  Tensor token_;  // the barrier's element
  nccl::Comm comm_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank, int size) {
  if (unique_id.size() != nccl::kUniqueIdBytes)
    throw std::invalid_argument("a NCCL unique id has " + std::to_string(nccl::kUniqueIdBytes) + " bytes, not " +
                                std::to_string(unique_id.size()));
  if (size < 1 || rank < 0 || rank >= size)
    throw std::invalid_argument("NCCL rank " + std::to_string(rank) + " of " + std::to_string(size) +
                                " does not exist");
  nccl::UniqueId id{};
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  return std::make_unique<Nccl>(id, rank, size);
}

#endif

}  // namespace palmcore
