"""Durable, atomic file-system writes: the one implementation every writer of checkpoints,
converted models, tiny test models and disk weight syncs uses.

The pattern: write everything under a temporary sibling name, :func:`fsync_tree` it, rename it
into place, then :func:`fsync_dir` the parent so the rename itself survives a crash. A reader
never sees a half-written directory under the final name.
"""

from __future__ import annotations

import os
from typing import Callable, BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's contents to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory below ``root`` (``root`` included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def write_file(path: str | os.PathLike, fill: Callable[[BinaryIO], object]) -> None:
    """Create ``path``, let ``fill`` write it, flush it to disk."""
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: str | os.PathLike, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` whole or not at all: ``fill`` writes a temporary sibling, which is flushed
    to disk and renamed over ``path``; the rename is flushed too."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    write_file(tmp, fill)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
