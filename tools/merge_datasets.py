"""Merge indexed datasets (`.bin` + `.idx` pairs) into one, atomically.

    python tools/merge_datasets.py --input DIR_OR_PREFIX [...] --output-prefix OUT

A directory contributes every complete pair in it, sorted by name; other files are reported
and skipped, hidden ones (writers' temporaries and locks) silently, and so is OUT itself when it
lies in the directory (running the same merge twice rewrites OUT from the same inputs).
Sequences and documents are concatenated in input order; pointers are recomputed. Legacy
(EOD-less) inputs are written in the correct layout. Nothing appears under OUT unless the
whole merge succeeds. Every merged dataset is listed with its counts.

Beside OUT the merge records its inputs in `OUT.merge.json`. A later merge refuses an input
that is an earlier merge of its other inputs (every document would appear twice): one the
record says so of, or, without a record, one with exactly as many documents, sequences and
tokens as all the other inputs together. `--exclude PREFIX` leaves such a dataset out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

try:
    import megatron  # noqa: F401  (installed with pip, or run from a directory on sys.path)
except ImportError:  # `python tools/merge_datasets.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetError,
    LegacyEodLayoutWarning,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    dataset_exists,
)
from megatron.fileio import atomic_write  # noqa: E402

RECORD_SUFFIX = ".merge.json"
COUNTS = ("documents", "sequences", "tokens", "bin_bytes")


def _strip_suffix(path: str) -> str:
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def scan_directory(directory: str) -> tuple[list[str], list[str]]:
    """(dataset prefixes with both files, "skipping PATH: reason" notes), sorted by name.

    Hidden names are writers' temporaries and locks: skipped without a note, like a dataset's
    merge record (`NAME.merge.json` beside NAME.bin/.idx).
    """
    prefixes, notes = [], []
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    present = set(names)
    for name in names:
        path = os.path.join(directory, name)
        stem, ext = os.path.splitext(name)
        if name.endswith(RECORD_SUFFIX) and name[:-len(RECORD_SUFFIX)] + ".idx" in present:
            continue
        if os.path.isdir(path):
            notes.append(f"skipping {path}: a directory (not searched recursively)")
        elif ext == ".idx":
            if stem + ".bin" in present:
                prefixes.append(os.path.join(directory, stem))
            else:
                notes.append(f"skipping {path}: no matching {stem}.bin")
        elif ext == ".bin":
            if stem + ".idx" not in present:
                notes.append(f"skipping {path}: no matching {stem}.idx")
        else:
            notes.append(f"skipping {path}: not a .bin/.idx dataset file")
    return prefixes, notes


def resolve_inputs(inputs: list[str], output_prefix: str) -> list[str]:
    """Expand directories into their datasets (never the output itself); a non-directory must
    name a dataset prefix."""
    prefixes = []
    out = os.path.realpath(output_prefix)
    for item in inputs:
        if os.path.isdir(item):
            found, notes = scan_directory(item)
            for prefix in [p for p in found if os.path.realpath(p) == out]:
                found.remove(prefix)
                notes.append(f"skipping {prefix}: the output of this merge (rewritten)")
            for note in notes:
                print(note, file=sys.stderr)
            if not found:
                print(f"skipping {item}: no .bin/.idx pairs in this directory", file=sys.stderr)
            prefixes += found
        else:
            prefix = _strip_suffix(item)
            if not dataset_exists(prefix):
                raise IndexedDatasetError(
                    f"{item}: no dataset here (needs {prefix}.bin and {prefix}.idx)")
            prefixes.append(prefix)
    return prefixes


def exclude_inputs(prefixes: list[str], excluded: list[str]) -> list[str]:
    """`prefixes` without those --exclude names (with or without .bin/.idx)."""
    kept = list(prefixes)
    for item in excluded:
        target = os.path.realpath(_strip_suffix(item))
        matching = [p for p in kept if os.path.realpath(p) == target]
        if not matching:
            raise ValueError(f"--exclude {item}: not among the inputs")
        kept = [p for p in kept if p not in matching]
    return kept


def _open_all(prefixes: list[str]) -> list[MMapIndexedDataset]:
    """Open (and so validate) every input before any byte is written; dtypes must agree."""
    datasets = []
    for prefix in prefixes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LegacyEodLayoutWarning)
            ds = MMapIndexedDataset(prefix)
        if caught:
            print(f"note: {prefix}: legacy EOD-less index, merged in the correct layout",
                  file=sys.stderr)
        if datasets and ds.dtype != datasets[0].dtype:
            raise IndexedDatasetError(
                f"{prefix}.idx: dtype {ds.dtype.name} does not match {datasets[0].dtype.name} "
                f"of {prefixes[0]}.idx")
        datasets.append(ds)
    return datasets


def _counts(prefix: str, ds: MMapIndexedDataset) -> dict[str, int]:
    return {"documents": ds.num_documents, "sequences": len(ds), "tokens": ds.num_tokens,
            "bin_bytes": os.path.getsize(data_file_path(prefix))}


def read_record(prefix: str, counts: dict[str, int]) -> list[dict] | None:
    """The inputs `PREFIX.merge.json` lists; None without a record, or when the record no
    longer describes the dataset (rewritten since by something else)."""
    path = prefix + RECORD_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if any(record["output"][k] != counts[k] for k in COUNTS):
            return None
        inputs = record["inputs"]
        if not all(isinstance(e, dict) and isinstance(e.get("prefix"), str) for e in inputs):
            raise TypeError("an input without a prefix")
        return inputs
    except (OSError, ValueError, KeyError, TypeError):
        print(f"note: ignoring {path}: not a readable merge record", file=sys.stderr)
        return None


def _recorded(entry: dict, prefix: str, counts: dict[str, int]) -> bool:
    """A record entry names this dataset: same name (the folder may have moved), same counts."""
    same_name = (os.path.basename(entry["prefix"]) == os.path.basename(prefix)
                 or os.path.realpath(entry["prefix"]) == os.path.realpath(prefix))
    return same_name and all(entry.get(k) == counts[k] for k in COUNTS)


def check_no_earlier_merge(prefixes: list[str], counts: list[dict[str, int]]) -> None:
    """Refuse an input that is an earlier merge of other inputs (their documents twice)."""
    for i, prefix in enumerate(prefixes):
        others = [j for j, p in enumerate(prefixes)
                  if os.path.realpath(p) != os.path.realpath(prefix)]
        entries = read_record(prefix, counts[i])
        if entries is not None:
            inside = [prefixes[j] for j in others
                      if any(_recorded(e, prefixes[j], counts[j]) for e in entries)]
            if inside:
                raise IndexedDatasetError(
                    f"{prefix}: an earlier merge of {', '.join(inside)} (per {prefix}"
                    f"{RECORD_SUFFIX}), inputs of this merge too, whose documents would appear "
                    f"twice; leave it out with --exclude {prefix}")
        elif len(others) >= 2 and counts[i]["documents"] and all(
                counts[i][k] == sum(counts[j][k] for j in others) for k in COUNTS[:3]):
            raise IndexedDatasetError(
                f"{prefix}: as many documents, sequences and tokens as all the other inputs "
                f"together, so probably an earlier merge of them whose documents would appear "
                f"twice; leave it out with --exclude {prefix}")


def write_record(output_prefix: str, prefixes: list[str], counts: list[dict[str, int]],
                 total: dict[str, int]) -> None:
    """`OUT.merge.json`: the inputs with their counts, for check_no_earlier_merge later."""
    record = {"merged_by": "tools/merge_datasets.py", "output": total,
              "inputs": [{"prefix": os.path.abspath(p), **c} for p, c in zip(prefixes, counts)]}
    try:
        with atomic_write(output_prefix + RECORD_SUFFIX, "w") as f:
            json.dump(record, f, indent=1)
    except OSError as e:  # the dataset itself is complete: say what is missing, not fail
        print(f"note: {output_prefix}{RECORD_SUFFIX} not written ({e}); a later merge cannot "
              f"tell that {output_prefix} is a merge", file=sys.stderr)


def merge(prefixes: list[str], output_prefix: str) -> dict[str, int]:
    """Write the concatenation of `prefixes` to `output_prefix`, listing each input on stdout;
    returns summary counts."""
    out = os.path.realpath(output_prefix)
    for prefix in prefixes:
        if os.path.realpath(prefix) == out:
            raise IndexedDatasetError(f"{prefix}.idx: the output prefix is also an input; "
                                      f"choose another --output-prefix")
    datasets = _open_all(prefixes)
    if not datasets:
        raise IndexedDatasetError("no input datasets found")
    counts = [_counts(p, ds) for p, ds in zip(prefixes, datasets)]
    check_no_earlier_merge(prefixes, counts)
    for prefix, c in zip(prefixes, counts):
        print(f"merging {prefix}: {c['documents']} documents, {c['sequences']} sequences, "
              f"{c['tokens']} tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyEodLayoutWarning)  # already reported above
        with MMapIndexedDatasetBuilder(output_prefix, dtype=datasets[0].dtype) as builder:
            for prefix in prefixes:
                builder.merge_file_(prefix)
            builder.finalize()
    total = {k: sum(c[k] for c in counts) for k in COUNTS}
    write_record(output_prefix, prefixes, counts, total)
    return {"datasets": len(datasets), **total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="directories of .bin/.idx pairs, or dataset prefixes")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PREFIX",
                        help="leave these datasets out (e.g. an earlier merge in an --input "
                             "directory)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = parser.parse_args(argv)
    try:
        prefixes = exclude_inputs(resolve_inputs(args.input, args.output_prefix), args.exclude)
        summary = merge(prefixes, args.output_prefix)
    except (ValueError, OSError) as e:  # IndexedDatasetError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {summary['datasets']} datasets into {args.output_prefix}: "
          f"{summary['sequences']} sequences, {summary['documents']} documents, "
          f"{summary['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
