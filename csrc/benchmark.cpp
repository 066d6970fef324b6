#include "palmcore/benchmark.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "palmcore/ops.h"
#include "palmcore/random.h"
#include "palmcore/threads.h"

namespace palmcore {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Tensor random_tensor(std::vector<int64_t> shape, uint64_t stream) {
  Tensor t = Tensor::zeros(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(uniform01(7, stream, i) - 0.5);
  return t;
}

void check_measure(int64_t size, int repeats) {
  if (size <= 0 || repeats < 1) throw std::invalid_argument("measure: sizes and repeats must be positive");
  apply_num_threads();
}

}  // namespace

double measure_matmul_gflops(int64_t m, int64_t n, int64_t k, int repeats) {
  check_measure(std::min({m, n, k}), repeats);
  Tensor a = random_tensor({m, k}, 0), b = random_tensor({k, n}, 1), c = Tensor::zeros({m, n});
  matmul(a, false, b, false, c);
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    matmul(a, false, b, false, c);
    best = std::min(best, seconds_since(start));
  }
  return 2.0 * m * n * k / best * 1e-9;
}

double measure_copy_gbps(int64_t bytes, int repeats) {
  check_measure(bytes / 4, repeats);
  bytes = bytes / 4 * 4;
  Tensor src = random_tensor({bytes / 4}, 2), dst = Tensor::zeros({bytes / 4});
  std::memcpy(dst.data<float>(), src.data<float>(), bytes);
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(dst.data<float>(), src.data<float>(), bytes);
    best = std::min(best, seconds_since(start));
  }
  return 2.0 * bytes / best * 1e-9;
}

double measure_read_gbps(int64_t bytes, int repeats) {
  check_measure(bytes / 4, repeats);
  const int64_t n = bytes / 4;
  Tensor src = random_tensor({n}, 3);
  const float* x = src.data<float>();
  volatile float sink = 0.0f;
  double best = 1e30;
  for (int r = 0; r <= repeats; ++r) {  // the first pass warms the caches
    const auto start = std::chrono::steady_clock::now();
    float total = 0.0f;
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (int64_t i = 0; i < n; ++i) total += x[i];
    if (r > 0) best = std::min(best, seconds_since(start));
    sink = total;
  }
  (void)sink;
  return 4.0 * n / best * 1e-9;
}

}  // namespace palmcore
