"""Optimizers over a PaLM's parameters (PALM_SPEC.md, "Training recipe"); the updates run in C++.

    opt = palmcore.Adafactor(model)                # PaLM's recipe
    model.forward_backward(tokens, targets)
    grad_norm = opt.step(lr=1e-2, max_grad_norm=1.0)
    model.zero_grad()
"""

from __future__ import annotations

import numpy as np

from palmcore import _core, checks
from palmcore.model import PaLM


class _Optimizer:
    _kind = ""

    def __init__(self, model: PaLM, settings: dict):
        if not isinstance(model, PaLM):
            raise TypeError(f"model must be a palmcore.PaLM, got {type(model).__name__}")
        settings = {name: checks.real(name, value) for name, value in settings.items()}
        self._model = model
        self._settings = settings
        data_comm = model.mesh.data_comm if model.mesh is not None else None
        self._opt = _core.Optimizer(model.core, self._kind, settings, data_comm)

    @property
    def steps_taken(self) -> int:
        return self._opt.steps_taken

    def step(self, lr: float, max_grad_norm: float | None = 1.0, grad_scale: float = 1.0) -> float:
        """One update from the model's accumulated gradients times ``grad_scale`` (``1/n`` after
        ``n`` micro-batches), clipped to global norm at most ``max_grad_norm`` (None: no
        clipping). Returns the norm before clipping. An update that leaves a parameter non-finite
        raises palmcore._core.NonFiniteStep (a RuntimeError) after it: roll back to a
        checkpoint. A non-finite norm raises NonFiniteStep and
        changes nothing. On a mesh, the gradients are first summed over the data axis."""
        lr = checks.real("lr", lr, low=0.0)
        clip = 0.0 if max_grad_norm is None else checks.real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        return self._opt.step(lr, clip, checks.real("grad_scale", grad_scale, low=0.0, low_open=True))

    def state_dict(self) -> dict:
        """{"kind", "settings", "steps_taken", "m": {name: float32}, "v": {name: float32}}, full
        tensors laid out like the parameters (gathered over the model axis: collective)."""
        model = self._model
        moments = {}
        for which, key in ((1, "m"), (2, "v")):
            pieces = model.flat_pieces(self._opt.moments(which))  # gathered over the data axis
            moments[key] = {n: model.gather(n, piece) for n, piece in pieces.items()}
        return {"kind": self._kind, "settings": dict(self._settings), "steps_taken": self.steps_taken, **moments}

    def load_state_dict(self, state: dict) -> None:
        """Strict: the same kind, every parameter's m and v, float32, right shapes, finite."""
        if state.get("kind") != self._kind:
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, not {self._kind!r}")
        names = list(self._model.state_dict_names())
        for key in ("m", "v"):
            moments = state.get(key, {})
            if set(moments) != set(names):
                raise ValueError(f"optimizer state '{key}' does not match the model's parameters")
            for n in names:
                a = moments[n]
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not np.isfinite(a).all():
                    raise ValueError(f"optimizer state '{key}' of '{n}' must be a finite float32 array")
                if tuple(a.shape) != self._model.param_shape(n):
                    raise ValueError(f"optimizer state '{key}' of '{n}' has shape {a.shape}, expected "
                                     f"{self._model.param_shape(n)}")
        steps = state.get("steps_taken")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 2**62:
            raise ValueError(f"steps_taken must be an integer in [0, 2^62), got {steps!r}")
        for which, key in ((1, "m"), (2, "v")):
            flat = np.empty(self._model.num_params(), np.float32)
            for n, piece in self._model.flat_pieces(flat).items():
                piece[...] = self._model.local_piece(n, state[key][n])
            self._opt.set_moments(which, flat)
        self._opt.steps_taken = steps


class Adafactor(_Optimizer):
    """PaLM's Adafactor: unfactored, parameter scaling, β2 = 1 - k^-decay, update clipping, and
    decoupled weight decay lr² (PALM_SPEC.md gives the exact update)."""

    _kind = "adafactor"

    def __init__(self, model: PaLM, beta1: float = 0.9, decay: float = 0.8, clip: float = 1.0,
                 eps: float = 1e-30, min_scale: float = 1e-3):
        super().__init__(model, dict(beta1=beta1, decay=decay, clip=clip, eps=eps, min_scale=min_scale))


class AdamW(_Optimizer):
    """AdamW with bias correction and decoupled weight decay (x -= lr · weight_decay · x)."""

    _kind = "adamw"

    def __init__(self, model: PaLM, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(model, dict(beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay))
