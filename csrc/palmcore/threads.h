// The thread count of every CPU kernel: OpenMP loops and the BLAS together.
#pragma once

namespace palmcore {

void set_num_threads(int n);
int get_num_threads();

}  // namespace palmcore
