// Learning-rate schedules as pure functions of the step k (1-based), so a resumed run gets the
// same rates: PaLM's (constant, then inverse square root) and linear warm-up + cosine decay.
#pragma once

#include <cstdint>

namespace palmcore {

struct Schedule {
  enum class Kind { PaLM, Cosine };
  Kind kind = Kind::PaLM;
  double peak = 1e-2;            // the rate of the constant phase / at the end of warm-up
  int64_t constant_steps = 10000;  // PaLM: lr = peak for k <= this, then peak · sqrt(this / k)
  int64_t warmup_steps = 0;      // cosine: lr = peak · k / warmup for k <= warmup
  int64_t total_steps = 1;       // cosine: decays to `floor` at this step, stays there after
  double floor = 0.0;

  // Throws std::invalid_argument naming the bad setting.
  void validate() const;
  double at(int64_t step) const;
};

}  // namespace palmcore
