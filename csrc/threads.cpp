#include "palmcore/threads.h"

#include <omp.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace palmcore {
namespace {

std::atomic<int> process_threads{0};  // 0: not set, OpenMP's default

}  // namespace

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("the thread count must be in [1, " + std::to_string(kMaxThreads) +
                                "], got " + std::to_string(n));
  process_threads = n;
  apply_num_threads();
}

int get_num_threads() {
  const int n = process_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

void apply_num_threads() {
  const int n = process_threads.load();
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

}  // namespace palmcore
