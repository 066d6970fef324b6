// Generation over the key/value cache; see palmcore/generator.h.
#include "palmcore/generator.h"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <stdexcept>
#include <string>

#include "palmcore/threads.h"

namespace palmcore {
namespace {

// Prompt tokens fed to the model per call while prefilling: bounds the activations' memory.
constexpr size_t kPrefillRows = 2048;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace

Generator::Generator(Model& model, std::vector<std::vector<int32_t>> prompts, GenerationSettings settings)
    : model_(model), settings_(std::move(settings)), prompts_(std::move(prompts)) {
  const ModelConfig& config = model_.config();
  const int64_t V = config.vocab_size;
  settings_.sampling.validate();
  require(!prompts_.empty(), "no prompts given");
  require(settings_.max_new_tokens >= 0,
          "max_new_tokens must be >= 0, got " + std::to_string(settings_.max_new_tokens));
  for (int32_t t : settings_.stop_tokens)
    require(t >= 0 && t < V, "stop token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                 std::to_string(V) + ")");
  int64_t capacity = 1;
  for (size_t b = 0; b < prompts_.size(); ++b) {
    const std::vector<int32_t>& p = prompts_[b];
    const std::string name = "prompt " + std::to_string(b);
    require(!p.empty(), name + " is empty (give at least one token)");
    for (size_t i = 0; i < p.size(); ++i)
      require(p[i] >= 0 && p[i] < V, name + ": token id " + std::to_string(p[i]) + " at position " +
                                         std::to_string(i) + " is outside the vocabulary [0, " +
                                         std::to_string(V) + ")");
    const int64_t total = static_cast<int64_t>(p.size()) + settings_.max_new_tokens;
    require(total <= config.max_seq_len, name + " has " + std::to_string(p.size()) + " tokens; with max_new_tokens " +
                                             std::to_string(settings_.max_new_tokens) + " that is " +
                                             std::to_string(total) + " > max_seq_len " +
                                             std::to_string(config.max_seq_len));
    capacity = std::max(capacity, total - 1);  // the last new token is never fed back
  }
  const size_t rows = prompts_.size();
  outputs_.assign(rows, {});
  finished_.assign(rows, settings_.max_new_tokens == 0);
  unfinished_ = settings_.max_new_tokens == 0 ? 0 : static_cast<int64_t>(rows);
  seen_.assign(rows, {});
  if (settings_.sampling.repetition_penalty != 1.0) {  // only the penalty reads them
    seen_flag_.assign(rows, std::vector<bool>(V, false));
    for (size_t b = 0; b < rows; ++b)
      for (int32_t t : prompts_[b])
        if (!seen_flag_[b][t]) {
          seen_flag_[b][t] = true;
          seen_[b].push_back(t);
        }
  }
  if (unfinished_ > 0) cache_ = model_.make_cache(static_cast<int64_t>(rows), capacity);
}

std::vector<Generator::Token> Generator::step() {
  std::vector<Token> made;
  if (done()) return made;
  std::vector<int32_t> tokens, slots;
  if (!prefilled_) {
    for (size_t b = 0; b < prompts_.size(); ++b)
      for (int32_t t : prompts_[b]) {
        tokens.push_back(t);
        slots.push_back(static_cast<int32_t>(b));
        if (tokens.size() == kPrefillRows) {
          feed_and_sample(tokens, slots, made);
          tokens.clear();
          slots.clear();
        }
      }
    if (!tokens.empty()) feed_and_sample(tokens, slots, made);
    prefilled_ = true;
    return made;
  }
  for (size_t b = 0; b < prompts_.size(); ++b)
    if (!finished_[b]) {
      tokens.push_back(outputs_[b].back());
      slots.push_back(static_cast<int32_t>(b));
    }
  feed_and_sample(tokens, slots, made);
  return made;
}

void Generator::feed_and_sample(const std::vector<int32_t>& tokens, const std::vector<int32_t>& slots,
                                std::vector<Token>& made) {
  const int64_t rows = static_cast<int64_t>(tokens.size());
  const Tensor device_logits = model_.forward_cached(
      cache_, Tensor::borrow(const_cast<int32_t*>(tokens.data()), {rows}, DType::I32),
      Tensor::borrow(const_cast<int32_t*>(slots.data()), {rows}, DType::I32));
  const Tensor logits = device_logits.to(Device::CPU);  // the sampler runs on the host
  // forward_cached returns one logits row per slot, at that slot's last row here, in row order.
  // A slot samples when its whole sequence so far is in the cache (a prompt cut by a prefill
  // chunk samples only after its last chunk).
  std::vector<int64_t> logits_row, row_of;
  for (int64_t r = 0, i = 0; r < rows; ++r) {
    if (r + 1 < rows && slots[r + 1] == slots[r]) continue;
    const int64_t b = slots[r];
    if (cache_.lengths[b] == static_cast<int64_t>(prompts_[b].size() + outputs_[b].size())) {
      logits_row.push_back(i);
      row_of.push_back(b);
    }
    ++i;
  }
  const int64_t n = static_cast<int64_t>(row_of.size()), V = model_.config().vocab_size;
  std::vector<int32_t> chosen(n);
  scratch_.resize(std::max<size_t>(scratch_.size(), get_num_threads()));
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) {
    try {
      const int64_t b = row_of[i];
      chosen[i] = sample_token(logits.host_data<float>() + logits_row[i] * V, V, seen_[b], settings_.sampling, b,
                               static_cast<int64_t>(outputs_[b].size()), scratch_[omp_get_thread_num()]);
    } catch (...) {
#pragma omp critical
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  for (int64_t i = 0; i < n; ++i) {
    record(row_of[i], chosen[i]);
    made.push_back({row_of[i], chosen[i]});
  }
}

void Generator::record(int64_t row, int32_t token) {
  outputs_[row].push_back(token);
  if (!seen_flag_.empty() && !seen_flag_[row][token]) {
    seen_flag_[row][token] = true;
    seen_[row].push_back(token);
  }
  const bool stop = std::find(settings_.stop_tokens.begin(), settings_.stop_tokens.end(), token) !=
                    settings_.stop_tokens.end();
  if (stop || static_cast<int64_t>(outputs_[row].size()) == settings_.max_new_tokens) {
    finished_[row] = true;
    --unfinished_;
  }
}

}  // namespace palmcore
