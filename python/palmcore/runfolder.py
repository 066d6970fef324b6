"""What a run folder holds, and replacing the run in it (``palmcore train --force``) so that a
crash at any moment leaves the old run or the new one, never neither.

A run is the entries of RUN_ENTRIES in its folder (anything else there is left alone). Replacing
it, under the run's lock:

1. the old entries are moved, one rename each, into ``.replacing-run/``, which is then renamed
   ``.replaced-run/`` (so ``.replaced-run`` always holds the whole old run);
2. the new run starts: its tokenizer, token cache and first checkpoint;
3. ``.replaced-run`` is removed.

If the new run fails before its first checkpoint, its entries are removed and the old ones put
back. A crash anywhere is repaired by the next start in the folder (``recover``): an
interrupted step 1 is undone; after step 1 the old run comes back unless the new one has a
complete checkpoint, in which case the old one is removed.
"""

from __future__ import annotations

import os
import shutil

from palmcore import checkpoint

RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "loss.png", "tokenizer.model", "tokenizer.vocab", "data", "texts")
_MOVING = ".replacing-run"
_ASIDE = ".replaced-run"


def run_entries(folder: str) -> list[str]:
    """The names of RUN_ENTRIES present in ``folder``: a run (or what is left of one) is there
    when this is not empty."""
    return [name for name in RUN_ENTRIES if os.path.lexists(os.path.join(folder, name))]


def started(folder: str) -> bool:
    """Whether the run in ``folder`` has a complete checkpoint."""
    return checkpoint.latest(os.path.join(folder, "checkpoints")) is not None


def recover(folder: str) -> None:
    """Finish or undo a replacement that a crash cut short (see the module's docstring)."""
    moving, aside = os.path.join(folder, _MOVING), os.path.join(folder, _ASIDE)
    if os.path.isdir(moving):
        _move_all(moving, folder)   # step 1 was cut short: nothing new was written yet
        os.rmdir(moving)
    if os.path.isdir(aside):
        if started(folder):
            shutil.rmtree(aside)
        else:
            _put_back(folder)


class Replacement:
    """Moves the run in ``folder`` aside (step 1); ``discard()`` removes it once the new run has
    started; leaving the ``with`` block by an exception before that puts it back."""

    def __init__(self, folder: str):
        self.folder = folder
        self.done = False

    def __enter__(self) -> "Replacement":
        moving = os.path.join(self.folder, _MOVING)
        os.mkdir(moving)
        for name in run_entries(self.folder):
            os.rename(os.path.join(self.folder, name), os.path.join(moving, name))
        os.rename(moving, os.path.join(self.folder, _ASIDE))
        return self

    def discard(self) -> None:
        """The new run has its first checkpoint: the old one goes."""
        if not self.done:
            shutil.rmtree(os.path.join(self.folder, _ASIDE))
            self.done = True

    def __exit__(self, kind, error, traceback) -> None:
        if not self.done:
            _put_back(self.folder)


def _put_back(folder: str) -> None:
    """The new run's entries out, the old run's back in."""
    for name in run_entries(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    aside = os.path.join(folder, _ASIDE)
    _move_all(aside, folder)
    os.rmdir(aside)


def _move_all(source: str, target: str) -> None:
    for name in os.listdir(source):
        os.rename(os.path.join(source, name), os.path.join(target, name))
