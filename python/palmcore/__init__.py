"""palmcore: a PaLM language-model runtime with a C++ core.

    import palmcore
    cfg = palmcore.PaLMConfig.preset("seed")
    model = palmcore.PaLM(cfg, seed=0)
    out = model.forward_backward(tokens, targets)
    new = model.generate([[1, 17, 42]], max_new_tokens=16)
    text = palmcore.generate("runs/default", "def fibonacci(")
    result = palmcore.train(texts=["my documents", "..."], steps=100)   # see palmcore.training
    palmcore.pipeline("text-generation", model=result)("The quick brown fox", max_length=50)
    palmcore.export_hf(model, tokenizer, "hf-model")    # transformers' CohereForCausalLM
    palmcore.export_gguf(model, tokenizer, "model.gguf", dtype="q8_0")   # llama.cpp
"""

import os as _os
import warnings as _warnings

# OpenMP's idle workers spin before they sleep (libgomp: 300,000 spins by default, about a
# millisecond). A decode step opens dozens of parallel regions; on a machine whose cores other
# processes keep busy, spinning workers take the time slices of the thread they wait for, and
# decoding ran 7-30x slower. A shorter spin keeps the idle speed (the next region starts within
# it) and yields the cores under load (bench/bench_contention.py measures both). libgomp reads
# it once, as it loads with _core: the user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and
# PALMCORE_OMP_DEFAULTS=0 keeps libgomp's. The variable is put back as it was after the load, so
# that child processes inherit the user's environment.
OMP_SPIN_COUNT = 10000
_set_spin = (_os.environ.get("PALMCORE_OMP_DEFAULTS", "1") != "0"
             and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ))
if _set_spin:
    _os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)
try:
    from palmcore import _core
finally:
    if _set_spin:
        del _os.environ["GOMP_SPINCOUNT"]
from palmcore import checks, schedules
from palmcore.config import PaLMConfig
from palmcore.distributed import Mesh
from palmcore.gguf_export import export_gguf
from palmcore.interchange import export_hf, import_hf
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.pipelines import pipeline
from palmcore.text import generate, load
from palmcore.training import TrainResult, train
from palmcore.tokenizer import Tokenizer

__all__ = ["train", "TrainResult", "load", "generate", "pipeline", "export_hf", "export_gguf", "import_hf", "Mesh", "PaLMConfig", "PaLM", "Adafactor", "AdamW", "Tokenizer", "schedules",
           "set_num_threads", "get_num_threads", "set_memory_limit", "get_memory_limit", "cuda_available",
           "set_kernels", "get_kernels", "set_cuda_graphs"]
__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether models and tensors can be made on a CUDA device here: palmcore built with CUDA,
    a driver new enough, a device and cuBLASLt. Never raises; ``_core.cuda_unavailable_reason()``
    says why not."""
    try:
        return not _core.cuda_unavailable_reason()
    except Exception:  # noqa: BLE001  (a question, not an operation: no answer is "no")
        return False


def set_kernels(choice: str) -> None:
    """Which CUDA kernels run where a fast one and a plain, obviously correct one exist
    (attention): "fast" (the default) or "plain", to tell a wrong algorithm from a wrong
    optimisation. Process-wide; ``PALMCORE_KERNELS=plain`` sets it at start-up."""
    _core.set_kernels(choice)


def get_kernels() -> str:
    return _core.kernel_choice()


def set_cuda_graphs(on: bool) -> None:
    """Whether a GPU decode step is captured once as a CUDA graph and replayed (the default), or
    enqueued op by op. Process-wide; ``PALMCORE_CUDA_GRAPHS=0`` turns graphs off at start-up."""
    _core.set_cuda_graphs(bool(on))


def set_num_threads(n: int) -> None:
    """Threads used by every CPU kernel (the BLAS runs single-threaded inside them), for calls
    from any Python thread."""
    _core.set_num_threads(checks.integer("the thread count", n, 1, 1024))


def get_num_threads() -> int:
    return _core.get_num_threads()


def set_memory_limit(limit_bytes: int | None) -> None:
    """Cap the memory palmcore's own tensors may hold at ``limit_bytes`` (None: no cap). With or
    without it, an allocation the machine cannot give is refused: a model, cache or batch too
    large raises ValueError stating the bytes needed and available, and nothing changes."""
    _core.set_memory_limit(0 if limit_bytes is None else checks.integer("the memory limit", limit_bytes, 1))


def get_memory_limit() -> int | None:
    return _core.get_memory_limit() or None


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _memory_limit_from_environment() -> None:
    """PALMCORE_MEMORY_LIMIT: bytes, or a number with K, M, G or T (powers of 1024), e.g. 8G."""
    value = _os.environ.get("PALMCORE_MEMORY_LIMIT")
    if value is None:
        return
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        set_memory_limit(round(float(text[:len(text) - len(unit)]) * _UNITS[unit]))
    except (TypeError, ValueError, OverflowError):
        _warnings.warn(f"PALMCORE_MEMORY_LIMIT={value!r} is not a size such as 8G or 500M; ignored",
                       RuntimeWarning, stacklevel=2)


def _threads_from_environment() -> None:
    """PALMCORE_NUM_THREADS, when set; a bad value is named in a warning and ignored (so that
    the import, and the command line, still work)."""
    value = _os.environ.get("PALMCORE_NUM_THREADS")
    if value is None:
        return
    try:
        set_num_threads(int(value))
    except (TypeError, ValueError):
        _warnings.warn(f"PALMCORE_NUM_THREADS={value!r} is not a thread count in [1, 1024]; ignored "
                       f"(using {get_num_threads()} threads)", RuntimeWarning, stacklevel=2)


_threads_from_environment()
_memory_limit_from_environment()
