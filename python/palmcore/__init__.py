"""palmcore: a PaLM language-model runtime with a C++ core.

    import palmcore
    cfg = palmcore.PaLMConfig.preset("seed")
    model = palmcore.PaLM(cfg, seed=0)
    out = model.forward_backward(tokens, targets)
    new = model.generate([[1, 17, 42]], max_new_tokens=16)
    text = palmcore.generate("runs/default", "def fibonacci(")
"""

import os as _os

from palmcore import _core, schedules
from palmcore.checkpoint import load_pretrained as load
from palmcore.config import PaLMConfig
from palmcore.distributed import Mesh
from palmcore.generation import generate_text as generate
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.tokenizer import Tokenizer

__all__ = ["load", "generate", "Mesh", "PaLMConfig", "PaLM", "Adafactor", "AdamW", "Tokenizer", "schedules", "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by every CPU kernel (the BLAS runs single-threaded inside them), for calls
    from any Python thread."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ValueError(f"the thread count must be a positive integer, got {n!r} (at most 1024)")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def _threads_from_environment() -> None:
    value = _os.environ.get("PALMCORE_NUM_THREADS")
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"PALMCORE_NUM_THREADS must be a positive integer, got {value!r}") from None
    set_num_threads(n)


_threads_from_environment()
