// The optimizer of a Model: its state (two moments, laid out like the flat parameter buffer)
// and one update per call over every parameter tensor, after global gradient-norm clipping.
//
// On a mesh the state is sharded over the data axis, as PaLM's fully sharded data parallelism
// does: the flat buffer is cut into one equal share per data rank. A step reduce-scatters the
// gradients (each rank gets the sum of its share), updates its share of the parameters and
// owns only that share's moments, then all-gathers the parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>

#include "palmcore/communicator.h"
#include "palmcore/model.h"
#include "palmcore/ops.h"

namespace palmcore {

enum class OptimizerKind { Adafactor, AdamW };

// A step that cannot count: a non-finite gradient norm (nothing was changed), or an update that
// left a parameter non-finite (the caller rolls back to a checkpoint). Python: _core.NonFiniteStep.
struct NonFiniteStep : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Optimizer {
 public:
  // `data_comm`: the mesh's data axis (null: one rank).
  Optimizer(Model& model, OptimizerKind kind, const AdafactorSettings& adafactor = {},
            const AdamWSettings& adamw = {}, std::shared_ptr<Communicator> data_comm = nullptr);

  // One update from the model's accumulated gradients at learning rate `lr`. The gradient is
  // g = grad_scale · (accumulated gradients, summed over the data axis), e.g. 1/n after n
  // micro-batches, then scaled by min(1, max_grad_norm / ‖g‖) (no clipping when
  // max_grad_norm <= 0). Norms and Adafactor's RMS terms cover whole tensors, wherever their
  // pieces are (data shares, model slices).
  // Returns ‖g‖ before clipping. Throws NonFiniteStep, changing no parameter or moment, if it is
  // not finite; and NonFiniteStep after the update if that left a parameter non-finite.
  double step(double lr, double max_grad_norm, double grad_scale = 1.0);

  OptimizerKind kind() const { return kind_; }
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t steps) { steps_ = steps; }
  // Elements of the flat buffer whose moments this rank keeps (its data-axis share).
  int64_t state_share() const { return share_; }
  // Moment 1 (m) or 2 (v) of the whole flat buffer, gathered from every data rank's share
  // (collective on the data axis), and its inverse: every rank keeps its share of `flat`.
  void gather_moment(int which, float* flat) const;
  void scatter_moment(int which, const float* flat);

 private:
  // The part of [offset, offset + count) of the flat buffer in this rank's share, as [begin, end).
  std::pair<int64_t, int64_t> mine(int64_t offset, int64_t count) const;

  Model& model_;
  std::shared_ptr<Communicator> data_comm_;
  OptimizerKind kind_;
  AdafactorSettings adafactor_;
  AdamWSettings adamw_;
  int64_t share_ = 0, begin_ = 0, end_ = 0;  // this data rank's share of the flat buffer
  Tensor m_, v_;                             // [share_]: the moments of that share
  Tensor grad_share_, padded_;               // [share_], [data ranks · share_] (data axis > 1)
  Tensor sums_;                              // float64 [2 · tensors]: the step's norms, on the device
  int64_t steps_ = 0;
};

}  // namespace palmcore
