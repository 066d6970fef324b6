// Token embedding lookup and its gradient on a CUDA device; math in palmcore/op_signatures.inc:
//   forward:   out[r] = table[tokens[r] - first], or 0 where tokens[r] - first is not a row of
//              the table (a vocabulary shard holds the rows [first, first + rows(table)))
//   backward:  dtable[tokens[r] - first] += dout[r] for the tokens in the table's rows,
//              accumulated in row order r = 0, 1, ... (deterministic: no atomics)
// Plain kernels: the first GPU run must tell a wrong algorithm from a wrong optimization.
#include <algorithm>

#include "cuda/context.h"
#include "palmcore/math/bf16.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per output element (grid-stride): element i is (row r, column c) of out. Table
// and Out: float or bf16 storage (a bf16 table into a float32 x; bf16 rows gathered as bf16).
template <class Table, class Out>
__global__ void embedding_forward_kernel(const Table* table, const int32_t* tokens, Out* out, int64_t rows,
                                         int64_t width, int64_t held, int64_t first) {
  const int64_t n = rows * width, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / width, c = i % width;
    const int64_t row = tokens[r] - first;
    store_float(out[i], row >= 0 && row < held ? load_float(table[row * width + c]) : 0.0f);
  }
}

// Thread (column c, group g) owns the elements dtable[t, c] of the table rows t with
// t % groups == g: it scans every token r in order and adds dout[r, c] to the rows it owns.
// Each element is thus summed by one thread, starting from its current value, in token-row
// order: the CPU kernel's order (cpu/embedding.cpp: column blocks, rows in order), so the two
// agree bit for bit. The groups only add parallelism (each thread re-reads the token ids).
__global__ void embedding_backward_kernel(const float* dout, const int32_t* tokens, float* dtable, int64_t rows,
                                          int64_t width, int64_t held, int64_t first, int64_t groups) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = tokens[r] - first;
      if (row < 0 || row >= held || row % groups != g) continue;
      dtable[row * width + c] += dout[r * width + c];
    }
  }
}

}  // namespace

void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out, int64_t first) {
  const int64_t rows = tokens.numel(), width = table.dim(1), held = table.dim(0);
  const int64_t n = rows * width;
  if (n == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  with_float_storage(table.dtype(), [&](auto table_element) {
    with_float_storage(out.dtype(), [&](auto out_element) {
      using Table = decltype(table_element);
      using Out = decltype(out_element);
      embedding_forward_kernel<<<blocks, kThreads, 0, context().stream()>>>(
          table.data<Table>(), tokens.data<int32_t>(), out.data<Out>(), rows, width, held, first);
    });
  });
  check_cuda(cudaGetLastError(), "embedding_forward");
}

void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable, int64_t first) {
  const int64_t rows = tokens.numel(), width = dtable.dim(1), held = dtable.dim(0);
  if (rows == 0 || width == 0 || held == 0) return;
  // about 64K threads in all: width columns times `groups` row groups (at most one per table row)
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(held, (int64_t{1} << 16) / width));
  const dim3 grid(static_cast<unsigned>((width + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(groups, 65535)));
  embedding_backward_kernel<<<grid, kThreads, 0, context().stream()>>>(
      dout.data<float>(), tokens.data<int32_t>(), dtable.data<float>(), rows, width, held, first, groups);
  check_cuda(cudaGetLastError(), "embedding_backward");
}

}  // namespace palmcore::cuda
