#include "palmcore/threads.h"

#include <omp.h>

#include <stdexcept>


namespace palmcore {

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("the thread count must be at least 1");
  omp_set_num_threads(n);  // the BLAS runs single-threaded inside these (cpu/matmul.cpp)
}

int get_num_threads() { return omp_get_max_threads(); }

}  // namespace palmcore
