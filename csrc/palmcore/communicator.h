// Collectives over a group of ranks (one axis of the device mesh), called from inside a step.
// One interface on tensors, one implementation per transport: a single rank (every collective
// is the identity or a copy; tensors anywhere), MPI (comm/mpi.cpp; host tensors) and NCCL
// (comm/nccl.cpp, with the CUDA backend; tensors on the GPU, collectives enqueued on the
// device's compute stream without waiting for them). The tensors are float32, bfloat16 or
// float64 (activations and gradients, the optimizer's double sums); the checks every transport
// shares are made here once (comm/communicator.cpp), before the transport sees the call.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "palmcore/tensor.h"

namespace palmcore {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;
  // Whether the collectives take tensors on `device` (MPI: the CPU; NCCL: CUDA; one rank: both).
  virtual bool serves(Device device) const = 0;

  // t[i] = Σ_ranks t[i], in place, on every rank.
  void all_reduce_sum(Tensor& t);
  // t[i] = max_ranks t[i], in place, on every rank.
  void all_reduce_max(Tensor& t);
  // out[i] = Σ_ranks in[rank · n + i], i < n = out.numel() = in.numel() / size(): each rank
  // gets its block of the sum. `in` and `out` do not overlap.
  void reduce_scatter_sum(const Tensor& in, Tensor& out);
  // out[r · n + i] = in[i] of rank r, n = in.numel() = out.numel() / size(): every rank gets
  // every rank's block. `in` and `out` do not overlap.
  void all_gather(const Tensor& in, Tensor& out);
  // Every rank has reached it (on the host: NCCL waits for the stream's collectives too).
  virtual void barrier() = 0;

  // Bytes this rank has sent through collectives so far, counted as a ring algorithm sends
  // them: all-reduce 2(n-1)/n · S, reduce-scatter and all-gather (n-1)/n · S.
  int64_t bytes_sent() const { return bytes_sent_; }

 protected:
  enum class Reduction { Sum, Max };
  // The transport's part, on arguments already checked (dtype, device, sizes).
  virtual void do_all_reduce(Tensor& t, Reduction op) = 0;
  virtual void do_reduce_scatter_sum(const Tensor& in, Tensor& out) = 0;
  virtual void do_all_gather(const Tensor& in, Tensor& out) = 0;

 private:
  void check(const Tensor& t, const char* what) const;
  int64_t bytes_sent_ = 0;
};

// The communicator of a group of one: every collective is a copy or nothing.
std::unique_ptr<Communicator> make_single_rank_communicator();

// An MPI communicator from an MPI_Comm handle (an integer for MPICH, whose ABI this build
// targets). The MPI library must already be loaded and initialized in the process (mpi4py
// does both); throws std::runtime_error if it is not, or if this build has no MPI support.
std::unique_ptr<Communicator> make_mpi_communicator(int64_t comm_handle);
bool built_with_mpi();

// A NCCL communicator: rank `rank` of `size`, on the CUDA device this process works on now
// (cuda:N, chosen before), joined through `unique_id` (nccl_unique_id() of the group's rank 0,
// sent to the others over MPI). Blocks until every rank of the group has joined. Throws
// std::runtime_error when this build has no CUDA backend, CUDA or NCCL cannot be used.
std::unique_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank, int size);
// A new NCCL unique id (its bytes), made by rank 0 of a group for make_nccl_communicator.
std::string nccl_unique_id();
// NCCL's version (major · 10000 + minor · 100 + patch) and the file it was loaded from, opening
// it on first use (comm/nccl_library.h says where it is looked for). These two need no GPU;
// they throw std::runtime_error saying what is missing when NCCL cannot be opened.
std::pair<int, std::string> nccl_library_info();

}  // namespace palmcore
