"""Small file-system helpers shared by the writers and readers of palmcore's files.

Writers build a directory or a file aside and rename it into place (:func:`publish_directory`,
:func:`publish_file`); readers open only regular files of a bounded size (:func:`open_regular`,
:func:`read_json_object`), so that a FIFO, a device or a huge file named like one of palmcore's
files is refused before anything is read from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from typing import BinaryIO, Callable

MAX_JSON_BYTES = 64 * 2**20  # config.json, trainer.json, an index: kilobytes; far beyond them, damage


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


def publish_file(final: str, write: Callable[[str], None]) -> None:
    """Make the file ``final`` whole or not at all: ``write(tmp)`` writes a hidden file beside it
    (``.tmp-<name of final>-`` + random), which is made durable and renamed over ``final``
    (os.replace: a reader sees the old file or the new one, never a part). On an error the hidden
    file goes and ``final`` is as it was. What a killed publish of ``final`` left (hidden regular
    files of exactly that name form) goes first."""
    parent, name = os.path.dirname(final), os.path.basename(final)
    prefix = f".tmp-{name}-"
    mine = re.compile(rf"^{re.escape(prefix)}[a-z0-9_]{{8}}$")
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if mine.match(entry) and not os.path.islink(path) and os.path.isfile(path):
            os.unlink(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def recover_directory(final: str, tmp_prefix: str, aside_name: str) -> None:
    """Tidy up after a :func:`publish_directory` of ``final`` that was killed: its hidden
    ``tmp_prefix``-folders (a half-written new version) go; a previous version waiting aside
    (``.old-<name>-*/<aside_name>``) is put back when ``final`` is missing (a kill between the two
    renames), and removed otherwise. Only folders of exactly those names are touched."""
    parent, name = os.path.dirname(final), os.path.basename(final)
    mine = re.compile(rf"^(?:{re.escape(tmp_prefix)}|{re.escape(f'.old-{name}-')})[a-z0-9_]{{8}}$")
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if not mine.match(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if entry.startswith(".old-"):
            old = os.path.join(path, aside_name)
            if os.listdir(path) not in ([], [aside_name]):
                continue  # not what publish_directory leaves
            if not os.path.lexists(final) and os.path.isdir(old):
                os.rename(old, final)
                fsync_dir(parent)
        shutil.rmtree(path, ignore_errors=True)


def open_regular(path: str, max_bytes: int | None = None) -> BinaryIO:
    """``path`` opened for reading in binary, if it is a regular file (a symlink to one is
    followed) of at most ``max_bytes``; otherwise ValueError naming it and what it is. Opened
    without blocking, so that a FIFO is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is {_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ValueError(f"{path} is too large ({info.st_size} bytes; at most {max_bytes} expected)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def read_json_object(path: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in the regular file ``path`` (at most ``max_bytes``); ValueError naming
    the file for anything else: not a file, too large, not UTF-8, not JSON, nested too deeply,
    not an object."""
    with open_regular(path, max_bytes) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:  # it grew since it was opened
        raise ValueError(f"{path} is too large (more than {max_bytes} bytes)")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is damaged: not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged: a JSON object was expected, got {type(value).__name__}")
    return value
