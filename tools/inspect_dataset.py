"""Inspect, check or repair an indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

    python tools/inspect_dataset.py PREFIX                 # counts, dtype, length histogram
    python tools/inspect_dataset.py PREFIX --show-doc 3 --vocab-file V --merge-file M
    python tools/inspect_dataset.py PREFIX --check [--eod 50256]   # exit 1 when anything is wrong
    python tools/inspect_dataset.py PREFIX --repair        # fix the original XMoE EOD-less index
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

try:
    import megatron  # noqa: F401  (installed with pip, or run from a directory on sys.path)
except ImportError:  # `python tools/inspect_dataset.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron.data.index_check import check_dataset, repair_index  # noqa: E402
from megatron.data.indexed_dataset import (  # noqa: E402
    LegacyEodLayoutWarning,
    MMapIndexedDataset,
)


def size_histogram(sizes: np.ndarray) -> list[tuple[str, int]]:
    """Sequence counts in log2 buckets of length: "0", "1", "2-3", "4-7", ... (non-empty only)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    rows = []
    zero = int(np.count_nonzero(sizes == 0))
    if zero:
        rows.append(("0", zero))
    positive = sizes[sizes > 0]
    if positive.size:
        buckets = np.floor(np.log2(positive)).astype(np.int64)
        counts = np.bincount(buckets)
        for b, count in enumerate(counts):
            if count:
                lo, hi = 1 << b, (1 << (b + 1)) - 1
                rows.append((str(lo) if lo == hi else f"{lo}-{hi}", int(count)))
    return rows


def summarize(ds: MMapIndexedDataset) -> str:
    lines = [
        f"dataset   {ds.path_prefix}",
        f"dtype     {ds.dtype.name}",
        f"documents {ds.num_documents}",
        f"sequences {len(ds)}",
        f"tokens    {ds.num_tokens}",
    ]
    if ds.legacy_eod_layout:
        lines.append("layout    legacy EOD-less index (corrected in memory; run --repair)")
    if len(ds):
        lines.append("sequence length histogram:")
        lines += [f"  {label:>11}  {count}" for label, count in size_histogram(ds.sizes)]
    return "\n".join(lines)


def show_document(ds: MMapIndexedDataset, k: int,
                  vocab_file: str | None, merge_file: str | None) -> str:
    """Token ids of document `k`, sequence by sequence, decoded when a GPT-2 vocab is given."""
    if not 0 <= k < ds.num_documents:
        raise IndexError(f"--show-doc {k}: the dataset has {ds.num_documents} documents")
    lo, hi = int(ds.doc_idx[k]), int(ds.doc_idx[k + 1])
    tokenizer = None
    if vocab_file and merge_file:
        from megatron.tokenizer import build_tokenizer  # lazy: only needed to decode

        tokenizer = build_tokenizer(tokenizer_type="GPT2BPETokenizer",
                                    vocab_file=vocab_file, merge_file=merge_file)
    if lo == hi:
        return f"document {k}: empty (no sequences)"
    lines = [f"document {k}: sequences {lo}..{hi - 1} ({hi - lo} sequences)"]
    for i in range(lo, hi):
        ids = ds.get(i).tolist()
        lines.append(f"  sequence {i} ({len(ids)} tokens): {ids}")
        if tokenizer is not None:
            lines.append(f"  text: {tokenizer.detokenize(ids)!r}")
    return "\n".join(lines)


def run_check(prefix: str, eod: int | None) -> int:
    report = check_dataset(prefix, eod=eod)
    for problem in report.problems:
        print(f"problem: {problem}")
    if report.ok:
        ends = f" (every document ends with {eod})" if eod is not None else ""
        print(f"ok: {prefix} is consistent{ends}")
    return 0 if report.ok else 1


def run_repair(prefix: str) -> int:
    if repair_index(prefix):
        print(f"repaired {prefix}.idx: EOD now counted in sizes, pointers recomputed")
    else:
        print(f"{prefix}.idx is already in the correct layout; nothing to repair")
    return run_check(prefix, eod=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--check", action="store_true", help="verify the index against the .bin")
    parser.add_argument("--eod", type=int, default=None,
                        help="with --check: every document ends with this id")
    parser.add_argument("--repair", action="store_true", help="rewrite a legacy EOD-less index")
    parser.add_argument("--show-doc", type=int, default=None, metavar="K", help="print document K")
    parser.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json, to decode --show-doc")
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges.txt, to decode --show-doc")
    args = parser.parse_args(argv)
    prefix = args.prefix
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    if args.eod is not None and not args.check:
        parser.error("--eod only applies with --check")
    if (args.vocab_file is None) != (args.merge_file is None):
        parser.error("--vocab-file and --merge-file go together")
    try:
        if args.repair:
            return run_repair(prefix)
        if args.check:
            return run_check(prefix, args.eod)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LegacyEodLayoutWarning)  # summarize() says it
            ds = MMapIndexedDataset(prefix)
        print(summarize(ds))
        if args.show_doc is not None:
            print(show_document(ds, args.show_doc, args.vocab_file, args.merge_file))
    except (ValueError, OSError, IndexError, ImportError) as e:  # IndexedDatasetError: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
