"""Merge indexed datasets (`.bin` + `.idx` pairs) into one, atomically.

    python tools/merge_datasets.py --input DIR_OR_PREFIX [...] --output-prefix OUT

A directory contributes every complete pair in it, sorted by name; other files are reported
and skipped. Sequences and documents are concatenated in input order; pointers are recomputed.
Legacy (EOD-less) inputs are written in the correct layout. Nothing appears under OUT unless
the whole merge succeeds.
"""

from __future__ import annotations

import argparse
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
    dataset_exists,
)


def _strip_suffix(path: str) -> str:
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def scan_directory(directory: str) -> tuple[list[str], list[str]]:
    """(dataset prefixes with both files, "skipping PATH: reason" notes), sorted by name."""
    prefixes, notes = [], []
    names = sorted(os.listdir(directory))
    present = set(names)
    for name in names:
        path = os.path.join(directory, name)
        stem, ext = os.path.splitext(name)
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


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Expand directories into their datasets; a non-directory must name a dataset prefix."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found, notes = scan_directory(item)
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


def merge(prefixes: list[str], output_prefix: str) -> dict[str, int]:
    """Write the concatenation of `prefixes` to `output_prefix`; returns summary counts."""
    out = os.path.realpath(output_prefix)
    for prefix in prefixes:
        if os.path.realpath(prefix) == out:
            raise IndexedDatasetError(f"{prefix}.idx: the output prefix is also an input; "
                                      f"choose another --output-prefix")
    datasets = _open_all(prefixes)
    if not datasets:
        raise IndexedDatasetError("no input datasets found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyEodLayoutWarning)  # already reported above
        with MMapIndexedDatasetBuilder(output_prefix, dtype=datasets[0].dtype) as builder:
            for prefix in prefixes:
                builder.merge_file_(prefix)
            builder.finalize()
    return {
        "datasets": len(datasets),
        "sequences": sum(len(ds) for ds in datasets),
        "documents": sum(ds.num_documents for ds in datasets),
        "tokens": sum(ds.num_tokens for ds in datasets),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="directories of .bin/.idx pairs, or dataset prefixes")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = parser.parse_args(argv)
    try:
        prefixes = resolve_inputs(args.input)
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
