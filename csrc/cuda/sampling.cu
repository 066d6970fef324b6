// PALM_SPEC "Sampling" on a CUDA device (op sample_tokens, palmcore/op_signatures.inc): the
// logits stay on the GPU and only the chosen tokens come back. One block per row, in double as
// the CPU sampler (sampler.cpp) computes:
//   1. z = logits (penalised: z/r where z > 0, else z·r, on the row's seen tokens)
//   2. τ = 0: argmax z (ties: lowest id). Else s = z/τ
//   3. top-k: the k largest s, ties to the lowest ids
//   4. p = exp(s - max s) on the kept; top-p: the shortest prefix by (p descending, id
//      ascending) whose mass reaches top_p · Σ p
//   5. u = uniform01(seed, row, step) (math/philox.h, the CPU's draw); walk the kept tokens in
//      ascending id summing p / Σ kept p; the first whose running sum exceeds u
// No sort: each "largest prefix" of 3 and 4 is a threshold found bit by bit over the values'
// order-preserving 64-bit keys (64 block-wide passes, each a count or a mass of the values at
// or above a candidate), then the ties at the threshold taken in id order. Every sum runs in a
// fixed order (thread t sums ids [t·V/T, (t+1)·V/T) in order, threads added in order), so
// reruns give the same token; the sums' order is not the CPU's, so a token can differ from the
// CPU's only when u or a threshold falls within a few ulps of a boundary.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda/context.h"
#include "palmcore/math/philox.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 256;

// Order-preserving key of a double: a < b  <=>  key(a) < key(b), and -0 and +0 one key (equal,
// as the CPU compares them).
__device__ uint64_t order_key(double x) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x == 0.0 ? 0.0 : x));
  return bits >> 63 ? ~bits : bits | (uint64_t{1} << 63);
}

// The block's fold of v with `op` from `init`, thread 0's first, then 1's, ... (a fixed order);
// every thread gets it.
template <class Op>
__device__ double block_fold(double v, double* shared, double init, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc = init;
    for (int t = 0; t < kThreads; ++t) acc = op(acc, shared[t]);
    shared[kThreads] = acc;
  }
  __syncthreads();
  const double result = shared[kThreads];
  __syncthreads();
  return result;
}

__device__ double block_sum(double v, double* shared) {
  return block_fold(v, shared, 0.0, [](double a, double b) { return a + b; });
}

__device__ double block_max(double v, double* shared) {
  return block_fold(v, shared, -INFINITY, [](double a, double b) { return fmax(a, b); });
}

// Exclusive prefix of v over the threads in thread order; every thread gets its own.
__device__ double block_exclusive_prefix(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double running = 0.0;
    for (int t = 0; t < kThreads; ++t) {
      const double here = shared[t];
      shared[t] = running;
      running += here;
    }
  }
  __syncthreads();
  const double prefix = shared[threadIdx.x];
  __syncthreads();
  return prefix;
}

__device__ int64_t block_min(int64_t v, int64_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] = min(shared[threadIdx.x], shared[threadIdx.x + half]);
    __syncthreads();
  }
  const int64_t m = shared[0];
  __syncthreads();
  return m;
}

struct SampleSettings {
  double temperature, top_p, penalty;
  int64_t top_k;
  uint64_t seed;
};

// The largest key K with measure({t : kept(t), key(x_t) >= K}) >= target over the row's values
// x, where the measure counts them (by_mass false) or sums them; bit by bit from the top, one
// block-wide pass per bit. This thread owns the ids [begin, end).
template <class Kept>
__device__ uint64_t threshold_key(const double* x, int64_t begin, int64_t end, Kept kept, bool by_mass,
                                  double target, double* shared) {
  uint64_t found = 0;
  for (int bit = 63; bit >= 0; --bit) {
    const uint64_t candidate = found | (uint64_t{1} << bit);
    double part = 0.0;
    for (int64_t t = begin; t < end; ++t)
      if (kept(t) && order_key(x[t]) >= candidate) part += by_mass ? x[t] : 1.0;
    if (block_sum(part, shared) >= target) found = candidate;
  }
  return found;
}

