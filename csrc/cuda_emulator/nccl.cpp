// The emulated device's single-rank NCCL (include/palmcore_emu/nccl.h). With one rank,
// all-reduce (sum or max) leaves the values as they are, reduce-scatter's one share is the whole
// input and all-gather's output is the input: recv = send, enqueued on the stream as a copy
// (checked to lie in device memory, as NCCL would fault otherwise).
#include "palmcore_emu/nccl.h"

#include <cuda_runtime.h>

#include <string>

struct palmcore::nccl::ncclComm {
  int ranks = 1;
};

namespace palmcore_emu {
namespace {

using palmcore::nccl::Comm;
using palmcore::nccl::DataType;
using palmcore::nccl::RedOp;
using palmcore::nccl::Result;
using palmcore::nccl::UniqueId;

constexpr Result kInvalidUsage = 5;  // ncclInvalidUsage
thread_local std::string last_error;

Result refuse(const std::string& why) {
  last_error = why;
  return kInvalidUsage;
}

size_t element_bytes(DataType type) {
  switch (type) {
    case palmcore::nccl::kFloat64: return 8;
    case palmcore::nccl::kBfloat16: return 2;
    default: return 4;
  }
}

Result copy(const void* send, void* recv, size_t count, DataType type, Comm comm, CUstream_st* stream) {
  if (!comm) return refuse("a collective on no communicator");
  const size_t bytes = count * element_bytes(type);
  if (!is_device_range(send, bytes) || !is_device_range(recv, bytes))
    return refuse("a collective's buffers are not in device memory");
  if (send == recv) return 0;
  if (cudaMemcpyAsync(recv, send, bytes, cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
    return refuse(cudaGetErrorString(cudaGetLastError()));
  return 0;
}

Result comm_init_rank(Comm* comm, int ranks, UniqueId, int rank) {
  if (ranks != 1 || rank != 0)
    return refuse("NCCL is not emulated beyond one rank (" + std::to_string(ranks) +
                  " asked for): a mesh of GPUs needs real GPUs");
  *comm = new palmcore::nccl::ncclComm;
  return 0;
}

Result comm_destroy(Comm comm) {
  delete comm;
  return 0;
}

const char* get_last_error(Comm) { return last_error.c_str(); }

Result all_reduce(const void* send, void* recv, size_t count, DataType type, RedOp, Comm comm, CUstream_st* stream) {
  return copy(send, recv, count, type, comm, stream);
}

Result reduce_scatter(const void* send, void* recv, size_t recv_count, DataType type, RedOp, Comm comm,
                      CUstream_st* stream) {
  return copy(send, recv, recv_count, type, comm, stream);
}

Result all_gather(const void* send, void* recv, size_t send_count, DataType type, Comm comm, CUstream_st* stream) {
  return copy(send, recv, send_count, type, comm, stream);
}

}  // namespace

void use_single_rank_nccl(palmcore::nccl::Library& lib) {
  lib.comm_init_rank = comm_init_rank;
  lib.comm_destroy = comm_destroy;
  lib.get_last_error = get_last_error;
  lib.all_reduce = all_reduce;
  lib.reduce_scatter = reduce_scatter;
  lib.all_gather = all_gather;
}

}  // namespace palmcore_emu
