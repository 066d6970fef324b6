"""PaLM: the Python face of one C++ model (PALM_SPEC.md)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from palmcore import _core, checks
from palmcore.config import PaLMConfig
from palmcore.generation import Generation, KVCache, sampling_settings, token_list, token_lists

_INT32 = np.iinfo(np.int32)


class PaLM:
    """A PaLM model whose parameters, activations and kernels live in the C++ runtime.

    Parameters are initialized as the spec says, deterministically in ``seed``. Gradients
    accumulate over calls of :meth:`forward_backward` until :meth:`zero_grad`.

    On a ``mesh`` (palmcore.Mesh), each rank holds its model-axis slice of every split
    parameter (PALM_SPEC.md "Sharded layout"), drawn to equal the same slice of an unsharded
    model of this seed; :meth:`state_dict` still gives full tensors (every rank of the model
    group must call it: it gathers), or with ``shard=True`` the local pieces.
    """

    def __init__(self, config: PaLMConfig, seed: int = 0, mesh=None, device: str = "cpu",
                 precision: str = "fp32", weights: str = "fp32"):
        """``device``: "cpu", "cuda" (device 0, or on a ``mesh`` on GPUs this rank's GPU) or
        "cuda:N". A CUDA device that cannot be used raises RuntimeError saying why (palmcore
        built without CUDA, no driver, no device); so does a mesh whose communicators cannot
        work there (MPI for a model on the CPU, NCCL on GPUs: palmcore.Mesh's ``device``).
        ``precision``: "fp32", or "bf16" (PALM_SPEC "Precision"). ``weights``: the GEMM
        weights' form for decoding, "fp32", "bf16" or "int8" (see :meth:`set_weights`)."""
        if not isinstance(config, PaLMConfig):
            raise TypeError(f"config must be a PaLMConfig, got {type(config).__name__}")
        if not isinstance(device, str):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
        seed = checks.integer("seed", seed, 0, 2**64 - 1)
        self._config = config
        self._mesh = mesh
        if mesh is not None:
            device = mesh.model_device(device)
        # the data axis: the sparse layers' routing statistics cover every data rank's rows
        data_comm = mesh.data_comm if mesh is not None and mesh.data > 1 and config.n_experts else None
        if mesh is not None and mesh.model > 1:
            self._model = _core.Model(config.to_dict(), int(seed), mesh.model_index, mesh.model, mesh.model_comm,
                                      device=device, data_comm=data_comm)
        else:
            self._model = _core.Model(config.to_dict(), int(seed), device=device, data_comm=data_comm)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self._model.set_precision(precision)
        self.set_weights(weights)
        self._names = self._model.param_names()
        # name -> (full shape, split axis or -1, offset of this rank's slice along it, offset in the flat buffer)
        self._layout = {n: tuple(self._model.param_layout(n)) for n in self._names}

    @property
    def core(self):
        """The C++ model (palmcore._core.Model) behind this object, for palmcore's own
        C++-facing classes (the optimizers)."""
        return self._model

    def param_shape(self, name: str) -> tuple:
        """The full shape of parameter ``name`` (whatever this rank holds of it)."""
        return tuple(self._layout[name][0])

    @property
    def precision(self) -> str:
        """'fp32', or 'bf16': PALM_SPEC "Precision" mixed precision (float32 master weights,
        bf16 GEMM inputs, float32 accumulation); parameters and state_dict stay float32."""
        return self._model.precision()

    @property
    def weights(self) -> str:
        """The GEMM weights' form for decoding: "fp32", "bf16" or "int8" (:meth:`set_weights`)."""
        return self._model.weight_format()

    def set_weights(self, weights: str) -> None:
        """Compute with compact GEMM weights (weight-only: activations and sums stay float32):
        "bf16" rounds each weight to bfloat16 (2 bytes), "int8" stores it as q · s with one
        float32 scale s = max|w| / 127 per 32 weights along the reduction axis (1.125 bytes;
        ggml's Q8_0 with a float32 scale), "fp32" (the default) is the weights themselves.
        Decoding reads the compact copy, which is what makes it faster (a decode step reads
        every weight once); prefill and training compute with the same values in float32. The
        float32 parameters stay the master copy: :meth:`state_dict`, checkpoints and optimizer
        steps see them, and every change is compacted again. CPU, unsharded and fp32 precision
        only; a mixture of experts' experts and router stay float32. PALM_SPEC "Precision" is
        unchanged: this is an inference option on top of it."""
        if not isinstance(weights, str):
            raise TypeError(f"weights must be 'fp32', 'bf16' or 'int8', got {type(weights).__name__}")
        self._model.set_weight_format(weights)

    @property
    def device(self) -> str:
        """Where the parameters and the compute live: "cpu" or "cuda:N"."""
        return self._model.device

    @property
    def mesh(self):
        """The palmcore.Mesh this model is laid out on, or None."""
        return self._mesh

    @property
    def config(self) -> PaLMConfig:
        return self._config

    def state_dict_names(self) -> list[str]:
        """The spec names of the parameters, in the spec's order."""
        return list(self._names)

    def num_params(self) -> int:
        return self._model.num_params()

    def state_dict(self, shard: bool = False) -> dict:
        """Every parameter by its spec name, as a full float32 copy (gathered over the model
        axis); with ``shard=True``, {name: (local piece, offsets of its first element in the
        full tensor)} instead."""
        if shard:
            return {n: (self._model.get_param(n), self._offsets(n)) for n in self._names}
        return {n: self.gather(n, self._model.get_param(n)) for n in self._names}

    def _offsets(self, name: str) -> tuple:
        full, axis, offset, _ = self._layout[name]
        return tuple(offset if d == axis else 0 for d in range(len(full)))

    def gather(self, name: str, piece: np.ndarray) -> np.ndarray:
        """The full tensor of parameter ``name`` from every model rank's ``piece`` laid out
        like it (a parameter, its gradient or an optimizer moment). Collective."""
        full, axis, _, _ = self._layout[name]
        if axis < 0 or tuple(piece.shape) == tuple(full):
            return piece
        pieces = self._mesh.model_comm.all_gather(np.ascontiguousarray(piece, dtype=np.float32))
        return np.concatenate(list(pieces.reshape(self._mesh.model, *piece.shape)), axis=axis)

    def flat_pieces(self, flat: np.ndarray) -> dict:
        """{name: this rank's piece} of an array laid out like the flat parameter buffer."""
        out = {}
        for n in self._names:
            shape = tuple(self._model.param_shape(n))
            start = self._layout[n][3]
            out[n] = flat[start:start + int(np.prod(shape))].reshape(shape)
        return out

    def local_piece(self, name: str, full: np.ndarray) -> np.ndarray:
        """This rank's slice of the full tensor ``full`` of parameter ``name``."""
        shape, axis, offset, _ = self._layout[name]
        if axis < 0:
            return full
        width = tuple(self._model.param_shape(name))[axis]
        index = [slice(None)] * len(shape)
        index[axis] = slice(offset, offset + width)
        return np.ascontiguousarray(full[tuple(index)])

    def load_state_dict(self, state_dict: dict) -> None:
        """Replace every parameter. Strict: the same names, shapes and dtype (float32), all
        values finite; nothing is changed unless all of it is right."""
        missing = [n for n in self._names if n not in state_dict]
        known = set(self._names)
        unexpected = [n for n in state_dict if n not in known]
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        arrays = {}
        for name in self._names:
            value = state_dict[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                dtype = getattr(value, "dtype", type(value).__name__)
                raise TypeError(f"parameter '{name}' must be a float32 ndarray, got {dtype}")
            expected = self.param_shape(name)
            if value.shape != expected:
                raise ValueError(f"parameter '{name}' has shape {value.shape}, expected {expected}")
            if not np.isfinite(value).all():
                raise ValueError(f"parameter '{name}' holds a non-finite value (NaN or Inf)")
            arrays[name] = self.local_piece(name, np.ascontiguousarray(value))
        for name, value in arrays.items():
            self._model.set_param(name, value)

    def forward(self, tokens) -> np.ndarray:
        """Logits float32 [B, T, V] for int tokens [B, T]."""
        return self._model.forward(_as_token_array(tokens, "tokens"))

    def forward_backward(self, tokens, targets, total_tokens: int | None = None) -> dict:
        """Loss of tokens [B, T] against targets [B, T] (targets < 0 are ignored); adds the
        gradient of the loss to :meth:`grads`. Returns {"loss", "ce", "tokens"}: the mean loss
        (with z-loss), the mean cross-entropy and the number of counted targets. The gradient
        is that of the sum of the losses over ``total_tokens`` (default: the counted targets
        here; data parallelism passes the whole batch's count, so its ranks' gradients add up)."""
        if total_tokens is not None and (isinstance(total_tokens, bool) or not isinstance(total_tokens, int)
                                         or total_tokens < 1):
            raise ValueError(f"total_tokens must be a positive integer, got {total_tokens!r}")
        return self._model.forward_backward(_as_token_array(tokens, "tokens"),
                                            _as_token_array(targets, "targets"), total_tokens or 0)

    def grads(self) -> dict[str, np.ndarray]:
        """The accumulated gradient of every parameter, by spec name (float32, full tensors)."""
        return {name: self.gather(name, self._model.get_grad(name)) for name in self._names}

    def zero_grad(self) -> None:
        self._model.zero_grad()

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, repetition_penalty: float = 1.0, stop_tokens=(1,),
                 seed: int = 0) -> list[list[int]]:
        """New tokens for each prompt (a list of token-id lists), decoded together over a
        key/value cache; a row ends after a stop token (which is emitted) or max_new_tokens.
        ``temperature=0`` is greedy. Sampling follows PALM_SPEC.md "Sampling": the draws of
        row i come from (seed, i, step), whatever the batch or thread count."""
        return self.generation(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               stop_tokens, seed).run()

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, repetition_penalty: float = 1.0, stop_tokens=(1,),
               seed: int = 0) -> Iterator[int]:
        """The new tokens of one prompt (a token-id list) as they are made; arguments as in
        :meth:`generate` (and checked here, before the first token)."""
        return self.generation([token_list(prompt)], max_new_tokens, temperature, top_k, top_p,
                               repetition_penalty, stop_tokens, seed).tokens()

    def generation(self, prompts, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
                   top_p: float = 0.95, repetition_penalty: float = 1.0, stop_tokens=(1,),
                   seed: int = 0) -> Generation:
        """A generation in progress, stepped by the caller (:meth:`Generation.step`): the
        arguments of :meth:`generate`, checked here."""
        settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                     stop_tokens, seed)
        return Generation(self._model, token_lists(prompts), settings)

    def kv_cache(self, slots: int = 1, capacity: int | None = None) -> KVCache:
        """An empty key/value cache of ``slots`` sequences of up to ``capacity`` positions
        (default max_seq_len), for incremental forwards (:meth:`KVCache.feed`)."""
        return KVCache(self._model, slots, self._config.max_seq_len if capacity is None else capacity)


def _as_token_array(values, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D [batch, seq], got shape {array.shape}")
    if array.size and (array.max() > _INT32.max or array.min() < _INT32.min):
        raise ValueError(f"{what} holds ids outside the int32 range")
    return np.ascontiguousarray(array, dtype=np.int32)