// rows of logits [n, V]; work: [n, V] doubles of scratch. One block per row.
__global__ void sample_kernel(const float* logits, int64_t V, const int32_t* rows, const int32_t* steps,
                              const int32_t* seen, const int32_t* seen_offsets, SampleSettings s, double* work,
                              int32_t* tokens) {
  __shared__ double shared[kThreads + 1];
  __shared__ int64_t shared_i[kThreads];
  const int64_t i = blockIdx.x;
  const float* z_in = logits + i * V;
  double* x = work + i * V;
  const int64_t per = (V + kThreads - 1) / kThreads;
  const int64_t begin = min(V, threadIdx.x * per), end = min(V, begin + per);

  // NaN: the caller raises, naming the first one
  int64_t first_nan = V;
  for (int64_t t = begin; t < end && first_nan == V; ++t)
    if (isnan(z_in[t])) first_nan = t;
  first_nan = block_min(first_nan, shared_i);
  if (first_nan < V) {
    if (threadIdx.x == 0) tokens[i] = static_cast<int32_t>(-1 - first_nan);
    return;
  }
  // 1. penalty (the seen tokens are distinct: one writer each)
  for (int64_t t = begin; t < end; ++t) x[t] = z_in[t];
  __syncthreads();
  if (s.penalty != 1.0)
    for (int64_t j = seen_offsets[i] + threadIdx.x; j < seen_offsets[i + 1]; j += kThreads) {
      const int64_t t = seen[j];
      if (t >= 0 && t < V) x[t] = x[t] > 0 ? x[t] / s.penalty : x[t] * s.penalty;  // (ids outside: none to penalise)
    }
  __syncthreads();
  // 2. greedy: the first id of the largest value
  if (s.temperature == 0.0) {
    double best = -INFINITY;
    int64_t best_id = V;
    for (int64_t t = begin; t < end; ++t)
      if (x[t] > best || best_id == V) best = x[t], best_id = t;
    // the largest value, then the lowest id holding it
    const double top = block_max(best, shared);
    const int64_t id = block_min(best == top && best_id < V ? best_id : V, shared_i);
    if (threadIdx.x == 0) tokens[i] = static_cast<int32_t>(id);
    return;
  }
  for (int64_t t = begin; t < end; ++t) x[t] = x[t] / s.temperature;
  __syncthreads();
  // 3. top-k: values above the threshold, then the lowest ids of those equal to it
  auto all = [](int64_t) { return true; };
  uint64_t k_key = 0;  // 0: every value is kept (key 0 is below every key of a real number)
  double k_ties = 0.0;  // ties at k_key to keep, in id order (when k_key > 0)
  if (s.top_k > 0 && s.top_k < V) {
    k_key = threshold_key(x, begin, end, all, false, static_cast<double>(s.top_k), shared);
    double above = 0.0;
    for (int64_t t = begin; t < end; ++t) above += order_key(x[t]) > k_key;
    k_ties = static_cast<double>(s.top_k) - block_sum(above, shared);
  }
  // kept after top-k: key > k_key, or key == k_key among the first k_ties such ids
  double my_ties = 0.0;
  for (int64_t t = begin; t < end; ++t) my_ties += order_key(x[t]) == k_key;
  const double ties_before = block_exclusive_prefix(my_ties, shared);
  auto kept_by_k = [&](int64_t t, double& tie_rank) {
    const uint64_t key = order_key(x[t]);
    if (key > k_key) return true;
    if (key < k_key) return false;
    return tie_rank++ < k_ties;
  };
  // 4. p = exp(s - top) over the kept (x becomes p; -1 marks a token left out)
  double top = -INFINITY;
  {
    double rank = ties_before;
    for (int64_t t = begin; t < end; ++t)
      if (kept_by_k(t, rank)) top = fmax(top, x[t]);
  }
  top = block_max(top, shared);
  double mass = 0.0;
  {
    double rank = ties_before;
    for (int64_t t = begin; t < end; ++t) {
      const bool kept = kept_by_k(t, rank);
      x[t] = kept ? exp(x[t] - top) : -1.0;
      if (kept) mass += x[t];
    }
  }
  const double total = block_sum(mass, shared);
  __syncthreads();
  // kept: p >= 0, or NaN (an infinite logit): as on the CPU, NaN stays in and no running sum
  // crosses u, so the last kept token is drawn
  auto in = [&](int64_t t) { return !(x[t] < 0.0); };
  if (s.top_p < 1.0) {
    const double target = s.top_p * total;
    const uint64_t p_key = threshold_key(x, begin, end, in, true, target, shared);
    double above = 0.0, ties = 0.0;
    for (int64_t t = begin; t < end; ++t) {
      if (!in(t)) continue;
      const uint64_t key = order_key(x[t]);
      if (key > p_key) above += x[t];
      ties += key == p_key;
    }
    const double mass_above = block_sum(above, shared);
    const double tie_rank0 = block_exclusive_prefix(ties, shared);
    // the ties at the threshold, in id order, until the mass reaches the target
    const double tie_value = __longlong_as_double(static_cast<long long>(p_key & ~(uint64_t{1} << 63)));
    const double needed = tie_value > 0 ? ceil((target - mass_above) / tie_value) : 0.0;
    double rank = tie_rank0;
    for (int64_t t = begin; t < end; ++t) {
      if (!in(t)) continue;
      const uint64_t key = order_key(x[t]);
      if (key < p_key || (key == p_key && rank++ >= needed)) x[t] = -1.0;
    }
    __syncthreads();
  }
  // 5. the draw over the kept, in ascending id
  double kept_mass = 0.0;
  for (int64_t t = begin; t < end; ++t)
    if (in(t)) kept_mass += x[t];
  const double kept_total = block_sum(kept_mass, shared);
  double chunk = 0.0;
  for (int64_t t = begin; t < end; ++t)
    if (in(t)) chunk += x[t] / kept_total;
  double running = block_exclusive_prefix(chunk, shared);
  const double u = uniform01(s.seed, static_cast<uint64_t>(rows[i]), static_cast<uint64_t>(steps[i]));
  int64_t chosen = V, last = -1;
  for (int64_t t = begin; t < end; ++t) {
    if (!in(t)) continue;
    last = t;
    if ((running += x[t] / kept_total) > u && chosen == V) chosen = t;
  }
  chosen = block_min(chosen, shared_i);
  const int64_t last_kept = -block_min(-last, shared_i);  // rounding left the sum just under u
  if (threadIdx.x == 0) tokens[i] = static_cast<int32_t>(chosen < V ? chosen : last_kept);
}

}  // namespace

void sample_tokens(const Tensor& logits, const Tensor& rows, const Tensor& steps, const Tensor& seen,
                   const Tensor& seen_offsets, const SamplingSettings& settings, Tensor& tokens) {
  const int64_t n = logits.dim(0), V = logits.dim(1);
  if (n == 0) return;
  const Scratch work(static_cast<size_t>(n * V) * sizeof(double));
  const SampleSettings s{settings.temperature, settings.top_p, settings.repetition_penalty, settings.top_k,
                         settings.seed};
  sample_kernel<<<static_cast<unsigned>(n), kThreads, 0, context().stream()>>>(
      logits.data<float>(), V, rows.data<int32_t>(), steps.data<int32_t>(), seen.data<int32_t>(),
      seen_offsets.data<int32_t>(), s, work.as<double>(), tokens.data<int32_t>());
  check_cuda(cudaGetLastError(), "sample_tokens");
}

}  // namespace palmcore::cuda
