// Choosing the next token from a row's logits (PALM_SPEC.md "Sampling"): repetition penalty,
// temperature (0 = greedy), top-k, top-p, then one draw from a counter-based generator keyed by
// (seed, row, step), so a row's tokens never depend on the thread count or its batch.
#pragma once

#include <cstdint>
#include <vector>

namespace palmcore {

struct SamplingSettings {
  double temperature = 1.0;         // 0: greedy
  int64_t top_k = 0;                // 0: off
  double top_p = 1.0;               // 1: off
  double repetition_penalty = 1.0;  // 1: off
  uint64_t seed = 0;
  // Throws std::invalid_argument naming the first setting out of its range.
  void validate() const;
};

struct TokenProbability {
  int32_t token;
  double probability;
};

// Per-thread scratch of the sampler, reused across calls.
struct SamplerScratch {
  std::vector<double> values;
  std::vector<TokenProbability> candidates, kept;
};

// Steps 1-4 of the spec: the tokens that survive the filters, in ascending id order, with their
// renormalized probabilities (greedy keeps the argmax alone, probability 1). `seen` lists the
// distinct tokens of the row so far (prompt and output, each once), for the repetition penalty.
// Throws std::runtime_error if the logits hold a NaN.
void filtered_distribution(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                           const SamplingSettings& settings, SamplerScratch& scratch,
                           std::vector<TokenProbability>& kept);

// Step 5: u = uniform [0, 1) draw (seed, row, step); walk `kept` (ascending ids) summing
// probabilities and take the first token whose running sum exceeds u.
int32_t draw_token(const std::vector<TokenProbability>& kept, uint64_t seed, int64_t row, int64_t step);

// The whole rule: filtered_distribution, then draw_token.
int32_t sample_token(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                     const SamplingSettings& settings, int64_t row, int64_t step, SamplerScratch& scratch);
// sample_token, or -1 - t when the logits hold a NaN (the first at t), for batch samplers whose
// caller raises afterwards.
int32_t sample_token_or_nan(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                            const SamplingSettings& settings, int64_t row, int64_t step, SamplerScratch& scratch);

}  // namespace palmcore
