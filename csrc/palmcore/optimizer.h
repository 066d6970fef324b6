// The optimizer of a Model: its state (two moments, laid out like the flat parameter buffer)
// and one update per call over every parameter tensor, after global gradient-norm clipping.
#pragma once

#include <cstdint>

#include "palmcore/model.h"
#include "palmcore/ops.h"

namespace palmcore {

enum class OptimizerKind { Adafactor, AdamW };

class Optimizer {
 public:
  // `data_comm`: the mesh's data axis (null: one rank), over which gradients are summed.
  Optimizer(Model& model, OptimizerKind kind, const AdafactorSettings& adafactor = {},
            const AdamWSettings& adamw = {}, std::shared_ptr<Communicator> data_comm = nullptr);

  // One update from the model's accumulated gradients at learning rate `lr`. The gradient is
  // g = grad_scale · (accumulated gradients, summed over the data axis), e.g. 1/n after n
  // micro-batches, then scaled by min(1, max_grad_norm / ‖g‖) (no clipping when
  // max_grad_norm <= 0). Norms and Adafactor's RMS terms cover whole tensors: the pieces of a
  // parameter split over the model axis are summed over it.
  // Returns ‖g‖ before clipping; throws, changing nothing but the data-axis sum, if it is not finite.
  double step(double lr, double max_grad_norm, double grad_scale = 1.0);

  OptimizerKind kind() const { return kind_; }
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t steps) { steps_ = steps; }
  // Adafactor: m (momentum of the clipped update) and v; AdamW: m and v. Flat, params' layout.
  Tensor& first_moment() { return m_; }
  Tensor& second_moment() { return v_; }

 private:
  Model& model_;
  std::shared_ptr<Communicator> data_comm_;
  OptimizerKind kind_;
  AdafactorSettings adafactor_;
  AdamWSettings adamw_;
  Tensor m_, v_;
  int64_t steps_ = 0;
};

}  // namespace palmcore
