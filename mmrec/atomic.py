"""Write a file or a folder whole or not at all.

The content is written under a temporary name beside its final one, then renamed over it
with ``os.replace``: a reader sees the old content or the new, never half of either. A
folder already at the final name is moved aside first, under a hidden name of its own
(a rename cannot replace a non-empty folder), and deleted once the new one is in place;
between those two renames the final name briefly does not exist. With ``durable=True`` every
file and folder of the new content, and the parent folder after the rename, are fsynced,
so a power cut after the write cannot leave the rename without the data.

Checkpoints (``mmrec.checkpoint``), ``metrics.jsonl`` (``mmrec.metrics``), state files
(``mmrec.state``) and token shard folders (``mmrec.data.prepare``) are written this way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fsync", "remove", "replacing"]


def remove(path: Path) -> None:
    """Delete a file or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """fsync a file, or a folder and everything in it."""
    if path.is_dir():
        for p in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):  # contents before their folders
            if p.is_file():
                _fsync_file(p)
            else:
                _fsync_dir(p)
        _fsync_dir(path)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(final: Path, tmp: Path | None = None, durable: bool = True) -> Iterator[Path]:
    """Yield ``tmp`` (default ``.<name>.tmp`` beside ``final``), emptied of what an
    interrupted write left there, to write ``final``'s new content into (a file, or a
    folder the caller creates); when the block ends, rename it to ``final``. When the block
    raises, ``tmp`` is deleted and ``final`` is left as it was."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else final.with_name(f".{final.name}.tmp")
    remove(tmp)
    try:
        yield tmp
        if durable:
            fsync(tmp)
        _rename(tmp, final)
    except BaseException:
        remove(tmp)
        raise
    if durable:
        _fsync_dir(final.parent)


def _rename(tmp: Path, final: Path) -> None:
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
        return
    # a rename cannot replace a folder: move it aside, under a name no user file has
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove(old)
