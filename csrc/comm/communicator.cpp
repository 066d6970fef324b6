// The checks every transport's collectives share (dtype, device, sizes, overlap) and the count
// of bytes sent, made once here so that MPI, NCCL and the single rank only move data. An empty
// collective (every rank passes the same sizes) reaches no transport.
#include "palmcore/communicator.h"

#include <stdexcept>

namespace palmcore {
namespace {

bool overlap(const Tensor& a, const Tensor& b) {
  const char* x = static_cast<const char*>(a.raw_data());
  const char* y = static_cast<const char*>(b.raw_data());
  return a.device() == b.device() && a.nbytes() && b.nbytes() && x < y + b.nbytes() && y < x + a.nbytes();
}

}  // namespace

void Communicator::check(const Tensor& t, const char* what) const {
  if (!t.defined()) throw std::invalid_argument(std::string(what) + ": the tensor is undefined");
  if (t.dtype() != DType::F32 && t.dtype() != DType::BF16 && t.dtype() != DType::F64)
    throw std::invalid_argument(std::string(what) + ": " + dtype_name(t.dtype()) +
                                " tensors are not reduced or gathered (float32, bfloat16 or float64 only)");
  if (!serves(t.device()))
    throw std::invalid_argument(std::string(what) + ": the communicator (" + name() + ") does not work on " +
                                device_name(t.device()) + " tensors");
}

void Communicator::all_reduce_sum(Tensor& t) {
  check(t, "all_reduce_sum");
  if (t.numel()) do_all_reduce(t, Reduction::Sum);
  bytes_sent_ += 2 * (size() - 1) * static_cast<int64_t>(t.nbytes()) / size();
}

void Communicator::all_reduce_max(Tensor& t) {
  check(t, "all_reduce_max");
  if (t.numel()) do_all_reduce(t, Reduction::Max);
  bytes_sent_ += 2 * (size() - 1) * static_cast<int64_t>(t.nbytes()) / size();
}

void Communicator::reduce_scatter_sum(const Tensor& in, Tensor& out) {
  check(in, "reduce_scatter_sum");
  check(out, "reduce_scatter_sum");
  if (in.dtype() != out.dtype() || in.device() != out.device() || in.numel() != size() * out.numel())
    throw std::invalid_argument("reduce_scatter_sum: " + std::to_string(in.numel()) + " " + dtype_name(in.dtype()) +
                                " elements on " + device_name(in.device()) + " do not give " + std::to_string(size()) +
                                " blocks of " + std::to_string(out.numel()) + " " + dtype_name(out.dtype()) +
                                " elements on " + device_name(out.device()));
  if (overlap(in, out)) throw std::invalid_argument("reduce_scatter_sum: the input and output overlap");
  if (out.numel()) do_reduce_scatter_sum(in, out);
  bytes_sent_ += (size() - 1) * static_cast<int64_t>(in.nbytes()) / size();
}

void Communicator::all_gather(const Tensor& in, Tensor& out) {
  check(in, "all_gather");
  check(out, "all_gather");
  if (in.dtype() != out.dtype() || in.device() != out.device() || out.numel() != size() * in.numel())
    throw std::invalid_argument("all_gather: " + std::to_string(size()) + " blocks of " + std::to_string(in.numel()) +
                                " " + dtype_name(in.dtype()) + " elements on " + device_name(in.device()) +
                                " do not fill " + std::to_string(out.numel()) + " " + dtype_name(out.dtype()) +
                                " elements on " + device_name(out.device()));
  if (overlap(in, out)) throw std::invalid_argument("all_gather: the input and output overlap");
  if (in.numel()) do_all_gather(in, out);
  bytes_sent_ += (size() - 1) * static_cast<int64_t>(out.nbytes()) / size();
}

}  // namespace palmcore
