"""Learning-rate schedules (computed in C++): pure functions of the 1-based step.

    lr = palmcore.schedules.palm()(step)            # 1e-2, then 1e-2 · sqrt(10000 / step)
    lr = palmcore.schedules.cosine(3e-4, warmup_steps=100, total_steps=5000)(step)
"""

from __future__ import annotations

from palmcore import _core


def palm(peak: float = 1e-2, constant_steps: int = 10000):
    """PaLM's schedule: ``peak`` for the first ``constant_steps`` steps, then
    ``peak · sqrt(constant_steps / step)``."""
    return _core.Schedule("palm", float(peak), int(constant_steps), 0, 1, 0.0)


def cosine(peak: float, warmup_steps: int, total_steps: int, floor: float = 0.0):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``floor`` at
    ``total_steps`` (and ``floor`` after)."""
    return _core.Schedule("cosine", float(peak), 1, int(warmup_steps), int(total_steps), float(floor))
