"""Atomic writes: every file gpucredit writes goes to a temporary name beside its target and
is renamed over it, so a reader never sees half a file and a failed write leaves nothing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["temporary_sibling", "write_atomically"]


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name in `path`'s directory: `.name.<pid>.<random>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary)` on a fresh name in `path`'s directory (same file system, so
    the rename is atomic; not mkstemp, whose 0600 mode would survive the rename), then rename
    it over `path`. If anything fails the temporary file is removed and the exception
    propagates (callers turn OSError into their own clear error). Returns `path`."""
    target = Path(path)
    temporary = temporary_sibling(target)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target
