// NCCL, opened at run time (dlopen) like cuBLASLt and MPI: the extension never links it, so
// palmcore imports without it, and only a mesh on GPUs needs it. The library is looked up as
// PALMCORE_NCCL_LIBRARY says (a file, or a folder holding libnccl.so.2) or else as
// libnccl.so.2 on the loader's path: LD_LIBRARY_PATH, then the nvidia-nccl-cu* wheel next to
// the palmcore package (the extension's RUNPATH), then the system.
//
// The few types and constants used are NCCL 2's stable ABI, declared here rather than taken
// from nccl.h so that every CUDA build compiles this without NCCL installed; the library's
// major version is checked to be 2 when it is opened.
#pragma once

#include <cstddef>
#include <string>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace palmcore::nccl {

struct ncclComm;
using Comm = ncclComm*;
constexpr size_t kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES
struct UniqueId {
  char internal[kUniqueIdBytes];
};
using Result = int;  // ncclResult_t
constexpr Result kSuccess = 0;
using DataType = int;  // ncclDataType_t
constexpr DataType kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9;
using RedOp = int;  // ncclRedOp_t
constexpr RedOp kSum = 0, kMax = 2;

struct Library {
  Result (*get_version)(int* version);
  Result (*get_unique_id)(UniqueId* id);
  Result (*comm_init_rank)(Comm* comm, int nranks, UniqueId id, int rank);
  Result (*comm_destroy)(Comm comm);
  const char* (*get_error_string)(Result result);
  const char* (*get_last_error)(Comm comm);
  Result (*all_reduce)(const void* send, void* recv, size_t count, DataType type, RedOp op, Comm comm,
                       CUstream_st* stream);
  Result (*reduce_scatter)(const void* send, void* recv, size_t recv_count, DataType type, RedOp op, Comm comm,
                           CUstream_st* stream);
  Result (*all_gather)(const void* send, void* recv, size_t send_count, DataType type, Comm comm,
                       CUstream_st* stream);
  std::string path;  // where it was found
  int version = 0;   // major · 10000 + minor · 100 + patch
};

// The library, opened on first use; throws std::runtime_error saying what is missing (the
// library, or a function in it) and how to provide it.
const Library& library();

// Throws std::runtime_error "<what>: <NCCL's error string>[ (<its last error>)]" unless
// `result` is success.
void check(Result result, const char* what, Comm comm = nullptr);

}  // namespace palmcore::nccl
