// The machine's own limits, measured through the same kernels the model uses, so benchmarks
// can report throughput as a fraction of them.
#pragma once

#include <cstdint>

namespace palmcore {

// Best GFLOP/s of C[m, n] = A[m, k] @ B[k, n] (float32) over `repeats` runs, after one warm-up.
double measure_matmul_gflops(int64_t m, int64_t n, int64_t k, int repeats);
// Best GB/s of copying `bytes` bytes (read + write counted) over `repeats` runs.
double measure_copy_gbps(int64_t bytes, int repeats);
// Read bandwidth: bytes summed per second (every thread sums its own part of a buffer), best of repeats.
double measure_read_gbps(int64_t bytes, int repeats);

}  // namespace palmcore
