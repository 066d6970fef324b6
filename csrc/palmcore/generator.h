// Generation: prompts prefilled into a key/value cache, then one token per step for every
// unfinished row, chosen by the sampler. Rows of different lengths decode together; a finished
// row (stop token or max_new_tokens) costs nothing more.
#pragma once

#include <cstdint>
#include <vector>

#include "palmcore/model.h"
#include "palmcore/sampler.h"

namespace palmcore {

struct GenerationSettings {
  SamplingSettings sampling;
  int64_t max_new_tokens = 64;
  std::vector<int32_t> stop_tokens;  // emitted, then the row stops
};

class Generator {
 public:
  struct Token {
    int64_t row;
    int32_t token;
  };

  // Checks every argument before any work: non-empty prompts of ids in the vocabulary, stop
  // tokens in the vocabulary, prompt length + max_new_tokens <= max_seq_len for every row.
  Generator(Model& model, std::vector<std::vector<int32_t>> prompts, GenerationSettings settings);

  // One new token for each unfinished row, in row order (the first call prefills the prompts
  // first). Empty once every row is done.
  std::vector<Token> step();
  bool done() const { return unfinished_ == 0; }

 private:
  // Feeds rows (token, slot), a prefill chunk or a decode step, then samples the next token
  // of every slot whose whole sequence so far is now in the cache; appends them to `made`.
  void feed_and_sample(const std::vector<int32_t>& tokens, const std::vector<int32_t>& slots,
                       std::vector<Token>& made);
  void record(int64_t row, int32_t token);
  // `values` in a view of `buffer` on the model's device (grown, doubling, when too small).
  Tensor staged(const std::vector<int32_t>& values, Tensor& buffer);

  Model& model_;
  GenerationSettings settings_;
  std::vector<std::vector<int32_t>> prompts_, outputs_;
  std::vector<std::vector<int32_t>> seen_;     // distinct tokens per row (kept for the penalty)
  std::vector<std::vector<bool>> seen_flag_;   // [row][token]
  std::vector<bool> finished_;
  int64_t unfinished_ = 0;
  bool prefilled_ = false;
  KVCache cache_;
  // sample_tokens' inputs and output on the model's device, reused from step to step
  Tensor logit_index_, sample_rows_, sample_steps_, seen_ids_, seen_offsets_, sampled_;
};

}  // namespace palmcore
