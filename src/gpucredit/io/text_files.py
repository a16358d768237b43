"""Reading a small text input (an assumptions file, a results summary): a regular file of
bounded size in UTF-8, or a clear refusal. A FIFO, /dev/zero or a directory given where a
file is expected must not hang the program or end in a traceback."""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_TEXT_BYTES", "TextFileError", "read_text_file"]

# The default assumptions file is 7 kB and a summary.json some hundred kB: far above either.
MAX_TEXT_BYTES = 16 * 2**20


class TextFileError(Exception):
    """The file is not a readable regular UTF-8 file; the message does not repeat the path
    (callers put it in front)."""


def read_text_file(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of `path`. Raises TextFileError for a missing or unreadable file, anything
    but a regular file, more than `max_bytes` bytes, or bytes that are not UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise TextFileError(f"cannot read the file: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode  # of what was opened: nothing can be swapped in after
        if stat.S_ISDIR(mode):
            raise TextFileError("is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise TextFileError("is not a regular file (a FIFO, device or socket): give a file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)  # + 1: a file that grew past the limit shows it
    except OSError as error:
        raise TextFileError(f"cannot read the file: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise TextFileError(f"is larger than {max_bytes:,} bytes: not a file of this kind")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TextFileError(
            f"is not UTF-8 text: byte {data[error.start : error.start + 1]!r} at line {line} "
            f"(offset {error.start}); save it as UTF-8"
        ) from None
