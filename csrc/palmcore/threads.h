// The thread count of every CPU kernel: OpenMP loops, with the BLAS single-threaded inside them.
//
// OpenMP's own setting belongs to the thread that sets it; palmcore keeps one process-wide
// count instead, and each entry point (a model call, a measurement) applies it to the thread
// it runs on, so a model called from any Python thread uses the count set anywhere.
#pragma once

namespace palmcore {

constexpr int kMaxThreads = 1024;

void set_num_threads(int n);  // 1 <= n <= kMaxThreads
int get_num_threads();
// Makes the calling thread's OpenMP regions use the process-wide count.
void apply_num_threads();

}  // namespace palmcore
