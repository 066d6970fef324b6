// Generation over the key/value cache; see palmcore/generator.h.
#include "palmcore/generator.h"

#include <algorithm>
#include <stdexcept>
#include <string>


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
  const Tensor logits = model_.forward_cached(
      cache_, Tensor::borrow(const_cast<int32_t*>(tokens.data()), {rows}, DType::I32),
      Tensor::borrow(const_cast<int32_t*>(slots.data()), {rows}, DType::I32));
  // forward_cached returns one logits row per slot, at that slot's last row here, in row order.
  // A slot samples when its whole sequence so far is in the cache (a prompt cut by a prefill
  // chunk samples only after its last chunk).
  std::vector<int32_t> logits_row, row_of, step_of, seen, offsets{0};
  for (int64_t r = 0, i = 0; r < rows; ++r) {
    if (r + 1 < rows && slots[r + 1] == slots[r]) continue;
    const int32_t b = slots[r];
    if (cache_.lengths[b] == static_cast<int64_t>(prompts_[b].size() + outputs_[b].size())) {
      logits_row.push_back(static_cast<int32_t>(i));
      row_of.push_back(b);
      step_of.push_back(static_cast<int32_t>(outputs_[b].size()));
      seen.insert(seen.end(), seen_[b].begin(), seen_[b].end());
      offsets.push_back(static_cast<int32_t>(seen.size()));
    }
    ++i;
  }
  const int64_t n = static_cast<int64_t>(row_of.size()), V = model_.config().vocab_size;
  if (n == 0) return;
  // The sampler runs where the logits are (a GPU sends back only the n tokens); the rows that
  // sample, when not all of them, are gathered first (an embedding lookup of logits rows).
  Tensor wanted = logits;
  if (n < logits.dim(0)) {
    wanted = Tensor::zeros({n, V}, DType::F32, model_.device());
    embedding_forward(logits, staged(logits_row, logit_index_), wanted);
  }
  if (!sampled_.defined()) sampled_ = Tensor::zeros({static_cast<int64_t>(prompts_.size())}, DType::I32, model_.device());
  Tensor sampled = sampled_.view(0, {n});
  sample_tokens(wanted, staged(row_of, sample_rows_), staged(step_of, sample_steps_), staged(seen, seen_ids_),
                staged(offsets, seen_offsets_), settings_.sampling, sampled);
  const Tensor chosen_tensor = sampled.to(Device::CPU);
  const int32_t* chosen = chosen_tensor.host_data<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (chosen[i] < 0)
      throw std::runtime_error("the logits hold NaN (at token " + std::to_string(-1 - int64_t{chosen[i]}) + ")");
  for (int64_t i = 0; i < n; ++i) {
    record(row_of[i], chosen[i]);
    made.push_back({row_of[i], chosen[i]});
  }
}

Tensor Generator::staged(const std::vector<int32_t>& values, Tensor& buffer) {
  const int64_t size = static_cast<int64_t>(values.size());
  if (!buffer.defined() || buffer.numel() < std::max<int64_t>(size, 1))
    buffer = Tensor::zeros({std::max<int64_t>(2 * size, 16)}, DType::I32, model_.device());
  Tensor view = buffer.view(0, {size});
  if (size > 0) copy(Tensor::borrow(const_cast<int32_t*>(values.data()), {size}, DType::I32), view);
  return view;
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
