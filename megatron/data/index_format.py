"""Byte-level `.idx` format: parse, validate and write Megatron's MMIDIDX index (numpy only).

Validation is split in two so the reader can raise on the first problem while
`tools/inspect_dataset.py --check` reports every problem it can find:
`read_index` (header, lengths, doc_idx) and `layout_problems` (index against the `.bin` size).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<QBQQ")  # version, dtype code, N sequences, M = len(doc_idx)
HEADER_SIZE = len(INDEX_MAGIC) + _HEADER.size  # 34 bytes

# Megatron's dtype codes; the numbers are part of the file format.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}


class IndexedDatasetError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


class LegacyEodLayoutWarning(UserWarning):
    """An index written by the original XMoE preprocess (EOD missing from sizes) was opened."""


def dtype_code(dtype) -> int:
    """The `.idx` code of `dtype`; ValueError for a dtype the format cannot store."""
    dt = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dt:
            return code
    raise ValueError(f"dtype {dt} is not storable in an indexed dataset "
                     f"(supported: {[np.dtype(t).name for t in DTYPE_CODES.values()]})")


@dataclass(frozen=True)
class IndexData:
    """Arrays of an `.idx` as read-only views into its memory map (`buffer`)."""

    path: str
    dtype: np.dtype
    sizes: np.ndarray     # int32 [N]
    pointers: np.ndarray  # int64 [N], byte offsets into .bin
    doc_idx: np.ndarray   # int64 [M]
    buffer: np.ndarray    # keeps the mapping alive


def exclusive_pointers(sizes: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence when sequences are stored back to back."""
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    return pointers


def read_index(path: str, validate: bool = True) -> IndexData:
    """Memory-map and parse `path`; raise IndexedDatasetError naming it when it is unreadable.

    With `validate`, also raise on the first problem of `doc_idx_problems`.
    """
    if not os.path.isfile(path):
        raise IndexedDatasetError(f"{path}: index file not found")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(INDEX_MAGIC)] != INDEX_MAGIC[: len(head)]:
        raise IndexedDatasetError(f"{path}: not an MMIDIDX index (bad magic {head[:9]!r})")
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(f"{path}: truncated header ({file_size} of {HEADER_SIZE} bytes)")
    version, code, n, m = _HEADER.unpack_from(head, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{path}: unsupported index version {version} (expected 1)")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    expected = HEADER_SIZE + 12 * n + 8 * m
    if file_size < expected:
        raise IndexedDatasetError(
            f"{path}: truncated: header declares {n} sequences and {m} doc_idx entries "
            f"({expected} bytes) but the file has {file_size}")
    if file_size > expected:
        raise IndexedDatasetError(f"{path}: {file_size - expected} bytes of trailing garbage after "
                                  f"{n} sequences and {m} doc_idx entries")
    buffer = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    sizes = np.frombuffer(buffer, dtype="<i4", count=n, offset=HEADER_SIZE)
    pointers = np.frombuffer(buffer, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
    doc_idx = np.frombuffer(buffer, dtype="<i8", count=m, offset=HEADER_SIZE + 12 * n)
    index = IndexData(path, np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx, buffer)
    if validate:
        problems = doc_idx_problems(index)
        if problems:
            raise IndexedDatasetError(problems[0])
    return index


def doc_idx_problems(index: IndexData) -> list[str]:
    """Problems of `sizes` and `doc_idx` that make the index unusable, each naming the file."""
    problems = []
    n, doc_idx = len(index.sizes), index.doc_idx
    if n and index.sizes.min() < 0:
        first = int(np.argmax(index.sizes < 0))
        problems.append(f"{index.path}: negative size at sequence {first}")
    if len(doc_idx) == 0:
        return problems + [f"{index.path}: doc_idx is empty (it must start with 0 and end at {n})"]
    if doc_idx[0] != 0:
        problems.append(f"{index.path}: doc_idx starts at {int(doc_idx[0])}, not 0")
    if doc_idx[-1] != n:
        problems.append(f"{index.path}: doc_idx ends at {int(doc_idx[-1])}, not at N={n} sequences")
    decreasing = np.flatnonzero(np.diff(doc_idx) < 0)
    if decreasing.size:
        problems.append(f"{index.path}: doc_idx decreases at entry {int(decreasing[0]) + 1} "
                        f"({decreasing.size} places)")
    return problems


def nonempty_documents(doc_idx: np.ndarray) -> int:
    return int(np.count_nonzero(np.diff(doc_idx) > 0))


def legacy_corrected_sizes(sizes: np.ndarray, doc_idx: np.ndarray) -> np.ndarray:
    """Sizes of an EOD-less legacy index with the EOD counted in each document's last sequence."""
    ends, starts = doc_idx[1:], doc_idx[:-1]
    last = ends[ends > starts] - 1  # empty documents have no sequence (and no EOD) to correct
    corrected = np.array(sizes, dtype=np.int32)
    corrected[last] += 1
    return corrected


def layout_problems(index: IndexData, bin_size: int, bin_path: str | None = None):
    """Classify the index against a `.bin` of `bin_size` bytes: ("ok" | "legacy" | "bad", problems).

    "legacy" is the original XMoE preprocess: pointers follow sizes, and the `.bin` holds one extra
    token (the EOD) per non-empty document. A correct index is always preferred when both fit.
    """
    bin_path = bin_path or index.path[: -len(".idx")] + ".bin"
    itemsize = index.dtype.itemsize
    expected = exclusive_pointers(index.sizes, itemsize)
    mismatch = np.flatnonzero(expected != index.pointers)
    total = int(index.sizes.sum(dtype=np.int64))
    if mismatch.size == 0:
        if bin_size == total * itemsize:
            return "ok", []
        docs = nonempty_documents(index.doc_idx)
        if docs and bin_size == (total + docs) * itemsize:
            return "legacy", []
    problems = []
    if mismatch.size:
        i = int(mismatch[0])
        problems.append(f"{index.path}: pointers disagree with sizes at {mismatch.size} sequences "
                        f"(first: sequence {i} at byte {int(index.pointers[i])}, "
                        f"expected {int(expected[i])})")
    if bin_size != total * itemsize:
        problems.append(f"{bin_path}: size {bin_size} bytes disagrees with the index, which "
                        f"describes {total} tokens of {index.dtype.name} "
                        f"({total * itemsize} bytes)")
    return "bad", problems


def write_index(f, dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write a complete `.idx` to the binary file object `f`; pointers are derived from sizes."""
    dt = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence sizes must lie in [0, 2**31 - 1]")
    f.write(INDEX_MAGIC)
    f.write(_HEADER.pack(INDEX_VERSION, dtype_code(dt), len(sizes), len(doc_idx)))
    f.write(sizes.astype("<i4").tobytes())
    f.write(exclusive_pointers(sizes, dt.itemsize).astype("<i8").tobytes())
    f.write(np.asarray(doc_idx, dtype="<i8").tobytes())
