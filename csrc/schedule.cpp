#include "palmcore/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace palmcore {

void Schedule::validate() const {
  if (!(peak >= 0) || !std::isfinite(peak)) throw std::invalid_argument("peak lr must be finite and >= 0");
  if (kind == Kind::PaLM && constant_steps < 1) throw std::invalid_argument("constant_steps must be >= 1");
  if (kind == Kind::Cosine) {
    if (warmup_steps < 0) throw std::invalid_argument("warmup_steps must be >= 0");
    if (total_steps <= warmup_steps) throw std::invalid_argument("total_steps must exceed warmup_steps");
    if (!(floor >= 0 && floor <= peak)) throw std::invalid_argument("the floor lr must be in [0, peak]");
  }
}

// PaLM:   lr(k) = peak                          for k <= constant_steps
//         lr(k) = peak · sqrt(constant_steps / k) after
// Cosine: lr(k) = peak · k / warmup             for k <= warmup
//         lr(k) = floor + (peak - floor) · (1 + cos(π · (k - warmup) / (total - warmup))) / 2
//         lr(k) = floor                         for k >= total
double Schedule::at(int64_t step) const {
  if (step < 1) throw std::invalid_argument("schedule steps count from 1");
  if (kind == Kind::PaLM)
    return step <= constant_steps ? peak : peak * std::sqrt(double(constant_steps) / double(step));
  if (step <= warmup_steps) return peak * double(step) / double(warmup_steps);
  const double progress = std::min(1.0, double(step - warmup_steps) / double(total_steps - warmup_steps));
  return floor + (peak - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace palmcore
