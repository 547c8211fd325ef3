"""Input discovery and line-aligned chunking of loose-JSON files.

Files are read in binary and cut into chunks of whole lines (split on b"\\n") of about
`chunk_bytes`; decoding and parsing happen in the workers, so the reading process only
does large reads and one newline search per chunk.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence

from megatron.data.preprocess.config import DEFAULT_CHUNK_BYTES, PreprocessError

_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """Whole lines `first_line, first_line + 1, ...` (1-based) of input file `file_index`."""

    file_index: int
    first_line: int
    data: bytes          # the lines joined by b"\n"; no trailing newline after the last
    n_bytes: int         # input bytes the chunk stands for (its newlines included)


def expand_inputs(spec: str) -> List[str]:
    """Input files for `--input`: one file, a directory (its regular non-hidden files) or a glob.

    The order is deterministic (sorted by name), so the output never depends on listing order.
    """
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if not n.startswith("."))
        files = [os.path.join(spec, n) for n in names if os.path.isfile(os.path.join(spec, n))]
        if not files:
            raise PreprocessError(f"--input directory {spec!r} has no regular non-hidden files")
        return files
    if os.path.isfile(spec):
        return [spec]
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not files:
            raise PreprocessError(f"--input pattern {spec!r} matches no files")
        return files
    if os.path.exists(spec):
        raise PreprocessError(f"--input {spec!r} is neither a regular file nor a directory")
    raise PreprocessError(f"--input {spec!r} not found")


def iter_chunks(files: Sequence[str],
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Each file's lines, in order, as chunks of about `chunk_bytes` (a line is never split)."""
    for file_index, path in enumerate(files):
        try:
            f = open(path, "rb")
        except OSError as e:
            raise PreprocessError(f"cannot open input {path!r}: {e.strerror}") from None
        with f:
            yield from _file_chunks(f, file_index, chunk_bytes)


def _file_chunks(f, file_index: int, chunk_bytes: int) -> Iterator[Chunk]:
    next_line = 1
    pending = bytearray()   # amortized appends even for a line far longer than a chunk
    while True:
        block = f.read(max(_READ_BYTES, chunk_bytes))
        if not block:
            break
        pending += block
        # Emit every whole-line chunk of about chunk_bytes that `pending` holds.
        start = 0
        while len(pending) - start >= chunk_bytes:
            cut = pending.rfind(b"\n", start, start + chunk_bytes)
            if cut < 0:
                cut = pending.find(b"\n", start + chunk_bytes)   # one line longer than a chunk
                if cut < 0:
                    break
            data = bytes(pending[start:cut])
            yield Chunk(file_index, next_line, data, len(data) + 1)
            next_line += data.count(b"\n") + 1
            start = cut + 1
        del pending[:start]
    # The rest: whole lines plus possibly a last line without a newline.
    if pending:
        n_bytes = len(pending)
        if pending.endswith(b"\n"):
            del pending[-1:]
        yield Chunk(file_index, next_line, bytes(pending), n_bytes)
