"""Verify a dataset's index against its `.bin`, and repair the EOD-less legacy index in place.

Used by `tools/inspect_dataset.py --check/--repair`. Unlike the reader, the check reports every
problem it finds instead of raising on the first one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from megatron.data.index_format import (
    IndexedDatasetError,
    doc_idx_problems,
    exclusive_pointers,
    layout_problems,
    legacy_corrected_sizes,
    read_index,
    write_index,
)
from megatron.data.indexed_dataset import data_file_path, index_file_path
from megatron.fileio import atomic_write


@dataclass
class CheckReport:
    """Outcome of `check_dataset`; `ok` is True when the dataset needs nothing."""

    problems: list[str] = field(default_factory=list)
    legacy_eod_layout: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _eod_problems(index, sizes: np.ndarray, bin_path: str, eod: int) -> list[str]:
    """Documents whose last token is not `eod` (empty documents have no last token)."""
    ends, starts = index.doc_idx[1:], index.doc_idx[:-1]
    nonempty = np.flatnonzero(ends > starts)
    if nonempty.size == 0:
        return []
    last_seq = ends[nonempty] - 1
    starts_tok = exclusive_pointers(sizes, index.dtype.itemsize) // index.dtype.itemsize
    last_tok = starts_tok[last_seq] + sizes[last_seq] - 1
    # A document whose last sequence is empty has no token to check there: count it as bad.
    valid = sizes[last_seq] > 0
    good = np.zeros(len(nonempty), dtype=bool)
    if valid.any():  # (np.memmap refuses an empty .bin)
        tokens = np.memmap(bin_path, dtype=index.dtype.newbyteorder("<"), mode="r")
        good[valid] = tokens[last_tok[valid]] == eod
    bad = np.flatnonzero(~good)
    if bad.size == 0:
        return []
    return [f"{bin_path}: {bad.size} of {nonempty.size} documents do not end with EOD id {eod} "
            f"(first: document {int(nonempty[bad[0]])})"]


def check_dataset(prefix: str, eod: int | None = None) -> CheckReport:
    """Check pointers against sizes, the `.bin` size, doc_idx and (with `eod`) document ends."""
    report = CheckReport()
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    if not os.path.isfile(bin_path):
        report.problems.append(f"{bin_path}: data file not found")
    try:
        index = read_index(idx_path, validate=False)
    except IndexedDatasetError as e:
        report.problems.append(str(e))
        return report
    report.problems += doc_idx_problems(index)
    if report.problems:
        return report
    layout, problems = layout_problems(index, os.path.getsize(bin_path), bin_path)
    report.problems += problems
    sizes = index.sizes
    if layout == "legacy":
        report.legacy_eod_layout = True
        report.problems.append(
            f"{idx_path}: legacy layout of the original XMoE preprocess: sizes leave out each "
            f"document's EOD, which the .bin holds (fix with --repair)")
        sizes = legacy_corrected_sizes(index.sizes, index.doc_idx)
    if eod is not None and layout != "bad":
        report.problems += _eod_problems(index, sizes, bin_path, eod)
    return report


def repair_index(prefix: str) -> bool:
    """Rewrite a legacy index with correct sizes and pointers; False when it was already correct.

    Raises IndexedDatasetError when the index has any other problem. The `.bin` is not touched;
    the new `.idx` is written to a temporary file, synced, then renamed over the old one.
    """
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    if not os.path.isfile(bin_path):
        raise IndexedDatasetError(f"{bin_path}: data file not found")
    index = read_index(idx_path)
    layout, problems = layout_problems(index, os.path.getsize(bin_path), bin_path)
    if problems:
        raise IndexedDatasetError(f"cannot repair: {problems[0]}")
    if layout == "ok":
        return False
    sizes = legacy_corrected_sizes(index.sizes, index.doc_idx)
    with atomic_write(idx_path) as f:
        write_index(f, index.dtype, sizes, np.array(index.doc_idx))
    return True
