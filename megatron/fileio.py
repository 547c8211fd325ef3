"""Crash-safe file writes shared by datasets, indices, vocabularies and checkpoints.

A reader must never see a torn file under its final name: write a hidden temporary file in the
same folder (same filesystem, so the rename is atomic), flush and fsync it, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator


def temporary_path(path: str) -> str:
    """A hidden, unique name next to `path` (`.NAME.<pid>.<random>.tmp`)."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Yield a file that becomes `path` only if the block ends without an exception."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
