"""palmcore: a PaLM language-model runtime with a C++ core.

    import palmcore
    cfg = palmcore.PaLMConfig.preset("seed")
    model = palmcore.PaLM(cfg, seed=0)
    out = model.forward_backward(tokens, targets)
    new = model.generate([[1, 17, 42]], max_new_tokens=16)
    text = palmcore.generate("runs/default", "def fibonacci(")
"""

import os as _os
import warnings as _warnings

from palmcore import _core, checks, schedules
from palmcore.config import PaLMConfig
from palmcore.distributed import Mesh
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.text import generate, load
from palmcore.tokenizer import Tokenizer

__all__ = ["load", "generate", "Mesh", "PaLMConfig", "PaLM", "Adafactor", "AdamW", "Tokenizer", "schedules", "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by every CPU kernel (the BLAS runs single-threaded inside them), for calls
    from any Python thread."""
    _core.set_num_threads(checks.integer("the thread count", n, 1, 1024))


def get_num_threads() -> int:
    return _core.get_num_threads()


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
