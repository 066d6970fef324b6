"""Small file-system helpers shared by the writers of a run's files."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(final: str, write: Callable[[str], None], tmp_prefix: str, aside_name: str) -> None:
    """Make the directory ``final`` whole or not at all: ``write(tmp)`` fills a hidden folder
    beside it (named ``tmp_prefix`` + random), which is then renamed into place. An existing
    ``final`` stays whole until the new one is in: it is first moved aside, to
    ``.old-<name of final>-*/<aside_name>`` (a reader that finds such a folder after a crash can
    put it back), and removed after. On an error the hidden folder goes and ``final`` is as it was."""
    parent, name = os.path.dirname(final), os.path.basename(final)
    tmp = tempfile.mkdtemp(dir=parent, prefix=tmp_prefix)
    try:
        os.chmod(tmp, 0o777 & ~umask())
        write(tmp)
        fsync_dir(tmp)
        aside = None
        if os.path.exists(final):
            aside = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
            os.rename(final, os.path.join(aside, aside_name))
        os.rename(tmp, final)
        fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
