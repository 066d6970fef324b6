// sample_tokens on the CPU (math in palmcore/op_signatures.inc): sampler.cpp's rule, rows in
// parallel with a scratch per thread; a row's token depends only on its own logits, row and
// step, never on the thread that draws it.
#include <vector>

#include <omp.h>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

void sample_tokens(const Tensor& logits, const Tensor& rows, const Tensor& steps, const Tensor& seen,
                   const Tensor& seen_offsets, const SamplingSettings& settings, Tensor& tokens) {
  const int64_t n = logits.dim(0), V = logits.dim(1);
  const float* z = logits.data<float>();
  const int32_t* offsets = seen_offsets.data<int32_t>();
  const int32_t* seen_ids = seen.data<int32_t>();
  int32_t* out = tokens.data<int32_t>();
  std::vector<SamplerScratch> scratch(omp_get_max_threads());
#pragma omp parallel for schedule(dynamic) if (n > 1)
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> row_seen;  // (an id outside the vocabulary has nothing to penalise)
    for (int32_t j = offsets[i]; j < offsets[i + 1]; ++j)
      if (seen_ids[j] >= 0 && seen_ids[j] < V) row_seen.push_back(seen_ids[j]);
    out[i] = sample_token_or_nan(z + i * V, V, row_seen, settings, rows.data<int32_t>()[i], steps.data<int32_t>()[i],
                                 scratch[omp_get_thread_num()]);  // a NaN row: -1 - t, the caller raises
  }
}

}  // namespace palmcore::cpu
