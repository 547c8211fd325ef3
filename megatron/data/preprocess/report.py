"""Run statistics, rate-limited progress lines and the end-of-run summary (all to stderr)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, TextIO

from megatron.data.preprocess.encode import BLANK, ChunkResult

MB = 1e6
MIN_SECONDS_BETWEEN_LINES = 2.0


@dataclass
class KeyStats:
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)   # EMPTY_TEXT / NO_TOKENS
    bytes_out: int = 0


@dataclass
class RunStats:
    keys: Dict[str, KeyStats]
    files: int = 0
    lines: int = 0
    documents: int = 0           # good non-blank lines
    bytes_in: int = 0
    skipped_lines: Counter = field(default_factory=Counter)   # BLANK and bad-line reasons
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def for_keys(cls, keys: Sequence[str], files: int, start: float) -> "RunStats":
        return cls({k: KeyStats() for k in keys}, files=files, start=start)

    def add(self, result: ChunkResult) -> None:
        self.lines += result.n_lines
        self.bytes_in += result.n_bytes
        self.documents += result.n_docs
        if result.n_blank:
            self.skipped_lines[BLANK] += result.n_blank
        for bad in result.bad_lines:
            self.skipped_lines[bad.reason] += 1
        for key, out in result.keys.items():
            ks = self.keys[key]
            ks.documents += len(out.doc_seq_counts)
            ks.sequences += len(out.seq_lengths)
            ks.tokens += len(out.tokens)
            ks.skipped.update({r: n for r, n in out.skipped.items() if n})

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class ProgressLog:
    """One line per `interval` documents, but never more than one per MIN_SECONDS_BETWEEN_LINES."""

    def __init__(self, interval: int, stream: TextIO = sys.stderr):
        self.interval = interval
        self.stream = stream
        self._next = interval
        self._last_time = float("-inf")

    def update(self, stats: RunStats) -> None:
        if stats.lines < self._next:
            return
        now = time.perf_counter()
        if now - self._last_time < MIN_SECONDS_BETWEEN_LINES:
            return
        self._last_time = now
        self._next = (stats.lines // self.interval + 1) * self.interval
        t = stats.elapsed()
        print(f"processed {stats.lines:,} lines, {stats.documents:,} documents "
              f"({stats.documents / t:,.1f} docs/s, {stats.bytes_in / MB / t:.2f} MB/s)",
              file=self.stream, flush=True)


def summary_lines(stats: RunStats) -> List[str]:
    """The end-of-run summary: input, per-key output, what was skipped and why, wall time."""
    t = stats.elapsed()
    lines = [f"summary: read {stats.files} file(s), {stats.lines:,} lines, "
             f"{stats.documents:,} documents, {stats.bytes_in:,} bytes in {t:.2f} s "
             f"({stats.bytes_in / MB / t:.2f} MB/s, {stats.documents / t:,.1f} docs/s)"]
    for key, ks in stats.keys.items():
        skipped = sum(ks.skipped.values())
        lines.append(f"summary: key {key!r}: {ks.documents:,} documents written, "
                     f"{ks.sequences:,} sequences, {ks.tokens:,} tokens, {ks.bytes_out:,} bytes out"
                     f"; {skipped:,} documents skipped{_reasons(ks.skipped)}")
    n_skipped = sum(stats.skipped_lines.values())
    lines.append(f"summary: {n_skipped:,} lines skipped{_reasons(stats.skipped_lines)}")
    return lines


def _reasons(counts: Counter) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{r}: {n:,}" for r, n in sorted(counts.items())) + ")"
