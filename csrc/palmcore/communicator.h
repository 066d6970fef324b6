// Collectives over a group of ranks (one axis of the device mesh), called from inside a step.
// One interface, one implementation per transport: a single rank (every collective is the
// identity), MPI (comm/mpi.cpp) and, with the CUDA backend, NCCL. float32 only: parameters,
// gradients and activations are float32 in this runtime.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace palmcore {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;

  // data[i] = Σ_ranks data[i], in place, on every rank.
  virtual void all_reduce_sum(float* data, int64_t count) = 0;
  // The same in double (small vectors of partial sums: norms, RMS terms).
  virtual void all_reduce_sum(double* data, int64_t count) = 0;
  // data[i] = max_ranks data[i], in place, on every rank.
  virtual void all_reduce_max(float* data, int64_t count) = 0;
  // out[i] = Σ_ranks in[rank · count + i], i < count: each rank gets its block of the sum.
  virtual void reduce_scatter_sum(const float* in, float* out, int64_t count) = 0;
  // out[r · count + i] = in[i] of rank r: every rank gets every rank's block.
  virtual void all_gather(const float* in, float* out, int64_t count) = 0;
  virtual void barrier() = 0;

  // Bytes this rank has sent through collectives so far, counted as a ring algorithm sends
  // them: all-reduce 2(n-1)/n · S, reduce-scatter and all-gather (n-1)/n · S.
  int64_t bytes_sent() const { return bytes_sent_; }

 protected:
  void count_all_reduce(int64_t bytes) { bytes_sent_ += 2 * (size() - 1) * bytes / size(); }
  void count_scatter_or_gather(int64_t bytes) { bytes_sent_ += (size() - 1) * bytes / size(); }

 private:
  int64_t bytes_sent_ = 0;
};

// The communicator of a group of one: every collective is a copy or nothing.
std::unique_ptr<Communicator> make_single_rank_communicator();

// An MPI communicator from an MPI_Comm handle (an integer for MPICH, whose ABI this build
// targets). The MPI library must already be loaded and initialized in the process (mpi4py
// does both); throws std::runtime_error if it is not, or if this build has no MPI support.
std::unique_ptr<Communicator> make_mpi_communicator(int64_t comm_handle);
bool built_with_mpi();

}  // namespace palmcore
