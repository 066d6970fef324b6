// The sampler of PALM_SPEC.md "Sampling"; see palmcore/sampler.h. All arithmetic is in double
// on the float logits, so the float64 reference (palmcore.reference.sample) agrees exactly.
#include "palmcore/sampler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "palmcore/math/philox.h"

namespace palmcore {
namespace {

// Larger value first; among equal values, the lower id first (the spec's tie rule).
bool ranks_before(const TokenProbability& a, const TokenProbability& b) {
  return a.probability > b.probability || (a.probability == b.probability && a.token < b.token);
}

}  // namespace

void SamplingSettings::validate() const {
  if (!(temperature >= 0.0 && std::isfinite(temperature)))
    throw std::invalid_argument("temperature must be finite and >= 0 (0 = greedy), got " + std::to_string(temperature));
  if (top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
  if (!(top_p > 0.0 && top_p <= 1.0))
    throw std::invalid_argument("top_p must be in (0, 1] (1 = off), got " + std::to_string(top_p));
  if (!(repetition_penalty > 0.0 && std::isfinite(repetition_penalty)))
    throw std::invalid_argument("repetition_penalty must be finite and > 0 (1 = off), got " +
                                std::to_string(repetition_penalty));
}

// 1. penalty: z/r where z > 0, else z·r, on seen tokens   2. τ = 0: argmax; else z/τ
// 3. top-k by value   4. softmax over the kept, shortest prefix (by probability) reaching top_p
void filtered_distribution(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                           const SamplingSettings& s, SamplerScratch& scratch, std::vector<TokenProbability>& kept) {
  std::vector<double>& z = scratch.values;
  z.assign(logits, logits + vocab);
  for (int64_t t = 0; t < vocab; ++t)
    if (std::isnan(z[t])) throw std::runtime_error("the logits hold NaN (at token " + std::to_string(t) + ")");
  if (s.repetition_penalty != 1.0)
    for (int32_t t : seen) z[t] = z[t] > 0 ? z[t] / s.repetition_penalty : z[t] * s.repetition_penalty;
  kept.clear();
  if (s.temperature == 0.0) {
    kept.push_back({static_cast<int32_t>(std::max_element(z.begin(), z.end()) - z.begin()), 1.0});
    return;
  }
  // candidates hold scaled logits first, then probabilities (same order: exp is monotone)
  std::vector<TokenProbability>& c = scratch.candidates;
  c.resize(vocab);
  for (int64_t t = 0; t < vocab; ++t) c[t] = {static_cast<int32_t>(t), z[t] / s.temperature};
  if (s.top_k > 0 && s.top_k < vocab) {
    std::nth_element(c.begin(), c.begin() + s.top_k, c.end(), ranks_before);
    c.resize(s.top_k);
  }
  double top = -INFINITY;
  for (const TokenProbability& t : c) top = std::max(top, t.probability);
  double total = 0.0;
  for (TokenProbability& t : c) total += (t.probability = std::exp(t.probability - top));
  if (s.top_p < 1.0) {
    // Rank a growing prefix until it holds the nucleus, rather than sorting every token.
    size_t ranked = 0, keep = c.size();
    for (size_t want = std::min<size_t>(64, c.size());; want = std::min(c.size(), want * 4)) {
      std::partial_sort(c.begin() + ranked, c.begin() + want, c.end(), ranks_before);
      double mass = 0.0;
      size_t i = 0;
      for (; i < want && mass < s.top_p * total; ++i) mass += c[i].probability;
      if (mass >= s.top_p * total || want == c.size()) {
        keep = i;
        break;
      }
      ranked = want;
    }
    c.resize(keep);
  }
  double kept_total = 0.0;
  for (const TokenProbability& t : c) kept_total += t.probability;
  std::sort(c.begin(), c.end(), [](const TokenProbability& a, const TokenProbability& b) { return a.token < b.token; });
  for (const TokenProbability& t : c) kept.push_back({t.token, t.probability / kept_total});
}

int32_t draw_token(const std::vector<TokenProbability>& kept, uint64_t seed, int64_t row, int64_t step) {
  const double u = uniform01(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(step));
  double running = 0.0;
  for (const TokenProbability& t : kept)
    if ((running += t.probability) > u) return t.token;
  return kept.back().token;  // rounding left the sum just under u
}

int32_t sample_token(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                     const SamplingSettings& settings, int64_t row, int64_t step, SamplerScratch& scratch) {
  filtered_distribution(logits, vocab, seen, settings, scratch, scratch.kept);
  return scratch.kept.size() == 1 ? scratch.kept[0].token : draw_token(scratch.kept, settings.seed, row, step);
}

int32_t sample_token_or_nan(const float* logits, int64_t vocab, const std::vector<int32_t>& seen,
                            const SamplingSettings& settings, int64_t row, int64_t step, SamplerScratch& scratch) {
  int64_t nan = 0;
  while (nan < vocab && !std::isnan(logits[nan])) ++nan;
  if (nan < vocab) return static_cast<int32_t>(-1 - nan);
  return sample_token(logits, vocab, seen, settings, row, step, scratch);
}

}  // namespace palmcore
