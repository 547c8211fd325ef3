#!/usr/bin/env python3
"""The main job on an embedded default, offline: corpus -> BPE vocabulary -> mmap dataset.

1. builds a small English corpus (loose JSON) from the Python standard library's docstrings;
2. trains a GPT-2-format byte-level BPE vocabulary on it (`tools/train_bpe_vocab.py`);
3. preprocesses it with `tools/preprocess_data.py --append-eod --workers 2`;
4. checks the dataset (`tools/inspect_dataset.py --check`) and decodes a document.
Training on it arrives with `pretrain_gpt.py`; every step here is a tool users run themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.data.demo_corpus import build_docstring_corpus  # noqa: E402
from train_bpe_vocab import train_bpe_vocab  # noqa: E402


def _run(step: str, cmd: list) -> None:
    shown = ["python"] + [os.path.relpath(c) if os.path.isabs(c) else c for c in cmd[1:]]
    print(f"\n== {step}: {' '.join(shown)}", flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"demo.py: {step} failed with exit code {result.returncode}")


def _show_first_tokens(dataset: str, vocab: str, merges: str, n: int = 40) -> None:
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab,
                                merge_file=merges)
    ids = MMapIndexedDataset(dataset).get(0, length=n).tolist()
    pieces = [tokenizer.detokenize([i]) for i in ids]
    print(f"\n== first {n} tokens of document 0: {ids}\n   as text pieces: {pieces}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="demo_output")
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()

    docs = build_docstring_corpus(max_bytes=int(args.corpus_mb * 1e6), seed=args.seed)
    corpus = os.path.join(args.out_dir, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"== corpus: {len(docs)} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus}")

    vocab, merges = train_bpe_vocab(docs, args.vocab_size, os.path.join(args.out_dir, "vocab"))
    print(f"== vocabulary: {args.vocab_size} entries -> {vocab}, {merges}")

    prefix = os.path.join(args.out_dir, "demo")
    _run("preprocess", [sys.executable, os.path.join(TOOLS, "preprocess_data.py"),
                        "--input", corpus, "--output-prefix", prefix,
                        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                        "--merge-file", merges, "--append-eod", "--workers", str(args.workers)])
    dataset = f"{prefix}_text_document"
    _run("inspect", [sys.executable, os.path.join(TOOLS, "inspect_dataset.py"), dataset])
    _run("check", [sys.executable, os.path.join(TOOLS, "inspect_dataset.py"), dataset, "--check"])
    _show_first_tokens(dataset, vocab, merges)
    print(f"\ndemo finished in {time.time() - t0:.1f} s; dataset prefix: {prefix}_text_document")
    return 0


if __name__ == "__main__":
    sys.exit(main())
