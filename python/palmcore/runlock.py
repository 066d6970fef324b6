"""One run per folder: an exclusive lock on ``<out>/.lock`` for as long as a run holds it.

The lock is an ``fcntl.flock`` on an open file, so the operating system releases it when the
process ends, however it ends (a crash or kill -9 leaves no stale lock). The file holds the
holder's pid, to name it in the refusal.
"""

from __future__ import annotations

import fcntl
import os


class RunFolderInUse(RuntimeError):
    """Another process is running in this folder."""


class RunLock:
    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self._file = None

    def __enter__(self) -> "RunLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunFolderInUse(f"{os.path.dirname(self.path)} is in use by another palmcore run "
                                 f"(pid {holder}); wait for it to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # closing releases the lock
        self._file = None
